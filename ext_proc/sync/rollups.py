"""Chargeback rollups on the data plane: what responses cost per UTC hour and
dimensions (route, provider, model, user, workspace, API key hash, tags),
whatever policies exist.

Responses are summed here per ``RollupKey`` and ride to the control plane in
the usage batches (``ReportUsageRequest.rollups``), journaled and
acknowledged with them, so they count exactly once like spend increments.
Memory and batches grow with the number of distinct keys per flush interval,
not with the request rate; a batch's rollups count against its record and
byte bounds (ext_proc/sync/batch.py), so many distinct users make more
batches, never an oversized one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from spendgate.domain.policies import RequestFacts
from spendgate.domain.pricing import MAX_COST_NANOS, saturating_add
from spendgate.v1 import reports_pb2 as rp

HOUR_S = 3600
# Longest route name a rollup carries as is (see ``bounded``).
MAX_VALUE_CHARS = 256
# hour, route, provider, model, user, workspace, api key hash, sorted tags
RollupKey = tuple[int, str, str, str, str, str, str, tuple[tuple[str, str], ...]]


@dataclass(slots=True)
class RollupSums:
    cost_nanos: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    estimated: int = 0

    def add(self, other: RollupSums) -> None:
        self.cost_nanos = saturating_add(self.cost_nanos, other.cost_nanos)
        self.input_tokens = min(self.input_tokens + other.input_tokens, MAX_COST_NANOS)
        self.output_tokens = min(self.output_tokens + other.output_tokens, MAX_COST_NANOS)
        self.requests += other.requests
        self.estimated += other.estimated

    def copy(self) -> RollupSums:
        return RollupSums(
            self.cost_nanos, self.input_tokens, self.output_tokens, self.requests, self.estimated
        )


def key_of(facts: RequestFacts, model: str, now: datetime) -> RollupKey:
    """The rollup a response of the request ``facts`` belongs to (``model``:
    the model that answered, lower-cased like MODEL policies see it)."""
    hour = int(now.timestamp()) // HOUR_S * HOUR_S
    return (
        hour,
        bounded(facts.route),
        facts.provider,
        model.lower(),
        facts.user,
        facts.workspace,
        facts.api_key_hash,
        tuple(sorted((k, v) for k, v in facts.tags.items() if k and v)),
    )


def bounded(value: str) -> str:
    """``value``, or when longer than MAX_VALUE_CHARS (an operator's route
    name may be any length) its start and a hash of the whole, so distinct
    values stay distinct and the control plane (512 characters) takes it."""
    if len(value) <= MAX_VALUE_CHARS:
        return value
    digest = hashlib.sha256(value.encode(errors="surrogatepass")).hexdigest()[:16]
    return f"{value[: MAX_VALUE_CHARS - 19]}...{digest}"


def size(key: RollupKey) -> int | None:
    """Upper bound of one UsageRollup's encoded size inside a
    ReportUsageRequest; None when the key cannot be encoded."""
    try:
        text = sum(len(s.encode()) for s in key[1:7])
        tags = sum(len(k.encode()) + len(v.encode()) + 12 for k, v in key[7])
    except UnicodeEncodeError:
        return None
    return text + tags + 96


def message(key: RollupKey, sums: RollupSums) -> rp.UsageRollup:
    return rp.UsageRollup(
        hour=key[0],
        route=key[1],
        provider=key[2],
        model=key[3],
        user=key[4],
        workspace=key[5],
        api_key_hash=key[6],
        tags=dict(key[7]),
        cost_nanos=min(sums.cost_nanos, MAX_COST_NANOS),
        input_tokens=sums.input_tokens,
        output_tokens=sums.output_tokens,
        request_count=sums.requests,
        estimated_count=sums.estimated,
    )


def from_message(r: rp.UsageRollup) -> tuple[RollupKey, RollupSums]:
    key: RollupKey = (
        r.hour,
        r.route,
        r.provider,
        r.model,
        r.user,
        r.workspace,
        r.api_key_hash,
        tuple(sorted(r.tags.items())),
    )
    return key, RollupSums(
        r.cost_nanos, r.input_tokens, r.output_tokens, r.request_count, r.estimated_count
    )


def quarantine_key(key: RollupKey) -> tuple[str, str, int]:
    """How a rollup that cannot be sent is named in a quarantine report (no
    policy; the member says which rollup)."""
    return ("", f"rollup user={key[4]} model={key[3]} route={key[1]}", key[0])
