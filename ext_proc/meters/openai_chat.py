"""Meter for OpenAI Chat Completions responses (``POST /v1/chat/completions``).

Also serves Azure OpenAI and OpenAI-compatible servers (vLLM, ...), which use
the same shapes. Non-streaming bodies are buffered (up to ``max_body_bytes``)
and parsed once at finish; streams (SSE) are parsed event by event.

Usage mapping: prompt_tokens -> input_tokens, prompt_tokens_details.cached_tokens
-> cached_input_tokens, completion_tokens -> output_tokens,
completion_tokens_details.reasoning_tokens -> reasoning_tokens. A count that is
not a non-negative int (null, missing, bool, float, string) is "not reported".

When no usage report arrives, output tokens are estimated from the generated
text seen (content, reasoning, refusal, tool/function call arguments).
A streaming response whose body starts with ``{`` is a plain JSON body (an
error, typically a 4xx/429 answer to a stream request) and is metered as one.

Errors: "provider error" (an ``error`` object, in a body or mid-stream) wins;
otherwise "no usage in response" / "no usage in stream", or "stream aborted"
when the stream was cut before ``data: [DONE]``; "invalid json" (or "response
aborted"), "body too large" for non-streaming bodies that cannot be parsed.
"""

from __future__ import annotations

from typing import Any

import orjson

from ext_proc.meters.base import MeterResult, estimate_tokens_from_chars
from ext_proc.meters.sse import SSEDecoder, SSEEvent
from spendgate.domain.usage import Usage

_MAX_EVENT_BYTES = 1024 * 1024


class OpenAIChatMeter:
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
        self._done = False  # saw ``data: [DONE]``
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
                missing = "stream aborted" if aborted and not self._done else "no usage in stream"
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
        self._on_object(body, "message")
        return self._outcome("no usage in response")

    # -- streaming ---------------------------------------------------------

    def _on_event(self, event: SSEEvent) -> None:
        if event.data == b"[DONE]":
            self._done = True
            return
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            self._on_object(obj, "delta")
        else:
            self.bad_events += 1

    # -- shared ------------------------------------------------------------

    def _on_object(self, obj: dict[str, Any], message_key: str) -> None:
        """One completion (message_key "message") or stream chunk ("delta")."""
        if self._model is None:
            model = obj.get("model")
            if isinstance(model, str) and model:  # Azure's first chunk has model ""
                self._model = model
        if obj.get("error") is not None or obj.get("object") == "error":
            self._provider_error = True
        usage = obj.get("usage")
        parsed = _parse_usage(usage) if isinstance(usage, dict) else None
        if parsed is not None:  # the last report wins
            self._usage = parsed
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    message = choice.get(message_key)
                    if isinstance(message, dict):
                        self._chars += _generated_chars(message)

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
    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    parsed = Usage(
        input_tokens=_count(usage.get("prompt_tokens")),
        cached_input_tokens=_detail(prompt, "cached_tokens"),
        output_tokens=_count(usage.get("completion_tokens")),
        reasoning_tokens=_detail(completion, "reasoning_tokens"),
    )
    return None if parsed.is_empty else parsed


def _detail(details: object, key: str) -> int | None:
    return _count(details.get(key)) if isinstance(details, dict) else None


def _generated_chars(message: dict[str, Any]) -> int:
    """Characters of generated text in a message or delta."""
    reasoning = message.get("reasoning_content")  # vLLM, DeepSeek; newer vLLM: "reasoning"
    if not isinstance(reasoning, str):
        reasoning = message.get("reasoning")
    texts = [message.get("content"), reasoning, message.get("refusal")]
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts.append(function.get("arguments"))
    function_call = message.get("function_call")  # deprecated single-function form
    if isinstance(function_call, dict):
        texts.append(function_call.get("arguments"))
    return sum(len(text) for text in texts if isinstance(text, str))
