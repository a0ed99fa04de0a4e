"""ext_proc's Prometheus metrics, computed when scraped.

The request path only bumps plain counters (ext_proc/stats.py); this
collector reads them, the LocalState and the sync status at scrape time, on
the event loop (see spendgate/metrics.py). Nothing here runs per request.
Every label value is bounded: policy ids, provider and API shape names, and
model names of the price table (or "unpriced") — never a user, an API key or
a member.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ext_proc.stats import Stats
from ext_proc.sync.state import LocalState
from ext_proc.sync.statestream import StreamStats
from spendgate.metrics import NANOS, counter, gauge, histogram_family, labelled, task_failures
from spendgate.supervise import Supervisor


@dataclass(slots=True)
class SyncStatus:
    """Whether ext_proc is in step with the control plane, kept by the
    server from the sync's connection and backlog callbacks.

    In sync = the state stream is open and no usage batch is failing to be
    delivered. ``since`` is the monotonic time of the last change.
    """

    connected: bool = False
    backlog: bool = False
    clock: Callable[[], float] = time.monotonic
    since: float = field(init=False)

    def __post_init__(self) -> None:
        self.since = self.clock()

    def set(self, *, connected: bool | None = None, backlog: bool | None = None) -> None:
        was = self.in_sync
        if connected is not None:
            self.connected = connected
        if backlog is not None:
            self.backlog = backlog
        if self.in_sync != was:
            self.since = self.clock()

    @property
    def in_sync(self) -> bool:
        return self.connected and not self.backlog

    def lag_seconds(self) -> float:
        """0 while in sync, else the seconds since it last was (or since
        start, if it never was)."""
        return 0.0 if self.in_sync else self.clock() - self.since


class ExtProcCollector(Collector):
    def __init__(
        self,
        stats: Stats,
        state: LocalState,
        sync: SyncStatus,
        stream: StreamStats | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.stats = stats
        self.state = state
        self.sync = sync
        self.stream = stream or StreamStats()
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._metering()
        yield histogram_family(
            "spendgate_ext_proc_decision_duration_seconds",
            "Time ext_proc spends answering one Envoy message (deciding, metering), by phase.",
            ["phase"],
            [((phase,), h) for phase, h in self.stats.latency.items()],
        )
        yield from self._sync()
        if self.supervisor is not None:
            yield task_failures(self.supervisor.failures)
        yield from self._state_stream()

    def _state_stream(self) -> Iterator[Metric]:
        yield counter(
            "spendgate_ext_proc_state_resyncs",
            "Full resyncs of policies, prices and window spend from the control plane "
            "that took effect.",
            self.stream.resyncs,
        )
        yield labelled(
            CounterMetricFamily(
                "spendgate_ext_proc_state_stream_failures",
                "Times the state stream from the control plane failed, by reason: stream "
                "(gRPC error or end), gap (a change was missed), protocol, apply (an update "
                "could not be applied). Each is followed by a resync.",
                labels=["reason"],
            ),
            [((reason,), n) for reason, n in sorted(self.stream.failures.items())],
        )

    def _requests(self) -> Iterator[Metric]:
        s = self.stats
        yield counter(
            "spendgate_ext_proc_requests_admitted",
            "HTTP requests ext_proc let through to the provider (counted when they end).",
            s.admitted_requests,
        )
        yield labelled(
            CounterMetricFamily(
                "spendgate_ext_proc_requests_rejected",
                "HTTP requests ext_proc answered itself: 429 budget_exceeded (policy_id names "
                "the exceeded policy) or budget_held (spend under the limit, running "
                "requests' holds fill the rest; retry in seconds), 403 model_not_priced or "
                "unmetered_request (policy_id empty), 400 invalid_identity or "
                "ambiguous_api_key (policy_id empty) or 403 "
                "identity_required (the * policy the request names no member for).",
                labels=["policy_id", "reason"],
            ),
            list(s.rejections.items()),
        )
        yield labelled(
            CounterMetricFamily(
                "spendgate_shadow_rejections",
                "Requests a SHADOW policy would have refused (they were admitted), by "
                "policy; counted once per request and policy.",
                labels=["policy_id"],
            ),
            [((pid,), n) for pid, n in s.shadow_rejections.items()],
        )
        yield counter(
            "spendgate_ext_proc_identity_headers_untrusted",
            "Requests whose identity headers came from a source not in "
            "trusted_header_sources (ignored and removed).",
            s.untrusted_identity_headers,
        )
        yield labelled(
            CounterMetricFamily(
                "spendgate_ext_proc_requests_unmetered",
                "HTTP requests of no metered API shape let through to the provider "
                "(admission-checked, not charged), by Envoy route and method; those "
                "refused (unmetered_requests: reject) count as rejected, reason "
                "unmetered_request.",
                labels=["route", "method"],
            ),
            list(s.unmetered.items()),
        )
        yield counter(
            "spendgate_ext_proc_requests_unparsed",
            "Request bodies of a metered API that were not a JSON object.",
            s.unparsed_requests,
        )
        yield gauge(
            "spendgate_ext_proc_requests_in_flight",
            "HTTP requests whose ext_proc stream is open.",
            s.open_streams,
        )
        arbitrations = CounterMetricFamily(
            "spendgate_ext_proc_arbitrations",
            "Requests near a budget's line that ext_proc asked the control plane to "
            "admit, by answer (admitted, rejected, unanswered: the local view decided).",
            labels=["result"],
        )
        for result, n in s.arbitrations.items():
            arbitrations.add_metric([result], n)
        yield arbitrations
        handoffs = CounterMetricFamily(
            "spendgate_ext_proc_handoffs",
            "response_metering: observe. Admitted requests handed from their admission stream "
            "to their metering stream, by outcome: parked, claimed (metered here), restored "
            "(another process's request metered here from its metadata), expired (no metering "
            "stream came here within handoff_timeout_s; its hold was released), unreadable, "
            "taken_elsewhere, charged_for_sibling and ended_elsewhere (--workers: another worker "
            "meters it and told this one; charged here from what it metered, or its hold ended), "
            "untold (a message to the admitting worker failed).",
            labels=["outcome"],
        )
        for outcome, n in s.handoffs.items():
            handoffs.add_metric([outcome], n)
        yield handoffs
        yield counter(
            "spendgate_ext_proc_observed_messages",
            "response_metering: observe. Messages on metering streams (never answered).",
            s.observed_messages,
        )
        yield counter(
            "spendgate_ext_proc_internal_errors",
            "Errors inside ext_proc (the request continued unchanged).",
            s.internal_errors,
        )

    def _metering(self) -> Iterator[Metric]:
        s = self.stats
        labels = ["provider", "api", "model"]
        tokens = CounterMetricFamily(
            "spendgate_ext_proc_tokens",
            "Tokens metered from responses, by direction (input, output); model is the "
            "price table's name for it or 'unpriced'.",
            labels=[*labels, "direction"],
        )
        cost = CounterMetricFamily(
            "spendgate_ext_proc_cost_usd", "USD charged for metered responses.", labels=labels
        )
        metered = CounterMetricFamily(
            "spendgate_ext_proc_metered_responses",
            "Responses whose usage was metered and charged.",
            labels=labels,
        )
        for key, c in list(s.metered.items()):
            tokens.add_metric([*key, "input"], c.input_tokens)
            tokens.add_metric([*key, "output"], c.output_tokens)
            cost.add_metric(list(key), c.cost_nanos / NANOS)
            metered.add_metric(list(key), c.responses)
        yield tokens
        yield cost
        yield metered
        yield labelled(
            CounterMetricFamily(
                "spendgate_ext_proc_responses",
                "Responses to metered requests by result: metered, unmetered (no usage could "
                "be read), provider_error (an error answer: no usage, no cost).",
                labels=["result"],
            ),
            [
                (("metered",), s.metered_responses),
                (("unmetered",), s.unmetered_responses),
                (("provider_error",), s.provider_errors),
            ],
        )
        yield counter(
            "spendgate_ext_proc_responses_estimated",
            "Metered responses whose usage was estimated (stream cut before its usage report).",
            s.estimated_responses,
        )
        yield counter(
            "spendgate_ext_proc_responses_unpriced",
            "Metered responses of a model with no price (charged as unpriced_models says).",
            s.unpriced_responses,
        )

    def _sync(self) -> Iterator[Metric]:
        state = self.state
        batches = list(state.in_flight.values())
        records = len(state.pending) + sum(len(b.increments) for b in batches)
        unsent = sum(i.cost_nanos for i in state.pending.values()) + sum(
            i.cost_nanos for b in batches for i in b.increments.values()
        )
        values: list[tuple[str, str, float]] = [
            (
                "spendgate_ext_proc_control_plane_connected",
                "1 while the state stream from the control plane is open.",
                int(self.sync.connected),
            ),
            (
                "spendgate_ext_proc_sync_lag_seconds",
                "0 while in sync with the control plane (state stream open, all usage "
                "delivered), else the seconds since it last was.",
                self.sync.lag_seconds(),
            ),
            (
                "spendgate_ext_proc_unsent_usage_records",
                "Usage records (one per policy window) the control plane has not acknowledged.",
                records,
            ),
            (
                "spendgate_ext_proc_unsent_usage_batches",
                "Usage batches sent or waiting but not acknowledged.",
                len(batches),
            ),
            (
                "spendgate_ext_proc_unsent_usage_usd",
                "USD in unacknowledged usage records (summed over policy windows).",
                unsent / NANOS,
            ),
            (
                "spendgate_ext_proc_reserved_windows",
                "Budget windows on which requests in flight hold reservations.",
                len(state.reserved),
            ),
            (
                "spendgate_ext_proc_reserved_usd",
                "USD held by reservations of requests in flight (summed over windows).",
                sum(state.reserved.values()) / NANOS,
            ),
            (
                "spendgate_ext_proc_reserved_requests",
                "Requests in flight holding a reservation.",
                state.holding_requests,
            ),
            (
                "spendgate_ext_proc_held_elsewhere_usd",
                "USD other data planes hold (running requests, unapplied usage) on the "
                "windows this one knows, unexpired (summed over windows).",
                state.held_elsewhere() / NANOS,
            ),
            ("spendgate_ext_proc_policies", "Budget policies in the snapshot.", len(state.index)),
            (
                "spendgate_ext_proc_journal_failing",
                "1 while writing the usage journal fails (usage is kept in memory).",
                int(state.journal_failed),
            ),
        ]
        for name, doc, value in values:
            yield GaugeMetricFamily(name, doc, value=value)
        quarantined = CounterMetricFamily(
            "spendgate_ext_proc_quarantined_records",
            "Usage records set aside because they cannot be encoded, sent or applied "
            "(too_large, unencodable, refused); the usage behind them keeps flowing.",
            labels=["reason"],
        )
        for reason, n in sorted(state.quarantine.counts.items()):
            quarantined.add_metric([reason], n)
        yield quarantined
        anomalies = CounterMetricFamily(
            "spendgate_ext_proc_usage_anomalies",
            "Responses charged whose cost was above max_cost_per_response_usd "
            "(cost_above_maximum) or beyond the largest representable cost (cost_saturated).",
            labels=["reason"],
        )
        for reason, n in sorted(self.stats.anomalies.items()):
            anomalies.add_metric([reason], n)
        yield anomalies


def registry_for(
    stats: Stats,
    state: LocalState,
    sync: SyncStatus,
    stream: StreamStats | None = None,
    supervisor: Supervisor | None = None,
) -> CollectorRegistry:
    """A registry of its own with ext_proc's metrics and the process_* ones."""
    registry = CollectorRegistry()
    registry.register(ExtProcCollector(stats, state, sync, stream, supervisor))
    ProcessCollector(registry=registry)
    return registry
