"""What a data plane knows: policies, window spend, and its own unsent usage.

Single-threaded by design: every method is called from the ext_proc event
loop, so no locks are needed and reads never see a half-applied update.

Spend of a window as this data plane sees it =
    the control plane's last known total (includes every data plane's
    acknowledged usage, ours too)
  + our usage not yet acknowledged (pending + in flight).
Totals only grow within a window, so totals from acks and from the state
stream are merged with max(). A batch stops being ours to count when the
first total that includes it arrives: the ack, or the state stream message
marked with its id (``StateUpdate.applied``), or the answer to a report that
named it as unapplied (``applied_batch_ids``), whichever comes first. The
answer to a report (Reserve, holds) may carry a total that counts a batch
made after the report, which it cannot name: such a window's total is left
to the stream (``take_totals``). Only a total from another data plane's
batch applied just after ours, arriving before either, counts ours twice for
a moment: an over-estimate, never an under-estimate.

With a journal (ext_proc/sync/journal.py), every batch is written durably before
it is sent, and acknowledged batches are marked there. Usage that cannot be
sent stays bounded in memory: new usage is merged into the newest batch as
long as that batch has never been sent (a batch id the control plane may have
seen never changes content), so at most two batches wait during an outage
and memory grows with the number of windows, not with time; the journal holds
the durable copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from ext_proc.admission import windows
from ext_proc.admission.decide import SpendKey
from ext_proc.sync import rollups, snapshot
from ext_proc.sync.batch import (
    MAX_BATCH_RECORDS,
    Batch,
    Increment,
    pack,
    record_size,
)
from ext_proc.sync.batch import pieces as batch_pieces
from ext_proc.sync.journal import Journal
from ext_proc.sync.quarantine import MAX_MEMBER_CHARS, Quarantine, record
from ext_proc.sync.remote import RemoteHold, RemoteWindows
from ext_proc.sync.rollups import RollupKey, RollupSums
from ext_proc.sync.view import OverrideSet, PolicySet
from spendgate.domain.policies import Match, PolicyIndex
from spendgate.domain.pricing import MAX_COST_NANOS, saturating_add
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.wire import timestamp

log = structlog.get_logger("spendgate.ext_proc")
PRUNE_INTERVAL_S = 10.0
# Ended windows deleted in one go; more wait for the next slice (see prune).
PRUNE_SLICE = 5000


@dataclass(slots=True)
class LocalState:
    index: PolicyIndex = field(default_factory=lambda: PolicyIndex(()))
    # The control plane's window totals and the other data planes' holds
    # (ext_proc/sync/remote.py; read them through ``remote`` etc. below).
    windows: RemoteWindows = field(default_factory=RemoteWindows)
    pending: dict[SpendKey, Increment] = field(default_factory=dict)
    # Chargeback rollups not yet in a batch (ext_proc/sync/rollups.py).
    pending_rollups: dict[RollupKey, RollupSums] = field(default_factory=dict)
    in_flight: dict[str, Batch] = field(default_factory=dict)
    synced: bool = False  # a snapshot has arrived at least once
    last_prune: float = 0.0
    journal: Journal | None = None
    journal_failed: bool = False
    # Estimated cost held by admitted requests still running (reservations):
    # counted as spent until the response ends and its real cost replaces it;
    # and how many requests hold it.
    reserved: dict[SpendKey, int] = field(default_factory=dict)
    reserved_requests: dict[SpendKey, int] = field(default_factory=dict)
    holding_requests: int = 0  # requests with a reservation, whatever their windows
    # Holds across data planes (see ReserveRequest; the other data planes'
    # are in ``windows``): the windows whose holds we report, and the order
    # of our reports.
    identity: str = ""
    hold_keys: set[SpendKey] = field(default_factory=set)
    holds_dirty: bool = False
    holds_seq: int = 0
    # The policies and price overrides the control plane sent (ext_proc/sync/view.py),
    # and whether anything changed since the state was saved (ext_proc/sync/snapshot.py).
    policy_set: PolicySet = field(default_factory=PolicySet)
    overrides: OverrideSet = field(default_factory=OverrideSet)
    snapshot_dirty: bool = False
    # Records that cannot be sent go here (ext_proc/sync/quarantine.py); usage
    # anomalies wait here for the next batch. A batch's records take at most
    # max_batch_bytes (half of usage_message_max_bytes: holds ride along).
    quarantine: Quarantine = field(default_factory=Quarantine)
    anomalies: list[dp.UsageAnomaly] = field(default_factory=list)
    max_batch_bytes: int = 512 * 1024
    # Unix seconds now. Holds of other data planes stop counting at their
    # expiry by this clock, whether or not any update arrives (a dead data
    # plane sends none).
    clock: Callable[[], float] = time.time
    # Ended windows deleted per step of a prune (tests make it small).
    prune_slice: int = PRUNE_SLICE

    # ---- the control plane's view (ext_proc/sync/remote.py), read-only -------

    @property
    def remote(self) -> dict[SpendKey, tuple[int, int]]:
        """Control plane totals: key -> (spent nanos, window end in Unix
        seconds); may still hold windows that ended by the last prune."""
        return self.windows.totals

    @property
    def remote_seq(self) -> dict[SpendKey, int]:
        return self.windows.seqs

    @property
    def holds_remote(self) -> dict[SpendKey, dict[str, RemoteHold]]:
        return self.windows.holds

    # ---- reads (hot path) --------------------------------------------------

    def spent(self, key: SpendKey) -> int:
        """Spend of a window as this data plane sees it: the control plane's
        total, the other data planes' holds (none once the window has ended
        by the last prune), and our own holds and unsent usage."""
        w = self.windows
        total = 0
        t = w.totals.get(key)
        if t is not None and t[1] > w.ended_at:
            total = t[0]
            others = w.held_others.get(key)
            if others:
                if w.held_others_until[key] <= self.clock():
                    others = w.count_others(key, self.clock())
                total += others
        held = self.reserved.get(key)
        if held:
            total += held
        inc = self.pending.get(key)
        if inc is not None:
            total += inc.cost_nanos
        for batch in self.in_flight.values():
            b = batch.increments.get(key)
            if b is not None and key not in batch.settled:
                total += b.cost_nanos
        return total

    def charge(
        self, matches: Iterable[Match], cost_nanos: int, now: datetime, *, estimated: bool
    ) -> None:
        """Add one response's cost to every window it counts against."""
        for policy, member in matches:
            start = windows.current(policy.window, now)[1]
            inc = self.pending.get((policy.id, member, start))
            if inc is None:
                inc = self.pending[(policy.id, member, start)] = Increment()
            inc.cost_nanos = saturating_add(inc.cost_nanos, cost_nanos)
            inc.requests += 1
            inc.estimated += int(estimated)

    def count_would_reject(self, keys: Iterable[SpendKey]) -> None:
        """One request a SHADOW policy would have refused, on each window:
        reported with the usage (the control plane sums it per window)."""
        for key in keys:
            inc = self.pending.get(key)
            if inc is None:
                inc = self.pending[key] = Increment()
            inc.would_reject += 1

    def record_rollup(self, key: RollupKey, sums: RollupSums) -> None:
        """Add one response to its chargeback rollup (whatever policies apply)."""
        into = self.pending_rollups.get(key)
        if into is None:
            self.pending_rollups[key] = sums
        else:
            into.add(sums)

    def held(self, key: SpendKey) -> tuple[int, int]:
        """(nanos, requests) of ``spent(key)`` that running requests hold
        here and on the other data planes (theirs includes, for a moment,
        usage the control plane has not applied yet)."""
        nanos = self.reserved.get(key, 0)
        requests = self.reserved_requests.get(key, 0)
        w = self.windows
        if w.held_others.get(key) and w.live(key):
            now = self.clock()
            if w.held_others_until[key] <= now:
                w.count_others(key, now)
            for h in w.holds.get(key, {}).values():
                if h.expires > now:
                    nanos += h.nanos
                    requests += h.requests
        return nanos, requests

    def held_elsewhere(self) -> int:
        """The other data planes' unexpired holds, summed over windows (metrics)."""
        now = self.clock()
        w = self.windows
        return sum(
            h.nanos
            for key, known in w.holds.items()
            if w.live(key)
            for h in known.values()
            if h.expires > now
        )

    # ---- local usage ---------------------------------------------------------

    def reserve(self, holds: Iterable[tuple[SpendKey, int]]) -> None:
        """Hold one request's estimate on each window (key, nanos) until ``release``."""
        for key, nanos in holds:
            self.reserved[key] = self.reserved.get(key, 0) + nanos
            self.reserved_requests[key] = self.reserved_requests.get(key, 0) + 1
            self.hold_keys.add(key)
        self.holding_requests += 1
        self.holds_dirty = True

    def release(self, holds: Iterable[tuple[SpendKey, int]]) -> None:
        """Undo one ``reserve`` with the same holds."""
        self.holds_dirty = True
        self.holding_requests = max(self.holding_requests - 1, 0)
        for key, nanos in holds:
            left = self.reserved.get(key, 0) - nanos
            count = self.reserved_requests.get(key, 0) - 1
            if left > 0 or count > 0:
                self.reserved[key] = max(left, 0)
                self.reserved_requests[key] = max(count, 0)
            else:
                self.reserved.pop(key, None)
                self.reserved_requests.pop(key, None)

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
                if b is not None and key not in batch.settled:
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
        # A window whose member the control plane cannot store has no holds
        # there (its usage is quarantined): not reported.
        wanted = [
            k for k in (self.hold_keys if keys is None else keys) if len(k[1]) <= MAX_MEMBER_CHARS
        ]
        for key in wanted:
            held = self.own_hold(key, skip)
            holds.append(_hold(key, held, self.reserved_requests.get(key, 0)))
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
                if (inc := batch.increments.get(k)) is not None
                and inc.cost_nanos
                and k not in batch.settled
            ]
            if usage:
                unapplied.append(dp.UnappliedBatch(batch_id=batch.batch_id, usage=usage))
        return holds, unapplied

    def take_batch(self) -> Batch | None:
        """Move pending usage (and anomalies, quarantine reports) into
        in-flight batches and journal them.

        The usage joins the newest in-flight batch if that one was never sent
        and has room (``max_batch_bytes``, ``MAX_BATCH_RECORDS``), else new
        batches with fresh ids. A record that cannot be encoded, or is alone
        larger than a batch may be, is quarantined instead: it is never
        journaled as usage, so it can never block a batch.
        """
        if self.pending or self.pending_rollups:
            self._quarantine_unsendable()
        reports = self.quarantine.take_reports()
        if not self.pending and not self.pending_rollups and not self.anomalies and not reports:
            return None
        delta, self.pending = self.pending, {}
        rollup_delta, self.pending_rollups = self.pending_rollups, {}
        anomalies, self.anomalies = self.anomalies, []
        target, parts = pack(
            self.in_flight, delta, rollup_delta, anomalies, reports, self.max_batch_bytes
        )
        messages = [part.message("") for part in parts]

        def append(j: Journal) -> None:
            for m in messages:
                j.append(m)

        self._journal(append)
        return target

    def _quarantine_unsendable(self) -> None:
        """Take out of ``pending`` the records no message can carry."""
        now = datetime.fromtimestamp(time.time(), UTC)
        bad = []
        for key, inc in list(self.pending.items()):
            size = record_size(key)
            if size is not None and size <= self.max_batch_bytes:
                continue
            del self.pending[key]
            reason, detail = (
                ("unencodable", "the member or policy id is not valid Unicode")
                if size is None
                else (
                    "too_large",
                    f"one record of {size} bytes; a usage batch carries at most "
                    f"{self.max_batch_bytes} bytes of records",
                )
            )
            bad.append(
                record(
                    key,
                    min(inc.cost_nanos, MAX_COST_NANOS),
                    inc.requests,
                    reason=reason,
                    detail=detail,
                    batch_id="",
                    now=now,
                )
            )
        for rkey, sums in list(self.pending_rollups.items()):
            size = rollups.size(rkey)
            if size is not None and size <= self.max_batch_bytes:
                continue
            del self.pending_rollups[rkey]
            bad.append(
                record(
                    rollups.quarantine_key(rkey),
                    min(sums.cost_nanos, MAX_COST_NANOS),
                    sums.requests,
                    reason="unencodable" if size is None else "too_large",
                    detail="a chargeback rollup no usage batch can carry",
                    batch_id="",
                    now=now,
                )
            )
        self.quarantine.add(bad)

    def split(self, batch: Batch, kind: str) -> list[Batch]:
        """Replace an unsent-for-good ``batch`` by pieces (``kind`` "s": each
        fitting ``max_batch_bytes``; "h": two halves), journaled with the
        batch's acknowledgement in one write. Piece ids derive from the
        batch's (``piece_id``), and a piece already known (replayed from the
        journal after a crash mid-split) is not made twice.
        """
        pieces = batch_pieces(batch, kind, self.max_batch_bytes)
        fresh = [p for p in pieces if p.batch_id not in self.in_flight]
        items = list(self.in_flight.items())
        at = next(i for i, (bid, _) in enumerate(items) if bid == batch.batch_id)
        self.in_flight = dict(items[:at] + [(p.batch_id, p) for p in fresh] + items[at + 1 :])
        self._journal(lambda j: j.replace(batch.batch_id, [p.message("") for p in fresh]))
        return fresh

    def quarantine_batch(self, batch: Batch, reason: str, detail: str) -> None:
        """Set aside a batch the control plane will never take (one record,
        or none): its record is quarantined, its anomalies and reports go
        with the next batch."""
        now = datetime.fromtimestamp(time.time(), UTC)
        records = [(key, inc.cost_nanos, inc.requests) for key, inc in batch.increments.items()]
        records += [
            (rollups.quarantine_key(key), sums.cost_nanos, sums.requests)
            for key, sums in batch.rollups.items()
        ]
        self.quarantine.add(
            record(
                key,
                min(cost, MAX_COST_NANOS),
                requests,
                reason=reason,
                detail=detail,
                batch_id=batch.batch_id,
                now=now,
            )
            for key, cost, requests in records
        )
        self.in_flight.pop(batch.batch_id, None)
        self.anomalies[:0] = batch.anomalies
        self.quarantine.pending[:0] = batch.quarantined
        self.take_batch()  # the reports are journaled before the batch is dropped
        self._journal(lambda j: j.acknowledge(batch.batch_id))

    def restore(self, messages: Iterable[dp.ReportUsageRequest]) -> None:
        """Add batches replayed from the journal, before any new usage is taken."""
        for msg in messages:
            batch = Batch.from_message(msg)
            self.in_flight[batch.batch_id] = batch

    def unsent_count(self) -> int:
        return (
            len(self.pending)
            + len(self.pending_rollups)
            + sum(b.records for b in self.in_flight.values())
        )

    def acknowledge(self, batch: Batch, resp: dp.ReportUsageResponse) -> None:
        # Merge the totals first so the batch is never missing from both.
        self.take_totals(resp.spend, resp.applied_batch_ids)
        self._applied(batch.batch_id)

    def take_totals(
        self,
        spend: Sequence[dp.WindowSpend],
        applied: Sequence[str],
        known: Collection[str] | None = None,
    ) -> None:
        """Totals from the answer to a report of ours, and the batches it
        named as unapplied that those totals include (applied already): they
        stop counting as unsent in the same step, not when their own answer
        arrives.

        ``known``: the batches in flight when the report was made (a Reserve
        or holds report, which may cross batches on their way). A batch made
        since (of usage then pending) may have been applied before the
        report, and its total then counts it while it is still ours: such a
        window's total is left to the state stream, which marks the batch.
        """
        if known is not None:
            made_since = [b for i, b in self.in_flight.items() if i not in known]
            if made_since:
                spend = [ws for ws in spend if not _touched(made_since, ws)]
        self.merge_spend(spend)
        if applied:
            self._settled(applied, spend)

    def _settled(self, batch_ids: Iterable[str], spend: Iterable[dp.WindowSpend]) -> None:
        """The control plane applied these batches of ours, and the totals of
        ``spend`` (merged) include them: they stop counting as unsent on
        those windows, and go once that is all of their windows (a report
        names a batch for the report's windows only; the rest of its
        windows wait for its own answer)."""
        keys = {(ws.policy_id, ws.member, ws.window_start.seconds) for ws in spend}
        for batch_id in batch_ids:
            batch = self.in_flight.get(batch_id)
            if batch is None:
                continue
            batch.settled.update(k for k in keys if k in batch.increments)
            if len(batch.settled) == len(batch.increments):
                self._applied(batch_id)

    def _applied(self, batch_id: str) -> None:
        """The control plane applied ``batch_id`` and its totals (merged
        already) include it: it is no longer ours to count or to send. Known
        first from the ReportUsage answer or from the state stream, whichever
        arrives first; the second is a no-op."""
        if self.in_flight.pop(batch_id, None) is None:
            return
        self._journal(lambda j: j.acknowledge(batch_id))
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

    def snapshot_parts(self) -> snapshot.Parts:
        """What ext_proc/sync/snapshot.py keeps (policies, prices and window
        totals), copied: cheap on the event loop, and the copy may then be
        built and written in a thread while this state keeps changing."""
        w = self.windows
        spend = dict(w.totals)
        if w.ending:  # rare: the snapshot loop prunes before it saves
            spend = {k: v for k, v in spend.items() if v[1] > w.ended_at}
        parts = snapshot.Parts(
            spend=spend,
            seqs=dict(w.seqs),
            policies=list(self.policy_set.msgs.values()),
            prices=list(self.overrides.msgs.values()),
        )
        self.snapshot_dirty = False
        return parts

    def saved_state(self) -> dp.StateUpdate:
        """The snapshot message of this state, built here (snapshot_parts and
        snapshot.write do the same with the building off the event loop)."""
        return snapshot.build(self.snapshot_parts())

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
            self.windows.clear()
            self.synced = True
        self.merge_spend(update.spend)
        if self.identity and update.applied.data_plane_id == self.identity:
            self._applied(update.applied.batch_id)
        if self.identity and update.applied_batches:
            ids = [a.batch_id for a in update.applied_batches if a.data_plane_id == self.identity]
            self._settled(ids, update.spend)
        # Pruning looks only at ended windows, but they come in slices: with
        # the sync client running, its snapshot loop prunes every second too.
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
        self.windows.clear()
        self.merge_spend(spend)
        self.synced = True
        self.snapshot_dirty = True
        self.prune(now)

    def merge_spend(self, spend: Iterable[dp.WindowSpend]) -> None:
        """Merge window totals and the other data planes' holds (from the
        state stream, an ack or a holds report)."""
        self.windows.merge(spend, self.identity, self.clock())

    def prune(self, now: datetime) -> None:
        """Forget control plane totals of windows that have ended by ``now``,
        and holds that expired by then. The ended windows stop counting at
        once; up to ``prune_slice`` of them are deleted here, the rest by
        ``prune_more`` (see ``pruning``). Costs what ended, not what is known."""
        t = now.timestamp()
        self.last_prune = t
        self.windows.prune(t, self.prune_slice)

    def prune_more(self) -> bool:
        """Delete up to ``prune_slice`` more ended windows; True while some remain."""
        return self.windows.delete_ended(self.prune_slice)

    @property
    def pruning(self) -> bool:
        """Ended windows remain to delete (``prune_more``)."""
        return bool(self.windows.ending)


def _touched(batches: Iterable[Batch], ws: dp.WindowSpend) -> bool:
    key = (ws.policy_id, ws.member, ws.window_start.seconds)
    return any(key in b.increments for b in batches)


def _hold(key: SpendKey, nanos: int, requests: int = 0) -> dp.WindowHold:
    return dp.WindowHold(
        policy_id=key[0],
        member=key[1],
        window_start=timestamp(key[2]),
        held_nanos=min(nanos, MAX_COST_NANOS),
        requests=requests,
    )


# Batch, Increment and MAX_BATCH_RECORDS live in ext_proc/sync/batch.py; kept
# importable from here.
__all__ = (
    "MAX_BATCH_RECORDS",
    "PRUNE_INTERVAL_S",
    "PRUNE_SLICE",
    "Batch",
    "Increment",
    "LocalState",
    "RemoteHold",
)
