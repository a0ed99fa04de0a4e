"""Retry timing and giving up (pure)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.webhooks.backoff import RetryPolicy, after_attempt, parse_retry_after

T = datetime(2025, 3, 10, 12, tzinfo=UTC)


def test_exponential_capped_and_jittered_below_the_cap() -> None:
    exact = RetryPolicy(base_s=10, max_s=60, jitter=0)
    assert [exact.delay(n, random.Random()) for n in range(1, 7)] == [10, 20, 40, 60, 60, 60]
    assert exact.delay(10_000, random.Random()) == 60  # no overflow
    jittered = RetryPolicy(base_s=10, max_s=60, jitter=0.5)
    rng = random.Random(1)
    samples = [jittered.delay(5, rng) for _ in range(500)]
    assert all(30 <= s <= 60 for s in samples)
    assert max(samples) - min(samples) > 20  # spread out, not a herd


def outcome(**kw: object) -> tuple[str, datetime, str]:
    args: dict[str, object] = {
        "delivered": False,
        "attempts": 1,
        "now": T,
        "due_since": T,
        "retry_after_s": None,
        "rng": random.Random(),
    }
    args.update(kw)
    policy = RetryPolicy(base_s=10, max_s=60, jitter=0, max_attempts=3, max_age=timedelta(hours=1))
    o = after_attempt(policy, **args)  # type: ignore[arg-type]
    return o.state, o.next_attempt_at, o.gave_up


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        pytest.param({"delivered": True}, ("delivered", T, ""), id="delivered"),
        pytest.param({}, ("pending", T + timedelta(seconds=10), ""), id="first-retry"),
        pytest.param(
            {"attempts": 2}, ("pending", T + timedelta(seconds=20), ""), id="second-retry"
        ),
        pytest.param({"attempts": 3}, ("failed", T, "gave up after 3 attempts"), id="max-attempts"),
        pytest.param(
            {"retry_after_s": 300.0},
            ("pending", T + timedelta(seconds=300), ""),
            id="retry-after-longer-wins",
        ),
        pytest.param(
            {"retry_after_s": 1.0},
            ("pending", T + timedelta(seconds=10), ""),
            id="backoff-longer-wins",
        ),
        pytest.param(
            {"retry_after_s": 3601.0},
            ("failed", T, "gave up: not delivered within 1 hour"),
            id="would-be-too-late",
        ),
    ],
)
def test_after_attempt(kw: dict[str, object], expected: tuple[str, datetime, str]) -> None:
    assert outcome(**kw) == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Mon, 10 Mar 2025 12:01:00 GMT", 60.0),
        ("Mon, 10 Mar 2025 11:00:00 GMT", 0.0),  # in the past: now
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, T) == seconds
