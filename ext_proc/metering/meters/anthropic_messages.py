"""Meter for Anthropic Messages responses (``POST /v1/messages``).

Non-streaming bodies are buffered (up to ``max_body_bytes``) and parsed once at
finish; streams (SSE) are parsed event by event: ``message_start`` carries the
model and the input/cache counts (and an initial output count), each
``message_delta`` carries the *cumulative* output count (newer API versions
repeat the input/cache counts there too). Every count keeps its latest
reported value.

Usage mapping (Anthropic reports cache reads and writes apart from
``input_tokens``; they are added back): input_tokens = input_tokens +
cache_read_input_tokens + cache_creation_input_tokens; cache_read_input_tokens
-> cached_input_tokens; cache_creation.ephemeral_5m_input_tokens ->
cache_write_tokens (all of cache_creation_input_tokens when the breakdown is
absent); cache_creation.ephemeral_1h_input_tokens -> cache_write_1h_tokens;
output_tokens -> output_tokens (thinking included; Anthropic reports no
separate reasoning count). A count that is not a non-negative int is "not
reported".

A stream is complete once a ``message_delta`` with an output count was seen.
Before that (stream cut, or ended without one) the result carries the
input/cache counts seen plus an output *estimated* from the generated text
(text, thinking, tool-input JSON), at least the initial output count.
A streaming response whose body starts with ``{`` is a plain JSON body (an
error, typically a 4xx/429/529 answer to a stream request) and is metered as one.

Errors: "provider error" (an ``error`` body or ``error`` event) wins; otherwise
"no usage in response" / "no usage in stream", or "stream aborted" when the
stream was cut before ``message_stop``; "invalid json" (or "response aborted"),
"body too large" for non-streaming bodies that cannot be parsed.
"""

from __future__ import annotations

from typing import Any

from ext_proc.metering.meters.base import (
    MAX_BODY_BYTES,
    BodyMeter,
    MeterResult,
    estimate_tokens_from_chars,
)
from ext_proc.metering.meters.jsonutil import (
    add_counts,
    count,
    json_chars,
    loads_object,
    text_chars,
)
from ext_proc.metering.meters.sse import SSEDecoder, SSEEvent
from spendgate.domain.usage import Usage

_USAGE_KEYS = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "output_tokens",
)
_CACHE_CREATION_KEYS = ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")
_DELTA_TEXT_KEYS = ("text", "thinking", "partial_json")  # text/thinking/input_json deltas


class AnthropicMessagesMeter(BodyMeter[SSEDecoder]):
    def __init__(self, *, streaming: bool, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__(streaming=streaming, max_body_bytes=max_body_bytes, decoder=SSEDecoder)
        self._counts: dict[str, int] = {}  # latest value of each reported usage field
        self._final = False  # the final output count was seen

    def _on_body(self, body: dict[str, Any]) -> None:
        self._set_model(body.get("model"))
        if body.get("type") == "error" or body.get("error") is not None:
            self._provider_error = True
        self._merge(body.get("usage"))
        self._final = bool(self._counts)
        content = body.get("content")
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict):
                self._chars += _block_chars(block)

    def _on_event(self, event: SSEEvent) -> None:
        obj = loads_object(event.data)
        if obj is None:
            if event.event == "error":
                self._provider_error = True
            else:
                self.bad_events += 1
            return
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self._chars += text_chars(delta.get(key) for key in _DELTA_TEXT_KEYS)
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                self._set_model(message.get("model"))
                self._merge(message.get("usage"))
        elif kind == "message_delta":
            usage = obj.get("usage")
            self._merge(usage)
            if isinstance(usage, dict) and count(usage.get("output_tokens")) is not None:
                self._final = True
        elif kind == "message_stop":
            self._ended = True
        elif kind == "error" or event.event == "error":
            self._provider_error = True

    def _merge(self, usage: object) -> None:
        merge_counts(self._counts, usage)

    def _outcome(self, missing: str) -> MeterResult:
        error = "provider error" if self._provider_error else None
        output = self._counts.get("output_tokens")
        if self._final:
            return MeterResult(self._model, _normalise(self._counts, output), True, error)
        estimate = None
        if self._counts or self._chars:
            tokens = max(estimate_tokens_from_chars(self._chars), output or 0)
            estimate = _normalise(self._counts, tokens, estimated=True)
        return MeterResult(self._model, estimate, False, error or missing)


def merge_counts(counts: dict[str, int], usage: object) -> None:
    """Keep in ``counts`` the latest reported value of each field of an
    Anthropic ``usage`` object (also what Bedrock's InvokeModel returns for
    Claude)."""
    if not isinstance(usage, dict):
        return
    fields: list[tuple[str, object]] = [(key, usage.get(key)) for key in _USAGE_KEYS]
    creation = usage.get("cache_creation")
    if isinstance(creation, dict):
        fields += [(key, creation.get(key)) for key in _CACHE_CREATION_KEYS]
    for key, value in fields:
        valid = count(value)
        if valid is not None:
            counts[key] = valid


def normalise_counts(
    counts: dict[str, int], output: int | None, *, estimated: bool = False
) -> Usage:
    """The Usage of counts kept by ``merge_counts`` (cache reads and writes
    added back into the input), with ``output`` output tokens."""
    return _normalise(counts, output, estimated=estimated)


def _normalise(counts: dict[str, int], output: int | None, *, estimated: bool = False) -> Usage:
    read = counts.get("cache_read_input_tokens")
    write_5m = counts.get("ephemeral_5m_input_tokens")
    write_1h = counts.get("ephemeral_1h_input_tokens")
    written = counts.get("cache_creation_input_tokens")
    if written is None:
        written = add_counts(write_5m, write_1h)
    if write_5m is None and written is not None:  # no breakdown: the rest is 5-minute
        write_5m = max(written - (write_1h or 0), 0)
    return Usage(
        input_tokens=add_counts(counts.get("input_tokens"), read, written),
        cached_input_tokens=read,
        cache_write_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        output_tokens=output,
        estimated=estimated,
    )


def _block_chars(block: dict[str, Any]) -> int:
    """Characters of generated text in a content block (text, thinking, tool input)."""
    chars = text_chars((block.get("text"), block.get("thinking")))
    if block.get("type") in ("tool_use", "server_tool_use"):
        chars += json_chars(block.get("input"))
    return chars
