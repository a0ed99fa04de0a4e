"""Budget policies, events and propagation measurements for the fault tests."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import httpx

from control_plane.webhooks.events import crossings
from spendgate.domain.windows import window_for
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import policy_from_message, timestamp
from tests.faults.topology import TwoPairs
from tests.faults.traffic import Sent
from tests.harness import wait_until

# Month windows: a test never straddles a window boundary in practice, and
# spend checks sum every window anyway.
MONTHLY = pb.BudgetWindow(unit=pb.WINDOW_UNIT_MONTHS, count=1)


def create_policy(
    pairs: TwoPairs,
    *,
    amount_nanos: int,
    action: int = pb.ACTION_REJECT,
    scope: int = pb.SCOPE_USER,
    target: str = "",
    thresholds: Sequence[int] = (),
    name: str = "",
) -> pb.BudgetPolicy:
    """A policy created through control plane A's admin API."""
    return pairs.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name=name or f"fault-{uuid.uuid4().hex[:8]}",
                amount_usd=usd_text(amount_nanos),
                window=MONTHLY,
                action=action,  # type: ignore[arg-type]
                scope=scope,  # type: ignore[arg-type]
                target=target,
                alert_thresholds=list(thresholds),
            )
        ),
        metadata=pairs.admin,
        timeout=10,
    )


def usd_text(nanos: int) -> str:
    whole, frac = divmod(nanos, 10**9)
    return f"{whole}.{frac:09d}"


def probe(base_url: str, user: str) -> int:
    """One request that the provider never bills (it answers 400): 429 if a
    REJECT policy of ``user`` is exceeded in that pair's ext_proc."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        resp = client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "probe"}]},
            headers={
                "authorization": "Bearer sk-fault-test",
                "x-spendgate-user": user,
                "x-fake-status": "400",
                "x-fake-prompt-tokens": "1",
                "x-fake-completion-tokens": "1",
            },
        )
        return resp.status_code


def wait_policies_everywhere(pairs: TwoPairs, timeout: float = 20.0) -> None:
    """Return once both ext_procs enforce a snapshot holding every policy
    created so far.

    Policy snapshots are complete, so an ext_proc that knows a policy created
    now also knows every older one: create an exceeded probe policy (usage
    injected through the data-plane API) and wait for both pairs to 429 its
    user. The probe's requests never reach the provider's bill.
    """
    user = f"probe-{uuid.uuid4().hex[:8]}"
    created = create_policy(pairs, amount_nanos=1000, target=user, name=f"barrier-{user}")
    policy = policy_from_message(created)
    start = int(window_for(policy.window, datetime.now(UTC)).start.timestamp())
    pairs.dataplane.ReportUsage(
        dp.ReportUsageRequest(
            data_plane_id="fault-test-barrier",
            batch_id=f"barrier-{uuid.uuid4().hex}",
            increments=[
                dp.SpendIncrement(
                    policy_id=created.id,
                    window_start=timestamp(start),
                    cost_nanos=1000,
                    request_count=1,
                )
            ],
        ),
        metadata=pairs.data,
        timeout=10,
    )
    for i, url in enumerate(pairs.base_urls):
        wait_until(
            lambda url=url: probe(url, user) == 429,
            timeout=timeout,
            interval=0.05,
            message=f"pair {i} enforcing the newest policy snapshot",
        )


def update_policy(
    pairs: TwoPairs, policy_id: str, paths: Iterable[str], **fields: object
) -> pb.BudgetPolicy:
    """UpdateBudgetPolicy on control plane A with an update mask."""
    req = pb.UpdateBudgetPolicyRequest(policy=pb.BudgetPolicy(id=policy_id, **fields))  # type: ignore[arg-type]
    req.update_mask.paths.extend(paths)
    return pairs.budgets.UpdateBudgetPolicy(req, metadata=pairs.admin, timeout=10)


# ---- events ------------------------------------------------------------------

EventKey = tuple[str, int, str, int]  # kind, threshold, member, window_start


def recorded_events(pairs: TwoPairs, policy_id: str) -> Counter[EventKey]:
    rows = pairs.query(
        "SELECT kind, threshold, member, window_start FROM webhook_events WHERE policy_id = %s",
        policy_id,
    )
    return Counter((str(k), int(t), str(m), int(w)) for k, t, m, w in rows)


def expected_events(
    pairs: TwoPairs, policy: pb.BudgetPolicy, thresholds: Sequence[int]
) -> Counter[EventKey]:
    """One event per level each window's recorded spend reached."""
    amount = policy_from_message(policy).amount_nanos
    rows = pairs.query(
        "SELECT member, window_start, spent_nanos FROM window_spend WHERE policy_id = %s",
        policy.id,
    )
    return Counter(
        (c.kind, c.threshold, str(member), int(start))
        for member, start, spent in rows
        for c in crossings(amount, tuple(thresholds), int(spent))
    )


# ---- propagation -------------------------------------------------------------


def last_admitted_start(results: Iterable[Sent], pair: int, user: str | None = None) -> float:
    """When the last request that pair admitted was sent (-inf if none)."""
    starts = [r.start for r in results if r.pair == pair and r.ok and user in (None, r.user)]
    return max(starts, default=float("-inf"))


def first_rejected_end(results: Iterable[Sent], pair: int, after: float) -> float | None:
    ends = [r.end for r in results if r.pair == pair and r.status == 429 and r.start >= after]
    return min(ends, default=None)


def settle_spend(pairs: TwoPairs, policy_id: str, expected: int, timeout: float = 30.0) -> int:
    """The policy's recorded spend once it equals ``expected`` (or when
    ``timeout`` runs out), read again after a few more flush intervals so a
    late double count would show."""
    deadline = time.monotonic() + timeout
    while pairs.spent_nanos(policy_id) != expected and time.monotonic() < deadline:
        pairs.check_alive()
        time.sleep(0.05)
    time.sleep(5 * pairs.flush_interval_ms / 1000)
    return pairs.spent_nanos(policy_id)


def amount_nanos(policy: pb.BudgetPolicy) -> int:
    return policy_from_message(policy).amount_nanos


def stable_spend(pairs: TwoPairs, policy_id: str, timeout: float = 30.0) -> int:
    """The policy's recorded spend once every ext_proc has delivered its usage
    and the value holds still for a few flush intervals."""
    pairs.wait_usage_delivered(timeout)
    deadline = time.monotonic() + timeout
    last = pairs.spent_nanos(policy_id)
    while True:
        time.sleep(5 * pairs.flush_interval_ms / 1000)
        now = pairs.spent_nanos(policy_id)
        if now == last or time.monotonic() > deadline:
            return now
        last = now
