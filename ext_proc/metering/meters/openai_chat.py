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

from ext_proc.metering.meters.base import MAX_BODY_BYTES, BodyMeter
from ext_proc.metering.meters.jsonutil import count, detail, loads_object, text_chars
from ext_proc.metering.meters.sse import SSEDecoder, SSEEvent
from spendgate.domain.usage import Usage


class OpenAIChatMeter(BodyMeter[SSEDecoder]):
    def __init__(self, *, streaming: bool, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__(streaming=streaming, max_body_bytes=max_body_bytes, decoder=SSEDecoder)

    def _on_body(self, body: dict[str, Any]) -> None:
        self._on_object(body, "message")

    def _on_event(self, event: SSEEvent) -> None:
        if event.data == b"[DONE]":
            self._ended = True
            return
        obj = loads_object(event.data)
        if obj is not None:
            self._on_object(obj, "delta")
        else:
            self.bad_events += 1

    def _on_object(self, obj: dict[str, Any], message_key: str) -> None:
        """One completion (message_key "message") or stream chunk ("delta")."""
        if self._model is None:  # every chunk names it: skip the lookup once known
            self._set_model(obj.get("model"))  # Azure's first chunk has model ""
        if obj.get("error") is not None or obj.get("object") == "error":
            self._provider_error = True
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._set_usage(_parse_usage(usage))
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._chars += self._choice_chars(choice, message_key)

    def _choice_chars(self, choice: dict[str, Any], message_key: str) -> int:
        """Characters of generated text in one choice."""
        message = choice.get(message_key)
        return _generated_chars(message) if isinstance(message, dict) else 0


def _parse_usage(usage: dict[str, Any]) -> Usage | None:
    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    parsed = Usage(
        input_tokens=count(usage.get("prompt_tokens")),
        cached_input_tokens=detail(prompt, "cached_tokens"),
        output_tokens=count(usage.get("completion_tokens")),
        reasoning_tokens=detail(completion, "reasoning_tokens"),
    )
    return None if parsed.is_empty else parsed


def _generated_chars(message: dict[str, Any]) -> int:
    """Characters of generated text in a message or delta."""
    if len(message) == 1:  # the usual stream delta: {"content": "..."}, one per token
        content = message.get("content")
        if content is not None:
            return len(content) if isinstance(content, str) else 0
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
    return text_chars(texts)
