"""Counters ext_proc keeps about what it metered and decided (in-process).

These are plain ints, dicts and fixed-bucket histograms, updated on the
request path: no locks, no label lookups, no allocation beyond a tuple key.
ext_proc/metrics.py turns them into Prometheus metrics when scraped. Like
everything on the request path they belong to the event loop's thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from spendgate.domain.usage import Usage
from spendgate.metrics import Histogram

# Upper bounds (nanoseconds) of the message-processing-time buckets.
DECISION_BUCKETS_NS = (
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
)
PHASES = (
    "request_headers",
    "request_body",
    "response_headers",
    "response_body",
    "request_trailers",
    "response_trailers",
)
# Rejection reasons (the `reason` label).
BUDGET_EXCEEDED = "budget_exceeded"
# A REJECT budget under its limit that running requests' holds fill (429,
# retry in seconds: ext_proc/protocol/reject.py).
BUDGET_HELD = "budget_held"
MODEL_NOT_PRICED = "model_not_priced"
# Identity refused: a value that cannot be a member (400), or none for a
# REJECT "*" policy under missing_identity: reject (403).
INVALID_IDENTITY = "invalid_identity"
IDENTITY_REQUIRED = "identity_required"
UNMETERED_REQUEST = "unmetered_request"
# A request value over its bound (spendgate.domain.limits): 400.
INVALID_MODEL = "invalid_model"
INVALID_PATH = "invalid_path"
# The `model` label of responses no price was known for.
UNPRICED = "unpriced"


@dataclass(slots=True)
class MeteredCounts:
    """What was metered for one (provider, API shape, model)."""

    responses: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0
    # Responses charged whose cost was implausible, by reason
    # (ext_proc/metering/anomalies.py: cost_above_maximum, cost_saturated).
    anomalies: dict[str, int] = field(
        default_factory=lambda: {"cost_above_maximum": 0, "cost_saturated": 0}
    )


@dataclass(slots=True)
class Stats:
    streams: int = 0  # HTTP requests seen (one ext_proc stream each)
    open_streams: int = 0  # HTTP requests in progress
    messages: int = 0  # ext_proc messages answered
    admitted_requests: int = 0  # let through to the provider after the decision
    rejected_requests: int = 0
    unmetered_requests: int = 0  # requests of no metered API shape (passed on or refused)
    unparsed_requests: int = 0  # request bodies that were not JSON objects
    # requests whose identity headers came from an untrusted source (ignored)
    untrusted_identity_headers: int = 0
    metered_responses: int = 0
    estimated_responses: int = 0
    unmetered_responses: int = 0  # metered shape, but no usage could be read
    unpriced_responses: int = 0
    provider_errors: int = 0  # error answers (no usage, no cost)
    internal_errors: int = 0
    # Requests the control plane was asked to admit (near a budget's line),
    # by answer: admitted | rejected | unanswered (the local view decided).
    arbitrations: dict[str, int] = field(
        default_factory=lambda: {"admitted": 0, "rejected": 0, "unanswered": 0}
    )
    # response_metering: observe. Metering streams opened by Envoy's observing
    # filter, and the messages they carried (never answered).
    observe_streams: int = 0
    observed_messages: int = 0
    # Admitted requests handed from their admission stream to their metering
    # stream, by outcome: parked (waiting for it) | claimed (it came to this
    # process) | restored (this process metered another process's request from
    # its metadata) | expired (none came here in handoff_timeout_s: another
    # process metered it, or Envoy has no metering filter) | unreadable
    # (metadata that could not be read: not metered, logged at error) |
    # taken_elsewhere, ended_elsewhere, charged_for_sibling (--workers: another
    # worker meters it and said so; it handed back what it metered, charged
    # here, or said "end") | untold (a message to the admitting worker could
    # not be sent; logged at error).
    handoffs: dict[str, int] = field(
        default_factory=lambda: {
            "parked": 0,
            "claimed": 0,
            "restored": 0,
            "expired": 0,
            "unreadable": 0,
            "taken_elsewhere": 0,
            "ended_elsewhere": 0,
            "charged_for_sibling": 0,
            "untold": 0,
        }
    )
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0
    # Responses charged whose cost was implausible, by reason
    # (ext_proc/metering/anomalies.py: cost_above_maximum, cost_saturated).
    anomalies: dict[str, int] = field(
        default_factory=lambda: {"cost_above_maximum": 0, "cost_saturated": 0}
    )
    # (policy id, reason) -> rejected requests; reason "model_not_priced" has
    # policy id "". Bounded by the policies this process has seen.
    rejections: dict[tuple[str, str], int] = field(default_factory=dict)
    # policy id -> requests a SHADOW policy would have refused (admitted).
    shadow_rejections: dict[str, int] = field(default_factory=dict)
    # (route, method) -> requests of no metered API shape let through; the
    # route names come from Envoy's config, methods are bounded (metering/coverage.py).
    unmetered: dict[tuple[str, str], int] = field(default_factory=dict)
    # (provider, API shape, model) -> metered; the model is the price table's
    # name for it or UNPRICED, never the raw name a client sent.
    metered: dict[tuple[str, str, str], MeteredCounts] = field(default_factory=dict)
    # Time spent answering one ext_proc message, per phase.
    latency: dict[str, Histogram] = field(
        default_factory=lambda: {p: Histogram(DECISION_BUCKETS_NS) for p in PHASES}
    )

    def count_shadow_rejection(self, policy_id: str) -> None:
        self.shadow_rejections[policy_id] = self.shadow_rejections.get(policy_id, 0) + 1

    def count_rejection(self, policy_id: str, reason: str) -> None:
        self.rejected_requests += 1
        key = (policy_id, reason)
        self.rejections[key] = self.rejections.get(key, 0) + 1

    def count_unmetered(self, route: str, method: str) -> None:
        self.unmetered_requests += 1
        key = (route, method)
        self.unmetered[key] = self.unmetered.get(key, 0) + 1

    def count_metered(self, key: tuple[str, str, str], usage: Usage, cost_nanos: int) -> None:
        counts = self.metered.get(key)
        if counts is None:
            counts = self.metered[key] = MeteredCounts()
        counts.responses += 1
        counts.input_tokens += usage.input_tokens or 0
        counts.output_tokens += usage.output_tokens or 0
        counts.cost_nanos += cost_nanos

    def observe_message(self, phase: str | None, nanos: int) -> None:
        hist = self.latency.get(phase or "")
        if hist is None:  # a phase added to the protocol later
            hist = self.latency[phase or "unknown"] = Histogram(DECISION_BUCKETS_NS)
        hist.observe(nanos)

    def as_dict(self) -> dict[str, int]:
        """The plain counters (for the shutdown log line)."""
        return {
            f.name: value for f in fields(self) if isinstance(value := getattr(self, f.name), int)
        }
