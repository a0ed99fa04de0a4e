"""Meter for Google Gemini ``generateContent`` / ``streamGenerateContent`` responses.

Serves the Gemini API (``/v1beta/models/{model}:generateContent``) and Vertex AI
(``.../publishers/google/models/{model}:streamGenerateContent``), which share
the GenerateContentResponse shape. Non-streaming bodies are buffered (up to
``max_body_bytes``) and parsed once at finish. A stream is either SSE
(``?alt=sse``: each event's data is one GenerateContentResponse) or, by
default, one JSON array of them flushed element by element; the array is cut
into its top-level objects as they complete (bracket/string tracking, no
buffering beyond the current object). A stream whose body starts with ``{`` or
``[`` is taken as the array form (a lone ``{...}`` is an error body).

Usage mapping (usageMetadata): promptTokenCount (cached content included) +
toolUsePromptTokenCount -> input_tokens; cachedContentTokenCount ->
cached_input_tokens; candidatesTokenCount + thoughtsTokenCount ->
output_tokens (Gemini counts thinking apart from the candidates);
thoughtsTokenCount -> reasoning_tokens. Each stream chunk carries cumulative
usage: the last report wins. A count that is not a non-negative int is "not
reported". The model is the response's ``modelVersion``, else the model named
in the request path.

A stream is complete when it ended normally or a final chunk (a candidate
with a ``finishReason``, a blocked prompt, or the array's closing ``]``) was
seen. A stream cut before that keeps the last (partial) report, its output
topped up with an estimate for the text streamed since, flagged estimated;
with no report at all, output is estimated from the generated text (text
parts and function-call arguments).

Errors: "provider error" (an ``error`` object) wins; otherwise "no usage in
response" / "no usage in stream", or "stream aborted" when the stream was cut
before its final chunk; "invalid json" (or "response aborted"), "body too
large" for non-streaming bodies that cannot be parsed.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any
from urllib.parse import unquote

from ext_proc.metering.meters.base import (
    MAX_BODY_BYTES,
    BodyMeter,
    MeterResult,
    estimate_tokens_from_chars,
)
from ext_proc.metering.meters.jsonutil import add_counts, count, json_chars, loads_object
from ext_proc.metering.meters.sse import SSEDecoder
from spendgate.domain.usage import Usage

_MODEL_SEGMENT = re.compile(r"/models/([^/?#]+)")


def gemini_model_from_path(path: str) -> str | None:
    """The model named in a Gemini / Vertex AI request path, e.g.
    ``/v1beta/models/gemini-2.5-flash:generateContent?key=...`` -> ``gemini-2.5-flash``."""
    path = path.partition("?")[0].partition("#")[0]
    segments = _MODEL_SEGMENT.findall(path)
    if not segments:
        return None
    model = unquote(segments[-1]).partition(":")[0].strip()
    return model or None


class GeminiMeter(BodyMeter["_SSEData | _ArraySplitter"]):
    def __init__(
        self, *, streaming: bool, model_from_path: str | None, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        # A stream's decoder is picked by its first non-blank byte (_sniff).
        super().__init__(
            streaming=streaming, max_body_bytes=max_body_bytes, path_model=model_from_path
        )
        self._chars_at_usage = 0  # generated characters seen when the last report arrived

    def _sniff(self, chunk: bytes) -> bytes:
        """A stream is never a plain body: ``[`` or ``{`` starts the array form."""
        chunk = chunk.lstrip()
        if chunk:
            self._sniffed = True
            array = chunk[0] in b"[{"
            self._decoder = (_ArraySplitter if array else _SSEData)(self._max_event_bytes)
        return chunk

    def _on_body(self, body: dict[str, Any]) -> None:
        self._on_object(body)

    def _on_event(self, data: bytes) -> None:
        obj = loads_object(data)
        if obj is None:
            self.bad_events += 1
        else:
            self._on_object(obj)

    def _on_object(self, obj: dict[str, Any]) -> None:
        """One GenerateContentResponse (a whole body or one stream chunk)."""
        if self._model is None:  # every chunk names it: skip the lookup once known
            self._set_model(obj.get("modelVersion"))
        if obj.get("error") is not None:
            self._provider_error = True
        feedback = obj.get("promptFeedback")
        if isinstance(feedback, dict) and isinstance(feedback.get("blockReason"), str):
            self._ended = True  # a blocked prompt gets no candidates
        candidates = obj.get("candidates")
        for candidate in candidates if isinstance(candidates, list) else ():
            if isinstance(candidate, dict):
                if isinstance(candidate.get("finishReason"), str):
                    self._ended = True
                self._chars += _candidate_chars(candidate)
        metadata = obj.get("usageMetadata")
        usage = _parse_usage(metadata) if isinstance(metadata, dict) else None
        if usage is not None:  # cumulative: the last report wins
            self._usage = usage
            self._chars_at_usage = self._chars

    def _finish_stream(self, aborted: bool) -> MeterResult:
        if isinstance(self._decoder, _ArraySplitter) and self._decoder.closed:
            self._ended = True
        usage = self._usage
        if not aborted or self._ended or usage is None:
            return super()._finish_stream(aborted)
        # Cut with a partial report: top its output up for the text streamed since.
        reported = usage.output_tokens
        since = self._chars - self._chars_at_usage if reported is not None else self._chars
        output = (reported or 0) + estimate_tokens_from_chars(since)
        estimate = replace(usage, output_tokens=output, estimated=True)
        error = "provider error" if self._provider_error else "stream aborted"
        return MeterResult(self._model or self._path_model, estimate, False, error)


def _parse_usage(metadata: dict[str, Any]) -> Usage | None:
    thoughts = count(metadata.get("thoughtsTokenCount"))
    parsed = Usage(
        input_tokens=add_counts(
            count(metadata.get("promptTokenCount")),
            count(metadata.get("toolUsePromptTokenCount")),
        ),
        cached_input_tokens=count(metadata.get("cachedContentTokenCount")),
        output_tokens=add_counts(count(metadata.get("candidatesTokenCount")), thoughts),
        reasoning_tokens=thoughts,
    )
    return None if parsed.is_empty else parsed


def _candidate_chars(candidate: dict[str, Any]) -> int:
    """Characters of generated text in a candidate (text parts, function-call args)."""
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    chars = 0
    for part in parts if isinstance(parts, list) else ():
        if isinstance(part, dict):
            text = part.get("text")
            chars += len(text) if isinstance(text, str) else 0
            call = part.get("functionCall")
            chars += json_chars(call.get("args")) if isinstance(call, dict) else 0
    return chars


_SPECIAL = re.compile(rb'[\[\]{}"]')  # what matters outside strings
_STRING_SPECIAL = re.compile(rb'["\\]')  # what matters inside strings
_QUOTE, _BACKSLASH, _LBRACKET, _RBRACKET, _LBRACE = 0x22, 0x5C, 0x5B, 0x5D, 0x7B


class _ArraySplitter:
    """Cuts the top-level objects out of a JSON array streamed in chunks of any size.

    Only bracket depth and string state are tracked (no validation: what is cut
    out is parsed later). A lone top-level object is cut out too. An object
    longer than ``max_object_bytes`` is dropped and counted in ``oversized``;
    at most ``max_object_bytes`` are held between calls.
    """

    def __init__(self, max_object_bytes: int) -> None:
        self.max_object_bytes = max_object_bytes
        self.oversized = 0
        self.closed = False  # the top-level array's closing bracket was seen
        self._depth = 0
        self._array = False  # the top-level value is an array
        self._string = False  # inside a string
        self._escape = False  # the next byte is escaped
        self._inside = False  # inside a top-level object
        self._dropping = False  # ... that is too large
        self._object = bytearray()  # its bytes from earlier chunks

    @property
    def buffered_bytes(self) -> int:
        return len(self._object)

    def flush(self) -> list[bytes]:
        """End of stream: an unfinished object is dropped."""
        return []

    def feed(self, chunk: bytes) -> list[bytes]:
        objects: list[bytes] = []
        start = i = 0  # start: where the current object starts in this chunk
        while i < len(chunk):
            if self._escape:
                self._escape, i = False, i + 1
                continue
            if self._string:
                match = _STRING_SPECIAL.search(chunk, i)
                if match is None:
                    break
                i = match.end()
                self._escape = chunk[match.start()] == _BACKSLASH
                self._string = self._escape
                continue
            match = _SPECIAL.search(chunk, i)
            if match is None:
                break
            byte, i = chunk[match.start()], match.end()
            element_depth = 1 if self._array else 0
            if byte == _QUOTE:
                self._string = True
            elif byte in (_LBRACKET, _LBRACE):
                if self._depth == 0:
                    self._array, self.closed = byte == _LBRACKET, False
                    element_depth = 1 if self._array else 0
                if byte == _LBRACE and self._depth == element_depth and not self._inside:
                    self._inside, start = True, match.start()
                self._depth += 1
            else:
                self._depth = max(self._depth - 1, 0)
                if self._inside and self._depth == element_depth:
                    self._end_object(chunk[start:i], objects)
                elif self._depth == 0 and self._array and byte == _RBRACKET:
                    self.closed = True
        if self._inside:
            self._keep(chunk[start:])
        return objects

    def _end_object(self, tail: bytes, objects: list[bytes]) -> None:
        if not self._dropping:
            if len(self._object) + len(tail) <= self.max_object_bytes:
                objects.append(bytes(self._object) + tail)
            else:
                self.oversized += 1
        self._inside = self._dropping = False
        self._object.clear()

    def _keep(self, part: bytes) -> None:
        if self._dropping:
            return
        if len(self._object) + len(part) > self.max_object_bytes:
            self.oversized += 1
            self._dropping = True
            self._object.clear()
        else:
            self._object += part


class _SSEData:
    """The ``alt=sse`` form of a stream: each event's data is one object."""

    def __init__(self, max_event_bytes: int) -> None:
        self._sse = SSEDecoder(max_event_bytes)

    @property
    def buffered_bytes(self) -> int:
        return self._sse.buffered_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        return [event.data for event in self._sse.feed(chunk)]

    def flush(self) -> list[bytes]:
        return [event.data for event in self._sse.flush()]
