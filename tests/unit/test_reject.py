"""The 429 a rejected client receives: OpenAI error body, message and headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from ext_proc.admission.decide import Rejection
from ext_proc.protocol.reject import (
    ERROR_CODE,
    error_code,
    openai_error_body,
    rejection_headers,
    rejection_message,
    retry_after_seconds,
)
from spendgate.domain.policies import Action, Policy, Scope, hash_api_key
from spendgate.domain.windows import Window, WindowSpec, WindowUnit, window_for

USD = 10**9
NOW = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
DAY = WindowSpec(WindowUnit.DAYS)
KEY_HASH = hash_api_key("sk-secret-key")


def rejection(
    scope: Scope = Scope.GLOBAL,
    target: str = "",
    member: str = "",
    window: WindowSpec = DAY,
    amount: int = 10 * USD,
    spent: int = 10 * USD,
) -> Rejection:
    p = Policy("bp_01TEAM", "Team cap", amount, window, Action.REJECT, scope, target)
    return Rejection(p, member, window_for(window, NOW), spent)


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        pytest.param(
            rejection(),
            "Budget exceeded: policy 'Team cap' (bp_01TEAM) allows $10.00 per 1 day; "
            "$10.00 spent. Requests are rejected until the window resets at "
            "2025-03-11T00:00:00Z.",
            id="global",
        ),
        pytest.param(
            rejection(Scope.USER, "*", "alice", spent=10_250_000_000),
            "Budget exceeded: policy 'Team cap' (bp_01TEAM) allows $10.00 per 1 day "
            "for user 'alice'; $10.25 spent. Requests are rejected until the window "
            "resets at 2025-03-11T00:00:00Z.",
            id="wildcard-user-named",
        ),
        pytest.param(
            rejection(Scope.API_KEY, "*", KEY_HASH),
            "Budget exceeded: policy 'Team cap' (bp_01TEAM) allows $10.00 per 1 day; "
            "$10.00 spent. Requests are rejected until the window resets at "
            "2025-03-11T00:00:00Z.",
            id="wildcard-api-key-hash-hidden",
        ),
        pytest.param(
            rejection(Scope.TAG, "team=*", "search"),
            "Budget exceeded: policy 'Team cap' (bp_01TEAM) allows $10.00 per 1 day "
            "for tag team=search; $10.00 spent. Requests are rejected until the window "
            "resets at 2025-03-11T00:00:00Z.",
            id="wildcard-tag",
        ),
        pytest.param(
            rejection(Scope.USER, "alice", ""),
            "Budget exceeded: policy 'Team cap' (bp_01TEAM) allows $10.00 per 1 day; "
            "$10.00 spent. Requests are rejected until the window resets at "
            "2025-03-11T00:00:00Z.",
            id="exact-user",
        ),
        pytest.param(
            rejection(window=WindowSpec(WindowUnit.HOURS, 6), amount=1_500_000, spent=1_600_000),
            "Budget exceeded: policy 'Team cap' (bp_01TEAM) allows $0.0015 per 6 hours; "
            "$0.0016 spent. Requests are rejected until the window resets at "
            "2025-03-10T18:00:00Z.",
            id="six-hours-sub-cent",
        ),
        pytest.param(
            rejection(window=WindowSpec(WindowUnit.DAYS, timezone="America/New_York")),
            "Budget exceeded: policy 'Team cap' (bp_01TEAM) allows $10.00 per 1 day "
            "(America/New_York); $10.00 spent. Requests are rejected until the window "
            "resets at 2025-03-11T04:00:00Z.",
            id="reset-shown-in-utc",
        ),
        pytest.param(
            rejection(window=WindowSpec(WindowUnit.WEEKS, week_start=6)),
            "Budget exceeded: policy 'Team cap' (bp_01TEAM) allows $10.00 per 1 week "
            "(from Sunday); $10.00 spent. Requests are rejected until the window resets "
            "at 2025-03-16T00:00:00Z.",
            id="week-from-sunday",
        ),
    ],
)
def test_rejection_message(r: Rejection, expected: str) -> None:
    assert rejection_message(r) == expected


def test_api_key_never_appears_in_message_or_headers() -> None:
    r = rejection(Scope.API_KEY, "*", KEY_HASH)
    text = rejection_message(r) + repr(rejection_headers(r, NOW, held_retry_after_s=2))
    assert KEY_HASH not in text
    assert KEY_HASH.removeprefix("sha256:") not in text


def test_openai_error_body_is_exact() -> None:
    r = rejection(Scope.USER, "*", "alice")
    body = openai_error_body(rejection_message(r))
    assert orjson.loads(body) == {
        "error": {
            "message": rejection_message(r),
            "type": "budget_exceeded",
            "param": None,
            "code": "budget_exceeded",
        }
    }
    assert body == (
        b'{"error":{"message":"' + rejection_message(r).encode() + b'",'
        b'"type":"budget_exceeded","param":null,"code":"budget_exceeded"}}'
    )
    assert ERROR_CODE == "budget_exceeded"


def test_openai_error_body_escapes_quotes() -> None:
    assert orjson.loads(openai_error_body('policy "x"\n'))["error"]["message"] == 'policy "x"\n'


def test_rejection_headers() -> None:
    r = rejection(Scope.USER, "*", "alice")
    assert rejection_headers(r, NOW, held_retry_after_s=2) == {
        "content-type": "application/json",
        "retry-after": str(11 * 3600 + 30 * 60),
        "x-should-retry": "false",
        "x-spendgate-error": "budget_exceeded",
        "x-spendgate-policy": "bp_01TEAM",
        "x-spendgate-reset": "2025-03-11T00:00:00Z",
    }


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        pytest.param(NOW, 41400, id="whole-seconds"),
        pytest.param(NOW + timedelta(microseconds=1), 41400, id="rounds-up"),
        pytest.param(NOW + timedelta(seconds=0.5), 41400, id="half-second-rounds-up"),
        pytest.param(datetime(2025, 3, 10, 23, 59, 59, 900_000, tzinfo=UTC), 1, id="under-1s"),
        pytest.param(datetime(2025, 3, 11, tzinfo=UTC), 1, id="at-reset-min-1"),
        pytest.param(datetime(2025, 3, 11, 0, 5, tzinfo=UTC), 1, id="after-reset-min-1"),
    ],
)
def test_retry_after_is_ceil_seconds_at_least_1(now: datetime, expected: int) -> None:
    r = rejection()
    assert retry_after_seconds(r, now) == expected
    assert rejection_headers(r, now, held_retry_after_s=2)["retry-after"] == str(expected)


def test_reset_header_is_utc_for_local_windows() -> None:
    spec = WindowSpec(WindowUnit.DAYS, timezone="Asia/Tokyo")
    r = rejection(window=spec)
    assert r.window == Window(
        datetime(2025, 3, 9, 15, tzinfo=UTC), datetime(2025, 3, 10, 15, tzinfo=UTC)
    )
    headers = rejection_headers(r, NOW, held_retry_after_s=2)
    assert headers["x-spendgate-reset"] == "2025-03-10T15:00:00Z"
    assert headers["retry-after"] == str(int(timedelta(hours=2, minutes=30).total_seconds()))


def held(spent: int, held_nanos: int, requests: int, amount: int = 10 * USD) -> Rejection:
    r = rejection(amount=amount, spent=spent + held_nanos)
    return Rejection(r.policy, r.member, r.window, r.spent_nanos, held_nanos, requests)


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        pytest.param(
            held(8_300, 2_400_000, 3, amount=2_000_000),
            "Budget held by 3 requests in flight: policy 'Team cap' (bp_01TEAM) allows "
            "$0.002 per 1 day; $0.0000083 spent; $0.0024 more held by 3 requests in flight. "
            "Retry shortly: room comes back as those requests end within the budget (the "
            "window resets at 2025-03-11T00:00:00Z).",
            id="held-by-running-requests",
        ),
        pytest.param(
            held(10 * USD, USD, 1),
            "Budget exceeded: policy 'Team cap' (bp_01TEAM) allows $10.00 per 1 day; "
            "$10.00 spent; $1.00 more held by 1 request in flight. Requests are rejected "
            "until the window resets at 2025-03-11T00:00:00Z.",
            id="spent-and-held",
        ),
        pytest.param(
            held(USD, 9 * USD, 0),
            "Budget held in flight: policy 'Team cap' (bp_01TEAM) allows $10.00 per 1 day; "
            "$1.00 spent; $9.00 more held in flight. Retry shortly: room comes back as those "
            "requests end within the budget (the window resets at 2025-03-11T00:00:00Z).",
            id="held-by-usage-not-yet-applied",
        ),
    ],
)
def test_the_message_tells_spent_from_held(r: Rejection, expected: str) -> None:
    assert rejection_message(r) == expected


@pytest.mark.parametrize(
    ("r", "held_only", "retry_after", "should_retry", "code"),
    [
        pytest.param(rejection(), False, "41400", "false", "budget_exceeded", id="spent"),
        pytest.param(
            held(9 * USD, 2 * USD, 3), True, "7", "true", "budget_held", id="spent-under-limit"
        ),
        pytest.param(
            held(10 * USD - 1, 1, 1), True, "7", "true", "budget_held", id="one-nano-under"
        ),
        pytest.param(
            held(10 * USD, 1, 1), False, "41400", "false", "budget_exceeded", id="spent-at-limit"
        ),
        pytest.param(
            held(0, 1, 1, amount=0), False, "41400", "false", "budget_exceeded", id="zero-budget"
        ),
        pytest.param(
            rejection(spent=USD), False, "41400", "false", "budget_exceeded", id="nothing-held"
        ),
    ],
)
def test_a_budget_full_of_holds_asks_for_a_retry_in_seconds(
    r: Rejection, held_only: bool, retry_after: str, should_retry: str, code: str
) -> None:
    """Spend alone under the limit: the holds end within seconds, so the SDK
    may retry soon; spend at the limit: not before the window resets."""
    assert r.held_only is held_only
    assert error_code(r) == code
    assert rejection_headers(r, NOW, held_retry_after_s=7) == {
        "content-type": "application/json",
        "retry-after": retry_after,
        "x-should-retry": should_retry,
        "x-spendgate-error": code,
        "x-spendgate-policy": "bp_01TEAM",
        "x-spendgate-reset": "2025-03-11T00:00:00Z",
    }
    assert rejection_message(r).startswith("Budget held" if held_only else "Budget exceeded")
