"""Admission: pure, local, instant.

Given the policies that match a request, the spend this data plane knows of
(control plane totals + its own unsent usage) and ``now``, decide whether the
request may go to the provider. The request that crosses a limit completes;
the ones after it are rejected until the window resets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from ext_proc.admission import windows
from spendgate.domain.policies import Action, Match, Policy
from spendgate.domain.windows import Window

SpendKey = tuple[str, str, int]
"""(policy id, member, window start in Unix seconds)"""
Held = Callable[[SpendKey], tuple[int, int]]
"""key -> (nanos, requests) of its spend that running requests hold"""


def nothing_held(key: SpendKey) -> tuple[int, int]:
    return 0, 0


@dataclass(frozen=True, slots=True)
class Rejection:
    policy: Policy
    member: str
    window: Window
    spent_nanos: int  # counted against the limit: spend and holds
    # The part of spent_nanos that requests still running hold (their
    # estimates, here and on other data planes), and how many they are.
    held_nanos: int = 0
    held_requests: int = 0

    @property
    def held_only(self) -> bool:
        """Spend alone is under the limit: running requests' holds fill the
        rest, and room comes back within seconds as they end (where they cost
        less than they hold). A $0 budget is never held only, nor is a
        rejection with nothing held (the control plane's, when this data
        plane's view still shows room: it is taken as spent, as before)."""
        return self.held_nanos > 0 and self.spent_nanos - self.held_nanos < self.policy.amount_nanos


def rejection(
    policy: Policy, member: str, window: Window, spent_nanos: int, held: tuple[int, int]
) -> Rejection:
    """A Rejection telling spent from held (``held``: (nanos, requests))."""
    nanos, requests = held
    if not nanos:
        return Rejection(policy, member, window, spent_nanos)
    return Rejection(policy, member, window, spent_nanos, min(nanos, spent_nanos), requests)


def decide(
    matches: Iterable[Match],
    spent: Callable[[SpendKey], int],
    now: datetime,
    held: Held = nothing_held,
) -> Rejection | None:
    """The exceeded REJECT policy whose window resets last, or None to admit;
    a window whose spend alone is at the limit outranks one that running
    requests' holds fill (``held``: what of ``spent(key)`` they hold).

    Spend is compared with the limit as the policy says now (not with an
    "exceeded" flag computed earlier), so raising a limit admits at once.

    Reporting the latest reset makes ``retry-after`` honest: no request can
    pass before every exceeded window has reset. Likewise a rejection is
    held only (retry in seconds) when every exceeded window is.
    """
    worst: Rejection | None = None
    for policy, member in matches:
        if not policy.enforces:  # ALERT, or a SHADOW policy (see shadowed)
            continue
        window, start = windows.current(policy.window, now)
        key = (policy.id, member, start)
        amount = spent(key)
        if amount < policy.amount_nanos:
            continue
        r = rejection(policy, member, window, amount, held(key))
        if worst is None or _rank(r) > _rank(worst):
            worst = r
    return worst


def _rank(r: Rejection) -> tuple[bool, datetime]:
    return not r.held_only, r.window.end


def shadowed(
    matches: Iterable[Match],
    spent: Callable[[SpendKey], int],
    now: datetime,
) -> list[SpendKey]:
    """The windows of SHADOW policies that would refuse the request: the
    same rule as ``decide`` (spend and holds at or over the limit), but the
    request is admitted; the caller counts these."""
    out: list[SpendKey] = []
    for policy, member in matches:
        if not policy.shadow or policy.action is not Action.REJECT:
            continue
        key = (policy.id, member, windows.current(policy.window, now)[1])
        if spent(key) >= policy.amount_nanos:
            out.append(key)
    return out
