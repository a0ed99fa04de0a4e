"""The 429: what a rejected client receives, in its own SDK's dialect.

The message names the policy, its limit, its window and when the window
resets, and tells what is spent from what requests still running hold
("$0.0000083 spent; $0.0024 more held by 3 requests in flight"); it shows
nothing about other members of a wildcard policy.

Two kinds of 429 (``x-spendgate-error`` and the error code say which):
``budget_exceeded``, spend alone is at the limit: ``retry-after`` is the
window's reset and ``x-should-retry: false``, so the SDKs give up at once;
``budget_held``, spend is under the limit and running requests' holds fill
the rest: ``retry-after`` is a few seconds (``held_retry_after_s``) and
``x-should-retry: true``, so the SDKs retry by themselves. A retry costs one
local decision; once the holds became spend at the limit it receives the
first kind and the SDK stops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from ext_proc.admission.decide import Rejection
from ext_proc.stats import BUDGET_EXCEEDED, BUDGET_HELD
from spendgate.domain.policies import Scope
from spendgate.domain.pricing import format_usd
from spendgate.domain.windows import describe

ERROR_CODE = BUDGET_EXCEEDED
HELD_CODE = BUDGET_HELD
ErrorBody = Callable[[str], bytes]


def error_code(r: Rejection) -> str:
    """``budget_held`` when retrying in seconds may pass, else ``budget_exceeded``."""
    return HELD_CODE if r.held_only else ERROR_CODE


def rejection_message(r: Rejection) -> str:
    p = r.policy
    reset = r.window.end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    who = ""
    if r.member and p.scope is Scope.TAG:
        who = f" for tag {p.target.partition('=')[0]}={r.member}"
    elif r.member and p.scope is not Scope.API_KEY:
        who = f" for {p.scope.value.lower().replace('_', ' ')} '{r.member}'"
    policy = (
        f"policy '{p.name}' ({p.id}) allows {format_usd(p.amount_nanos)} "
        f"per {describe(p.window)}{who}; "
    )
    if not r.held_nanos:
        return (
            f"Budget exceeded: {policy}{format_usd(r.spent_nanos)} spent. "
            f"Requests are rejected until the window resets at {reset}."
        )
    spent = r.spent_nanos - r.held_nanos
    n = r.held_requests
    by = f" by {n} request{'s' if n != 1 else ''} in flight" if n else " in flight"
    amounts = f"{format_usd(spent)} spent; {format_usd(r.held_nanos)} more held{by}."
    if not r.held_only:
        return (
            f"Budget exceeded: {policy}{amounts} "
            f"Requests are rejected until the window resets at {reset}."
        )
    return (
        f"Budget held{by}: {policy}{amounts} Retry shortly: room comes back as those "
        f"requests end within the budget (the window resets at {reset})."
    )


def retry_after_seconds(r: Rejection, now: datetime) -> int:
    return max(1, math.ceil((r.window.end - now).total_seconds()))


def openai_error_body(message: str) -> bytes:
    """OpenAI's error shape; openai.RateLimitError.message carries ``message``."""
    return orjson.dumps(
        {"error": {"message": message, "type": ERROR_CODE, "param": None, "code": ERROR_CODE}}
    )


def rejection_headers(r: Rejection, now: datetime, *, held_retry_after_s: int) -> dict[str, str]:
    """The 429's headers; ``held_retry_after_s``: its ``retry-after`` when
    running requests' holds, not spend, fill the budget."""
    held = r.held_only
    return {
        "content-type": "application/json",
        "retry-after": str(held_retry_after_s if held else retry_after_seconds(r, now)),
        # The official SDKs retry a 429 by default: a spent budget does not
        # come back in seconds, so tell them not to; a held one may, so tell
        # them to (whatever their own rules say of the status).
        "x-should-retry": "true" if held else "false",
        "x-spendgate-error": error_code(r),
        "x-spendgate-policy": r.policy.id,
        "x-spendgate-reset": r.window.end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
