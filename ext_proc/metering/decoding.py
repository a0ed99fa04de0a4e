"""Incremental decoding of compressed response bodies (gzip, deflate).

spendgate removes ``accept-encoding`` from metered requests, so providers
answer uncompressed; this covers the ones that compress anyway. Output is
bounded (a small compressed body cannot make ext_proc allocate without
limit): past ``max_output`` bytes decoding stops and the meter sees no more.
Brotli and unknown encodings are not decoded (the response is counted as
unmetered).
"""

from __future__ import annotations

import zlib

SUPPORTED = frozenset({"gzip", "x-gzip", "deflate"})
_STEP = 1024 * 1024


class BodyDecoder:
    def __init__(self, encoding: str, *, max_output: int = 64 * 1024 * 1024) -> None:
        # 32 + 15: zlib picks gzip or zlib framing from the header; deflate
        # bodies in the wild are sometimes raw, which is retried below.
        self._encoding = encoding
        self._z = zlib.decompressobj(47)
        self._raw_retry = encoding == "deflate"
        self._max = max_output
        self._out = 0
        self.failed = False

    def decode(self, chunk: bytes) -> bytes:
        """The decoded bytes of ``chunk``; b"" once failed or over the limit."""
        if self.failed or self._out >= self._max:
            return b""
        try:
            parts = []
            data = chunk
            while data and self._out < self._max:
                piece = self._z.decompress(data, _STEP)
                self._out += len(piece)
                parts.append(piece)
                data = self._z.unconsumed_tail
            return b"".join(parts)
        except zlib.error:
            if self._raw_retry and self._out == 0:
                self._raw_retry = False
                self._z = zlib.decompressobj(-15)
                return self.decode(chunk)
            self.failed = True
            return b""
