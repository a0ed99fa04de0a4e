"""The 429: what a rejected client receives, in its own SDK's dialect.

The message names the policy, its limit, its window and when the window
resets, and tells what is spent from what requests still running hold
("$0.0000083 spent; $0.0024 more held by 3 requests in flight"); it shows
nothing about other members of a wildcard policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from ext_proc.admission.decide import Rejection
from spendgate.domain.policies import Scope
from spendgate.domain.pricing import format_usd
from spendgate.domain.windows import describe

ERROR_CODE = "budget_exceeded"
ErrorBody = Callable[[str], bytes]


def rejection_message(r: Rejection) -> str:
    p = r.policy
    reset = r.window.end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    who = ""
    if r.member and p.scope is Scope.TAG:
        who = f" for tag {p.target.partition('=')[0]}={r.member}"
    elif r.member and p.scope is not Scope.API_KEY:
        who = f" for {p.scope.value.lower().replace('_', ' ')} '{r.member}'"
    head = (
        f"Budget exceeded: policy '{p.name}' ({p.id}) allows {format_usd(p.amount_nanos)} "
        f"per {describe(p.window)}{who}; "
    )
    if not r.held_nanos:
        return (
            f"{head}{format_usd(r.spent_nanos)} spent. "
            f"Requests are rejected until the window resets at {reset}."
        )
    spent = r.spent_nanos - r.held_nanos
    n = r.held_requests
    by = f" by {n} request{'s' if n != 1 else ''} in flight" if n else " in flight"
    until = (
        f"until the window resets at {reset}."
        if spent >= p.amount_nanos
        else f"until those end within the budget, or the window resets at {reset}."
    )
    return (
        f"{head}{format_usd(spent)} spent; {format_usd(r.held_nanos)} more held{by}. "
        f"Requests are rejected {until}"
    )


def retry_after_seconds(r: Rejection, now: datetime) -> int:
    return max(1, math.ceil((r.window.end - now).total_seconds()))


def openai_error_body(message: str) -> bytes:
    """OpenAI's error shape; openai.RateLimitError.message carries ``message``."""
    return orjson.dumps(
        {"error": {"message": message, "type": ERROR_CODE, "param": None, "code": ERROR_CODE}}
    )


def rejection_headers(r: Rejection, now: datetime) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "retry-after": str(retry_after_seconds(r, now)),
        # The official SDKs retry a 429 by default; a budget does not come
        # back in seconds, so tell them not to.
        "x-should-retry": "false",
        "x-spendgate-policy": r.policy.id,
        "x-spendgate-reset": r.window.end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
