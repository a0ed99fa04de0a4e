"""The contract every response meter implements, and the skeleton they share.

A meter is created per response, fed the response body chunk by chunk as
Envoy streams it through ext_proc, and asked for a MeterResult once at the end
of the stream (or when the stream is aborted). Meters are pure: bytes in, a
MeterResult out, no I/O, and they never raise, whatever the bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ext_proc.metering.meters.jsonutil import loads_object
from spendgate.domain.usage import Usage

MAX_BODY_BYTES = 16 * 1024 * 1024  # default: the most of a non-streaming body buffered
MAX_EVENT_BYTES = 1024 * 1024  # the most one stream event may hold (capped by max_body_bytes)


@dataclass(frozen=True, slots=True)
class MeterResult:
    model: str | None  # model as reported by the response (None if never seen)
    usage: Usage | None  # None = nothing meterable (no usage and nothing to estimate)
    complete: bool  # True when the provider's own usage report was seen
    error: str | None  # short reason the body could not be (fully) metered; None when fine


class Meter(Protocol):
    def feed(self, chunk: bytes) -> None:
        """Consume the next chunk of the response body. Ignored after finish."""

    def finish(self, *, aborted: bool = False) -> MeterResult:
        """End of body (aborted=True: the stream was cut). Idempotent."""


def estimate_tokens_from_chars(chars: int) -> int:
    """Rough token count for ``chars`` characters of generated text: ceil(chars / 4).

    The usual rule of thumb for English text with BPE tokenizers (about four
    characters per token). It is only used when the provider's own usage report
    never arrived, and the result is flagged ``Usage.estimated``.
    """
    return -(-chars // 4) if chars > 0 else 0


class StreamDecoder(Protocol):
    """An incremental decoder that cuts a stream into events (SSE, AWS event stream, ...)."""

    @property
    def buffered_bytes(self) -> int:
        """Bytes held between calls."""

    def feed(self, chunk: bytes) -> list[Any]:
        """The events the chunk completes."""

    def flush(self) -> list[Any]:
        """End of stream: the events still pending."""


D = TypeVar("D", bound=StreamDecoder)


class BodyMeter(Generic[D]):
    """The skeleton of a meter; a subclass parses its API's bodies and events.

    A non-streaming body is buffered (up to ``max_body_bytes``, else "body too
    large") and parsed once at finish: "invalid json" (or "response aborted")
    unless it is a JSON object, which goes to ``_on_body``. A stream is cut into
    events by a ``D`` decoder, each of which goes to ``_on_event``; a stream
    whose first non-blank byte is ``{`` is a plain JSON body (an error answer to
    a stream request, typically) and is metered as one. ``feed`` after
    ``finish`` is ignored and ``finish`` is idempotent.

    What meters have in common is kept here: the model, the last usage report,
    the generated characters seen (for an estimate when no report arrives), a
    provider error, whether the stream's end was seen; ``_outcome`` makes the
    MeterResult of them. A subclass overrides what its API does differently.
    """

    def __init__(
        self,
        *,
        streaming: bool,
        max_body_bytes: int,
        decoder: Callable[[int], D] | None = None,
        path_model: str | None = None,
    ) -> None:
        self._max_body_bytes = max_body_bytes
        self._max_event_bytes = min(max_body_bytes, MAX_EVENT_BYTES)
        self._streaming = streaming  # metered as a stream (not found to be a JSON body)
        # The first non-blank byte decides between a JSON body and a stream,
        # whatever the request asked for (see _sniff).
        self._sniffed = not streaming and decoder is None
        self._new_decoder = decoder
        self._decoder: D | None = None
        if streaming and decoder is not None:
            self._decoder = decoder(self._max_event_bytes)
        self._body = bytearray()
        self._too_large = False
        self._result: MeterResult | None = None
        self._path_model = path_model  # the model named in the request path, if any
        self._model: str | None = None  # the first model the response names
        self._usage: Usage | None = None  # the last usage report
        self._chars = 0  # generated characters seen, for estimation
        self._provider_error = False
        self._ended = False  # saw the stream's last event (its end marker)
        self.bad_events = 0  # stream events that were not JSON objects

    @property
    def buffered_bytes(self) -> int:
        """Body bytes held between calls (at most max_body_bytes + the decoder's slack)."""
        decoder = self._decoder.buffered_bytes if self._decoder is not None else 0
        return len(self._body) + decoder

    def feed(self, chunk: bytes) -> None:
        if self._result is not None or not chunk:
            return
        if not self._sniffed:
            chunk = self._sniff(chunk)
            if not chunk:
                return
        decoder = self._decoder
        if decoder is None:
            self._buffer(chunk)
            return
        for event in decoder.feed(chunk):
            self._on_event(event)

    def finish(self, *, aborted: bool = False) -> MeterResult:
        if self._result is None:
            if self._streaming:
                if self._decoder is not None:
                    for event in self._decoder.flush():
                        self._on_event(event)
                self._result = self._finish_stream(aborted)
            else:
                self._result = self._finish_body(aborted)
            self._body = bytearray()
            self._decoder = None
        return self._result

    # -- for subclasses ----------------------------------------------------

    def _on_body(self, body: dict[str, Any]) -> None:
        """A whole response body (a JSON object)."""
        raise NotImplementedError

    def _on_event(self, event: Any) -> None:
        """One event of a stream, as the decoder cut it out."""
        raise NotImplementedError

    def _sniff(self, chunk: bytes) -> bytes:
        """Look at the body's first chunks until a non-blank byte: a ``{`` makes
        it a JSON body, the start of an event stream (``_stream_start``) a
        stream, whatever the request said it wanted (a provider may take
        ``"stream": "true"`` as true, or answer a stream request with a JSON
        error). Returns what of the chunk to feed on."""
        head = chunk.lstrip()
        if head:
            self._sniffed = True
            if self._streaming and head[0] == 0x7B:  # '{': a JSON body, not a stream
                self._streaming = False
                self._decoder = None
            elif not self._streaming and self._new_decoder and self._stream_start(head):
                self._streaming = True
                self._decoder = self._new_decoder(self._max_event_bytes)
        return chunk

    def _stream_start(self, head: bytes) -> bool:
        """Whether a body starting with ``head`` (a non-blank byte first) is an
        event stream. Server-sent events start with a field (``data:``,
        ``event:``) or a comment (``:``); a JSON body never does."""
        return head[0] in b"de:"

    def _finish_stream(self, aborted: bool) -> MeterResult:
        cut = aborted and not self._ended
        return self._outcome("stream aborted" if cut else "no usage in stream")

    def _outcome(self, missing: str) -> MeterResult:
        """The result of what was seen; ``missing`` is the error when no usage was."""
        model = self._model or self._path_model
        error = "provider error" if self._provider_error else None
        if self._usage is not None:
            return MeterResult(model, self._usage, True, error)
        estimate = None
        if self._chars:
            estimate = Usage(output_tokens=estimate_tokens_from_chars(self._chars), estimated=True)
        return MeterResult(model, estimate, False, error or missing)

    def _set_model(self, model: object) -> None:
        """Keep the first non-empty model name."""
        if self._model is None and isinstance(model, str) and model:
            self._model = model

    def _set_usage(self, usage: Usage | None) -> None:
        """Keep the last usage report."""
        if usage is not None:
            self._usage = usage

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
            return self._failed("body too large")
        body = loads_object(self._body)
        if body is None:
            return self._failed("response aborted" if aborted else "invalid json")
        self._on_body(body)
        return self._outcome("no usage in response")

    def _failed(self, error: str) -> MeterResult:
        return MeterResult(self._model or self._path_model, None, False, error)
