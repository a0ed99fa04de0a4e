"""An ext_proc dies under traffic (``kill -9``, or a plain restart).

docs/concepts/request-flow.md ("Usage is never lost"): usage is journaled (fdatasync) every flush
interval before it is sent, so a ``kill -9`` loses at most the last
``flush_interval_ms`` of usage: what the killed process had charged but not
yet journaled, plus the answers in flight when it died (the provider billed
them; ext_proc never saw their end). Meanwhile its Envoy fails closed
(``failure_mode_allow: false``): 5xx, and the provider is not called. The
restarted ext_proc (same port, same journal) replays its journal and meters
again; the other pair is not affected at all.

Each phase of the victim's traffic has its own user and ALERT budget, so the
loss at the kill and any loss after the restart are measured apart.
"""

from __future__ import annotations

import itertools
import signal
import time
import uuid
from collections.abc import Iterable

import pytest

from spendgate.v1 import budget_pb2 as pb
from tests.faults.budgets import (
    create_policy,
    settle_spend,
    stable_spend,
    wait_policies_everywhere,
)
from tests.faults.topology import TwoPairs
from tests.faults.traffic import (
    SEQ_BASE,
    Load,
    Sent,
    provider_bill,
    provider_seen_prompts,
    seq_tokens,
    statuses,
    usd,
)
from tests.harness import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
VICTIM = 0
# Client-side times trail ext_proc's: an answer is charged a little before the
# client has read it, and the next flush starts flush_interval_ms after the
# previous one *ended*. This much is added to the documented window when
# deciding which answers could still have been unjournaled at the kill.
SLACK_S = 0.1


def alert_for(pairs: TwoPairs, user: str) -> pb.BudgetPolicy:
    return create_policy(pairs, amount_nanos=10**12, action=pb.ACTION_ALERT, target=user)


def cost(results: Iterable[Sent]) -> int:
    return sum(r.cost for r in results)


def billed_results(pairs: TwoPairs, results: list[Sent]) -> list[Sent]:
    """The requests the provider billed (each bill line names its request)."""
    billed = provider_bill(pairs.provider)
    seqs = {b.usage.input_tokens - SEQ_BASE for b in billed}  # type: ignore[operator]
    found = [r for r in results if r.seq in seqs]
    assert len(found) == len(billed), "a bill line matches no request"
    return found


def test_kill_9_of_one_ext_proc_loses_at_most_one_flush_interval(pairs: TwoPairs) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    steady, before, after = (alert_for(pairs, u) for u in ("steady", "before", "after"))
    wait_policies_everywhere(pairs)
    victim = pairs.ext_procs[VICTIM]
    counter = itertools.count(1)
    other = Load(pairs.base_urls, workspace, counter)
    other.add(1 - VICTIM, "steady", tokens=seq_tokens)
    first = Load(pairs.base_urls, workspace, counter)
    first.add(VICTIM, "before", tokens=seq_tokens)
    second = Load(pairs.base_urls, workspace, counter)
    try:
        time.sleep(2.0)
        victim.kill()
        killed_at = time.monotonic()
        time.sleep(2.0)
        restarting_at = time.monotonic()
        first.stop()
        second.add(VICTIM, "after", tokens=seq_tokens)
        victim.start()
        victim.wait_ready()
        wait_until(victim.is_synced, timeout=20, interval=0.005, message="victim synced")
        synced_at = time.monotonic()
        time.sleep(2.0)
    finally:
        results = first.stop() + second.stop() + other.stop()

    billed = billed_results(pairs, results)
    recorded = {p.id: stable_spend(pairs, p.id) for p in (steady, before, after)}

    def loss(policy: pb.BudgetPolicy, user: str) -> int:
        return cost(r for r in billed if r.user == user) - recorded[policy.id]

    # While the victim was down its Envoy answered 5xx and called no provider.
    down = [r for r in results if r.pair == VICTIM and killed_at < r.start < restarting_at]
    seen = provider_seen_prompts(pairs.provider)
    assert down and statuses(down).keys() == {500}, statuses(down)
    assert not [r for r in down if r.prompt in seen], "provider called while failing closed"

    # The documented bound (docs/concepts/request-flow.md): answers the provider
    # billed for the victim in the last flush interval before the kill, or still
    # in flight then.
    window = killed_at - pairs.flush_interval_ms / 1000 - SLACK_S
    at_risk = [r for r in billed if r.user == "before" and r.start < killed_at and r.end >= window]
    cut = [r for r in billed if r.pair == VICTIM and not r.ok]
    unsynced = [r for r in billed if r.user == "after" and r.start < synced_at]
    lost_at_kill = loss(before, "before")
    per_request = at_risk[0].cost if at_risk else 1
    print(
        f"\n[kill -9 ext_proc {VICTIM}] {len(results)} requests {statuses(results)}; "
        f"{len(down)} sent to pair {VICTIM} while it was down: {statuses(down)}, none "
        f"reached the provider; {len(cut)} billed but cut off by the kill.\n"
        f"  lost at the kill: {usd(lost_at_kill)} (~{lost_at_kill / per_request:.1f} "
        f"requests); bound {usd(cost(at_risk))} ({len(at_risk)} requests billed in the last "
        f"{pairs.flush_interval_ms} ms + {SLACK_S * 1000:.0f} ms or in flight)\n"
        f"  after the restart: {statuses(r for r in results if r.user == 'after')}, lost "
        f"{usd(loss(after, 'after'))}; {len(unsynced)} admitted before its first snapshot "
        f"arrived ({(synced_at - restarting_at) * 1000:.0f} ms after the restart began)\n"
        f"  other pair: lost {usd(loss(steady, 'steady'))}"
    )
    assert 0 <= lost_at_kill <= cost(at_risk)
    assert loss(steady, "steady") == 0
    assert {r.status for r in results if r.user == "after" and r.start > synced_at} == {200}

    # The restarted ext_proc meters: exactly what it now admits is recorded.
    client = second.client(VICTIM)
    try:
        more = [client.send("after", seq_tokens) for _ in range(5)]
    finally:
        client.close()
    assert [r.status for r in more] == [200] * 5
    want = recorded[after.id] + cost(more)
    assert settle_spend(pairs, after.id, want) == want


def test_an_ext_proc_restarted_during_a_control_plane_outage_loses_nothing(
    pairs: TwoPairs,
) -> None:
    """An ext_proc restarted (SIGTERM, start) while no control plane is
    reachable starts from the policy snapshot it saved (ext_proc/sync/snapshot.py):
    what it admits meanwhile is charged, and reaches the control plane when
    one is back."""
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    policy = alert_for(pairs, "restart")
    wait_policies_everywhere(pairs)
    victim = pairs.ext_procs[VICTIM]
    load = Load(pairs.base_urls, workspace)
    load.add(VICTIM, "restart", tokens=seq_tokens)
    try:
        time.sleep(1.0)
        pairs.stop_control_planes(signal.SIGKILL, signal.SIGKILL)
        assert victim.stop(signal.SIGTERM) == 0
        victim.start()
        victim.wait_ready()
        time.sleep(1.0)
        pairs.start_control_planes()
        pairs.wait_synced()
        time.sleep(1.0)
    finally:
        results = load.stop()
    billed = billed_results(pairs, results)
    expected = cost(billed)
    recorded = stable_spend(pairs, policy.id)
    print(
        f"\n[ext_proc {VICTIM} restarted while the control planes were down] "
        f"{statuses(results)}; provider billed {usd(expected)}, recorded {usd(recorded)}: "
        f"lost {usd(expected - recorded)}"
    )
    assert recorded == expected
