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

from ext_proc.metering.meters.base import MAX_BODY_BYTES, BodyMeter
from ext_proc.metering.meters.jsonutil import count, detail, loads_object, text_chars
from ext_proc.metering.meters.sse import SSEDecoder, SSEEvent
from spendgate.domain.usage import Usage

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


class OpenAIResponsesMeter(BodyMeter[SSEDecoder]):
    def __init__(self, *, streaming: bool, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__(streaming=streaming, max_body_bytes=max_body_bytes, decoder=SSEDecoder)

    def _on_body(self, body: dict[str, Any]) -> None:
        self._on_response(body, count_output=True)

    def _on_event(self, event: SSEEvent) -> None:
        obj = loads_object(event.data)
        if obj is None:
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
                self._ended = True
                self._provider_error |= kind == "response.failed"
            self._on_response(response, count_output=False)

    def _on_response(self, response: dict[str, Any], *, count_output: bool) -> None:
        """A response object (a body, or the one a stream event carries)."""
        self._set_model(response.get("model"))
        if response.get("error") is not None or response.get("status") == "failed":
            self._provider_error = True
        self._set_usage(_parse_usage(response.get("usage")))
        output = response.get("output")
        if count_output and isinstance(output, list):
            self._chars += sum(_item_chars(item) for item in output if isinstance(item, dict))


def _parse_usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    inp = usage.get("input_tokens_details")
    out = usage.get("output_tokens_details")
    parsed = Usage(
        input_tokens=count(usage.get("input_tokens")),
        cached_input_tokens=detail(inp, "cached_tokens"),
        cache_write_tokens=detail(inp, "cache_write_tokens"),
        output_tokens=count(usage.get("output_tokens")),
        reasoning_tokens=detail(out, "reasoning_tokens"),
    )
    return None if parsed.is_empty else parsed


def _item_chars(item: dict[str, Any]) -> int:
    """Characters of generated text in an output item of a response body."""
    texts = [item.get("arguments"), item.get("input"), item.get("code")]  # tool calls
    for key in ("content", "summary"):  # message / reasoning parts
        parts = item.get(key)
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict):
                texts += [part.get("text"), part.get("refusal")]
    return text_chars(texts)
