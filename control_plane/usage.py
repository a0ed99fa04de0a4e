"""ReportUsage: a data plane's usage batch applied exactly once, in one
transaction with the holds it reports, the budget events its spend reaches,
its quarantined records and its chargeback rollups."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from sqlalchemy import select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from control_plane import anomalies, forecasts, holds, quarantine, reports
from control_plane.errors import InvalidArgument
from control_plane.runtime import Runtime, log_recorded
from control_plane.store import repo
from control_plane.store.models import PolicyRow
from control_plane.webhooks.events import ANOMALY
from control_plane.webhooks.outbox import (
    OutboxResult,
    record_anomalies,
    record_crossings,
    record_forecasts,
)
from spendgate.domain.pricing import MAX_COST_NANOS, saturating_add
from spendgate.v1 import dataplane_pb2 as dp

log = structlog.get_logger("spendgate.control_plane")

MAX_INCREMENTS_PER_BATCH = 50_000
# Tag sets remembered as stored (control_plane/reports.py); forgotten all at
# once beyond this (writing a known set again is harmless, only slower).
MAX_KNOWN_TAG_SETS = 100_000


@dataclass(frozen=True, slots=True)
class UsageResult:
    duplicate: bool
    spend: list[dp.WindowSpend]
    unknown_policy_increments: int
    quarantined_increments: int = 0
    refused_rollups: int = 0
    # Batches of ``unapplied`` applied already (ReportUsageResponse.applied_batch_ids).
    applied_batch_ids: list[str] = field(default_factory=list)


# duplicate, totals, unknown-policy increments, events, batches of
# ``unapplied`` applied already.
Applied = tuple[bool, list[dp.WindowSpend], int, OutboxResult, list[str]]


async def apply_usage(cp: Runtime, req: dp.ReportUsageRequest) -> UsageResult:
    """Apply a usage batch exactly once (by batch_id), atomically, and
    record the data plane's holds it carries (newest report wins)."""
    if (req.increments or req.rollups) and not req.batch_id:
        raise InvalidArgument.one("batch_id", "is required when there are increments or rollups")
    if len(req.batch_id) > 80:
        raise InvalidArgument.one("batch_id", "must be at most 80 characters")
    if len(req.increments) > MAX_INCREMENTS_PER_BATCH:
        raise InvalidArgument.one("increments", f"at most {MAX_INCREMENTS_PER_BATCH} per batch")
    if len(req.rollups) > reports.MAX_ROLLUPS_PER_BATCH:
        raise InvalidArgument.one("rollups", f"at most {reports.MAX_ROLLUPS_PER_BATCH} per batch")
    holds.check_holds(req.holds, "holds", req.data_plane_id)
    holds.check_unapplied(req.unapplied)
    # Rollups that cannot be stored are dropped (and logged), never the batch.
    rollup_rows, rollup_problems = reports.rows_of(req.rollups)
    tag_sets_written: list[str] = []
    anomalies.check(req)
    # Increments that cannot be stored are quarantined, not refused with
    # the batch: one bad record must not block the ones behind it.
    good: list[dp.SpendIncrement] = []
    refused: list[tuple[dp.SpendIncrement, str, str]] = []
    for inc in req.increments:
        problem = quarantine.check_increment(inc)
        if problem is None:
            good.append(inc)
        else:
            refused.append((inc, *problem))
    # Holds on windows that cannot exist (their usage is quarantined) are dropped.
    hold_list = [h for h in req.holds if quarantine.storable(h.policy_id, h.member) is None]
    now = cp.clock()

    def apply(s: Session) -> Applied:
        ids = {inc.policy_id for inc in good} | {h.policy_id for h in hold_list}
        rows = {r.id: r for r in s.scalars(select(PolicyRow).where(PolicyRow.id.in_(ids)))}
        buckets = holds.Buckets(rows)
        deltas: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        unknown = 0
        for inc in good:
            found = buckets.key(inc.policy_id, inc.member, inc.window_start.seconds)
            if found is None:
                unknown += 1
                continue
            key, end = found
            acc = deltas[key]
            acc[0] = end
            acc[1] = saturating_add(acc[1], inc.cost_nanos)
            acc[2] += inc.request_count
            acc[3] += inc.estimated_count
            acc[4] += inc.would_reject_count
        held_now = buckets.holds(hold_list)
        duplicate = bool(req.batch_id) and not repo.claim_batch(
            s, req.batch_id, req.data_plane_id, now
        )
        if duplicate:  # count nothing again; report the current totals
            for acc in deltas.values():
                acc[1:] = [0, 0, 0, 0]
        else:
            s.add_all(
                quarantine.from_increment(
                    inc,
                    reason,
                    detail,
                    data_plane_id=req.data_plane_id,
                    batch_id=req.batch_id,
                    now=now,
                )
                for inc, reason, detail in refused
            )
            s.add_all(
                quarantine.from_report(
                    r, data_plane_id=req.data_plane_id, batch_id=req.batch_id, now=now
                )
                for r in req.quarantined
            )
            tag_sets_written[:] = reports.add(s, rollup_rows, cp.known_tag_sets)
        # Windows that only holds touch get a row too (adding nothing),
        # which also locks them in key order like any spend.
        for key, (_, end) in held_now.items():
            if key not in deltas:
                deltas[key][0] = end
        totals = repo.add_spend(
            s,
            (
                repo.SpendDelta(k[0], k[1], k[2], a[0], a[1], a[2], a[3], a[4])
                for k, a in deltas.items()
            ),
            now,
            horizon_s=cp.forecast_horizon_s,
        )
        # Checked with the windows locked (see Buckets.without_applied).
        applied = buckets.without_applied(held_now, req.unapplied, s)
        at = int(now.timestamp())
        discounted: list[tuple[str, str, int]] = []
        if not duplicate and req.holds_seq:
            # Reports newer than this batch's counted it as unapplied.
            discounted = repo.discount_holds(
                s, req.data_plane_id, req.holds_seq, {k: a[1] for k, a in deltas.items()}
            )
        if held_now:
            repo.set_holds(
                s,
                req.data_plane_id,
                req.holds_seq,
                ((k, min(h, MAX_COST_NANOS)) for k, (h, _) in held_now.items()),
                at + cp.hold_ttl_s,
                buckets.requests(req.holds),
            )
        keys = [(t.policy_id, t.member, t.window_start) for t in totals]
        # Holds change only with a report of them: only those windows'
        # holds are sent again (a data plane keeps what it knew of the rest).
        held_keys = {*held_now, *discounted}
        held = repo.holds_by_window(s, list(held_keys), at) if held_keys else {}
        if not duplicate or held_keys:
            cp.changed(s, "spend", keys)
        # Crossings are recorded in this transaction: committed together
        # with the spend, or not at all.
        outbox = (
            OutboxResult()
            if duplicate
            else record_crossings(s, ((rows[t.policy_id], t) for t in totals), now, cp.known_events)
        )
        if not duplicate:
            costs = {k: a[1] for k, a in deltas.items()}
            due = forecasts.due(totals, costs, rows, now, cp.forecast_horizon_s)
            record_forecasts(s, due, now, cp.known_events, outbox)
        if not duplicate and req.anomalies:
            record_anomalies(s, req.data_plane_id, req.anomalies, now, outbox)
        spend = holds.total_messages(totals, rows, held)
        return duplicate, spend, unknown, outbox, applied

    def committed(result: Applied) -> None:
        # Runs once the transaction committed, even if the caller's
        # deadline expired meanwhile: counters and log lines say what the
        # database holds.
        duplicate, spend, unknown, outbox, applied = result
        if len(cp.known_tag_sets) > MAX_KNOWN_TAG_SETS:
            cp.known_tag_sets.clear()
        cp.known_tag_sets.update(tag_sets_written)
        cp.known_events.add(outbox.seen, now)
        cp.metrics.usage_applied(
            duplicate=duplicate,
            records=len(req.increments),
            rollups=len(req.rollups),
            unknown=unknown,
            events=[e.kind for e in outbox.recorded] + [ANOMALY] * len(outbox.anomalies),
        )
        if not duplicate:
            _log_quarantined(cp, req, refused)
            if rollup_problems:
                log.error(
                    "usage rollups refused: values out of bounds; dropped",
                    count=len(rollup_problems),
                    first=rollup_problems[0],
                    data_plane_id=req.data_plane_id,
                    batch_id=req.batch_id,
                )
        for a in outbox.anomalies:  # committed: one error line per anomaly
            log.error(
                "usage anomaly recorded",
                event_id=a.event_id,
                data_plane_id=req.data_plane_id,
                reason=a.reason,
                model=a.model,
                request_id=a.request_id,
                charged_usd=a.charged_usd,
                reported_cost_usd=a.reported_cost_usd,
                deliveries=a.deliveries,
            )
        log_recorded(outbox)
        if outbox.deliveries:
            cp.deliveries_ready.set()
        if unknown:
            log.warning("usage for unknown policies dropped", count=unknown, batch_id=req.batch_id)
        if spend and (not duplicate or req.holds):
            update = dp.StateUpdate(spend=spend)
            if not duplicate and req.batch_id:
                update.applied.data_plane_id = req.data_plane_id
                update.applied.batch_id = req.batch_id
            update.applied_batches.extend(
                dp.AppliedBatch(data_plane_id=req.data_plane_id, batch_id=b) for b in applied
            )
            cp.hub.publish(update)

    try:
        duplicate, spend, unknown, _, applied = await cp.run(apply, committed)
    except DataError as refused_by_db:
        # A value the database refuses (and no check above caught) would
        # fail this batch on every retry: refuse it as invalid, so the data
        # plane isolates the record and quarantines it.
        why = str(refused_by_db.orig or refused_by_db).splitlines()[0]
        raise InvalidArgument.one(
            "increments", f"the database refused a value: {why}"
        ) from refused_by_db
    return UsageResult(duplicate, spend, unknown, len(refused), len(rollup_problems), applied)


def _log_quarantined(
    cp: Runtime,
    req: dp.ReportUsageRequest,
    refused: Sequence[tuple[dp.SpendIncrement, str, str]],
) -> None:
    """One error line per quarantined record (committed), and the metric."""
    reasons = [reason for _, reason, _ in refused]
    for inc, reason, detail in refused:
        log.error(
            "usage record quarantined: the control plane cannot apply it",
            reason=reason,
            detail=detail,
            policy_id=inc.policy_id[:64],
            member_chars=len(inc.member),
            cost_nanos=inc.cost_nanos,
            batch_id=req.batch_id,
            data_plane_id=req.data_plane_id,
        )
    for r in req.quarantined:
        reasons.append(r.reason if r.reason in quarantine.REASONS else "refused")
        log.error(
            "usage record quarantined by a data plane",
            reason=r.reason,
            detail=r.detail[:200],
            policy_id=r.policy_id[:64],
            member_bytes=r.member_bytes,
            cost_nanos=r.cost_nanos,
            batch_id=r.batch_id[:80],
            data_plane_id=req.data_plane_id,
        )
    cp.metrics.usage_quarantined(reasons)
