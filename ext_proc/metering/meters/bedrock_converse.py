"""Meter for Amazon Bedrock Converse responses.

``POST /model/{modelId}/converse`` answers with one JSON body;
``POST /model/{modelId}/converse-stream`` with an AWS event stream
(``application/vnd.amazon.eventstream``) whose messages carry an
``:event-type`` header (messageStart, contentBlockStart, contentBlockDelta,
contentBlockStop, messageStop, metadata) and a JSON payload. The last one,
``metadata``, carries ``usage`` and ``metrics``. Errors mid-stream arrive as
messages with ``:message-type`` ``exception`` (or ``error``).

Neither shape names the model, so the model is the one in the request path
(see :func:`bedrock_model_from_path`): a model id, an inference profile id
(``us.anthropic.claude-sonnet-4-20250514-v1:0``) or an ARN.

Usage mapping: Bedrock's ``inputTokens`` excludes cache reads and writes (as
Anthropic's does), so input_tokens = inputTokens + cacheReadInputTokens +
cacheWriteInputTokens (the sum of those reported); cached_input_tokens =
cacheReadInputTokens. Cache writes are split by ``cacheDetails`` TTL: its
``1h`` entries are cache_write_1h_tokens, the rest cache_write_tokens.
outputTokens -> output_tokens (Bedrock reports no reasoning count). A count
that is not a non-negative int (null, missing, bool, float, string) is "not
reported".

When no usage report arrives, output tokens are estimated from the generated
text seen (text, tool-use input, reasoning text). A streaming response whose
body starts with ``{`` is a plain JSON body (an error answer to a stream
request) and is metered as one.

Errors: "provider error" (an exception message, or a JSON body that is an
error: ``message`` but neither ``output`` nor ``usage``) wins; otherwise
"no usage in response" / "no usage in stream", "stream aborted" when the
stream was cut before its usage report, "invalid event stream" when its
framing broke (bad CRC) first; "invalid json" (or "response aborted"),
"body too large" for non-streaming bodies that cannot be parsed.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import orjson

from ext_proc.metering.meters.base import MAX_BODY_BYTES, BodyMeter, MeterResult
from ext_proc.metering.meters.eventstream import EventMessage, EventStreamDecoder
from ext_proc.metering.meters.jsonutil import add_counts, count, loads_object, text_chars
from spendgate.domain.usage import Usage

_PATH = re.compile(
    r"(?:^|/)model/(?P<id>[^?#]+?)/(?:converse|converse-stream|invoke|invoke-with-response-stream)"
    r"/?(?:[?#].*)?$"
)


def bedrock_model_from_path(path: str) -> str | None:
    """The model id in a Bedrock runtime path, URL-decoded; None if there is none.

    ``/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse`` ->
    ``anthropic.claude-3-5-haiku-20241022-v1:0``. Also takes converse-stream,
    invoke and invoke-with-response-stream, a route prefix before ``/model/``,
    a query string, and ARNs whether their ``/`` is encoded or not.
    """
    match = _PATH.search(path)
    return _decoded(match["id"]) if match else None


class BedrockConverseMeter(BodyMeter[EventStreamDecoder]):
    def __init__(
        self, *, streaming: bool, model_from_path: str | None, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        super().__init__(
            streaming=streaming,
            max_body_bytes=max_body_bytes,
            decoder=EventStreamDecoder,
            path_model=_decoded(model_from_path),
        )

    def _on_body(self, body: dict[str, Any]) -> None:
        if "output" not in body and "usage" not in body and _is_error(body):
            self._provider_error = True
        self._set_usage(_parse_usage(body.get("usage")))
        output = body.get("output")
        message = output.get("message") if isinstance(output, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict):
                self._chars += _block_chars(block)

    def _on_event(self, message: EventMessage) -> None:
        if message.headers.get(":message-type") in ("exception", "error"):
            self._provider_error = True
            return
        payload = loads_object(message.payload)
        if payload is None:
            self.bad_events += 1
            return
        event_type = message.headers.get(":event-type")
        if event_type == "contentBlockDelta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                self._chars += _delta_chars(delta)
        elif event_type == "metadata":
            self._set_usage(_parse_usage(payload.get("usage")))

    def _finish_stream(self, aborted: bool) -> MeterResult:
        # No event marks the end (_ended stays False): aborted means "stream aborted".
        if self._decoder is not None and self._decoder.broken:
            return self._outcome("invalid event stream")
        return super()._finish_stream(aborted)


def _decoded(model: str | None) -> str | None:
    return (unquote(model).strip() or None) if model else None


def _parse_usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    inp = count(usage.get("inputTokens"))
    read = count(usage.get("cacheReadInputTokens"))
    write = count(usage.get("cacheWriteInputTokens"))
    write_1h = _one_hour_writes(usage.get("cacheDetails"), write)
    if write is not None and write_1h is not None:
        write -= write_1h
    parsed = Usage(
        input_tokens=add_counts(inp, read, write, write_1h),
        cached_input_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=write_1h,
        output_tokens=count(usage.get("outputTokens")),
    )
    return None if parsed.is_empty else parsed


def _one_hour_writes(details: object, writes: int | None) -> int | None:
    """Cache writes with a 1-hour TTL per ``cacheDetails`` (at most ``writes``)."""
    if writes is None or not isinstance(details, list):
        return None
    hour = [d.get("inputTokens") for d in details if isinstance(d, dict) and d.get("ttl") == "1h"]
    total = add_counts(*map(count, hour))
    return None if total is None else min(total, writes)


def _delta_chars(delta: dict[str, Any]) -> int:
    """Characters of generated text in a contentBlockDelta's ``delta``."""
    tool_use = delta.get("toolUse")
    reasoning = delta.get("reasoningContent")
    return text_chars(
        (
            delta.get("text"),
            tool_use.get("input") if isinstance(tool_use, dict) else None,
            reasoning.get("text") if isinstance(reasoning, dict) else None,
        )
    )


def _block_chars(block: dict[str, Any]) -> int:
    """Characters of generated text in a content block of a Converse body."""
    tool_use = block.get("toolUse")
    reasoning = block.get("reasoningContent")
    reasoning_text = reasoning.get("reasoningText") if isinstance(reasoning, dict) else None
    texts = [
        block.get("text"),
        reasoning_text.get("text") if isinstance(reasoning_text, dict) else None,
    ]
    if isinstance(tool_use, dict) and "input" in tool_use:
        texts.append(_json_text(tool_use["input"]))  # the input is a JSON document
    return text_chars(texts)


def _json_text(value: object) -> str | None:
    """``value`` as compact JSON text. Unlike jsonutil.json_chars this counts
    characters, not UTF-8 bytes, and a null input as ``null``."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return None


def _is_error(body: dict[str, Any]) -> bool:
    """An AWS error body: ``{"message": "..."}`` (some services say "Message")."""
    return isinstance(body.get("message"), str) or isinstance(body.get("Message"), str)
