"""When to try a delivery again, and when to give up. Pure.

Retry n (after n failed attempts) waits ``min(base * 2**(n-1), max)`` seconds
less a random part of up to ``jitter`` of it (so retries after an outage
spread out, and never exceed ``max``). A receiver's Retry-After wins when
longer. A delivery is given up after ``max_attempts`` attempts, or when its
next attempt would come after ``max_age`` from when it first became due.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

from control_plane.config import Settings

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 10.0
    max_s: float = 3600.0
    jitter: float = 0.5
    max_attempts: int = 15
    max_age: timedelta = timedelta(hours=48)

    @classmethod
    def from_settings(cls, s: Settings) -> RetryPolicy:
        return cls(
            base_s=s.webhook_backoff_base_s,
            max_s=s.webhook_backoff_max_s,
            jitter=s.webhook_backoff_jitter,
            max_attempts=s.webhook_max_attempts,
            max_age=timedelta(hours=s.webhook_max_age_hours),
        )

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds before the next attempt after ``failures`` failed ones (>= 1)."""
        exp = min(failures - 1, 60)  # 2**60 * base is far past any max
        d = min(self.base_s * float(2**exp), self.max_s)
        return d * (1 - self.jitter * rng.random())


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str
    next_attempt_at: datetime
    gave_up: str  # why it was given up; empty otherwise


def after_attempt(
    policy: RetryPolicy,
    *,
    delivered: bool,
    attempts: int,
    now: datetime,
    due_since: datetime,
    retry_after_s: float | None,
    rng: random.Random,
) -> Outcome:
    """The delivery's state after its ``attempts``-th attempt ended at ``now``."""
    if delivered:
        return Outcome(DELIVERED, now, "")
    if attempts >= policy.max_attempts:
        return Outcome(FAILED, now, f"gave up after {attempts} attempts")
    wait = max(policy.delay(attempts, rng), retry_after_s or 0.0)
    next_at = now + timedelta(seconds=wait)
    if next_at > due_since + policy.max_age:
        return Outcome(FAILED, now, f"gave up: not delivered within {_hours(policy.max_age)}")
    return Outcome(PENDING, next_at, "")


def expired(policy: RetryPolicy, *, now: datetime, due_since: datetime) -> bool:
    return now > due_since + policy.max_age


def too_old_message(policy: RetryPolicy) -> str:
    return f"gave up: not delivered within {_hours(policy.max_age)}"


def _hours(age: timedelta) -> str:
    hours = age.total_seconds() / 3600
    return f"{hours:g} hour{'' if hours == 1 else 's'}"


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP
    date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())
