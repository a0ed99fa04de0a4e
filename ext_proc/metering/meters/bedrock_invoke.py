"""Meter for Amazon Bedrock InvokeModel and InvokeModelWithResponseStream.

``POST /model/{modelId}/invoke`` answers with the model family's own JSON
body; ``POST /model/{modelId}/invoke-with-response-stream`` with an AWS event
stream (``application/vnd.amazon.eventstream``) whose ``chunk`` messages carry
``{"bytes": "<base64>"}``, each decoding to one JSON object of the family's
stream. Errors mid-stream arrive as messages with ``:message-type``
``exception`` (or ``error``). The model is the one in the request path.

Usage, first found wins:

1. the family's own report, when it has input and output counts:
   Anthropic Claude (``usage`` of the body, or ``message_start`` +
   ``message_delta`` in a stream; cache reads and writes added to the input
   as in ext_proc/metering/meters/anthropic_messages.py), Amazon Nova (``usage``
   inputTokens / outputTokens / cacheReadInputTokenCount /
   cacheWriteInputTokenCount, in the body or a stream's ``metadata``), Meta
   Llama (``prompt_token_count`` + ``generation_token_count``; in a stream
   the first chunk names the prompt count and each chunk the generated count
   so far), OpenAI-style bodies (Mistral Large, Jamba: ``usage.prompt_tokens``
   / ``completion_tokens``), Cohere (``meta.billed_units``);
2. ``amazon-bedrock-invocationMetrics`` (inputTokenCount, outputTokenCount,
   cacheReadInputTokenCount, cacheWriteInputTokenCount), which Bedrock adds
   to the last chunk of every stream;
3. the ``x-amzn-bedrock-input-token-count`` / ``-output-token-count`` (and
   ``-cache-read-`` / ``-cache-write-input-token-count``) response headers,
   which Bedrock sets on every InvokeModel answer (Mistral's and Cohere's
   bodies carry no usage; an embedding's output count is 0 when absent).
   Amazon Titan bodies (``inputTextTokenCount``, ``results[].tokenCount``,
   embeddings) are read too.

Bedrock's input counts exclude cache reads and writes, which are added back.
Without a complete report (a stream cut short) the result carries the input
count seen (Claude's ``message_start``, Llama's first chunk, a header) and an
output *estimated* from the generated text (at least the output count seen),
flagged estimated. Generated text: Claude text / thinking / tool-input
deltas and content blocks, Nova ``text``, Llama ``generation``, Mistral
``outputs[].text`` and ``choices[]`` message / delta content, Cohere
``text`` / ``generations[].text``.

A stream has ended when its last chunk, the one with the invocation metrics,
was seen (every family's end marker comes before or with it). Errors:
"provider error" (an exception message, an Anthropic ``error``, or an AWS
error body ``{"message": ...}``) wins;
otherwise "no usage in response" / "no usage in stream", "stream aborted"
when the stream was cut before its end, "invalid event stream" when its
framing broke first; "invalid json" (or "response aborted"), "body too
large" for bodies that cannot be parsed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ext_proc.metering.meters.anthropic_messages import merge_counts, normalise_counts
from ext_proc.metering.meters.base import (
    MAX_BODY_BYTES,
    BodyMeter,
    MeterResult,
    estimate_tokens_from_chars,
)
from ext_proc.metering.meters.bedrock_converse import bedrock_model_from_path
from ext_proc.metering.meters.eventstream import EventMessage, EventStreamDecoder
from ext_proc.metering.meters.jsonutil import (
    add_counts,
    count,
    json_chars,
    loads_object,
    text_chars,
)
from spendgate.domain.usage import Usage

__all__ = ["BedrockInvokeMeter", "bedrock_model_from_path", "header_usage"]

_METRICS = "amazon-bedrock-invocationMetrics"
_HEADER = "x-amzn-bedrock-{}-token-count"
_ANTHROPIC_TEXT = ("text", "thinking", "partial_json")


def header_usage(headers: Mapping[str, str]) -> Usage | None:
    """Usage from Bedrock's ``x-amzn-bedrock-*-token-count`` response headers;
    None without an input count (the output count is None when absent, as for
    embeddings). A value that is not a plain non-negative integer is "not
    reported"."""

    def number(name: str) -> int | None:
        value = headers.get(_HEADER.format(name), "").strip()
        return int(value) if value.isdigit() and value.isascii() and len(value) <= 12 else None

    inp, read, write = number("input"), number("cache-read-input"), number("cache-write-input")
    if inp is None:
        return None
    return Usage(
        input_tokens=add_counts(inp, read, write),
        cached_input_tokens=read,
        cache_write_tokens=write,
        output_tokens=number("output"),
    )


class BedrockInvokeMeter(BodyMeter[EventStreamDecoder]):
    def __init__(
        self,
        *,
        streaming: bool,
        model_from_path: str | None,
        headers: Mapping[str, str] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        super().__init__(
            streaming=streaming,
            max_body_bytes=max_body_bytes,
            decoder=EventStreamDecoder,
            path_model=model_from_path,
        )
        self._headers = header_usage(headers or {})
        self._counts: dict[str, int] = {}  # Claude's usage fields, latest of each
        self._claude_final = False  # Claude's final output count was seen
        self._report: Usage | None = None  # another family's complete report
        self._input: int | None = None  # an input count seen before the report
        self._output: int | None = None  # the output count so far (Llama streams)
        self._metrics: Usage | None = None  # amazon-bedrock-invocationMetrics

    def _stream_start(self, head: bytes) -> bool:
        # An event stream message starts with its length: a 0 byte below 16 MiB.
        return head[0] == 0

    def _on_body(self, body: dict[str, Any]) -> None:
        if _is_aws_error(body):
            self._provider_error = True
        self._on_object(body)

    def _on_event(self, message: EventMessage) -> None:
        if message.headers.get(":message-type") in ("exception", "error"):
            self._provider_error = True
            return
        payload = loads_object(message.payload)
        data = payload.get("bytes") if payload is not None else None
        obj = None
        if isinstance(data, str):
            try:
                obj = loads_object(base64.b64decode(data, validate=True))
            except (binascii.Error, ValueError):
                obj = None
        if obj is None:
            self.bad_events += 1
        else:
            self._on_object(obj)

    def _on_object(self, obj: dict[str, Any]) -> None:
        """One body, or one decoded stream chunk, of any model family."""
        metrics = obj.get(_METRICS)
        if isinstance(metrics, dict):
            self._ended = True
            self._metrics = (
                _bedrock_counts(
                    count(metrics.get("inputTokenCount")),
                    count(metrics.get("outputTokenCount")),
                    count(metrics.get("cacheReadInputTokenCount")),
                    count(metrics.get("cacheWriteInputTokenCount")),
                )
                or self._metrics
            )
        kind = obj.get("type")
        if isinstance(kind, str):
            self._claude(obj, kind)
            return
        self._nova(obj)
        self._llama(obj)
        self._mistral(obj)
        self._cohere(obj)
        self._titan(obj)

    # -- the families ----------------------------------------------------

    def _claude(self, obj: dict[str, Any], kind: str) -> None:
        if kind == "message":  # a whole body
            merge_counts(self._counts, obj.get("usage"))
            self._claude_final = "output_tokens" in self._counts
            for block in _list(obj.get("content")):
                self._chars += text_chars((block.get("text"), block.get("thinking")))
                if block.get("type") == "tool_use":
                    self._chars += json_chars(block.get("input"))
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self._chars += text_chars(delta.get(key) for key in _ANTHROPIC_TEXT)
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                merge_counts(self._counts, message.get("usage"))
        elif kind == "message_delta":
            usage = obj.get("usage")
            merge_counts(self._counts, usage)
            if isinstance(usage, dict) and count(usage.get("output_tokens")) is not None:
                self._claude_final = True
        elif kind == "error":
            self._provider_error = True

    def _nova(self, obj: dict[str, Any]) -> None:
        output = obj.get("output")
        message = output.get("message") if isinstance(output, dict) else None
        if isinstance(message, dict):
            self._chars += text_chars(b.get("text") for b in _list(message.get("content")))
        delta = obj.get("contentBlockDelta")
        inner = delta.get("delta") if isinstance(delta, dict) else None
        if isinstance(inner, dict):
            self._chars += text_chars((inner.get("text"),))
        metadata = obj.get("metadata")
        usage = metadata.get("usage") if isinstance(metadata, dict) else obj.get("usage")
        if isinstance(usage, dict):
            self._set_report(_usage_object(usage))

    def _llama(self, obj: dict[str, Any]) -> None:
        generation = obj.get("generation")
        if not isinstance(generation, str) and "generation_token_count" not in obj:
            return
        self._chars += text_chars((generation,))
        prompt = count(obj.get("prompt_token_count"))
        if prompt is not None:
            self._input = prompt
        generated = count(obj.get("generation_token_count"))
        if generated is not None:
            self._output = generated  # cumulative in a stream
        # A stream's counts are final with its last chunk; a body's at once.
        last = isinstance(obj.get("stop_reason"), str)
        known = self._input is not None and self._output is not None
        if known and (last or not self._streaming):
            self._report = Usage(input_tokens=self._input, output_tokens=self._output)

    def _mistral(self, obj: dict[str, Any]) -> None:
        for item in _list(obj.get("outputs")):
            self._chars += text_chars((item.get("text"),))
        for choice in _list(obj.get("choices")):
            texts: list[object] = [choice.get("text")]
            for key in ("message", "delta"):
                part = choice.get(key)
                if isinstance(part, dict):
                    texts += [part.get("content"), part.get("reasoning_content")]
            self._chars += text_chars(texts)

    def _cohere(self, obj: dict[str, Any]) -> None:
        if obj.get("event_type") in (None, "text-generation"):
            self._chars += text_chars((obj.get("text"),))
        for generation in _list(obj.get("generations")):
            self._chars += text_chars((generation.get("text"),))
        meta = obj.get("meta")
        billed = meta.get("billed_units") if isinstance(meta, dict) else None
        if isinstance(billed, dict):
            self._set_report(
                _complete(count(billed.get("input_tokens")), count(billed.get("output_tokens")))
            )

    def _titan(self, obj: dict[str, Any]) -> None:
        results = _list(obj.get("results"))
        self._chars += text_chars([obj.get("outputText"), *(r.get("outputText") for r in results)])
        inp = count(obj.get("inputTextTokenCount"))
        if inp is None:
            return
        self._input = inp
        if "embedding" in obj or "embeddingsByType" in obj:  # nothing generated
            self._report = Usage(input_tokens=inp, output_tokens=0)
        elif results and not self._streaming:
            out = add_counts(*(count(r.get("tokenCount")) for r in results))
            if out is not None:
                self._report = Usage(input_tokens=inp, output_tokens=out)

    def _set_report(self, usage: Usage | None) -> None:
        if usage is not None and usage.output_tokens is not None:
            if usage.input_tokens is not None:
                self._report = usage
            else:
                self._output = usage.output_tokens
        elif usage is not None and usage.input_tokens is not None:
            self._input = usage.input_tokens

    # -- the result ------------------------------------------------------

    def _finish_stream(self, aborted: bool) -> MeterResult:
        if self._decoder is not None and self._decoder.broken:
            return self._outcome("invalid event stream")
        return super()._finish_stream(aborted)

    def _outcome(self, missing: str) -> MeterResult:
        model = self._path_model
        error = "provider error" if self._provider_error else None
        claude = None
        if self._claude_final:
            claude = normalise_counts(self._counts, self._counts.get("output_tokens"))
        headers = self._headers
        if headers is not None and headers.output_tokens is None and not self._chars:
            headers = replace(headers, output_tokens=0)  # nothing generated (embeddings)
        for usage in (claude, self._report, self._metrics, headers):
            if usage and usage.input_tokens is not None and usage.output_tokens is not None:
                return MeterResult(model, usage, True, error)
        # No complete report: the input seen, and the output estimated from
        # the text (at least the output count seen).
        partial = normalise_counts(self._counts, None) if self._counts else None
        if partial is None or partial.input_tokens is None:
            partial = Usage(input_tokens=self._input)
        if partial.input_tokens is None and headers is not None:
            partial = replace(headers, output_tokens=None)
        reported = max(self._counts.get("output_tokens", 0), self._output or 0)
        output = max(estimate_tokens_from_chars(self._chars), reported)
        if partial.input_tokens is None and not output:
            return MeterResult(model, None, False, error or missing)
        estimate = replace(partial, output_tokens=output, estimated=True)
        return MeterResult(model, estimate, False, error or missing)


def _bedrock_counts(
    inp: int | None, out: int | None, read: int | None, write: int | None
) -> Usage | None:
    """Bedrock's counts (input excluding cache reads and writes) normalised;
    None unless input and output are both reported."""
    if inp is None or out is None:
        return None
    return Usage(
        input_tokens=add_counts(inp, read, write),
        cached_input_tokens=read,
        cache_write_tokens=write,
        output_tokens=out,
    )


def _usage_object(usage: dict[str, Any]) -> Usage | None:
    """A Nova (camelCase) or OpenAI-style ``usage`` object; None when neither."""
    if "inputTokens" in usage or "outputTokens" in usage:
        inp, out = count(usage.get("inputTokens")), count(usage.get("outputTokens"))
        read = count(usage.get("cacheReadInputTokenCount"))
        write = count(usage.get("cacheWriteInputTokenCount"))
        if inp is None:
            return Usage(output_tokens=out) if out is not None else None
        return Usage(
            input_tokens=add_counts(inp, read, write),
            cached_input_tokens=read,
            cache_write_tokens=write,
            output_tokens=out,
        )
    return _complete(count(usage.get("prompt_tokens")), count(usage.get("completion_tokens")))


def _complete(inp: int | None, out: int | None) -> Usage | None:
    if inp is None and out is None:
        return None
    return Usage(input_tokens=inp, output_tokens=out)


def _list(value: object) -> list[dict[str, Any]]:
    """The objects in ``value`` when it is a list; [] otherwise."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _is_aws_error(body: dict[str, Any]) -> bool:
    """An AWS error body: ``{"message": "..."}`` (or "Message") and nothing a
    model family answers with."""
    message = body.get("message")
    if not isinstance(message, str) and not isinstance(body.get("Message"), str):
        return False
    return not any(k in body for k in ("output", "usage", "type", "generation", "outputs"))
