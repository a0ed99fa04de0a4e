"""Costs no real response has: charged anyway, and reported.

A provider that reports absurd token counts (or a price that makes an
ordinary answer cost a fortune) must neither break usage delivery nor go
unnoticed. The cost is computed exactly, then saturated at
``MAX_COST_NANOS`` (the int64 nano-dollar maximum, about $9.22 billion), and
charged in full. A response above ``max_cost_per_response_usd`` or beyond
that maximum is a usage anomaly: counted
(``spendgate_ext_proc_usage_anomalies_total{reason}``), logged at error level,
and sent with the next usage batch; the control plane records it as a
``usage.anomaly`` event (webhooks can subscribe, ``ListEvents`` lists it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import structlog

from ext_proc.sync.state import LocalState
from spendgate.domain.pricing import MAX_COST_NANOS, ModelPrice, exact_cost_nanos, format_usd
from spendgate.domain.usage import Usage
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

log = structlog.get_logger("spendgate.ext_proc")

SATURATED = "cost_saturated"
ABOVE_MAXIMUM = "cost_above_maximum"
REASONS = (ABOVE_MAXIMUM, SATURATED)
# Anomalies waiting for a batch (beyond this they are counted and logged only).
MAX_PENDING = 10_000


@dataclass(frozen=True, slots=True)
class Response:
    """Where a response came from, for the anomaly report."""

    model: str
    provider: str
    route: str
    request_id: str
    policy_ids: tuple[str, ...]


def charge(
    usage: Usage,
    price: ModelPrice,
    *,
    max_nanos: int,
    state: LocalState,
    counts: dict[str, int],
    response: Response,
    now: datetime,
) -> int:
    """The cost to charge for ``usage`` (saturated), reporting an anomaly when
    it is above ``max_nanos`` or was saturated."""
    exact = exact_cost_nanos(usage, price)
    cost = min(exact, MAX_COST_NANOS)
    if exact <= max_nanos and exact <= MAX_COST_NANOS:
        return cost
    reason = SATURATED if exact > MAX_COST_NANOS else ABOVE_MAXIMUM
    counts[reason] = counts.get(reason, 0) + 1
    anomaly = dp.UsageAnomaly(
        id=uuid.uuid4().hex,
        reason=reason,
        occur_time=timestamp(now),
        model=_text(response.model, 256),
        provider=_text(response.provider, 64),
        route=_text(response.route, 256),
        request_id=_text(response.request_id, 128),
        charged_nanos=cost,
        reported_cost_usd=format_usd(exact).removeprefix("$")[:64],
        input_tokens=str(usage.input_tokens or 0)[:64],
        output_tokens=str(usage.output_tokens or 0)[:64],
        max_cost_usd=format_usd(max_nanos).removeprefix("$"),
        policy_ids=[p[:40] for p in response.policy_ids[:100]],
    )
    log.error(
        "usage anomaly: response charged, reported to the control plane",
        reason=reason,
        model=anomaly.model,
        request_id=anomaly.request_id,
        reported_cost_usd=anomaly.reported_cost_usd,
        charged_usd=format_usd(cost),
        max_cost_usd=anomaly.max_cost_usd,
        input_tokens=anomaly.input_tokens,
        output_tokens=anomaly.output_tokens,
    )
    if len(state.anomalies) < MAX_PENDING:
        state.anomalies.append(anomaly)
    return cost


def _text(value: str, n: int) -> str:
    return value[:n].encode("utf-8", "backslashreplace").decode("utf-8")
