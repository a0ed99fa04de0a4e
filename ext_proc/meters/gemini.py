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

from ext_proc.meters.base import MeterResult, estimate_tokens_from_chars
from ext_proc.meters.jsonutil import add_counts, count, json_chars, loads_object
from ext_proc.meters.sse import SSEDecoder
from spendgate.domain.usage import Usage

_MAX_EVENT_BYTES = 1024 * 1024
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


class GeminiMeter:
    def __init__(
        self,
        *,
        streaming: bool,
        model_from_path: str | None,
        max_body_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._max_body_bytes = max_body_bytes
        self._streaming = streaming
        self._path_model = model_from_path
        self._decoder: SSEDecoder | None = None  # streaming, SSE form
        self._splitter: _ArraySplitter | None = None  # streaming, JSON-array form
        self._body = bytearray()
        self._too_large = False
        self._model: str | None = None
        self._usage: Usage | None = None
        self._chars = 0  # generated characters seen, for estimation
        self._chars_at_usage = 0  # ... when the last usage report arrived
        self._final = False  # saw a final chunk
        self._provider_error = False
        self._result: MeterResult | None = None
        self.bad_events = 0  # stream events that were not JSON objects

    @property
    def buffered_bytes(self) -> int:
        """Body bytes held between calls (at most max_body_bytes + 2)."""
        decoder = self._decoder.buffered_bytes if self._decoder is not None else 0
        splitter = self._splitter.buffered_bytes if self._splitter is not None else 0
        return len(self._body) + decoder + splitter

    def feed(self, chunk: bytes) -> None:
        if self._result is not None or not chunk:
            return
        if not self._streaming:
            self._buffer(chunk)
            return
        if self._decoder is None and self._splitter is None:  # sniff the stream's form
            chunk = chunk.lstrip()
            if not chunk:
                return
            max_object = min(self._max_body_bytes, _MAX_EVENT_BYTES)
            if chunk[0] in b"[{":
                self._splitter = _ArraySplitter(max_object)
            else:
                self._decoder = SSEDecoder(max_object)
        objects: list[bytes] = []
        if self._splitter is not None:
            objects = self._splitter.feed(chunk)
        elif self._decoder is not None:
            objects = [event.data for event in self._decoder.feed(chunk)]
        for data in objects:
            self._on_data(data)

    def finish(self, *, aborted: bool = False) -> MeterResult:
        if self._result is None:
            if not self._streaming:
                self._result = self._finish_body(aborted)
            else:
                if self._decoder is not None:
                    for event in self._decoder.flush():
                        self._on_data(event.data)
                if self._splitter is not None and self._splitter.closed:
                    self._final = True
                cut = aborted and not self._final
                self._result = self._outcome("stream aborted" if cut else "no usage in stream", cut)
            self._body = bytearray()
            self._decoder = self._splitter = None
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
            return MeterResult(self._path_model, None, False, "body too large")
        body = loads_object(self._body)
        if body is None:
            error = "response aborted" if aborted else "invalid json"
            return MeterResult(self._path_model, None, False, error)
        self._on_object(body)
        return self._outcome("no usage in response", False)

    # -- shared ------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        obj = loads_object(data)
        if obj is None:
            self.bad_events += 1
        else:
            self._on_object(obj)

    def _on_object(self, obj: dict[str, Any]) -> None:
        """One GenerateContentResponse (a whole body or one stream chunk)."""
        model = obj.get("modelVersion")
        if self._model is None and isinstance(model, str) and model:
            self._model = model
        if obj.get("error") is not None:
            self._provider_error = True
        feedback = obj.get("promptFeedback")
        if isinstance(feedback, dict) and isinstance(feedback.get("blockReason"), str):
            self._final = True  # a blocked prompt gets no candidates
        candidates = obj.get("candidates")
        for candidate in candidates if isinstance(candidates, list) else ():
            if isinstance(candidate, dict):
                if isinstance(candidate.get("finishReason"), str):
                    self._final = True
                self._chars += _candidate_chars(candidate)
        metadata = obj.get("usageMetadata")
        usage = _parse_usage(metadata) if isinstance(metadata, dict) else None
        if usage is not None:  # cumulative: the last report wins
            self._usage = usage
            self._chars_at_usage = self._chars

    def _outcome(self, missing: str, cut: bool) -> MeterResult:
        model = self._model or self._path_model
        error = "provider error" if self._provider_error else None
        usage = self._usage
        if usage is not None and not cut:
            return MeterResult(model, usage, True, error)
        estimate = None
        if usage is not None:  # a partial report: top it up for the text streamed since
            reported = usage.output_tokens
            since = self._chars - self._chars_at_usage if reported is not None else self._chars
            output = (reported or 0) + estimate_tokens_from_chars(since)
            estimate = replace(usage, output_tokens=output, estimated=True)
        elif self._chars:
            estimate = Usage(output_tokens=estimate_tokens_from_chars(self._chars), estimated=True)
        return MeterResult(model, estimate, False, error or missing)


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
