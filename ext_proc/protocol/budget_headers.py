"""Budget headers for clients: the tightest budget an admitted response is
under, in the style of the providers' own rate-limit headers.

Only policies with ``expose_to_clients`` are ever shown (a global budget's
size can be confidential); among them the one with the least remaining USD
(spend and holds both counted), the earlier reset breaking a tie. Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

from ext_proc.admission import windows
from ext_proc.admission.decide import SpendKey
from spendgate.domain.policies import Match
from spendgate.domain.pricing import format_usd

PREFIX = "x-spendgate-budget-"
LIMIT = PREFIX + "limit"
REMAINING = PREFIX + "remaining"
RESET = PREFIX + "reset"
POLICY = PREFIX + "policy"


def budget_headers(
    matches: Iterable[Match], spent: Callable[[SpendKey], int], now: datetime
) -> dict[str, str]:
    """The headers of the tightest exposed budget (empty: none applies).

    ``x-spendgate-budget-limit`` and ``-remaining`` are USD decimals
    (remaining never below 0), ``-reset`` the window's end in RFC 3339 (UTC),
    ``-policy`` the policy id.
    """
    best: tuple[int, datetime, str, int] | None = None
    for policy, member in matches:
        if not policy.expose_to_clients:
            continue
        window, start = windows.current(policy.window, now)
        left = max(policy.amount_nanos - spent((policy.id, member, start)), 0)
        candidate = (left, window.end, policy.id, policy.amount_nanos)
        if best is None or candidate[:3] < best[:3]:
            best = candidate
    if best is None:
        return {}
    left, end, policy_id, amount = best
    return {
        LIMIT: format_usd(amount).removeprefix("$"),
        REMAINING: format_usd(left).removeprefix("$"),
        RESET: end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        POLICY: policy_id,
    }


def foreign(headers: Mapping[str, str]) -> list[str]:
    """Budget headers a response already carries (a provider's, or anyone's
    but spendgate's): removed before spendgate's own are set."""
    return [k for k in headers if k.startswith(PREFIX)]
