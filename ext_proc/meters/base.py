"""The contract every response meter implements, whatever the API shape.

A meter is created per response, fed the response body chunk by chunk as
Envoy streams it through ext_proc, and asked for a MeterResult once at the end
of the stream (or when the stream is aborted). Meters are pure: bytes in, a
MeterResult out, no I/O, and they never raise, whatever the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from spendgate.domain.usage import Usage


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
