"""Meter for OpenAI legacy Completions responses (``POST /v1/completions``).

Also serves Azure OpenAI (``/openai/deployments/{d}/completions``) and
OpenAI-compatible servers (vLLM, ...). The shapes are the chat completion's
with ``text`` in place of ``message`` / ``delta``: a body is
``{"object": "text_completion", "model", "choices": [{"text", ...}], "usage"}``;
a stream is SSE chunks of the same object (``choices[].text`` the new text),
then, when the request asked for ``stream_options.include_usage`` (spendgate
asks), a chunk with empty ``choices`` and ``usage``, then ``data: [DONE]``.

Usage mapping, estimation and errors are the chat completion meter's
(ext_proc/metering/meters/openai_chat.py): prompt_tokens -> input_tokens,
completion_tokens -> output_tokens; without a usage report the output is
estimated from the generated ``text``.
"""

from __future__ import annotations

from typing import Any

from ext_proc.metering.meters.openai_chat import OpenAIChatMeter


class OpenAICompletionsMeter(OpenAIChatMeter):
    def _choice_chars(self, choice: dict[str, Any], message_key: str) -> int:
        text = choice.get("text")
        return len(text) if isinstance(text, str) else 0
