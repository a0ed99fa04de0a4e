"""How much a running request holds: its plausible cost, not its theoretical maximum.

A reservation (ext_proc/protocol/processor.py ``_reserve``) holds a request's estimated
cost against its REJECT windows while it runs. Input tokens are estimated from
the request's size; output tokens from what the same model produced on the
same route recently: a high percentile (``reservation_percentile``, 95 by
default) of the last ``SAMPLES`` answers. Until ``MIN_SAMPLES`` answers have
been seen, ``reservation_output_tokens`` is assumed. Either way the estimate
never exceeds the request's own ``max_tokens`` (the provider stops there),
and no window is held for more than its policy's whole amount.

Why not ``max_tokens`` alone: clients set it far above what they use (or to
absurd values, ``1000000000000``); holding that much blocks every other caller
of a shared budget while the request runs. A request that does produce more
than the estimate overshoots by the difference, once (its real cost then
replaces the estimate).

Pure and single-threaded (the ext_proc event loop): no I/O, no clock. Memory is
bounded: at most ``MAX_KEYS`` (model, route) keys, least recently used first
out, each with at most ``SAMPLES`` integers. Keys are the price table's name
for the model (a bounded set: catalog and operator overrides; every unpriced
model shares the default price's name) and Envoy's route name, never a
client-chosen string.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

SAMPLES = 100
MIN_SAMPLES = 5
MAX_KEYS = 1000
# A provider's report is bounded before it is learned from, so one absurd
# answer cannot make the estimate absurd (it is still charged in full).
MAX_LEARNED_TOKENS = 10_000_000

Key = tuple[str, str]
"""(the price table's model name, Envoy route name)"""


class _Recent:
    __slots__ = ("cached", "samples")

    def __init__(self) -> None:
        self.samples: deque[int] = deque(maxlen=SAMPLES)
        self.cached: int | None = None  # the percentile, until the next sample


class OutputEstimator:
    """Recent output tokens per (model, route), and the estimate they give."""

    def __init__(self, default_tokens: int, percentile: int = 95) -> None:
        if default_tokens < 0:
            raise ValueError("default_tokens must be >= 0")
        if not 1 <= percentile <= 100:
            raise ValueError("percentile must be between 1 and 100")
        self.default_tokens = default_tokens
        self.percentile = percentile
        self._recent: OrderedDict[Key, _Recent] = OrderedDict()

    def __len__(self) -> int:
        return len(self._recent)

    def record(self, key: Key, output_tokens: int) -> None:
        """One answer's real output tokens (not an estimate of a cut stream)."""
        if output_tokens < 0:
            return
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = _Recent()
            if len(self._recent) > MAX_KEYS:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(key)
        recent.samples.append(min(output_tokens, MAX_LEARNED_TOKENS))
        recent.cached = None

    def output_tokens(self, key: Key) -> int:
        """The output tokens a new request of ``key`` is assumed to produce:
        the percentile of the recent answers, or the default without enough of them."""
        recent = self._recent.get(key)
        if recent is None or len(recent.samples) < MIN_SAMPLES:
            return self.default_tokens
        if recent.cached is None:
            recent.cached = percentile(recent.samples, self.percentile)
        return recent.cached

    def estimate(self, key: Key, max_tokens: int | None) -> int:
        """``output_tokens(key)``, never more than the request's own limit."""
        tokens = self.output_tokens(key)
        return tokens if max_tokens is None else min(tokens, max_tokens)


def percentile(values: Iterable[int], p: int) -> int:
    """The nearest-rank ``p``-th percentile: the smallest value that at least
    ``p`` % of ``values`` do not exceed (``values`` must not be empty)."""
    ordered = sorted(values)
    rank = -(-p * len(ordered) // 100)  # ceil(p/100 * n), at least 1 for p >= 1
    return ordered[max(rank, 1) - 1]


def max_tokens_of(body: dict[str, object]) -> int | None:
    """The request's own output limit (OpenAI chat / Responses, Anthropic), or None."""
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def per_window(amount_nanos: int, limits: Iterable[int]) -> list[int]:
    """What a request of ``amount_nanos`` holds on each of its windows: never
    more than the window's policy amount (a request cannot need more room
    than the whole budget to be admitted, and must not block more)."""
    return [min(amount_nanos, limit) for limit in limits]
