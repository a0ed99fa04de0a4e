"""A usage batch: what one ReportUsageRequest carries, and how it is cut.

Pure (no I/O, no clock): ext_proc/sync/state.py decides when batches are
made, journaled, sent, split and acknowledged.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

from ext_proc.admission.decide import SpendKey
from ext_proc.sync import rollups
from ext_proc.sync.rollups import RollupKey, RollupSums
from spendgate.domain.pricing import MAX_COST_NANOS, saturating_add
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp


@dataclass(slots=True)
class Increment:
    cost_nanos: int = 0
    requests: int = 0
    estimated: int = 0
    would_reject: int = 0  # requests a SHADOW policy would have refused

    def add(self, other: Increment) -> None:
        self.cost_nanos = saturating_add(self.cost_nanos, other.cost_nanos)
        self.requests += other.requests
        self.estimated += other.estimated
        self.would_reject += other.would_reject


# Most records one usage batch carries (the control plane takes 50,000).
MAX_BATCH_RECORDS = 10_000
# Upper bound of an anomaly's or a quarantine report's encoded size (their
# strings are truncated when they are made).
REPORT_BYTES = 4096


def record_size(key: SpendKey) -> int | None:
    """Upper bound of one SpendIncrement's encoded size inside a
    ReportUsageRequest; None when the key cannot be encoded at all."""
    try:
        return len(key[0].encode()) + len(key[1].encode()) + 64
    except UnicodeEncodeError:
        return None


@dataclass(slots=True)
class Batch:
    batch_id: str
    increments: dict[SpendKey, Increment]
    attempts: int = 0
    # Set once the batch may have reached the control plane (a send was
    # attempted, or it was replayed from the journal): its content is final.
    sent: bool = False
    # Carried with the batch (and journaled with it): usage anomalies and
    # reports of records this data plane quarantined.
    anomalies: list[dp.UsageAnomaly] = field(default_factory=list)
    quarantined: list[dp.QuarantinedRecord] = field(default_factory=list)
    # Upper bound of the encoded size of what the batch carries.
    size: int = 0
    # The control plane refused a message of this batch with holds: send it without.
    without_holds: bool = False
    # Chargeback rollups (ext_proc/sync/rollups.py) the batch carries.
    rollups: dict[RollupKey, RollupSums] = field(default_factory=dict)
    # Windows whose known totals include the batch (the answer to a report
    # that named it as unapplied said it was applied, with their totals):
    # not counted as unsent there any more; dropped once all are.
    settled: set[SpendKey] = field(default_factory=set)

    @property
    def records(self) -> int:
        """Spend increments and rollups: what MAX_BATCH_RECORDS bounds."""
        return len(self.increments) + len(self.rollups)

    @staticmethod
    def from_message(msg: dp.ReportUsageRequest) -> Batch:
        batch = Batch(
            batch_id=msg.batch_id,
            increments={},
            sent=True,
            anomalies=list(msg.anomalies),
            quarantined=list(msg.quarantined),
        )
        batch.size = REPORT_BYTES * (len(batch.anomalies) + len(batch.quarantined))
        for i in msg.increments:
            key = (i.policy_id, i.member, i.window_start.seconds)
            batch.add(
                key,
                Increment(i.cost_nanos, i.request_count, i.estimated_count, i.would_reject_count),
            )
        for r in msg.rollups:
            batch.add_rollup(*rollups.from_message(r))
        return batch

    def add(self, key: SpendKey, inc: Increment, size: int | None = None) -> None:
        into = self.increments.get(key)
        if into is None:
            self.increments[key] = Increment(
                inc.cost_nanos, inc.requests, inc.estimated, inc.would_reject
            )
            self.size += size if size is not None else (record_size(key) or 0)
        else:
            into.add(inc)

    def add_rollup(self, key: RollupKey, sums: RollupSums, size: int | None = None) -> None:
        into = self.rollups.get(key)
        if into is None:
            self.rollups[key] = sums.copy()
            self.size += size if size is not None else (rollups.size(key) or 0)
        else:
            into.add(sums)

    def message(self, data_plane_id: str) -> dp.ReportUsageRequest:
        return dp.ReportUsageRequest(
            data_plane_id=data_plane_id,
            batch_id=self.batch_id,
            increments=[
                dp.SpendIncrement(
                    policy_id=k[0],
                    member=k[1],
                    window_start=timestamp(k[2]),
                    cost_nanos=min(i.cost_nanos, MAX_COST_NANOS),
                    request_count=i.requests,
                    estimated_count=i.estimated,
                    would_reject_count=i.would_reject,
                )
                for k, i in self.increments.items()
            ],
            anomalies=self.anomalies,
            quarantined=self.quarantined,
            rollups=[rollups.message(k, r) for k, r in self.rollups.items()],
        )


def piece_id(parent: str, kind: str, n: int) -> str:
    """The id of piece ``n`` of a split batch: derived from the parent's, so a
    batch split again after a restart gives the same pieces the same ids."""
    candidate = f"{parent}.{kind}{n}"
    if len(candidate) <= 80:
        return candidate
    return hashlib.sha256(candidate.encode()).hexdigest()[:40]


def pieces(batch: Batch, kind: str, max_bytes: int) -> list[Batch]:
    """``batch`` cut into pieces (``kind`` "s": each fitting ``max_bytes`` and
    MAX_BATCH_RECORDS; "h": two halves), ids derived from the batch's
    (``piece_id``); anomalies and quarantine reports go with the first piece."""
    keys: list[SpendKey | RollupKey] = [*batch.increments, *batch.rollups]
    groups: list[list[SpendKey | RollupKey]] = []
    if kind == "h":
        half = max(len(keys) // 2, 1)
        groups = [keys[:half], keys[half:]]
    else:
        size = REPORT_BYTES * (len(batch.anomalies) + len(batch.quarantined))
        groups = [[]]
        for key in keys:
            n = (record_size(key) if len(key) == 3 else rollups.size(key)) or 0
            if groups[-1] and (size + n > max_bytes or len(groups[-1]) >= MAX_BATCH_RECORDS):
                groups.append([])
                size = 0
            groups[-1].append(key)
            size += n
    pieces: list[Batch] = []
    for n, group in enumerate(g for g in groups if g or not pieces):
        piece = Batch(piece_id(batch.batch_id, kind, n), {}, sent=True)
        for key in group:
            if len(key) == 3:
                piece.add(key, batch.increments[key])
            else:
                piece.add_rollup(key, batch.rollups[key])
        if n == 0:  # anomalies and reports go with the first piece
            piece.anomalies = list(batch.anomalies)
            piece.quarantined = list(batch.quarantined)
            piece.size += REPORT_BYTES * (len(piece.anomalies) + len(piece.quarantined))
        piece.without_holds = batch.without_holds
        pieces.append(piece)
    return pieces


def pack(
    in_flight: dict[str, Batch],
    usage: dict[SpendKey, Increment],
    rollup_usage: dict[RollupKey, RollupSums],
    anomalies: list[dp.UsageAnomaly],
    reports: list[dp.QuarantinedRecord],
    max_bytes: int,
) -> tuple[Batch | None, list[Batch]]:
    """Add usage, anomalies and quarantine reports to the newest batch of
    ``in_flight`` while it was never sent and has room (``max_bytes``,
    MAX_BATCH_RECORDS), else to new batches (fresh ids) added to
    ``in_flight``. Returns the batch written to last and what each batch
    gained (to journal)."""
    newest = next(reversed(in_flight.values()), None)
    target = newest if newest is not None and not newest.sent else None
    parts: dict[str, Batch] = {}  # what each batch gains (the caller journals it)

    def room_for(size: int) -> Batch:
        nonlocal target
        if target is None or (
            target.size + size > max_bytes or target.records >= MAX_BATCH_RECORDS
        ):
            target = Batch(batch_id=uuid.uuid4().hex, increments={})
            in_flight[target.batch_id] = target
        part = parts.get(target.batch_id)
        if part is None:
            part = parts[target.batch_id] = Batch(target.batch_id, {})
        return part

    for key, inc in usage.items():
        size = record_size(key) or 0
        if target is not None and key in target.increments:
            part = parts.setdefault(target.batch_id, Batch(target.batch_id, {}))
        else:
            part = room_for(size)
        assert target is not None
        target.add(key, inc, size)
        part.add(key, inc, size)
    for rkey, sums in rollup_usage.items():
        size = rollups.size(rkey) or 0
        if target is not None and rkey in target.rollups:
            part = parts.setdefault(target.batch_id, Batch(target.batch_id, {}))
        else:
            part = room_for(size)
        assert target is not None
        target.add_rollup(rkey, sums, size)
        part.add_rollup(rkey, sums, size)
    for a in anomalies:
        part = room_for(REPORT_BYTES)
        assert target is not None
        target.anomalies.append(a)
        target.size += REPORT_BYTES
        part.anomalies.append(a)
    for r in reports:
        part = room_for(REPORT_BYTES)
        assert target is not None
        target.quarantined.append(r)
        target.size += REPORT_BYTES
        part.quarantined.append(r)
    return target, list(parts.values())
