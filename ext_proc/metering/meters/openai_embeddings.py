"""Meter for OpenAI Embeddings responses (``POST /v1/embeddings``).

Also serves Azure OpenAI and OpenAI-compatible servers. The body is one JSON
object ``{"object": "list", "data": [...], "model": ..., "usage":
{"prompt_tokens": N, "total_tokens": N}}``; embeddings never stream, so
``streaming`` is accepted for a uniform constructor and ignored.

Usage mapping: prompt_tokens (else total_tokens, which equals it) ->
input_tokens; output_tokens is 0 whenever usage was reported. A count that is
not a non-negative int is "not reported". Nothing is generated, so nothing is
estimated when usage is missing.

Large batches easily outgrow ``max_body_bytes`` (vectors are big). Past that
limit only the first and last few KiB are kept, and ``model`` and ``usage``
are read from them: they are the only keys after ``data`` (vLLM puts
``model`` first), and the vectors (numbers or base64) cannot contain a
quoted key that could be mistaken for them.

Errors: "provider error" (an ``error`` object) wins; otherwise "no usage in
response"; "invalid json" (or "response aborted"), "body too large" for
bodies that cannot be parsed.
"""

from __future__ import annotations

import re
from typing import Any

from ext_proc.metering.meters.base import MAX_BODY_BYTES, BodyMeter, MeterResult, StreamDecoder
from ext_proc.metering.meters.jsonutil import count, loads, loads_object
from spendgate.domain.usage import Usage

_EDGE = 4096  # bytes kept at each end of an oversized body
_USAGE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')
_MODEL = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')


class OpenAIEmbeddingsMeter(BodyMeter[StreamDecoder]):
    def __init__(self, *, streaming: bool = False, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        del streaming  # embeddings never stream
        super().__init__(streaming=False, max_body_bytes=max_body_bytes)
        self._edge = max(min(_EDGE, max_body_bytes // 2), 0)
        self._tail = bytearray()  # the last bytes of a body too large (_body keeps its head)

    @property
    def buffered_bytes(self) -> int:
        """Body bytes held between calls (at most max_body_bytes)."""
        return len(self._body) + len(self._tail)

    def _buffer(self, chunk: bytes) -> None:
        if self._too_large:
            self._keep_tail(chunk)
        elif len(self._body) + len(chunk) > self._max_body_bytes:
            self._too_large = True
            self._keep_tail(self._body)
            self._keep_tail(chunk)
            self._body += chunk[: self._edge]
            del self._body[self._edge :]
        else:
            self._body += chunk

    def _keep_tail(self, data: bytes | bytearray) -> None:
        self._tail += data[max(len(data) - self._edge, 0) :]
        del self._tail[: max(len(self._tail) - self._edge, 0)]

    def _finish_body(self, aborted: bool) -> MeterResult:
        tail, self._tail = self._tail, bytearray()
        return self._edges(bytes(tail)) if self._too_large else super()._finish_body(aborted)

    def _on_body(self, body: dict[str, Any]) -> None:
        self._set_model(body.get("model"))
        self._provider_error = body.get("error") is not None
        self._set_usage(_parse_usage(body.get("usage")))

    def _edges(self, tail: bytes) -> MeterResult:
        """Model and usage of an oversized body, from its head and tail."""
        usages = _USAGE.findall(tail) if tail.rstrip().endswith(b"}") else []
        parsed = _parse_usage(loads_object(usages[-1])) if usages else None
        if parsed is None:
            return self._failed("body too large")
        found = _MODEL.search(tail) or _MODEL.search(self._body)
        self._set_model(loads(found[1]) if found else None)
        return MeterResult(self._model, parsed, True, None)


def _parse_usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    tokens = count(usage.get("prompt_tokens"))
    if tokens is None:
        tokens = count(usage.get("total_tokens"))
    return None if tokens is None else Usage(input_tokens=tokens, output_tokens=0)
