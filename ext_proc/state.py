"""What a data plane knows: policies, window spend, and its own unsent usage.

Single-threaded by design: every method is called from the ext_proc event
loop, so no locks are needed and reads never see a half-applied update.

Spend of a window as this data plane sees it =
    the control plane's last known total (includes every data plane's
    acknowledged usage, ours too)
  + our usage not yet acknowledged (pending + in flight).
Totals only grow within a window, so totals from acks and from the state
stream are merged with max(). Between the moment the control plane applies
our batch and the moment its ack reaches us, that batch can be counted twice
— an over-estimate for a few milliseconds, never an under-estimate.

With a journal (ext_proc/journal.py), every batch is written durably before
it is sent, and acknowledged batches are marked there. Usage that cannot be
sent stays bounded in memory: new usage is merged into the newest batch as
long as that batch has never been sent (a batch id the control plane may have
seen never changes content), so at most two batches wait during an outage
and memory grows with the number of windows, not with time; the journal holds
the durable copy.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from ext_proc import windows
from ext_proc.decide import SpendKey
from ext_proc.journal import Journal
from ext_proc.view import OverrideSet, PolicySet
from spendgate.domain.policies import Match, PolicyIndex
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.wire import timestamp

log = structlog.get_logger("spendgate.ext_proc")
PRUNE_INTERVAL_S = 10.0


@dataclass(slots=True)
class Increment:
    cost_nanos: int = 0
    requests: int = 0
    estimated: int = 0


@dataclass(slots=True)
class Batch:
    batch_id: str
    increments: dict[SpendKey, Increment]
    attempts: int = 0
    # Set once the batch may have reached the control plane (a send was
    # attempted, or it was replayed from the journal): its content is final.
    sent: bool = False

    @staticmethod
    def from_message(msg: dp.ReportUsageRequest) -> Batch:
        increments: dict[SpendKey, Increment] = {}
        for i in msg.increments:
            key = (i.policy_id, i.member, i.window_start.seconds)
            inc = increments.get(key)
            if inc is None:
                inc = increments[key] = Increment()
            inc.cost_nanos += i.cost_nanos
            inc.requests += i.request_count
            inc.estimated += i.estimated_count
        return Batch(batch_id=msg.batch_id, increments=increments, sent=True)

    def message(self, data_plane_id: str) -> dp.ReportUsageRequest:
        return dp.ReportUsageRequest(
            data_plane_id=data_plane_id,
            batch_id=self.batch_id,
            increments=[
                dp.SpendIncrement(
                    policy_id=k[0],
                    member=k[1],
                    window_start=timestamp(k[2]),
                    cost_nanos=i.cost_nanos,
                    request_count=i.requests,
                    estimated_count=i.estimated,
                )
                for k, i in self.increments.items()
            ],
        )


@dataclass(slots=True)
class LocalState:
    index: PolicyIndex = field(default_factory=lambda: PolicyIndex(()))
    # control plane totals: key -> (spent nanos, window end in Unix seconds)
    remote: dict[SpendKey, tuple[int, int]] = field(default_factory=dict)
    pending: dict[SpendKey, Increment] = field(default_factory=dict)
    in_flight: dict[str, Batch] = field(default_factory=dict)
    synced: bool = False  # a snapshot has arrived at least once
    last_prune: float = 0.0
    journal: Journal | None = None
    journal_failed: bool = False
    # Estimated cost held by admitted requests still running (reservations):
    # counted as spent until the response ends and its real cost replaces it.
    reserved: dict[SpendKey, int] = field(default_factory=dict)
    # Holds across data planes (see ReserveRequest): the other data planes'
    # holds per window (id -> (seq, nanos, expires at)) and their sum; the
    # windows whose holds we report, and the order of our reports.
    identity: str = ""
    holds_remote: dict[SpendKey, dict[str, tuple[int, int, int]]] = field(default_factory=dict)
    held_others: dict[SpendKey, int] = field(default_factory=dict)
    hold_keys: set[SpendKey] = field(default_factory=set)
    holds_dirty: bool = False
    holds_seq: int = 0
    # The policies and price overrides the control plane sent (ext_proc/view.py),
    # and whether anything changed since the state was saved (ext_proc/snapshot.py).
    policy_set: PolicySet = field(default_factory=PolicySet)
    overrides: OverrideSet = field(default_factory=OverrideSet)
    snapshot_dirty: bool = False

    # ---- reads (hot path) --------------------------------------------------

    def spent(self, key: SpendKey) -> int:
        """Spend of a window as this data plane sees it: the control plane's
        total, the other data planes' holds, and our own holds and unsent usage."""
        total = self.remote[key][0] if key in self.remote else 0
        others = self.held_others.get(key)
        if others:
            total += others
        held = self.reserved.get(key)
        if held:
            total += held
        inc = self.pending.get(key)
        if inc is not None:
            total += inc.cost_nanos
        for batch in self.in_flight.values():
            b = batch.increments.get(key)
            if b is not None:
                total += b.cost_nanos
        return total

    # ---- local usage ---------------------------------------------------------

    def charge(
        self, matches: Iterable[Match], cost_nanos: int, now: datetime, *, estimated: bool
    ) -> None:
        """Add one response's cost to every window it counts against."""
        for policy, member in matches:
            start = windows.current(policy.window, now)[1]
            inc = self.pending.get((policy.id, member, start))
            if inc is None:
                inc = self.pending[(policy.id, member, start)] = Increment()
            inc.cost_nanos += cost_nanos
            inc.requests += 1
            inc.estimated += int(estimated)

    def reserve(self, keys: Iterable[SpendKey], nanos: int) -> None:
        """Hold ``nanos`` against each window until ``release``."""
        for key in keys:
            self.reserved[key] = self.reserved.get(key, 0) + nanos
            self.hold_keys.add(key)
        self.holds_dirty = True

    def release(self, keys: Iterable[SpendKey], nanos: int) -> None:
        self.holds_dirty = True
        for key in keys:
            left = self.reserved.get(key, 0) - nanos
            if left > 0:
                self.reserved[key] = left
            else:
                self.reserved.pop(key, None)

    # ---- holds reported to the control plane --------------------------------

    def own_hold(self, key: SpendKey, skip: Batch | None = None) -> int:
        """What we hold against a window: running requests' estimates plus our
        usage the control plane has not applied (``skip``: a batch it is
        about to apply with the report)."""
        total = self.reserved.get(key, 0)
        inc = self.pending.get(key)
        if inc is not None:
            total += inc.cost_nanos
        for batch in self.in_flight.values():
            if batch is not skip:
                b = batch.increments.get(key)
                if b is not None:
                    total += b.cost_nanos
        return total

    def next_seq(self) -> int:
        self.holds_seq = max(self.holds_seq + 1, time.time_ns())
        return self.holds_seq

    def hold_report(
        self, keys: Iterable[SpendKey] | None = None, skip: Batch | None = None
    ) -> tuple[list[dp.WindowHold], list[dp.UnappliedBatch]]:
        """Our holds on ``keys`` (default: every window we hold or held), and
        the unacknowledged batches they include (the control plane leaves out
        those it has applied). A window reported at zero is dropped from the
        default set."""
        holds = []
        wanted = list(self.hold_keys if keys is None else keys)
        for key in wanted:
            held = self.own_hold(key, skip)
            holds.append(_hold(key, held))
            if not held and keys is None:
                self.hold_keys.discard(key)
        if keys is None:
            self.holds_dirty = False
        unapplied = []
        for batch in self.in_flight.values():
            if batch is skip:
                continue
            usage = [
                _hold(k, inc.cost_nanos)
                for k in wanted
                if (inc := batch.increments.get(k)) is not None and inc.cost_nanos
            ]
            if usage:
                unapplied.append(dp.UnappliedBatch(batch_id=batch.batch_id, usage=usage))
        return holds, unapplied

    def take_batch(self) -> Batch | None:
        """Move pending usage into an in-flight batch and journal it.

        The usage joins the newest in-flight batch if that one was never sent,
        else a new batch with a fresh id.
        """
        if not self.pending:
            return None
        delta, self.pending = self.pending, {}
        newest = next(reversed(self.in_flight.values()), None)
        if newest is not None and not newest.sent:
            batch = newest
            for key, inc in delta.items():
                into = batch.increments.get(key)
                if into is None:
                    batch.increments[key] = inc
                else:
                    into.cost_nanos += inc.cost_nanos
                    into.requests += inc.requests
                    into.estimated += inc.estimated
        else:
            batch = Batch(batch_id=uuid.uuid4().hex, increments=delta)
            self.in_flight[batch.batch_id] = batch
        self._journal(lambda j: j.append(Batch(batch.batch_id, delta).message("")))
        return batch

    def restore(self, messages: Iterable[dp.ReportUsageRequest]) -> None:
        """Add batches replayed from the journal, before any new usage is taken."""
        for msg in messages:
            batch = Batch.from_message(msg)
            self.in_flight[batch.batch_id] = batch

    def unsent_count(self) -> int:
        return len(self.pending) + sum(len(b.increments) for b in self.in_flight.values())

    def acknowledge(self, batch: Batch, resp: dp.ReportUsageResponse) -> None:
        # Merge the totals first so the batch is never missing from both.
        self.merge_spend(resp.spend)
        self.in_flight.pop(batch.batch_id, None)
        self._journal(lambda j: j.acknowledge(batch.batch_id))
        if self.journal is not None and self.journal.needs_compaction():
            live = [b.message("") for b in self.in_flight.values()]
            self._journal(lambda j: j.compact(live))

    def _journal(self, op: Callable[[Journal], None]) -> None:
        """Run a journal operation; a failing disk never stops metering."""
        if self.journal is None:
            return
        try:
            op(self.journal)
        except OSError as e:
            if not self.journal_failed:
                log.error("usage journal write failed; usage is kept in memory", error=str(e))
            self.journal_failed = True
        else:
            if self.journal_failed:
                log.info("usage journal writable again")
            self.journal_failed = False

    # ---- control plane state -------------------------------------------------

    def saved_state(self) -> dp.StateUpdate:
        """What ext_proc/snapshot.py keeps: policies, prices and window totals
        (as increments on an empty state; apply_update reads it back)."""
        update = dp.StateUpdate(
            spend=[
                dp.WindowSpend(
                    policy_id=k[0],
                    member=k[1],
                    window_start=timestamp(k[2]),
                    window_end=timestamp(v[1]),
                    spent_nanos=v[0],
                )
                for k, v in self.remote.items()
            ],
            policy_changes=dp.PolicyChanges(upserts=self.policy_set.msgs.values()),
            price_changes=dp.PriceOverrideChanges(upserts=self.overrides.msgs.values()),
        )
        self.snapshot_dirty = False
        return update

    def apply_update(self, update: dp.StateUpdate, now: datetime) -> None:
        """Apply a change (or, from an earlier release's control plane or
        saved snapshot, a whole set: ``policies``, ``price_overrides``,
        ``full_snapshot``)."""
        self.snapshot_dirty = True
        if update.HasField("price_overrides"):
            self.overrides.replace(update.price_overrides.overrides)
        if update.HasField("price_changes"):
            self.overrides.change(update.price_changes)
        if update.HasField("policies"):
            self.index = self.policy_set.replace(
                dp.VersionedPolicy(policy=p) for p in update.policies.policies
            )
        if update.HasField("policy_changes"):
            self.index = self.policy_set.change(update.policy_changes)
        if update.full_snapshot:
            self.remote = {}
            self.holds_remote = {}
            self.held_others = {}
            self.synced = True
        self.merge_spend(update.spend)
        # Pruning walks every known window: do it at most every few seconds.
        if update.full_snapshot or now.timestamp() - self.last_prune >= PRUNE_INTERVAL_S:
            self.prune(now)

    def replace_view(
        self,
        policies: Iterable[dp.VersionedPolicy],
        overrides: Iterable[pp.PriceOverride],
        spend: Iterable[dp.WindowSpend],
        now: datetime,
    ) -> None:
        """A completed resync: everything the control plane knows replaces
        what this data plane knew, in one step (our own unsent usage and
        holds stay)."""
        self.index = self.policy_set.replace(policies)
        self.overrides.replace(overrides)
        self.remote = {}
        self.holds_remote = {}
        self.held_others = {}
        self.merge_spend(spend)
        self.synced = True
        self.snapshot_dirty = True
        self.prune(now)

    def merge_spend(self, spend: Iterable[dp.WindowSpend]) -> None:
        for ws in spend:
            key = (ws.policy_id, ws.member, ws.window_start.seconds)
            old = self.remote.get(key)
            if old is None or ws.spent_nanos >= old[0]:
                self.remote[key] = (ws.spent_nanos, ws.window_end.seconds)
            if ws.holds or key in self.holds_remote:
                self._merge_holds(key, ws.holds)

    def _merge_holds(self, key: SpendKey, holds: Iterable[dp.DataPlaneHold]) -> None:
        """Holds rise and fall, and messages about them arrive by several
        paths: per data plane, the newest report (highest seq) wins."""
        known = self.holds_remote.get(key)
        if known is None:
            known = self.holds_remote[key] = {}
        for h in holds:
            if h.data_plane_id == self.identity:
                continue
            old = known.get(h.data_plane_id)
            if old is None or h.seq >= old[0]:
                known[h.data_plane_id] = (h.seq, h.held_nanos, h.expire_time.seconds)
        self.held_others[key] = sum(v[1] for v in known.values())

    def prune(self, now: datetime) -> None:
        """Forget control plane totals of windows that have ended."""
        t = now.timestamp()
        self.last_prune = t
        ended = [k for k, v in self.remote.items() if v[1] <= t]
        for k in ended:
            del self.remote[k]
        # Holds of a data plane that stopped reporting lapse at their expiry.
        for k, known in list(self.holds_remote.items()):
            if k not in self.remote:
                del self.holds_remote[k]
                self.held_others.pop(k, None)
                continue
            for dp_id in [d for d, v in known.items() if v[2] <= t]:
                del known[dp_id]
            self.held_others[k] = sum(v[1] for v in known.values())


def _hold(key: SpendKey, nanos: int) -> dp.WindowHold:
    return dp.WindowHold(
        policy_id=key[0], member=key[1], window_start=timestamp(key[2]), held_nanos=nanos
    )
