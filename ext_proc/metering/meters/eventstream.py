"""Incremental decoder for AWS event streams (``application/vnd.amazon.eventstream``).

Bedrock's streaming APIs frame their events in this binary format. Each
message, all integers big-endian::

    total length   u32   the whole message, these 4 bytes and the CRC included
    headers length u32
    prelude CRC    u32   CRC32 of the 8 bytes above
    headers              name_len u8, name (UTF-8), type u8, value; repeated
    payload              total - headers - 16 bytes
    message CRC    u32   CRC32 of everything before it

Header value types: 0 true, 1 false, 2 int8, 3 int16, 4 int32, 5 int64,
6 bytes (u16 length), 7 UTF-8 string (u16 length), 8 timestamp (int64 ms since
the epoch, kept as an int), 9 UUID (16 raw bytes). Values are decoded as
botocore's ``EventStreamBuffer`` decodes them.

Feed the body in chunks of any size; ``feed`` returns the messages each chunk
completes. Nothing ever raises:

* A CRC mismatch or an impossible length (total < 16, headers longer than the
  message) means the framing can no longer be trusted and cannot be
  resynchronised safely: it is counted in ``bad_frames``, ``broken`` is set and
  everything after it is ignored.
* A message whose CRCs check out but whose headers do not parse (unknown type,
  value past the end, bad UTF-8, duplicate name) is counted in ``bad_frames``
  and skipped; framing is intact, so decoding goes on.
* A message longer than ``max_message_bytes`` (its length vouched for by the
  prelude CRC) is counted in ``oversized_messages`` and skipped unbuffered.

Memory is bounded: at most ``max(max_message_bytes, 12)`` bytes are held.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

HeaderValue = bool | int | bytes | str

_PRELUDE = 12  # total length, headers length, prelude CRC
_OVERHEAD = 16  # prelude + message CRC
_FIXED = {2: struct.Struct(">b"), 3: struct.Struct(">h"), 4: struct.Struct(">i")}
_FIXED |= {5: struct.Struct(">q"), 8: struct.Struct(">q")}
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class EventMessage:
    headers: dict[str, HeaderValue]
    payload: bytes


class EventStreamDecoder:
    def __init__(self, max_message_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_message_bytes = max_message_bytes
        self.bad_frames = 0
        self.oversized_messages = 0
        self.broken = False
        self._buf = bytearray()  # the current message, prelude first
        self._total = 0  # its total length, once its prelude checked out
        self._skip = 0  # bytes still to drop of an oversized message

    @property
    def buffered_bytes(self) -> int:
        """Bytes held between calls (at most max(max_message_bytes, 12))."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[EventMessage]:
        messages: list[EventMessage] = []
        pos = 0
        while pos < len(chunk) and not self.broken:
            if self._skip:
                dropped = min(self._skip, len(chunk) - pos)
                self._skip -= dropped
                pos += dropped
                continue
            want = (self._total or _PRELUDE) - len(self._buf)
            self._buf += chunk[pos : pos + want]
            pos += want
            if len(self._buf) < (self._total or _PRELUDE):
                break  # chunk exhausted mid-message
            if not self._total:
                self._prelude()
                continue
            message = self._message()
            if message is not None:
                messages.append(message)
        return messages

    def flush(self) -> list[EventMessage]:
        """End of stream: nothing more to emit (a partial message is incomplete)."""
        return []

    # -- internals ---------------------------------------------------------

    def _prelude(self) -> None:
        total, headers_len, crc = struct.unpack(">III", self._buf)
        if zlib.crc32(self._buf[:8]) != crc or total < _OVERHEAD + headers_len:
            self._break()
        elif total > self.max_message_bytes:
            self.oversized_messages += 1
            self._skip = total - _PRELUDE
            self._buf.clear()
        else:
            self._total = total

    def _message(self) -> EventMessage | None:
        data = bytes(self._buf)
        self._buf.clear()
        self._total = 0
        if zlib.crc32(data[:-4]) != _U32.unpack_from(data, len(data) - 4)[0]:
            self._break()
            return None
        headers_end = _PRELUDE + _U32.unpack_from(data, 4)[0]
        headers = _parse_headers(data[_PRELUDE:headers_end])
        if headers is None:
            self.bad_frames += 1
            return None
        return EventMessage(headers, data[headers_end:-4])

    def _break(self) -> None:
        self.bad_frames += 1
        self.broken = True
        self._buf = bytearray()
        self._total = self._skip = 0


def _parse_headers(data: bytes) -> dict[str, HeaderValue] | None:
    """The headers section as a dict, or None when it is malformed."""
    headers: dict[str, HeaderValue] = {}
    pos = 0
    try:
        while pos < len(data):
            name_end = pos + 1 + data[pos]
            if name_end + 1 > len(data):
                return None
            name = data[pos + 1 : name_end].decode("utf-8")
            kind = data[name_end]
            pos = name_end + 1
            value: HeaderValue
            if kind in (0, 1):
                value = kind == 0
            elif kind in _FIXED:
                value = _FIXED[kind].unpack_from(data, pos)[0]
                pos += _FIXED[kind].size
            elif kind in (6, 7):
                end = pos + 2 + _U16.unpack_from(data, pos)[0]
                raw = data[pos + 2 : end]
                value = raw.decode("utf-8") if kind == 7 else raw
                pos = end
            elif kind == 9:
                value = data[pos : pos + 16]
                pos += 16
            else:
                return None
            if pos > len(data) or name in headers:
                return None
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return headers
