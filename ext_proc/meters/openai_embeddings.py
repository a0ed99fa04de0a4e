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

import orjson

from ext_proc.meters.base import MeterResult
from spendgate.domain.usage import Usage

_EDGE = 4096  # bytes kept at each end of an oversized body
_USAGE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')
_MODEL = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')


class OpenAIEmbeddingsMeter:
    def __init__(self, *, streaming: bool = False, max_body_bytes: int = 16 * 1024 * 1024) -> None:
        del streaming  # embeddings never stream
        self._max_body_bytes = max_body_bytes
        self._edge = max(min(_EDGE, max_body_bytes // 2), 0)
        self._body = bytearray()  # the whole body, or its head once too large
        self._tail = bytearray()  # the last bytes of a body too large
        self._too_large = False
        self._result: MeterResult | None = None

    @property
    def buffered_bytes(self) -> int:
        """Body bytes held between calls (at most max_body_bytes)."""
        return len(self._body) + len(self._tail)

    def feed(self, chunk: bytes) -> None:
        if self._result is not None or not chunk:
            return
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

    def finish(self, *, aborted: bool = False) -> MeterResult:
        if self._result is None:
            self._result = self._edges() if self._too_large else self._whole(aborted)
            self._body = bytearray()
            self._tail = bytearray()
        return self._result

    def _whole(self, aborted: bool) -> MeterResult:
        try:
            body = orjson.loads(self._body)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return MeterResult(None, None, False, "response aborted" if aborted else "invalid json")
        model = body.get("model")
        model = model if isinstance(model, str) and model else None
        usage = body.get("usage")
        parsed = _parse_usage(usage) if isinstance(usage, dict) else None
        error = "provider error" if body.get("error") is not None else None
        if parsed is None:
            return MeterResult(model, None, False, error or "no usage in response")
        return MeterResult(model, parsed, True, error)

    def _edges(self) -> MeterResult:
        """Model and usage of an oversized body, from its head and tail."""
        tail = bytes(self._tail)
        usages = _USAGE.findall(tail) if tail.rstrip().endswith(b"}") else []
        usage = _loads(usages[-1]) if usages else None
        parsed = _parse_usage(usage) if isinstance(usage, dict) else None
        if parsed is None:
            return MeterResult(None, None, False, "body too large")
        found = _MODEL.search(tail) or _MODEL.search(self._body)
        model = _loads(found[1]) if found else None
        return MeterResult(model if isinstance(model, str) and model else None, parsed, True, None)


def _loads(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _parse_usage(usage: dict[str, Any]) -> Usage | None:
    tokens = _count(usage.get("prompt_tokens"))
    if tokens is None:
        tokens = _count(usage.get("total_tokens"))
    return None if tokens is None else Usage(input_tokens=tokens, output_tokens=0)
