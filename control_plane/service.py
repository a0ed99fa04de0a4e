"""Use cases of the control plane: one transaction each.

Blocking database work runs on a thread pool (one thread for SQLite, whose
single writer would otherwise make threads queue on its lock); callers on the
event loop await it. Every successful change is published to the StateHub
after its transaction commits, never before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import structlog
from sqlalchemy import Engine, select
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from control_plane import (
    adjustments,
    anomalies,
    convert,
    forecasts,
    holds,
    names,
    quarantine,
    reports,
    spend_list,
    statepush,
)
from control_plane.errors import EtagMismatch, InvalidArgument, NotFound, Unavailable
from control_plane.hub import StateHub
from control_plane.metrics import ControlPlaneMetrics
from control_plane.page_tokens import PageTokens, load_key
from control_plane.store import repo
from control_plane.store.models import PolicyRow, WindowSpendRow
from control_plane.webhooks.events import ANOMALY, rate_per_hour
from control_plane.webhooks.outbox import (
    KnownEvents,
    OutboxResult,
    record_anomalies,
    record_crossings,
    record_forecasts,
)
from spendgate.domain.forecast import DEFAULT_HORIZON_S, Forecast
from spendgate.domain.limits import MAX_PAGE_SIZE
from spendgate.domain.pricing import MAX_COST_NANOS, format_usd, saturating_add
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import reports_pb2 as rp
from spendgate.wire import timestamp

log = structlog.get_logger("spendgate.control_plane")

T = TypeVar("T")
Clock = Callable[[], datetime]
# Called inside a use case's transaction with what changed ("policies" or
# "prices" with their ids, or "spend" with window keys);
# control_plane.replicas tells the other replicas through it.
ChangeKeys = Sequence[tuple[str, str, int]] | Sequence[str]
ChangeHook = Callable[[Session, str, ChangeKeys], None]
MAX_INCREMENTS_PER_BATCH = 50_000
# Spend rows of old windows deleted per transaction (forget_old_spend).
SPEND_CHUNK = 5_000
# Tag sets remembered as stored (control_plane/reports.py); forgotten all at
# once beyond this (writing a known set again is harmless, only slower).
MAX_KNOWN_TAG_SETS = 100_000
# A list page stops short of page_size at about this many bytes (at least one
# item per page), far below the 4 MB a gRPC client accepts by default:
# descriptions are free text of any length.
LIST_PAGE_BYTES = 1 << 20


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class UsageResult:
    duplicate: bool
    spend: list[dp.WindowSpend]
    unknown_policy_increments: int
    quarantined_increments: int = 0
    refused_rollups: int = 0


class ControlPlane:
    def __init__(
        self,
        engine: Engine,
        hub: StateHub,
        *,
        clock: Clock = utc_now,
        default_week_start: int = 0,
        hold_ttl_s: int = 30,
        forecast_horizon_s: float = DEFAULT_HORIZON_S,
    ) -> None:
        self.engine = engine
        self.hub = hub
        self.clock = clock
        self.default_week_start = default_week_start
        self.hold_ttl_s = hold_ttl_s
        self.forecast_horizon_s = forecast_horizon_s
        workers = 1 if engine.dialect.name == "sqlite" else 8
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="store")
        # Set after a transaction that wrote webhook deliveries commits; the
        # dispatcher waits on it besides polling.
        self.deliveries_ready = asyncio.Event()
        self.known_events = KnownEvents()
        self.on_change: ChangeHook | None = None
        self.metrics = ControlPlaneMetrics()
        self._page_tokens: PageTokens | None = None
        # Tag sets of usage rollups stored (committed): not written again.
        self.known_tag_sets: set[str] = set()

    def changed(self, session: Session, kind: str, keys: ChangeKeys = ()) -> None:
        """Record, in ``session``'s transaction, that data-plane state changed."""
        if self.on_change is not None:
            self.on_change(session, kind, keys)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.dispose()

    async def run(
        self, fn: Callable[[Session], T], on_commit: Callable[[T], None] | None = None
    ) -> T:
        """``fn(session)`` in one transaction on the store's thread pool;
        Unavailable when the database cannot be reached.

        ``on_commit(result)`` runs on the event loop once the transaction has
        committed, also when the caller was cancelled meanwhile (a deadline
        that expired while the thread committed): what counts committed work
        (metrics, log lines) then still agrees with the database.
        """

        def in_transaction() -> T:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                return fn(session)

        started = time.perf_counter_ns()
        failed = False
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, in_transaction)
            if on_commit is None:
                return await future
            try:
                result = await asyncio.shield(future)
            except asyncio.CancelledError:
                future.add_done_callback(
                    lambda f: None if f.cancelled() or f.exception() else on_commit(f.result())
                )
                raise
            on_commit(result)
            return result
        except (OperationalError, InterfaceError) as e:
            failed = True
            log.error("database unavailable", error=str(e.orig or e).splitlines()[0])
            raise Unavailable("database unavailable") from e
        finally:
            self.metrics.store_operation(fn, time.perf_counter_ns() - started, failed=failed)

    async def page_tokens(self) -> PageTokens:
        """Signs and checks page tokens (the key is read, or created, once)."""
        if self._page_tokens is None:
            now = self.clock()
            key = await self.run(lambda s: load_key(s, now))
            self._page_tokens = PageTokens(key)
        return self._page_tokens

    async def ping(self) -> None:
        await self.run(lambda s: s.execute(select(1)).scalar_one())

    # ---- policies -------------------------------------------------------

    async def create_policy(self, msg: pb.BudgetPolicy, author: str) -> pb.BudgetPolicy:
        values = convert.policy_values(msg, default_week_start=self.default_week_start)
        now = self.clock()

        def create(s: Session) -> PolicyRow:
            row = PolicyRow(
                id=repo.new_policy_id(),
                create_time=now,
                update_time=now,
                created_by=author,
                updated_by=author,
                version=1,
            )
            convert.apply_values(row, values, now)
            names.check_free(s, PolicyRow, "policy", row.name, row.id)
            s.add(row)
            self.changed(s, "policies", [row.id])
            return row

        try:
            row = await self.run(create)
        except IntegrityError:
            raise names.taken("policy", values.name) from None
        log.info("policy created", policy_id=row.id, name=row.name, author=author)
        self.publish_policy_changes(upserts=[row])
        return convert.policy_message(row)

    async def get_policy(self, policy_id: str) -> pb.BudgetPolicy:
        def query(s: Session) -> pb.BudgetPolicy:
            row = repo.get_policy(s, policy_id)
            if row is None:
                raise NotFound("policy", policy_id)
            counts = repo.would_reject_counts(s, [row])
            return convert.policy_message(row, counts.get(row.id, 0))

        return await self.run(query)

    async def list_policies(
        self, page_size: int, page_token: str
    ) -> tuple[list[pb.BudgetPolicy], str]:
        limit = clamp_page_size(page_size, default=50)
        tokens = await self.page_tokens()
        after = tokens.decode("policies", page_token, 1)[0] if page_token else ""

        def query(s: Session) -> tuple[list[pb.BudgetPolicy], str, bool]:
            rows, more = repo.list_policies_sized(
                s, after_id=after, limit=limit, max_bytes=LIST_PAGE_BYTES
            )
            counts = repo.would_reject_counts(s, rows)
            last = rows[-1].id if rows else ""
            return [convert.policy_message(r, counts.get(r.id, 0)) for r in rows], last, more

        page, last, more = await self.run(query)
        token = tokens.encode("policies", last) if more else ""
        return page, token

    async def update_policy(
        self,
        policy_id: str,
        merge: Callable[[pb.BudgetPolicy], pb.BudgetPolicy],
        expected_etag: str,
        author: str,
    ) -> pb.BudgetPolicy:
        """Read, merge (``merge`` applies the field mask to the stored message),
        validate and write in one transaction; the row is locked meanwhile."""
        now = self.clock()
        wanted = {"name": ""}  # the name written, for a concurrent writer's error

        def update(s: Session) -> PolicyRow:
            row = s.get(PolicyRow, policy_id, with_for_update=True)
            if row is None:
                raise NotFound("policy", policy_id)
            if expected_etag and expected_etag != convert.etag(row):
                raise EtagMismatch(policy_id)
            merged = merge(convert.policy_message(row))
            values = convert.policy_values(merged, default_week_start=self.default_week_start)
            convert.apply_values(row, values, now)
            wanted["name"] = row.name
            names.check_free(s, PolicyRow, "policy", row.name, row.id)
            row.update_time = now
            row.updated_by = author
            row.version += 1
            self.changed(s, "policies", [row.id])
            return row

        try:
            row = await self.run(update)
        except IntegrityError:
            raise names.taken("policy", wanted["name"]) from None
        log.info("policy updated", policy_id=row.id, author=author, version=row.version)
        self.publish_policy_changes(upserts=[row])
        return convert.policy_message(row)

    async def delete_policy(self, policy_id: str, expected_etag: str, author: str) -> None:
        def delete(s: Session) -> None:
            row = s.get(PolicyRow, policy_id, with_for_update=True)
            if row is None:
                raise NotFound("policy", policy_id)
            if expected_etag and expected_etag != convert.etag(row):
                raise EtagMismatch(policy_id)
            repo.delete_policy(s, row)
            self.changed(s, "policies", [policy_id])

        await self.run(delete)
        log.info("policy deleted", policy_id=policy_id, author=author)
        self.publish_policy_changes(deleted=[policy_id])

    # ---- spend ------------------------------------------------------------

    async def apply_usage(self, req: dp.ReportUsageRequest) -> UsageResult:
        """Apply a usage batch exactly once (by batch_id), atomically, and
        record the data plane's holds it carries (newest report wins)."""
        if (req.increments or req.rollups) and not req.batch_id:
            raise InvalidArgument.one(
                "batch_id", "is required when there are increments or rollups"
            )
        if len(req.batch_id) > 80:
            raise InvalidArgument.one("batch_id", "must be at most 80 characters")
        if len(req.increments) > MAX_INCREMENTS_PER_BATCH:
            raise InvalidArgument.one("increments", f"at most {MAX_INCREMENTS_PER_BATCH} per batch")
        if len(req.rollups) > reports.MAX_ROLLUPS_PER_BATCH:
            raise InvalidArgument.one(
                "rollups", f"at most {reports.MAX_ROLLUPS_PER_BATCH} per batch"
            )
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
        now = self.clock()

        def apply(s: Session) -> tuple[bool, list[dp.WindowSpend], int, OutboxResult]:
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
            held_now = buckets.holds(hold_list, req.unapplied, s)
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
                tag_sets_written[:] = reports.add(s, rollup_rows, self.known_tag_sets)
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
                horizon_s=self.forecast_horizon_s,
            )
            at = int(now.timestamp())
            if held_now:
                repo.set_holds(
                    s,
                    req.data_plane_id,
                    req.holds_seq,
                    ((k, min(h, MAX_COST_NANOS)) for k, (h, _) in held_now.items()),
                    at + self.hold_ttl_s,
                    buckets.requests(req.holds),
                )
            keys = [(t.policy_id, t.member, t.window_start) for t in totals]
            # Holds change only with a report of them: only those windows'
            # holds are sent again (a data plane keeps what it knew of the rest).
            held = repo.holds_by_window(s, list(held_now), at) if held_now else {}
            if not duplicate or held_now:
                self.changed(s, "spend", keys)
            # Crossings are recorded in this transaction: committed together
            # with the spend, or not at all.
            outbox = (
                OutboxResult()
                if duplicate
                else record_crossings(
                    s, ((rows[t.policy_id], t) for t in totals), now, self.known_events
                )
            )
            if not duplicate:
                costs = {k: a[1] for k, a in deltas.items()}
                due = forecasts.due(totals, costs, rows, now, self.forecast_horizon_s)
                record_forecasts(s, due, now, self.known_events, outbox)
            if not duplicate and req.anomalies:
                record_anomalies(s, req.data_plane_id, req.anomalies, now, outbox)
            spend = holds.total_messages(totals, rows, held)
            return duplicate, spend, unknown, outbox

        def committed(result: tuple[bool, list[dp.WindowSpend], int, OutboxResult]) -> None:
            # Runs once the transaction committed, even if the caller's
            # deadline expired meanwhile: counters and log lines say what the
            # database holds.
            duplicate, spend, unknown, outbox = result
            if len(self.known_tag_sets) > MAX_KNOWN_TAG_SETS:
                self.known_tag_sets.clear()
            self.known_tag_sets.update(tag_sets_written)
            self.known_events.add(outbox.seen, now)
            self.metrics.usage_applied(
                duplicate=duplicate,
                records=len(req.increments),
                rollups=len(req.rollups),
                unknown=unknown,
                events=[e.kind for e in outbox.recorded] + [ANOMALY] * len(outbox.anomalies),
            )
            if not duplicate:
                self._log_quarantined(req, refused)
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
            _log_recorded(outbox)
            if outbox.deliveries:
                self.deliveries_ready.set()
            if unknown:
                log.warning(
                    "usage for unknown policies dropped", count=unknown, batch_id=req.batch_id
                )
            if spend and (not duplicate or req.holds):
                update = dp.StateUpdate(spend=spend)
                if not duplicate and req.batch_id:
                    update.applied.data_plane_id = req.data_plane_id
                    update.applied.batch_id = req.batch_id
                self.hub.publish(update)

        try:
            duplicate, spend, unknown, _ = await self.run(apply, committed)
        except DataError as refused_by_db:
            # A value the database refuses (and no check above caught) would
            # fail this batch on every retry: refuse it as invalid, so the data
            # plane isolates the record and quarantines it.
            why = str(refused_by_db.orig or refused_by_db).splitlines()[0]
            raise InvalidArgument.one(
                "increments", f"the database refused a value: {why}"
            ) from refused_by_db
        return UsageResult(duplicate, spend, unknown, len(refused), len(rollup_problems))

    def _log_quarantined(
        self,
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
        self.metrics.usage_quarantined(reasons)

    async def list_quarantined(
        self, page_size: int, page_token: str
    ) -> tuple[list[pb.QuarantinedUsage], str, int]:
        limit = clamp_page_size(page_size, default=50)
        tokens = await self.page_tokens()
        before = tokens.decode("quarantined", page_token, 1)[0] if page_token else ""

        def query(s: Session) -> tuple[list[pb.QuarantinedUsage], bool, int]:
            rows = quarantine.page(s, before_id=before, limit=limit + 1)
            return [quarantine.message(r) for r in rows], len(rows) > limit, quarantine.count(s)

        records, more, total = await self.run(query)
        records = records[:limit]
        token = tokens.encode("quarantined", records[-1].id) if more and records else ""
        return records, token, total

    # ---- spend adjustments ----------------------------------------------

    async def create_adjustment(
        self, msg: pb.SpendAdjustment, author: str, request_id: str = ""
    ) -> pb.SpendAdjustment:
        """Record a correction and apply it to the policy's current window in
        one transaction (control_plane/adjustments.py), with the events the
        new total reaches; then push the window to every data plane. A retry
        with the same ``request_id`` returns the adjustment already made."""
        wanted = adjustments.check(msg, request_id)
        now = self.clock()

        def create(
            s: Session,
        ) -> tuple[adjustments.Applied, OutboxResult, list[dp.WindowSpend]]:
            applied = adjustments.apply(s, wanted, now, author)
            t, policy = applied.total, applied.policy
            if t is None or policy is None:  # a retry: nothing changes
                return applied, OutboxResult(), []
            keys = [(t.policy_id, t.member, t.window_start)]
            self.changed(s, "spend", keys)
            outbox = record_crossings(s, [(policy, t)], now, self.known_events)
            held = repo.holds_by_window(s, keys, int(now.timestamp()))
            spend = holds.total_messages([t], {policy.id: policy}, held)
            return applied, outbox, spend

        try:
            applied, outbox, spend = await self.run(create)
        except IntegrityError:
            # The same request id committed by a concurrent call in between:
            # answer with that one (or refuse different fields).
            applied, outbox, spend = await self.run(create)
        r = applied.row
        if applied.total is None:
            log.info("spend adjustment retried", adjustment_id=r.id, request_id=request_id)
            return adjustments.message(r)
        self.known_events.add(outbox.seen, now)
        self.metrics.spend_adjusted(wanted.amount_nanos, [e.kind for e in outbox.recorded])
        log.info(
            "spend adjusted",
            adjustment_id=r.id,
            policy_id=r.policy_id,
            member=r.member[:256] or None,
            amount_usd=adjustments.usd(r.amount_nanos),
            spent_before_usd=adjustments.usd(r.spent_before_nanos),
            spent_after_usd=adjustments.usd(r.spent_after_nanos),
            reason=r.reason,
            author=r.created_by,
        )
        _log_recorded(outbox, adjustment_id=r.id)
        if outbox.deliveries:
            self.deliveries_ready.set()
        self.hub.publish(dp.StateUpdate(spend=spend))
        return adjustments.message(r)

    async def list_adjustments(
        self, policy_id: str, member: str, page_size: int, page_token: str
    ) -> tuple[list[pb.SpendAdjustment], str]:
        """Newest first. ``member`` is matched as stored (canonical), after
        canonicalising it for ``policy_id``'s scope when that policy exists."""
        limit = clamp_page_size(page_size, default=50)
        tokens = await self.page_tokens()
        before = tokens.decode("adjustments", page_token, 1)[0] if page_token else ""
        if before and not adjustments.is_id(before):
            raise InvalidArgument.one("page_token", "is not a token this server returned")

        def query(s: Session) -> list[pb.SpendAdjustment]:
            wanted = member
            if member and policy_id:
                row = repo.get_policy(s, policy_id)
                if row is not None and convert.domain_policy(row).is_wildcard:
                    try:
                        wanted = adjustments.member_of(convert.domain_policy(row), member)
                    except InvalidArgument as e:
                        raise InvalidArgument.one("member", e.violations[0].description) from None
            rows = adjustments.page(
                s, policy_id=policy_id, member=wanted, before_id=before, limit=limit + 1
            )
            return [adjustments.message(r) for r in rows]

        page = await self.run(query)
        token = tokens.encode("adjustments", page[limit - 1].id) if len(page) > limit else ""
        return page[:limit], token

    async def reserve(self, req: dp.ReserveRequest) -> dp.ReserveResponse:
        """Admit requests near a REJECT budget's line, across data planes
        (control_plane/holds.py decides, in one transaction)."""
        holds.check_reserve(req)
        now = self.clock()

        def decide(s: Session) -> tuple[dp.ReserveResponse, list[dp.WindowSpend]]:
            return holds.decide(s, req, now, self.hold_ttl_s, self.changed)

        resp, messages = await self.run(decide)
        if messages:
            self.hub.publish(dp.StateUpdate(spend=messages))
        return resp

    async def forget_expired_holds(self) -> int:
        at = int(self.clock().timestamp())
        return await self.run(lambda s: repo.forget_holds(s, at))

    async def list_spend(
        self, policy_id: str, member: str, page_size: int, page_token: str
    ) -> tuple[list[pb.SpendEntry], str]:
        limit = clamp_page_size(page_size, default=100)
        tokens = await self.page_tokens()
        after: tuple[str, str] = ("", "")
        if page_token:
            parts = tokens.decode("spend", page_token, 2)
            after = (parts[0], parts[1])
        now = self.clock()

        def query(s: Session) -> list[pb.SpendEntry]:
            if policy_id and not repo.policies_by_id(s, [policy_id], description=False):
                raise NotFound("policy", policy_id)
            rows = spend_list.page(
                s, policy_id=policy_id, member=member, after=after, limit=limit + 1, now=now
            )
            # Unexpired holds only: a dead data plane's lapse on their own.
            keys = [(r.policy_id, r.member, r.window_start) for r, _ in rows]
            held = repo.holds_by_window(s, keys, int(now.timestamp()))
            return [
                _spend_entry(
                    r,
                    p,
                    held.get(k),
                    forecasts.forecast_of(r, p.amount_nanos, now, self.forecast_horizon_s),
                )
                for k, (r, p) in zip(keys, rows, strict=True)
            ]

        page = await self.run(query)
        token = ""
        if len(page) > limit:
            page = page[:limit]
            token = tokens.encode("spend", page[-1].policy_id, page[-1].member)
        return page, token

    async def list_top_spend(
        self, policy_id: str, page_size: int, page_token: str, top: int
    ) -> tuple[list[pb.SpendEntry], str, list[pb.MemberCounts]]:
        """ListSpend with top_members: a page of whole policies (``page_size``
        of them), a wildcard policy's ``top`` biggest spenders only; its
        entries, the next page's token and the wildcard policies' member counts."""
        policies = clamp_page_size(page_size, default=100)
        tokens = await self.page_tokens()
        after = tokens.decode("spend-top", page_token, 1)[0] if page_token else ""
        now = self.clock()

        def query(s: Session) -> tuple[list[pb.SpendEntry], list[pb.MemberCounts], str]:
            if policy_id and not repo.policies_by_id(s, [policy_id], description=False):
                raise NotFound("policy", policy_id)
            page = spend_list.top_page(
                s, policy_id=policy_id, after_id=after, policies=policies, top=top, now=now
            )
            held = repo.holds_by_window(
                s,
                [(r.policy_id, r.member, r.window_start) for r, _ in page.rows],
                int(now.timestamp()),
            )
            entries = [
                _spend_entry(
                    r,
                    p,
                    held.get((r.policy_id, r.member, r.window_start)),
                    forecasts.forecast_of(r, p.amount_nanos, now, self.forecast_horizon_s),
                )
                for r, p in page.rows
            ]
            counts = [
                pb.MemberCounts(policy_id=pid, members=n, exceeded=over, alerting=near)
                for pid, n, over, near in page.counts
            ]
            return entries, counts, page.last_policy_id

        entries, counts, last = await self.run(query)
        return entries, tokens.encode("spend-top", last) if last else "", counts

    async def forget_old_spend(self, retention: timedelta, chunk: int = SPEND_CHUNK) -> int:
        """Delete the spend rows of windows that ended more than ``retention``
        ago, ``chunk`` rows a transaction (other writers wait for one chunk at
        most); how many."""
        cutoff = int((self.clock() - retention).timestamp())
        removed = 0
        while True:
            n = await self.run(lambda s: repo.forget_spend(s, ended_before=cutoff, limit=chunk))
            removed += n
            if n < chunk:
                break
        if removed:
            log.info("forgot spend of old windows", count=removed, ended_before=cutoff)
        return removed

    async def forget_old_batches(self, retention: timedelta) -> int:
        """Drop batch ids older than ``retention``. A data plane retries a batch
        until it is acknowledged, so retention only has to outlast the longest
        control plane outage a data plane rides out with usage unsent."""
        cutoff = self.clock() - retention
        removed = await self.run(lambda s: repo.forget_batches(s, cutoff))
        if removed:
            log.info("forgot old usage batch ids", count=removed)
        old = self.clock() - quarantine.RETENTION
        forgotten = await self.run(lambda s: quarantine.forget(s, before=old))
        if forgotten:
            log.info("forgot old quarantined usage records", count=forgotten)
        return removed

    # ---- chargeback reports ------------------------------------------------

    async def query_spend(self, req: rp.QuerySpendRequest) -> rp.QuerySpendResponse:
        """ReportService.QuerySpend: a page of groups (control_plane/reports.py)."""
        q = reports.parse_query(req, self.clock())
        limit = clamp_page_size(req.page_size, default=100)
        tokens = await self.page_tokens()
        kind = "report-" + q.digest()
        after: list[str | int] | None = None
        if req.page_token:
            encoded, end = tokens.decode(kind, req.page_token, 2)
            after = json.loads(encoded)
            # Every page of a query without end_time ends where the first did.
            q = dataclasses.replace(q, end=int(end))
        groups = await self.run(lambda s: reports.query_page(s, q, after, limit + 1))
        token = ""
        # A page ends at page_size groups or at about LIST_PAGE_BYTES.
        size, kept = 0, 0
        for g in groups[:limit]:
            size += g.ByteSize()
            kept += 1
            if size >= LIST_PAGE_BYTES:
                break
        if kept < len(groups):
            groups = groups[:kept]
            token = tokens.encode(kind, json.dumps(reports.position(q, groups[-1])), str(q.end))
        return rp.QuerySpendResponse(columns=q.columns, groups=groups, next_page_token=token)

    async def forget_old_rollups(self, retention: timedelta) -> int:
        """Delete chargeback rollups of hours older than ``retention``."""
        before = self.clock() - retention
        removed = await self.run(lambda s: reports.forget(s, before))
        if removed:
            log.info("forgot old usage rollups", count=removed, before=before.isoformat())
        return removed

    # ---- data-plane state ------------------------------------------------

    async def snapshot(self) -> dp.StateUpdate:
        """Every policy and the spend of every window open now, in one message:
        streams of data planes of earlier releases only (control_plane/resync.py
        pages it for the others)."""
        at = int(self.clock().timestamp())

        def query(s: Session) -> dp.StateUpdate:
            rows = repo.all_policies(s)
            by_id = {r.id: r for r in rows}
            held = repo.holds_by_window(s, None, at)
            spend = [
                _spend_message(r, by_id[r.policy_id], held)
                for r in repo.current_spend(s, active_at=at)
                if r.policy_id in by_id
            ]
            return dp.StateUpdate(
                policies=dp.PolicySnapshot(policies=[convert.policy_message(r) for r in rows]),
                spend=spend,
                full_snapshot=True,
            )

        update = await self.run(query)
        update.server_time.FromDatetime(self.clock())
        return update

    async def policy_snapshot(self) -> dp.PolicySnapshot:
        """Every policy in one message (streams of data planes of earlier
        releases only: it grows with the policy set)."""
        rows = await self.run(repo.all_policies)
        return dp.PolicySnapshot(policies=[convert.policy_message(r) for r in rows])

    def publish_policy_changes(
        self, upserts: Iterable[PolicyRow] = (), deleted: Iterable[str] = ()
    ) -> None:
        self.hub.publish(
            dp.StateUpdate(
                policy_changes=dp.PolicyChanges(
                    upserts=[statepush.dataplane_policy(r) for r in upserts],
                    deleted_ids=list(deleted),
                )
            )
        )

    async def publish_policies(self, ids: Collection[str]) -> None:
        """Push the current state of these policies (as they are, or deleted)."""
        rows = await self.run(lambda s: repo.policies_by_id(s, ids))
        found = {r.id for r in rows}
        self.publish_policy_changes(rows, [i for i in ids if i not in found])


def clamp_page_size(requested: int, *, default: int) -> int:
    """The page size to serve: ``default`` for 0, at most MAX_PAGE_SIZE."""
    if requested < 0:
        raise InvalidArgument.one(
            "page_size",
            f"must be 0 (the default, {default}) or a positive number of items "
            f"(at most {MAX_PAGE_SIZE} are returned), got {requested}",
        )
    return min(requested or default, MAX_PAGE_SIZE)


def _spend_message(
    r: WindowSpendRow, p: PolicyRow, held: dict[tuple[str, str, int], list[repo.Hold]]
) -> dp.WindowSpend:
    return convert.window_spend_message(
        policy_id=r.policy_id,
        member=r.member,
        window_start=r.window_start,
        window_end=r.window_end,
        spent_nanos=r.spent_nanos,
        limit_nanos=p.amount_nanos,
        request_count=r.request_count,
        holds=held.get((r.policy_id, r.member, r.window_start), ()),
        adjustment_seq=r.adjustment_count,
    )


def _log_recorded(outbox: OutboxResult, **context: str) -> None:
    """One line per budget event a committed transaction recorded."""
    for e in outbox.recorded:
        log.info(
            "budget event recorded",
            event_id=e.event_id,
            event_type=e.kind,
            policy_id=e.policy_id,
            member=e.member or None,
            threshold_percent=e.threshold or None,
            spent_usd=e.spent_usd,
            amount_usd=e.amount_usd,
            deliveries=e.deliveries,
            **context,
        )


def _spend_entry(
    r: WindowSpendRow,
    p: PolicyRow,
    holds: Sequence[repo.Hold] | None = None,
    forecast: Forecast | None = None,
) -> pb.SpendEntry:
    """``remaining_usd`` is the limit less what is spent; ``held_usd`` (what
    running requests hold, across data planes) is apart from both."""
    remaining = max(p.amount_nanos - r.spent_nanos, 0)
    held = sum(h.held_nanos for h in holds or ())
    entry = pb.SpendEntry(
        policy_id=p.id,
        policy_name=p.name,
        scope=convert.scope_message(convert.domain_policy(p).scope),
        target=p.target,
        member=r.member,
        action=convert.action_message(convert.domain_policy(p).action),
        window_start=timestamp(r.window_start),
        window_end=timestamp(r.window_end),
        spent_usd=format_usd(r.spent_nanos).removeprefix("$"),
        limit_usd=format_usd(p.amount_nanos).removeprefix("$"),
        remaining_usd=format_usd(remaining).removeprefix("$"),
        exceeded=r.spent_nanos >= p.amount_nanos,
        request_count=r.request_count,
        held_usd=format_usd(held).removeprefix("$"),
        held_requests=sum(h.requests for h in holds or ()),
        adjusted_usd=adjustments.usd(r.adjusted_nanos) if r.adjustment_count else "",
        adjustment_count=r.adjustment_count or 0,
        would_reject_count=r.would_reject_count or 0,
    )
    if forecast is not None:
        entry.forecast_exhaust_time.FromSeconds(forecast.exhausted_at)
        entry.forecast_rate_usd_per_hour = rate_per_hour(forecast.rate_nanos_per_s)
    return entry


__all__: Sequence[str] = ("ControlPlane", "UsageResult", "clamp_page_size", "utc_now")
