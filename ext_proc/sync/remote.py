"""What the control plane says about window spend, as a data plane keeps it:
each window's total and end, and the other data planes' holds on it.

Part of LocalState (ext_proc/sync/state.py), with its threading rule: every
method runs on the ext_proc event loop.

Forgetting what has ended costs what has ended, never what is known. Windows
are indexed by their end and windows with holds by their first hold's expiry
(``TimeIndex``), so ``prune`` looks only at the times that have passed: with
nothing ended it touches no window. When many windows end together (every
member of a ``*`` policy ends at the same boundary), ``prune`` makes them
invisible at once (LocalState's reads ignore a window that ends at or before
``ended_at``, see ``live``) and deletes them ``limit`` at a time; the caller
runs ``delete_ended`` again, letting the event loop serve requests between
slices (ControlPlaneSync.prune in ext_proc/sync/client.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ext_proc.admission.decide import SpendKey
from spendgate.v1 import dataplane_pb2 as dp

K = TypeVar("K", bound=Hashable)


class TimeIndex(Generic[K]):
    """Keys by a time (Unix seconds), to take those due by a time without
    looking at the others: a bucket of keys per time and a heap of the
    times. Many keys share a time (the windows of one policy end together),
    so the heap stays small.

    A key whose time changes is added again under its new time and left
    under the old one: whoever takes a bucket checks each key's current
    time. Buckets are lists, appended to and read in order: at a million
    keys, reading them in the order they were added (the order they sit in
    memory) and deleting them costs a third of what a set's order does.
    """

    __slots__ = ("_buckets", "_times")

    def __init__(self) -> None:
        self._buckets: dict[int, list[K]] = {}
        self._times: list[int] = []  # a heap: one entry per bucket

    def add(self, key: K, at: int) -> None:
        bucket = self._buckets.get(at)
        if bucket is None:
            bucket = self._buckets[at] = []
            heapq.heappush(self._times, at)
        bucket.append(key)

    def pop_due(self, now: float) -> list[list[K]]:
        """Remove and return the buckets of every time at or before ``now``."""
        due = []
        times = self._times
        while times and times[0] <= now:
            due.append(self._buckets.pop(heapq.heappop(times)))
        return due

    def items(self) -> Iterator[tuple[K, int]]:
        """Every (key, time) added and not yet due, in no particular order
        (for tests and checks)."""
        for at, bucket in self._buckets.items():
            for key in bucket:
                yield key, at

    def times(self) -> list[int]:
        """The times of the buckets, as the heap holds them (for tests)."""
        return list(self._times)


@dataclass(frozen=True, slots=True)
class RemoteHold:
    """Another data plane's hold on a window, from its newest report."""

    seq: int
    nanos: int
    expires: int  # Unix seconds
    requests: int  # running requests the hold includes


@dataclass(slots=True)
class RemoteWindows:
    # key -> (spent nanos, window end in Unix seconds)
    totals: dict[SpendKey, tuple[int, int]] = field(default_factory=dict)
    # key -> the adjustment_seq of its total, for windows that had spend
    # adjustments (an adjusted total may be lower than an earlier one).
    seqs: dict[SpendKey, int] = field(default_factory=dict)
    # The other data planes' holds per window (data plane id -> RemoteHold),
    # their sum, and when the first of them expires (0: none).
    holds: dict[SpendKey, dict[str, RemoteHold]] = field(default_factory=dict)
    held_others: dict[SpendKey, int] = field(default_factory=dict)
    held_others_until: dict[SpendKey, int] = field(default_factory=dict)
    # Windows by end; windows with holds by held_others_until.
    ends: TimeIndex[SpendKey] = field(default_factory=TimeIndex)
    expiries: TimeIndex[SpendKey] = field(default_factory=TimeIndex)
    # Unix seconds of the latest prune: a window ending at or before it is
    # over, whether or not it is deleted yet.
    ended_at: float = 0.0
    # Ended windows not deleted yet (buckets taken from ``ends``), and how
    # far into the first one deleting has come (the entries before it are
    # set to None as they go).
    ending: list[list[SpendKey]] = field(default_factory=list)
    ending_at: int = 0

    # ---- reads (hot path) --------------------------------------------------

    def live(self, key: SpendKey) -> bool:
        """The window is known and has not ended by the last prune."""
        t = self.totals.get(key)
        return t is not None and t[1] > self.ended_at

    # ---- writes ------------------------------------------------------------

    def clear(self) -> None:
        """Forget everything (a resync replaces it); ``ended_at`` stays."""
        self.totals = {}
        self.seqs = {}
        self.holds = {}
        self.held_others = {}
        self.held_others_until = {}
        self.ends = TimeIndex()
        self.expiries = TimeIndex()
        self.ending = []
        self.ending_at = 0

    def merge(self, spend: Iterable[dp.WindowSpend], identity: str, now: float) -> None:
        """Merge totals and holds (``identity``: ours, not counted; ``now``:
        Unix seconds, holds expired by then are dropped). A window that ended
        by the last prune (a late total) is kept unseen until the next one."""
        totals, seqs, ends = self.totals, self.seqs, self.ends
        for ws in spend:
            end = ws.window_end.seconds
            key = (ws.policy_id, ws.member, ws.window_start.seconds)
            old = totals.get(key)
            if old is not None and old[1] <= self.ended_at:
                # Ended, not deleted yet: gone, its seq and holds with it.
                self._forget(key)
                old = None
            # Totals arrive by several paths and out of order: within one
            # adjustment_seq the larger is the newer; a higher seq (a spend
            # adjustment, which may lower the total) supersedes any total.
            seq, known = ws.adjustment_seq, seqs.get(key, 0)
            if seq > known or (seq == known and (old is None or ws.spent_nanos >= old[0])):
                totals[key] = (ws.spent_nanos, end)
                if old is None or old[1] != end:
                    ends.add(key, end)
                if seq:
                    seqs[key] = seq
            if ws.holds or key in self.holds:
                self._merge_holds(key, ws.holds, identity, now)

    def _merge_holds(
        self, key: SpendKey, holds: Iterable[dp.DataPlaneHold], identity: str, now: float
    ) -> None:
        """Holds rise and fall, and messages about them arrive by several
        paths: per data plane, the newest report (highest seq) wins."""
        known = self.holds.get(key)
        if known is None:
            known = self.holds[key] = {}
        for h in holds:
            if h.data_plane_id == identity:
                continue
            old = known.get(h.data_plane_id)
            if old is None or h.seq >= old.seq:
                known[h.data_plane_id] = RemoteHold(
                    h.seq, h.held_nanos, h.expire_time.seconds, h.requests
                )
        self.count_others(key, now)

    def count_others(self, key: SpendKey, now: float) -> int:
        """Sum the other data planes' unexpired holds on ``key``, forget the
        expired ones, and note when the next one expires."""
        known = self.holds.get(key, {})
        for dp_id in [d for d, h in known.items() if h.expires <= now]:
            del known[dp_id]
        total = sum(h.nanos for h in known.values())
        self.held_others[key] = total
        until = min((h.expires for h in known.values()), default=0)
        if until and until != self.held_others_until.get(key):
            self.expiries.add(key, until)
        self.held_others_until[key] = until
        return total

    def prune(self, now: float, limit: int) -> bool:
        """Windows that end at or before ``now`` (Unix seconds) are over:
        ignored from here on, deleted up to ``limit`` now and the rest by
        ``delete_ended``. Holds that expired by ``now`` are forgotten. Looks
        only at the times that have passed. True when ended windows remain."""
        if now > self.ended_at:
            self.ended_at = now
        # By ended_at, not now: a clock that went back never brings a window
        # back, and one merged meanwhile with an end before it goes too.
        self.ending += self.ends.pop_due(self.ended_at)
        until = self.held_others_until
        for bucket in self.expiries.pop_due(now):
            for key in bucket:
                # Not if its holds have a later expiry now, or are gone.
                if 0 < until.get(key, 0) <= now:
                    self.count_others(key, now)
        return self.delete_ended(limit)

    def delete_ended(self, limit: int) -> bool:
        """Delete up to ``limit`` windows that ended by the last prune; True
        when some remain."""
        ending, totals, ended_at = self.ending, self.totals, self.ended_at
        seqs, holds = self.seqs, self.holds
        left = limit
        while ending:
            bucket: list[Any] = ending[0]  # its keys become None as they go
            start = self.ending_at
            stop = min(len(bucket), start + left)
            for i in range(start, stop):
                key = bucket[i]
                bucket[i] = None  # the key is freed with its window, not all at the end
                # Inlined _forget: this loop is the whole cost of a boundary.
                t = totals.pop(key, None)
                if t is None:
                    continue  # deleted already
                if t[1] > ended_at:
                    # Merged again with a later end (its policy's window
                    # changed): not over.
                    totals[key] = t
                    continue
                if seqs:
                    seqs.pop(key, None)
                if holds and holds.pop(key, None) is not None:
                    self.held_others.pop(key, None)
                    self.held_others_until.pop(key, None)
            left -= stop - start
            if stop < len(bucket):
                self.ending_at = stop
                return True
            ending.pop(0)
            self.ending_at = 0
            if not left:
                break
        return bool(ending)

    def _forget(self, key: SpendKey) -> None:
        # Left in the indexes: checked against ``totals`` when due.
        del self.totals[key]
        if self.seqs:
            self.seqs.pop(key, None)
        if self.holds and self.holds.pop(key, None) is not None:
            self.held_others.pop(key, None)
            self.held_others_until.pop(key, None)
