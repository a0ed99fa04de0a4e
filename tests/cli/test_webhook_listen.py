"""`spendgate webhook listen`'s check of a delivery (Standard Webhooks
signature and timestamp) and the line it prints for an event."""

from __future__ import annotations

import json

import pytest

from control_plane.webhooks.signing import new_secret, signed_headers
from spendgate.cli.listen import check_delivery, describe

SECRET = new_secret()
NOW = 1_800_000_000
BODY = json.dumps(
    {
        "entity": "budget_policy",
        "action": "threshold_crossed",
        "timestamp": "2027-01-15T08:00:00Z",
        "data": {
            "policy_name": "team\x1b[31m",
            "scope": "user",
            "member": "alice",
            "threshold_percent": 80,
            "spent_usd": "8.1",
            "amount_usd": "10",
            "percent_used": "81.0",
            "action": "alert",
        },
    }
).encode()


def headers(secret: str = SECRET, msg_id: str = "msg_1", at: int = NOW) -> dict[str, str]:
    return signed_headers(secret, msg_id, at, BODY)


def test_a_genuine_delivery_passes() -> None:
    assert check_delivery(SECRET, headers(), BODY, NOW + 10) == ("msg_1", json.loads(BODY))


def test_one_of_several_signatures_may_match() -> None:
    h = headers()
    h["webhook-signature"] = "v1,bm90IHRoaXMgb25l " + h["webhook-signature"]
    assert isinstance(check_delivery(SECRET, h, BODY, NOW), tuple)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("other secret", "webhook-signature does not match the secret"),
        ("other body", "webhook-signature does not match the secret"),
        ("no signature", "webhook-signature does not match the secret"),
        ("old", "webhook-timestamp is more than 300 s away"),
        ("future", "webhook-timestamp is more than 300 s away"),
        ("no id", "missing or malformed webhook-id"),
        ("control id", "missing or malformed webhook-id"),
        ("huge id", "missing or malformed webhook-id"),
        ("negative timestamp", "missing or malformed webhook-timestamp"),
        ("huge timestamp", "missing or malformed webhook-timestamp"),
    ],
)
def test_anything_else_is_refused_with_a_reason(change: str, problem: str) -> None:
    h, body = headers(), BODY
    if change == "other secret":
        h = headers(new_secret())
    elif change == "other body":
        body = BODY.replace(b"8.1", b"0.1")
    elif change == "no signature":
        del h["webhook-signature"]
    elif change == "old":
        h = headers(at=NOW - 301)
    elif change == "future":
        h = headers(at=NOW + 301)
    elif change == "no id":
        del h["webhook-id"]
    elif change == "control id":
        h["webhook-id"] = "msg\n1"
    elif change == "huge id":
        h["webhook-id"] = "m" * 257
    elif change == "negative timestamp":
        h["webhook-timestamp"] = "-5"
    elif change == "huge timestamp":
        h["webhook-timestamp"] = "1" * 13
    assert str(check_delivery(SECRET, h, body, NOW)).startswith(problem)


def test_a_signed_body_that_is_not_an_object_is_refused() -> None:
    body = b"[1]"
    h = signed_headers(SECRET, "msg_2", NOW, body)
    assert check_delivery(SECRET, h, body, NOW) == "body is not a JSON object"


def test_the_printed_line_names_the_budget_and_escapes_control_characters() -> None:
    line = describe(json.loads(BODY))
    assert line == (
        "2027-01-15T08:00:00Z  budget_policy.threshold_crossed  "
        "policy team\\x1b[31m (user member alice)  80% threshold  $8.1 of $10 (81.0%), alert"
    )
    assert "\x1b" not in line
