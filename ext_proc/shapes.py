"""API shapes spendgate meters: how to recognise a request, prepare it, meter
its response, and word an error in its clients' dialect.

One entry per shape; adding a provider API means a meter module in meters/
and an entry here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ext_proc import dialects
from ext_proc.meters.anthropic_messages import AnthropicMessagesMeter
from ext_proc.meters.base import Meter
from ext_proc.meters.bedrock_converse import BedrockConverseMeter, bedrock_model_from_path
from ext_proc.meters.gemini import GeminiMeter, gemini_model_from_path
from ext_proc.meters.openai_chat import OpenAIChatMeter
from ext_proc.meters.openai_embeddings import OpenAIEmbeddingsMeter
from ext_proc.meters.openai_responses import OpenAIResponsesMeter

# (request path, response content-type, model named in the path) -> meter
MeterFactory = Callable[[str, str, "str | None"], Meter]


@dataclass(frozen=True, slots=True)
class ApiShape:
    name: str
    provider: str  # when the route does not name one
    new_meter: MeterFactory
    dialect: dialects.Dialect
    # Whether the request body is needed (for `model`, `stream`, or to change it).
    needs_request_body: bool = True
    model_from_path: Callable[[str], str | None] | None = None
    # Mutates the parsed request body so the response carries usage; returns
    # True when it changed something.
    prepare_request: Callable[[dict[str, Any]], bool] = lambda body: False


def _openai_chat_prepare(body: dict[str, Any]) -> bool:
    """Streaming chat responses carry usage only when asked; ask."""
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if isinstance(options, dict):
        if options.get("include_usage") is True:
            return False
        options["include_usage"] = True
    else:
        body["stream_options"] = {"include_usage": True}
    return True


def _sse(content_type: str) -> bool:
    return "text/event-stream" in content_type


OPENAI_CHAT = ApiShape(
    name="openai_chat",
    provider="openai",
    new_meter=lambda path, ctype, model: OpenAIChatMeter(streaming=_sse(ctype)),
    dialect=dialects.openai,
    prepare_request=_openai_chat_prepare,
)
OPENAI_RESPONSES = ApiShape(
    name="openai_responses",
    provider="openai",
    new_meter=lambda path, ctype, model: OpenAIResponsesMeter(streaming=_sse(ctype)),
    dialect=dialects.openai,
)
OPENAI_EMBEDDINGS = ApiShape(
    name="openai_embeddings",
    provider="openai",
    new_meter=lambda path, ctype, model: OpenAIEmbeddingsMeter(),
    dialect=dialects.openai,
)
ANTHROPIC_MESSAGES = ApiShape(
    name="anthropic_messages",
    provider="anthropic",
    new_meter=lambda path, ctype, model: AnthropicMessagesMeter(streaming=_sse(ctype)),
    dialect=dialects.anthropic,
)
GEMINI = ApiShape(
    name="gemini",
    provider="google",
    new_meter=lambda path, ctype, model: GeminiMeter(
        streaming=":streamGenerateContent" in path, model_from_path=model
    ),
    dialect=dialects.google,
    needs_request_body=False,
    model_from_path=gemini_model_from_path,
)
BEDROCK_CONVERSE = ApiShape(
    name="bedrock_converse",
    provider="bedrock",
    new_meter=lambda path, ctype, model: BedrockConverseMeter(
        streaming=path.split("?", 1)[0].rstrip("/").endswith("/converse-stream"),
        model_from_path=model,
    ),
    dialect=dialects.aws,
    needs_request_body=False,
    model_from_path=bedrock_model_from_path,
)

_GEMINI_PATH = re.compile(r"/models/[^/]+:(generateContent|streamGenerateContent)$")
_BEDROCK_PATH = re.compile(r"/model/[^?]+/(converse|converse-stream)$")


def detect(method: str, path: str) -> ApiShape | None:
    """The shape of a request from its method and path (query ignored)."""
    if method != "POST":
        return None
    path = path.split("?", 1)[0].rstrip("/")
    # OpenAI, Azure OpenAI (/openai/deployments/{d}/...) and OpenAI-compatible
    # servers mounted under any prefix.
    if path.endswith("/chat/completions"):
        return OPENAI_CHAT
    if path.endswith("/responses"):
        return OPENAI_RESPONSES
    if path.endswith("/embeddings"):
        return OPENAI_EMBEDDINGS
    if path.endswith("/v1/messages"):
        return ANTHROPIC_MESSAGES
    if _GEMINI_PATH.search(path):
        return GEMINI
    if _BEDROCK_PATH.search(path):
        return BEDROCK_CONVERSE
    return None
