"""Exhaustion forecasts: the recent spend rate of a window and when, at that
rate, its budget will be gone. Pure: values and ``now`` in, values out.

The rate is an exponentially decayed sum of the spend observed in the window
(time constant ``horizon_s``), divided by the weight the time observed so far
could have given it, so a steady load reads as its true rate from the first
minutes on instead of rising slowly towards it:

    S(t)  = sum of cost_i * exp(-(t - t_i) / horizon)   (observations after the first)
    rate  = S(t) / (horizon * (1 - exp(-(t - since) / horizon)))

The first observation of a window does not count: it carries spend made
before anything was seen (since the last report), over an unknown span;
leaving it out keeps a steady load's rate unbiased. It is kept in S and
apart (``first_nanos``), and taken out when the rate is read, so that an
update is a function of the stored state and the new cost alone (the store
does it in the SQL statement that adds the spend, with the same arithmetic).

Minimum evidence: no forecast until the window's spend was seen at least
``MIN_SAMPLES`` times over at least ``MIN_EVIDENCE`` of the horizon. A single
burst (however many reports it spans) followed by silence never gets there,
and during silence the decay makes the rate fall, so the projected exhaustion
recedes instead of staying frozen at the burst's pace.

Floats are fine here: a rate is an estimate, never money that is charged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The spend must have been seen over at least this fraction of the horizon.
MIN_EVIDENCE = 0.25
# ... and at least this many times (reports that carried spend).
MIN_SAMPLES = 3
# A forecast further out than this is no forecast ("not at this pace").
MAX_FORECAST_S = 10 * 366 * 86400
# The horizon never exceeds this fraction of the window's length: a minute's
# window cannot wait an hour for evidence.
WINDOW_FRACTION = 0.25
MIN_HORIZON_S = 1.0
# The control plane's forecast_horizon_s unless configured.
DEFAULT_HORIZON_S = 3600.0


@dataclass(frozen=True, slots=True)
class Rate:
    """What is kept per window (policy, member, window start).

    ``decayed_nanos`` is S at ``at_ms`` with the first observation's cost
    (``first_nanos``, at ``since_ms``) in it; times are Unix milliseconds.
    ``samples`` 0: nothing observed yet (the other fields mean nothing).
    """

    decayed_nanos: float
    at_ms: int
    since_ms: int  # the window's first observation of spend
    last_ms: int  # its latest
    samples: int  # observations of spend, the first included
    first_nanos: int = 0


@dataclass(frozen=True, slots=True)
class Forecast:
    rate_nanos_per_s: float
    exhausted_at: int  # Unix seconds
    exhausted_in_s: int  # from the instant the forecast was made


@dataclass(frozen=True, slots=True)
class AlertRule:
    """A policy's forecast_alert: warn when the budget will be gone within
    ``within_s`` seconds (0 = no such rule), or (``before_window_end``)
    before the window ends at the current rate."""

    within_s: int = 0
    before_window_end: bool = False

    @property
    def enabled(self) -> bool:
        return self.within_s > 0 or self.before_window_end


def horizon_for(configured_s: float, window_s: float) -> float:
    """The time constant for a window ``window_s`` seconds long."""
    return max(MIN_HORIZON_S, min(configured_s, window_s * WINDOW_FRACTION))


def observe(prev: Rate | None, cost_nanos: int, now_ms: int, horizon_s: float) -> Rate:
    """The state after spend ``cost_nanos`` (> 0) was seen at ``now_ms``.

    A ``now_ms`` before the state's (clocks of two replicas) counts as the
    state's instant: weights never grow.
    """
    if prev is None or prev.samples <= 0:
        return Rate(float(cost_nanos), now_ms, now_ms, now_ms, 1, cost_nanos)
    at = max(now_ms, prev.at_ms)
    return Rate(
        decayed_at(prev, at, horizon_s) + float(cost_nanos),
        at,
        prev.since_ms,
        max(prev.last_ms, at),
        prev.samples + 1,
        prev.first_nanos,
    )


def decayed_at(r: Rate, now_ms: int, horizon_s: float) -> float:
    """S brought forward to ``now_ms`` (never backwards)."""
    dt = max(0, now_ms - r.at_ms) / 1000.0
    return r.decayed_nanos * math.exp(-dt / horizon_s)


def confident(r: Rate, horizon_s: float) -> bool:
    """Whether there is evidence enough to forecast from (see the module doc)."""
    span_s = (r.last_ms - r.since_ms) / 1000.0
    return r.samples >= MIN_SAMPLES and span_s >= MIN_EVIDENCE * horizon_s


def rate(r: Rate, now_ms: int, horizon_s: float) -> float:
    """Nano-dollars per second at ``now_ms`` (0 before any span was seen)."""
    elapsed_s = (max(now_ms, r.at_ms) - r.since_ms) / 1000.0
    if elapsed_s <= 0:
        return 0.0
    weight = -math.expm1(-elapsed_s / horizon_s) * horizon_s
    first = r.first_nanos * math.exp(-elapsed_s / horizon_s)
    return max(0.0, decayed_at(r, now_ms, horizon_s) - first) / weight


def project(
    r: Rate | None, *, spent_nanos: int, amount_nanos: int, now_ms: int, horizon_s: float
) -> Forecast | None:
    """When the budget will be gone at the current rate; None without
    evidence enough, when already spent, or when the rate would take longer
    than MAX_FORECAST_S."""
    if r is None or r.samples <= 0 or spent_nanos >= amount_nanos or not confident(r, horizon_s):
        return None
    per_s = rate(r, now_ms, horizon_s)
    if per_s <= 0:
        return None
    left_s = (amount_nanos - spent_nanos) / per_s
    if left_s > MAX_FORECAST_S:
        return None
    now_s = now_ms // 1000
    in_s = math.ceil(left_s)
    return Forecast(per_s, now_s + in_s, in_s)


def alert_due(f: Forecast | None, rule: AlertRule, *, window_end: int) -> bool:
    """Whether forecast ``f`` crosses ``rule`` (``window_end`` in Unix seconds)."""
    if f is None:
        return False
    if rule.within_s > 0 and f.exhausted_in_s <= rule.within_s:
        return True
    return rule.before_window_end and f.exhausted_at < window_end


def duration_text(seconds: float) -> str:
    """4h12m, 2d03h, 12m07s, 45s."""
    s = max(0, int(seconds))
    days, rem = divmod(s, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
