"""API shapes spendgate meters: how to recognise a request, prepare it, meter
its response, and word a rejection in its clients' dialect.

One entry per shape; adding a provider API means adding a meter module and a
line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ext_proc.meters.base import Meter
from ext_proc.meters.openai_chat import OpenAIChatMeter
from ext_proc.reject import ErrorBody, openai_error_body


@dataclass(frozen=True, slots=True)
class ApiShape:
    name: str
    provider: str  # when the route does not name one
    new_meter: Callable[[bool], Meter]  # streaming -> meter
    # Mutates the parsed request body so the response carries usage; returns
    # True when it changed something.
    prepare_request: Callable[[dict[str, Any]], bool]
    error_body: ErrorBody


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


OPENAI_CHAT = ApiShape(
    name="openai_chat",
    provider="openai",
    new_meter=lambda streaming: OpenAIChatMeter(streaming=streaming),
    prepare_request=_openai_chat_prepare,
    error_body=openai_error_body,
)


def detect(method: str, path: str) -> ApiShape | None:
    """The shape of a request from its method and path (query ignored)."""
    if method != "POST":
        return None
    path = path.split("?", 1)[0].rstrip("/")
    # /v1/chat/completions, /openai/deployments/{d}/chat/completions (Azure),
    # and OpenAI-compatible servers mounted under any prefix.
    if path.endswith("/chat/completions"):
        return OPENAI_CHAT
    return None
