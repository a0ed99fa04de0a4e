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

from ext_proc.meters.base import MeterResult, estimate_tokens_from_chars
from ext_proc.meters.eventstream import EventMessage, EventStreamDecoder
from spendgate.domain.usage import Usage

_MAX_MESSAGE_BYTES = 1024 * 1024
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


class BedrockConverseMeter:
    def __init__(
        self,
        *,
        streaming: bool,
        model_from_path: str | None,
        max_body_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._model = _decoded(model_from_path)
        self._max_body_bytes = max_body_bytes
        max_message = min(max_body_bytes, _MAX_MESSAGE_BYTES)
        self._decoder = EventStreamDecoder(max_message) if streaming else None
        self._sniffed = False  # streaming: first non-blank byte seen?
        self._body = bytearray()
        self._too_large = False
        self._usage: Usage | None = None
        self._chars = 0  # generated characters seen, for estimation
        self._provider_error = False
        self._result: MeterResult | None = None
        self.bad_events = 0  # stream events whose payload was not a JSON object

    @property
    def buffered_bytes(self) -> int:
        """Body bytes held between calls (at most max_body_bytes)."""
        decoder = self._decoder.buffered_bytes if self._decoder is not None else 0
        return len(self._body) + decoder

    def feed(self, chunk: bytes) -> None:
        if self._result is not None or not chunk:
            return
        if self._decoder is not None and not self._sniffed:
            head = chunk.lstrip()
            if head:
                self._sniffed = True
                if head[0] == 0x7B:  # '{': a JSON body, not an event stream
                    self._decoder = None
        if self._decoder is None:
            self._buffer(chunk)
            return
        for message in self._decoder.feed(chunk):
            self._on_message(message)

    def finish(self, *, aborted: bool = False) -> MeterResult:
        if self._result is None:
            if self._decoder is None:
                self._result = self._finish_body(aborted)
            else:
                missing = "stream aborted" if aborted else "no usage in stream"
                if self._decoder.broken:
                    missing = "invalid event stream"
                self._result = self._outcome(missing)
            self._body = bytearray()
            self._decoder = None
        return self._result

    # -- non-streaming -----------------------------------------------------

    def _buffer(self, chunk: bytes) -> None:
        if self._too_large:
            return
        if len(self._body) + len(chunk) > self._max_body_bytes:
            self._too_large = True
            self._body = bytearray()
        else:
            self._body += chunk

    def _finish_body(self, aborted: bool) -> MeterResult:
        if self._too_large:
            return MeterResult(self._model, None, False, "body too large")
        try:
            body = orjson.loads(self._body)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            error = "response aborted" if aborted else "invalid json"
            return MeterResult(self._model, None, False, error)
        if "output" not in body and "usage" not in body and _is_error(body):
            self._provider_error = True
        self._on_usage(body.get("usage"))
        output = body.get("output")
        message = output.get("message") if isinstance(output, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict):
                self._chars += _block_chars(block)
        return self._outcome("no usage in response")

    # -- streaming ---------------------------------------------------------

    def _on_message(self, message: EventMessage) -> None:
        if message.headers.get(":message-type") in ("exception", "error"):
            self._provider_error = True
            return
        try:
            payload = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            self.bad_events += 1
            return
        event_type = message.headers.get(":event-type")
        if event_type == "contentBlockDelta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                self._chars += _delta_chars(delta)
        elif event_type == "metadata":
            self._on_usage(payload.get("usage"))

    # -- shared ------------------------------------------------------------

    def _on_usage(self, usage: object) -> None:
        parsed = _parse_usage(usage) if isinstance(usage, dict) else None
        if parsed is not None:  # the last report wins
            self._usage = parsed

    def _outcome(self, missing: str) -> MeterResult:
        error = "provider error" if self._provider_error else None
        if self._usage is not None:
            return MeterResult(self._model, self._usage, True, error)
        estimate = None
        if self._chars:
            tokens = estimate_tokens_from_chars(self._chars)
            estimate = Usage(output_tokens=tokens, estimated=True)
        return MeterResult(self._model, estimate, False, error or missing)


def _decoded(model: str | None) -> str | None:
    return (unquote(model).strip() or None) if model else None


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _parse_usage(usage: dict[str, Any]) -> Usage | None:
    inp = _count(usage.get("inputTokens"))
    read = _count(usage.get("cacheReadInputTokens"))
    write = _count(usage.get("cacheWriteInputTokens"))
    write_1h = _one_hour_writes(usage.get("cacheDetails"), write)
    if write is not None and write_1h is not None:
        write -= write_1h
    parts = [n for n in (inp, read, write, write_1h) if n is not None]
    parsed = Usage(
        input_tokens=sum(parts) if parts else None,
        cached_input_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=write_1h,
        output_tokens=_count(usage.get("outputTokens")),
    )
    return None if parsed.is_empty else parsed


def _one_hour_writes(details: object, writes: int | None) -> int | None:
    """Cache writes with a 1-hour TTL per ``cacheDetails`` (at most ``writes``)."""
    if writes is None or not isinstance(details, list):
        return None
    hour = [d.get("inputTokens") for d in details if isinstance(d, dict) and d.get("ttl") == "1h"]
    counts = [n for n in map(_count, hour) if n is not None]
    return min(sum(counts), writes) if counts else None


def _delta_chars(delta: dict[str, Any]) -> int:
    """Characters of generated text in a contentBlockDelta's ``delta``."""
    tool_use = delta.get("toolUse")
    reasoning = delta.get("reasoningContent")
    texts = [
        delta.get("text"),
        tool_use.get("input") if isinstance(tool_use, dict) else None,
        reasoning.get("text") if isinstance(reasoning, dict) else None,
    ]
    return sum(len(text) for text in texts if isinstance(text, str))


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
    return sum(len(text) for text in texts if isinstance(text, str))


def _json_text(value: object) -> str | None:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return None


def _is_error(body: dict[str, Any]) -> bool:
    """An AWS error body: ``{"message": "..."}`` (some services say "Message")."""
    return isinstance(body.get("message"), str) or isinstance(body.get("Message"), str)
