"""API shapes spendgate meters: how to recognise a request, prepare it, meter
its response, and word an error in its clients' dialect.

One entry per shape; adding a provider API means a meter module in meters/
and an entry here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ext_proc.metering.meters.anthropic_messages import AnthropicMessagesMeter
from ext_proc.metering.meters.base import Meter
from ext_proc.metering.meters.bedrock_converse import BedrockConverseMeter, bedrock_model_from_path
from ext_proc.metering.meters.bedrock_invoke import BedrockInvokeMeter
from ext_proc.metering.meters.gemini import GeminiMeter, gemini_model_from_path
from ext_proc.metering.meters.openai_chat import OpenAIChatMeter
from ext_proc.metering.meters.openai_completions import OpenAICompletionsMeter
from ext_proc.metering.meters.openai_embeddings import OpenAIEmbeddingsMeter
from ext_proc.metering.meters.openai_responses import OpenAIResponsesMeter
from ext_proc.protocol import dialects

# (request path, response content-type, model named in the path, response
# headers: {} when ext_proc did not ask for them) -> meter
MeterFactory = Callable[[str, str, "str | None", Mapping[str, str]], Meter]

# Methods that never cost anything: a CORS preflight (OPTIONS) and HEAD never
# carry a body or reach a model. These alone skip the budget check; every
# other method on a provider route is admission-checked, GET included (GET
# /v1/realtime opens a billed session; GET /v1/models is free, but a spent
# REJECT budget refusing it costs the caller nothing either).
NEVER_BILLABLE_METHODS = frozenset({"OPTIONS", "HEAD"})


@dataclass(frozen=True, slots=True)
class ApiShape:
    name: str
    provider: str  # when the route does not name one
    new_meter: MeterFactory
    dialect: dialects.Dialect
    # Whether the request body is needed (for `model`, `stream`, or to change it).
    needs_request_body: bool = True
    # Whether the meter needs the response headers (usage in them).
    needs_response_headers: bool = False
    model_from_path: Callable[[str], str | None] | None = None
    # Mutates the parsed request body so the response carries usage; returns
    # True when it changed something.
    prepare_request: Callable[[dict[str, Any]], bool] = lambda body: False


_TRUE_STRINGS = frozenset({"1", "on", "t", "true", "y", "yes"})


def stream_flag(value: object) -> bool:
    """Whether a request body's ``stream`` value asks for a stream.

    The widest truthiness a provider applies: servers validated by pydantic
    (vLLM, LiteLLM, most OpenAI-compatible ones) take ``1``, ``1.0`` and the
    strings 1/on/t/true/y/yes in any case as true; the strict APIs answer
    anything but ``true`` with a 400, which costs nothing. So a value is taken
    as true when any provider would stream for it.
    """
    if value is True:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS


def _openai_chat_prepare(body: dict[str, Any]) -> bool:
    """Streaming chat (and legacy) completions carry usage only when asked; ask."""
    if not stream_flag(body.get("stream")):
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


def _path(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/")


OPENAI_CHAT = ApiShape(
    name="openai_chat",
    provider="openai",
    new_meter=lambda path, ctype, model, headers: OpenAIChatMeter(streaming=_sse(ctype)),
    dialect=dialects.openai,
    prepare_request=_openai_chat_prepare,
)
OPENAI_COMPLETIONS = ApiShape(
    name="openai_completions",
    provider="openai",
    new_meter=lambda path, ctype, model, headers: OpenAICompletionsMeter(streaming=_sse(ctype)),
    dialect=dialects.openai,
    prepare_request=_openai_chat_prepare,
)
OPENAI_RESPONSES = ApiShape(
    name="openai_responses",
    provider="openai",
    new_meter=lambda path, ctype, model, headers: OpenAIResponsesMeter(streaming=_sse(ctype)),
    dialect=dialects.openai,
)
OPENAI_EMBEDDINGS = ApiShape(
    name="openai_embeddings",
    provider="openai",
    new_meter=lambda path, ctype, model, headers: OpenAIEmbeddingsMeter(),
    dialect=dialects.openai,
)
ANTHROPIC_MESSAGES = ApiShape(
    name="anthropic_messages",
    provider="anthropic",
    new_meter=lambda path, ctype, model, headers: AnthropicMessagesMeter(streaming=_sse(ctype)),
    dialect=dialects.anthropic,
)
GEMINI = ApiShape(
    name="gemini",
    provider="google",
    new_meter=lambda path, ctype, model, headers: GeminiMeter(
        streaming=":streamGenerateContent" in path, model_from_path=model
    ),
    dialect=dialects.google,
    needs_request_body=False,
    model_from_path=gemini_model_from_path,
)
BEDROCK_CONVERSE = ApiShape(
    name="bedrock_converse",
    provider="bedrock",
    new_meter=lambda path, ctype, model, headers: BedrockConverseMeter(
        streaming=_path(path).endswith("/converse-stream"),
        model_from_path=model,
    ),
    dialect=dialects.aws,
    needs_request_body=False,
    model_from_path=bedrock_model_from_path,
)
# InvokeModel answers carry their usage in response headers (Mistral's and
# Cohere's bodies have none), so this shape asks for them; the content-type
# then says whether the answer streams.
BEDROCK_INVOKE = ApiShape(
    name="bedrock_invoke",
    provider="bedrock",
    new_meter=lambda path, ctype, model, headers: BedrockInvokeMeter(
        streaming=(
            "amazon.eventstream" in ctype
            if ctype
            else _path(path).endswith("/invoke-with-response-stream")
        ),
        model_from_path=model,
        headers=headers,
    ),
    dialect=dialects.aws,
    needs_request_body=False,
    needs_response_headers=True,
    model_from_path=bedrock_model_from_path,
)

_GEMINI_PATH = re.compile(r"/models/[^/]+:(generateContent|streamGenerateContent)$")
_BEDROCK_PATH = re.compile(r"/model/[^?]+/(converse|converse-stream)$")
_BEDROCK_INVOKE_PATH = re.compile(r"/model/[^?]+/(invoke|invoke-with-response-stream)$")


BY_NAME: dict[str, ApiShape] = {
    s.name: s
    for s in (
        OPENAI_CHAT,
        OPENAI_COMPLETIONS,
        OPENAI_RESPONSES,
        OPENAI_EMBEDDINGS,
        ANTHROPIC_MESSAGES,
        GEMINI,
        BEDROCK_CONVERSE,
        BEDROCK_INVOKE,
    )
}


def streams_by_path(path: str) -> bool:
    """Whether the path alone asks for a streamed answer (Gemini, Bedrock)."""
    path = _path(path)
    return ":streamGenerateContent" in path or path.endswith(
        ("/converse-stream", "/invoke-with-response-stream")
    )


def detect(method: str, path: str) -> ApiShape | None:
    """The shape of a request from its method and path (query ignored)."""
    if method != "POST":
        return None
    path = _path(path)
    # OpenAI, Azure OpenAI (/openai/deployments/{d}/...) and OpenAI-compatible
    # servers mounted under any prefix.
    if path.endswith("/chat/completions"):
        return OPENAI_CHAT
    if path.endswith("/completions"):
        return OPENAI_COMPLETIONS
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
    if _BEDROCK_INVOKE_PATH.search(path):
        return BEDROCK_INVOKE
    return None


# envoy/envoy.yaml's routes whose name says which provider's clients use them.
_ROUTE_DIALECTS = {
    "anthropic": dialects.anthropic,
    "gemini": dialects.google,
    "bedrock": dialects.aws,
    "openai": dialects.openai,
    "azure-openai": dialects.openai,
}


def dialect_for(route: str, path: str) -> dialects.Dialect:
    """The error dialect of a request of no metered shape: its route's
    provider when the route names one (Anthropic's ``/v1/files`` looks like
    OpenAI's), else guessed from the path (``dialect_for_path``)."""
    return _ROUTE_DIALECTS.get(route) or dialect_for_path(path)


def dialect_for_path(path: str) -> dialects.Dialect:
    """The error dialect of a request of no metered shape, from its path:
    AWS under ``/model/``, Google for ``/v1beta/`` and ``models/…:method``
    paths, Anthropic under ``/v1/messages`` and for ``/v1/complete``, OpenAI
    otherwise (its clients and the compatible ones are the most common)."""
    path = _path(path)
    if "/model/" in path:
        return dialects.aws
    if path.startswith("/v1beta/") or re.search(r"/models/[^/]+:[A-Za-z]+$", path):
        return dialects.google
    if "/v1/messages" in path or path.endswith("/v1/complete"):
        return dialects.anthropic
    return dialects.openai
