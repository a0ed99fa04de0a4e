"""Token usage of one response, as metered from the provider's own report.

Every count is ``None`` when the provider did not report it, which is not the
same as 0. Counts are normalised across providers so pricing needs one rule:

* ``input_tokens`` is *all* prompt tokens, including those read from or
  written to a prompt cache (Anthropic reports those separately; its meter adds
  them back).
* ``cached_input_tokens`` is the part of ``input_tokens`` read from cache.
* ``cache_write_tokens`` / ``cache_write_1h_tokens`` are the parts of
  ``input_tokens`` written to a 5-minute / 1-hour cache.
* ``output_tokens`` is all generated tokens, reasoning included;
  ``reasoning_tokens`` is the reasoning part (informational, priced as output).
* ``estimated`` is True when the numbers were estimated from streamed content
  because the provider's usage report never arrived (aborted stream).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    cache_write_1h_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    estimated: bool = False

    @property
    def is_empty(self) -> bool:
        """True when no count at all was reported."""
        return self.input_tokens is None and self.output_tokens is None
