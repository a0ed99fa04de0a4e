"""The control plane's Prometheus metrics.

``ControlPlaneMetrics`` is counted as the control plane works (usage
batches, budget events, webhook attempts, store operations), with plain ints
on the event loop. ``ControlPlaneCollector`` adds what is read at scrape
time: each policy's current window from the store (one aggregate query on
the store's thread pool, awaited before the scrape is rendered, so the event
loop is never blocked by it), webhook deliveries per state, connected data
planes and whether the database answers.

A wildcard policy (target ``*``) gives each member its own budget; its
gauges describe the member closest to (or furthest past) the limit: spend is
the largest member's, remaining ratio that member's. Members are never
labels.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy.orm import Session

from control_plane import convert
from control_plane.errors import Unavailable
from control_plane.store import repo, summary
from control_plane.webhooks import events
from spendgate.domain.windows import window_for
from spendgate.metrics import (
    NANOS,
    Histogram,
    counter,
    gauge,
    histogram_family,
    label_values,
    labelled,
    task_failures,
)

STORE_BUCKETS_NS = tuple(
    int(ms * 1_000_000) for ms in (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)
)
WEBHOOK_BUCKETS_NS = tuple(
    int(ms * 1_000_000) for ms in (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
)
# A scrape waits this long for the store; then database_up reads 0.
SCRAPE_TIMEOUT_S = 5.0
DELIVERY_STATES = ("pending", "delivered", "failed")
# What became of a delivery after an attempt (the `outcome` label).
ATTEMPT_OUTCOMES = {"delivered": "delivered", "pending": "retry", "failed": "failed"}


def operation_name(fn: Callable[..., Any]) -> str:
    """The store operation label for ``fn``, a bounded set: the use case
    that runs it (``apply_usage.<locals>.apply`` ->
    ``apply_usage``), or the function itself (``repo.all_policies``)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    qualname = getattr(fn, "__qualname__", type(fn).__name__)
    return str(qualname).split(".<locals>", 1)[0].rsplit(".", 1)[-1].lstrip("_")


class ControlPlaneMetrics:
    """Counters kept by one control plane. Update them from its event loop."""

    def __init__(self) -> None:
        self.batches = {"applied": 0, "duplicate": 0}
        self.records = 0  # increments (one per policy window) in applied batches
        # Full resyncs sent to data planes (paged; first ones and later ones).
        self.resyncs = 0
        self.unknown_records = 0
        self.events = dict.fromkeys(events.SUBSCRIBABLE, 0)
        # Usage records quarantined (by this control plane, or reported by a
        # data plane that could not send them), by reason.
        self.quarantined: dict[str, int] = {}
        # Spend adjustments recorded, by direction (increase | decrease).
        self.adjustments = {"increase": 0, "decrease": 0}
        self.attempts = dict.fromkeys(ATTEMPT_OUTCOMES.values(), 0)
        self.attempt_latency = Histogram(WEBHOOK_BUCKETS_NS)
        self.store_latency: dict[str, Histogram] = {}
        self.store_errors: dict[str, int] = {}

    def store_operation(self, fn: Callable[..., Any], nanos: int, *, failed: bool) -> None:
        op = operation_name(fn)
        hist = self.store_latency.get(op)
        if hist is None:
            hist = self.store_latency[op] = Histogram(STORE_BUCKETS_NS)
        hist.observe(nanos)
        if failed:
            self.store_errors[op] = self.store_errors.get(op, 0) + 1

    def usage_applied(
        self,
        *,
        duplicate: bool,
        records: int,
        unknown: int,
        events: Iterable[str],
        rollups: int = 0,
    ) -> None:
        """A ReportUsage was handled (``records`` increments; a report of
        holds alone has none and is no usage batch); ``events``: the kinds of
        the budget events its transaction recorded."""
        if records or rollups:
            self.batches["duplicate" if duplicate else "applied"] += 1
        if not duplicate:
            self.records += records
            self.unknown_records += unknown
        for kind in events:
            self.events[kind] = self.events.get(kind, 0) + 1

    def spend_adjusted(self, amount_nanos: int, events: Iterable[str]) -> None:
        """A spend adjustment committed; ``events``: the kinds of the budget
        events its transaction recorded."""
        self.adjustments["increase" if amount_nanos > 0 else "decrease"] += 1
        for kind in events:
            self.events[kind] = self.events.get(kind, 0) + 1

    def usage_quarantined(self, reasons: Iterable[str]) -> None:
        for reason in reasons:
            self.quarantined[reason] = self.quarantined.get(reason, 0) + 1

    def webhook_attempt(self, state: str, duration_ms: int | None) -> None:
        """``state``: the delivery's state after the attempt; ``duration_ms``
        None when nothing was sent (the delivery was too old)."""
        outcome = ATTEMPT_OUTCOMES.get(state, state)
        self.attempts[outcome] = self.attempts.get(outcome, 0) + 1
        if duration_ms is not None:
            self.attempt_latency.observe(duration_ms * 1_000_000)


@dataclass(frozen=True, slots=True)
class PolicyWindow:
    """One policy's current window as the last scrape read it."""

    policy_id: str
    name: str
    scope: str
    action: str
    enabled: bool
    limit_nanos: int
    spent_nanos: int  # the largest member's, for a wildcard policy
    requests: int  # all members'
    members_exceeded: int
    window_end: int
    held_nanos: int = 0  # running requests' holds, all members, unexpired
    held_requests: int = 0


@dataclass(slots=True)
class StoreReading:
    policies: list[PolicyWindow] = field(default_factory=list)
    deliveries: dict[str, int] = field(default_factory=dict)
    database_up: bool = False


def read_metrics(session: Session, now: datetime) -> StoreReading:
    """Every policy's current window and the deliveries per state."""
    at = int(now.timestamp())
    windows = {
        (w.policy_id, w.window_start): w for w in summary.window_summaries(session, active_at=at)
    }
    held: dict[tuple[str, int], list[int]] = {}
    for (policy_id, _, start), holds in repo.holds_by_window(session, None, at).items():
        acc = held.setdefault((policy_id, start), [0, 0])
        acc[0] += sum(h.held_nanos for h in holds)
        acc[1] += sum(h.requests for h in holds)
    out = []
    for row in repo.all_policies(session):
        policy = convert.domain_policy(row)
        window = window_for(policy.window, now)
        w = windows.get((row.id, int(window.start.timestamp())))
        held_nanos, held_requests = held.get((row.id, int(window.start.timestamp())), (0, 0))
        out.append(
            PolicyWindow(
                policy_id=row.id,
                name=row.name,
                scope=policy.scope.value,
                action=policy.action.value,
                enabled=policy.enabled,
                limit_nanos=policy.amount_nanos,
                spent_nanos=w.max_spent_nanos if w else 0,
                requests=w.request_count if w else 0,
                members_exceeded=w.members_exceeded if w else 0,
                window_end=int(window.end.timestamp()),
                held_nanos=held_nanos,
                held_requests=held_requests,
            )
        )
    return StoreReading(out, summary.delivery_counts(session), database_up=True)


class ControlPlaneCollector(Collector):
    """Renders ``metrics`` and the last ``refresh``; ``refresh`` before each scrape."""

    def __init__(
        self,
        metrics: ControlPlaneMetrics,
        *,
        run: Callable[[Callable[[Session], StoreReading]], Any],
        clock: Callable[[], datetime],
        data_planes: Callable[[], int],
        task_failures: Callable[[], dict[str, int]] = dict,
    ) -> None:
        """``run`` runs a function in a store transaction (ControlPlane.run);
        ``task_failures``: the supervised tasks' failure counts."""
        self.metrics = metrics
        self.run = run
        self.clock = clock
        self.data_planes = data_planes
        self.task_failures = task_failures
        self.reading = StoreReading()

    async def refresh(self) -> None:
        read = functools.partial(read_metrics, now=self.clock())
        try:
            self.reading = await asyncio.wait_for(self.run(read), SCRAPE_TIMEOUT_S)
        except (Unavailable, TimeoutError):
            self.reading = StoreReading(database_up=False)

    def collect(self) -> Iterator[Metric]:
        yield from self._policies()
        yield from self._activity()
        r = self.reading
        yield labelled(
            GaugeMetricFamily(
                "spendgate_webhook_deliveries",
                "Webhook deliveries kept in the store, by state (pending, delivered, failed).",
                labels=["state"],
            ),
            [((s,), r.deliveries.get(s, 0)) for s in DELIVERY_STATES] if r.database_up else [],
        )
        yield gauge(
            "spendgate_data_planes_connected",
            "Data planes (ext_proc) with a state stream open to this control plane.",
            self.data_planes(),
        )
        yield counter(
            "spendgate_data_plane_resyncs",
            "Full resyncs (every policy, price override and open window, in pages) sent "
            "to data planes: one per new stream, more when one fell behind or replica "
            "notifications were lost.",
            self.metrics.resyncs,
        )
        yield gauge(
            "spendgate_database_up",
            "1 when the database answered this scrape's query.",
            int(r.database_up),
        )
        yield task_failures(self.task_failures())

    def _policies(self) -> Iterator[Metric]:
        policies = self.reading.policies
        info = GaugeMetricFamily(
            "spendgate_policy_info",
            "1 per budget policy; its name, scope, action and whether it is enabled.",
            labels=["policy_id", "name", "scope", "action", "enabled"],
        )
        for p in policies:
            labels = [p.policy_id, p.name, p.scope, p.action, str(p.enabled).lower()]
            info.add_metric(label_values(labels), 1)
        yield info
        per_policy: list[tuple[str, str, Callable[[PolicyWindow], float]]] = [
            (
                "spendgate_policy_spend_usd",
                "USD spent in the policy's current window (wildcard: the largest member's).",
                lambda p: p.spent_nanos / NANOS,
            ),
            (
                "spendgate_policy_held_usd",
                "USD held in the policy's current window by requests still running, on "
                "every data plane (all members; not in spendgate_policy_spend_usd).",
                lambda p: p.held_nanos / NANOS,
            ),
            (
                "spendgate_policy_held_requests",
                "Requests still running whose estimates are held in the policy's current "
                "window (all members).",
                lambda p: p.held_requests,
            ),
            (
                "spendgate_policy_limit_usd",
                "The policy's budget per window (wildcard: per member).",
                lambda p: p.limit_nanos / NANOS,
            ),
            (
                "spendgate_policy_remaining_ratio",
                "Share of the budget left in the current window, 0 to 1 (wildcard: of the "
                "member closest to its limit).",
                lambda p: (
                    max(p.limit_nanos - p.spent_nanos, 0) / p.limit_nanos
                    if p.limit_nanos > 0
                    else 0.0
                ),
            ),
            (
                "spendgate_policy_window_requests",
                "Requests charged in the policy's current window (all members).",
                lambda p: p.requests,
            ),
            (
                "spendgate_policy_members_exceeded",
                "Members (1 for a non-wildcard policy) at or over the limit in the current window.",
                lambda p: p.members_exceeded,
            ),
            (
                "spendgate_policy_window_end_timestamp_seconds",
                "When the policy's current window ends (Unix seconds).",
                lambda p: p.window_end,
            ),
        ]
        for name, doc, value in per_policy:
            yield labelled(
                GaugeMetricFamily(name, doc, labels=["policy_id"]),
                [((p.policy_id,), value(p)) for p in policies],
            )

    def _activity(self) -> Iterator[Metric]:
        m = self.metrics
        yield labelled(
            CounterMetricFamily(
                "spendgate_usage_batches",
                "Usage batches received from data planes: applied, or duplicate (a retry of "
                "one already applied, not counted again).",
                labels=["result"],
            ),
            [((k,), n) for k, n in m.batches.items()],
        )
        yield counter(
            "spendgate_usage_records",
            "Usage records (one per policy window) in applied batches.",
            m.records,
        )
        yield counter(
            "spendgate_usage_unknown_policy_records",
            "Usage records dropped because their policy no longer exists.",
            m.unknown_records,
        )
        yield labelled(
            CounterMetricFamily(
                "spendgate_usage_quarantined_records",
                "Usage records quarantined instead of applied (they are in no window), by reason.",
                labels=["reason"],
            ),
            [((k,), n) for k, n in sorted(m.quarantined.items())],
        )
        yield labelled(
            CounterMetricFamily(
                "spendgate_spend_adjustments",
                "Spend adjustments recorded by administrators, by direction (increase, decrease).",
                labels=["direction"],
            ),
            [((k,), n) for k, n in m.adjustments.items()],
        )
        yield labelled(
            CounterMetricFamily(
                "spendgate_budget_events",
                "Budget events recorded (each crossing once per policy, member and window).",
                labels=["type"],
            ),
            [((k,), n) for k, n in m.events.items()],
        )
        yield labelled(
            CounterMetricFamily(
                "spendgate_webhook_attempts",
                "Webhook delivery attempts by outcome: delivered, retry (will be retried), "
                "failed (given up).",
                labels=["outcome"],
            ),
            [((k,), n) for k, n in m.attempts.items()],
        )
        yield histogram_family(
            "spendgate_webhook_attempt_duration_seconds",
            "Duration of webhook delivery attempts that were sent.",
            [],
            [((), m.attempt_latency)],
        )
        yield histogram_family(
            "spendgate_store_operation_duration_seconds",
            "Store transactions by operation (the use case), including the wait for the "
            "store's thread pool.",
            ["operation"],
            [((op,), h) for op, h in m.store_latency.items()],
        )
        yield labelled(
            CounterMetricFamily(
                "spendgate_store_errors",
                "Store transactions that failed because the database was unavailable.",
                labels=["operation"],
            ),
            [((op,), n) for op, n in m.store_errors.items()],
        )


def registry_for(collector: ControlPlaneCollector) -> CollectorRegistry:
    """A registry of its own with the control plane's metrics and the process_* ones."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry
