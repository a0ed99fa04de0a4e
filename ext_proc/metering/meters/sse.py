"""Incremental Server-Sent Events decoder (WHATWG "event stream" parsing).

Feed it the response body as it arrives, in chunks of any size; it returns
the events completed by each chunk. Only the ``event`` and ``data`` fields
are kept (``id`` and ``retry`` mean nothing to a meter).

Memory is bounded: an *event block* (all of its lines up to the blank line
that ends it, line terminators excluded) longer than ``max_event_bytes`` is
dropped, counted in ``oversized_events``, and decoding resumes after the next
blank line. The decoder never holds more than ``max_event_bytes`` plus the two
bytes of a half-seen BOM, and never raises.

End of stream (``flush``) is more forgiving than the spec, which discards an
unterminated event: an unterminated last line is taken as a line and the
pending event is emitted, so a body cut just before its final blank line
still yields its last event (its JSON, if truncated, will not parse anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = 0x0A


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str | None  # the ``event:`` field; None when absent or empty
    data: bytes  # ``data:`` lines joined with b"\n"


class SSEDecoder:
    def __init__(self, max_event_bytes: int = 1024 * 1024) -> None:
        self.max_event_bytes = max_event_bytes
        self.oversized_events = 0
        self._buf = bytearray()  # unterminated line (or half a BOM at stream start)
        self._bom_pending = True  # stream start: a BOM may still be arriving
        self._pending_cr = False  # last chunk ended in \r: drop a leading \n
        self._discard_line = False  # inside an oversized line: drop up to its end
        self._skipping = False  # inside an oversized event: drop up to a blank line
        self._size = 0  # bytes of the current event block's lines so far
        self._event: str | None = None
        self._data: list[bytes] = []

    @property
    def buffered_bytes(self) -> int:
        """Bytes retained between calls (bounded by max_event_bytes + 2)."""
        return len(self._buf) + self._size

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._bom_pending:
            chunk = bytes(self._buf) + chunk
            self._buf.clear()
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._buf += chunk
                return []
            self._bom_pending = False
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        if self._pending_cr and chunk:
            self._pending_cr = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
        if self._discard_line and chunk:
            chunk = self._drop_to_line_end(chunk)
        if not chunk:
            return []
        if not self._buf and not self._size and not self._skipping:
            whole = _whole_events(chunk, self.max_event_bytes)
            if whole is not None:
                return whole

        if b"\n" not in chunk and b"\r" not in chunk:  # no line end: just buffer
            self._keep_partial(chunk)
            return []
        data = bytes(self._buf) + chunk if self._buf else chunk
        self._buf.clear()
        lines = data.splitlines(keepends=True)
        partial = b""
        if lines[-1][-1] not in (_CR, _LF):
            partial = lines.pop()
        elif lines[-1][-1] == _CR:
            self._pending_cr = True
        events: list[SSEEvent] = []
        for raw in lines:
            cut = 2 if raw.endswith(b"\r\n") else 1
            event = self._line(raw[:-cut])
            if event is not None:
                events.append(event)
        if partial:
            self._keep_partial(partial)
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: take an unterminated last line, emit the pending event."""
        events: list[SSEEvent] = []
        if self._buf and not self._discard_line:
            event = self._line(bytes(self._buf))
            if event is not None:
                events.append(event)
        event = self._line(b"") if not self._skipping else None
        if event is not None:
            events.append(event)
        self._buf.clear()
        self._bom_pending = self._pending_cr = self._discard_line = self._skipping = False
        self._reset_event()
        return events

    # -- internals ---------------------------------------------------------

    def _line(self, line: bytes) -> SSEEvent | None:
        if not line:  # blank line: end of the event block
            if self._skipping:
                self._skipping = False
                self._reset_event()
                return None
            return self._dispatch()
        if self._skipping:
            return None
        self._size += len(line)
        if self._size > self.max_event_bytes:
            self._oversized()
            return None
        if line[0] == 0x3A:  # ':' comment
            return None
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace") or None
        return None

    def _dispatch(self) -> SSEEvent | None:
        event = SSEEvent(self._event, b"\n".join(self._data)) if self._data else None
        self._reset_event()
        return event

    def _keep_partial(self, partial: bytes) -> None:
        if self._skipping:
            self._discard_line = True
        elif self._size + len(self._buf) + len(partial) > self.max_event_bytes:
            self._oversized()
            self._discard_line = True
        else:
            self._buf += partial

    def _drop_to_line_end(self, chunk: bytes) -> bytes:
        ends = [i for i in (chunk.find(b"\r"), chunk.find(b"\n")) if i >= 0]
        if not ends:
            return b""
        self._discard_line = False
        end = min(ends)
        if chunk[end] == _CR:
            if end + 1 == len(chunk):
                self._pending_cr = True
            elif chunk[end + 1] == _LF:
                end += 1
        return chunk[end + 1 :]

    def _oversized(self) -> None:
        self.oversized_events += 1
        self._skipping = True
        self._buf.clear()
        self._reset_event()

    def _reset_event(self) -> None:
        self._size = 0
        self._event = None
        self._data = []


def _whole_events(chunk: bytes, max_event_bytes: int) -> list[SSEEvent] | None:
    """The events of a chunk that is whole events only, as providers send them
    (one event per chunk, lines of ``data:``, ``event:`` or comments, each event
    ended by a blank line, no CR); None for anything else, which the general
    line-by-line path then decodes. Same result, a third of the work: this is
    the per-token path of every stream."""
    if not chunk.endswith(b"\n\n") or b"\r" in chunk or len(chunk) > max_event_bytes:
        return None
    events: list[SSEEvent] = []
    for block in chunk[:-2].split(b"\n\n"):
        if b"\n" not in block:  # the usual event: one data line
            if not block.startswith(b"data:"):
                return None
            value = block[5:]
            events.append(SSEEvent(None, value[1:] if value[:1] == b" " else value))
            continue
        event: str | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            name, colon, value = line.partition(b":")
            if not colon or not line:
                return None
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value.decode("utf-8", "replace") or None
            elif name:  # id, retry and unknown fields: the general path
                return None
        if data:
            events.append(SSEEvent(event, b"\n".join(data)))
    return events
