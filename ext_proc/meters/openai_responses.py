"""Meter for OpenAI Responses API responses (``POST /v1/responses``).

Also serves Azure OpenAI and compatible servers, which use the same shapes.
A non-streaming body is one ``response`` object, buffered (up to
``max_body_bytes``) and parsed at finish. A stream (SSE) sends typed events
(the JSON ``type`` field; the SSE ``event:`` name when ``type`` is absent):
``response.created`` / ``response.in_progress`` carry the response so far
(its model), ``response.*.delta`` events the generated text, and the final
``response.completed`` / ``response.incomplete`` / ``response.failed`` the
whole response with its ``usage``. An ``error`` event reports a failure.

Usage mapping: input_tokens -> input_tokens (cache reads included),
input_tokens_details.cached_tokens -> cached_input_tokens,
input_tokens_details.cache_write_tokens -> cache_write_tokens,
output_tokens -> output_tokens,
output_tokens_details.reasoning_tokens -> reasoning_tokens. A count that is
not a non-negative int (null, missing, bool, float, string) is "not reported".

When no usage report arrives, output tokens are estimated from the generated
text seen (output text, refusals, reasoning text and summaries, function and
tool call arguments). A streaming response whose body starts with ``{`` is a
plain JSON body (an error, typically) and is metered as one.

Errors: "provider error" (an ``error`` object, a failed response, an ``error``
event) wins; otherwise "no usage in response" / "no usage in stream", or
"stream aborted" when the stream was cut before its final response event;
"invalid json" (or "response aborted"), "body too large" for non-streaming
bodies that cannot be parsed.
"""

from __future__ import annotations

from typing import Any

import orjson

from ext_proc.meters.base import MeterResult, estimate_tokens_from_chars
from ext_proc.meters.sse import SSEDecoder, SSEEvent
from spendgate.domain.usage import Usage

_MAX_EVENT_BYTES = 1024 * 1024
_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_TEXT_DELTAS = frozenset(
    f"response.{kind}.delta"
    for kind in (
        "output_text",
        "refusal",
        "reasoning_text",
        "reasoning_summary_text",
        "function_call_arguments",
        "custom_tool_call_input",
        "code_interpreter_call_code",
        "mcp_call_arguments",
    )
)


class OpenAIResponsesMeter:
    def __init__(self, *, streaming: bool, max_body_bytes: int = 16 * 1024 * 1024) -> None:
        self._max_body_bytes = max_body_bytes
        self._decoder = SSEDecoder(min(max_body_bytes, _MAX_EVENT_BYTES)) if streaming else None
        self._sniffed = False  # streaming: first non-blank byte seen?
        self._body = bytearray()
        self._too_large = False
        self._model: str | None = None
        self._usage: Usage | None = None
        self._chars = 0  # generated characters seen, for estimation
        self._provider_error = False
        self._final = False  # saw the final response event
        self._result: MeterResult | None = None
        self.bad_events = 0  # stream events that were not JSON objects

    @property
    def buffered_bytes(self) -> int:
        """Body bytes held between calls (at most max_body_bytes + 2)."""
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
        for event in self._decoder.feed(chunk):
            self._on_event(event)

    def finish(self, *, aborted: bool = False) -> MeterResult:
        if self._result is None:
            if self._decoder is None:
                self._result = self._finish_body(aborted)
            else:
                for event in self._decoder.flush():
                    self._on_event(event)
                missing = "stream aborted" if aborted and not self._final else "no usage in stream"
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
            return MeterResult(None, None, False, "body too large")
        try:
            body = orjson.loads(self._body)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return MeterResult(None, None, False, "response aborted" if aborted else "invalid json")
        self._on_response(body, count_output=True)
        return self._outcome("no usage in response")

    # -- streaming ---------------------------------------------------------

    def _on_event(self, event: SSEEvent) -> None:
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            self.bad_events += 1
            return
        kind = obj.get("type")
        if not isinstance(kind, str):
            kind = event.event
        response = obj.get("response")
        if kind == "error":
            self._provider_error = True
        elif kind in _TEXT_DELTAS:
            delta = obj.get("delta")
            self._chars += len(delta) if isinstance(delta, str) else 0
        elif isinstance(response, dict):  # created, in_progress, the final events
            if kind in _FINAL:
                self._final = True
                self._provider_error |= kind == "response.failed"
            self._on_response(response, count_output=False)

    # -- shared ------------------------------------------------------------

    def _on_response(self, response: dict[str, Any], *, count_output: bool) -> None:
        """A response object (a body, or the one a stream event carries)."""
        if self._model is None:
            model = response.get("model")
            if isinstance(model, str) and model:
                self._model = model
        if response.get("error") is not None or response.get("status") == "failed":
            self._provider_error = True
        usage = response.get("usage")
        parsed = _parse_usage(usage) if isinstance(usage, dict) else None
        if parsed is not None:  # the last report wins
            self._usage = parsed
        output = response.get("output")
        if count_output and isinstance(output, list):
            self._chars += sum(_item_chars(item) for item in output if isinstance(item, dict))

    def _outcome(self, missing: str) -> MeterResult:
        error = "provider error" if self._provider_error else None
        if self._usage is not None:
            return MeterResult(self._model, self._usage, True, error)
        estimate = None
        if self._chars:
            tokens = estimate_tokens_from_chars(self._chars)
            estimate = Usage(output_tokens=tokens, estimated=True)
        return MeterResult(self._model, estimate, False, error or missing)


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _parse_usage(usage: dict[str, Any]) -> Usage | None:
    inp = usage.get("input_tokens_details")
    out = usage.get("output_tokens_details")
    parsed = Usage(
        input_tokens=_count(usage.get("input_tokens")),
        cached_input_tokens=_detail(inp, "cached_tokens"),
        cache_write_tokens=_detail(inp, "cache_write_tokens"),
        output_tokens=_count(usage.get("output_tokens")),
        reasoning_tokens=_detail(out, "reasoning_tokens"),
    )
    return None if parsed.is_empty else parsed


def _detail(details: object, key: str) -> int | None:
    return _count(details.get(key)) if isinstance(details, dict) else None


def _item_chars(item: dict[str, Any]) -> int:
    """Characters of generated text in an output item of a response body."""
    texts = [item.get("arguments"), item.get("input"), item.get("code")]  # tool calls
    for key in ("content", "summary"):  # message / reasoning parts
        parts = item.get(key)
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict):
                texts += [part.get("text"), part.get("refusal")]
    return sum(len(text) for text in texts if isinstance(text, str))
