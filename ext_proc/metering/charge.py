"""Charging one metered response: usage to cost, every matching window, the
reports' rollups and the metrics."""

from __future__ import annotations

import dataclasses

import structlog

from ext_proc.metering import anomalies
from ext_proc.metering.meters.base import MeterResult, estimate_tokens_from_chars
from ext_proc.protocol.context import MAX_WARNED_MODELS, Context
from ext_proc.stats import UNPRICED, Stats
from ext_proc.sync import rollups
from spendgate.domain.limits import MAX_MODEL_BYTES
from spendgate.domain.policies import Match, RequestFacts
from spendgate.domain.usage import Usage

log = structlog.get_logger("spendgate.ext_proc")
_CUT = ("stream aborted", "response aborted")  # meter errors of a response cut short


@dataclasses.dataclass(frozen=True, slots=True)
class Charged:
    """The request a response answers, as charging needs it."""

    model: str  # the model the request named ("" if none)
    request_bytes: int
    facts: RequestFacts
    matches: list[Match]
    api: str  # the API shape's name
    request_id: str


def charge(ctx: Context, result: MeterResult, request: Charged, *, aborted: bool) -> None:
    """Charge ``result`` (what the meter read) for ``request``."""
    usage = result.usage
    stats = ctx.stats
    if usage is None and result.error == "provider error":
        stats.provider_errors += 1  # an error answer carries no usage and costs nothing
        return
    if usage is None and result.error in _CUT and request.request_bytes:
        # Cut before any usage or text: the provider read the prompt all
        # the same. Charge its estimated input (completed below).
        usage = Usage(output_tokens=0, estimated=True)
    if usage is None:
        stats.unmetered_responses += 1
        log.warning(
            "response not metered",
            reason=result.error,
            model=request.model,
            aborted=aborted,
            request_id=request.request_id,
        )
        return
    if usage.estimated and usage.input_tokens is None:
        usage = dataclasses.replace(
            usage, input_tokens=estimate_tokens_from_chars(request.request_bytes)
        )
    model = result.model or request.model
    if len(model.encode(errors="replace")) > MAX_MODEL_BYTES:  # bounded like a request
        model = request.model
    prices = ctx.prices
    price = prices.lookup(model, request.facts.provider, request.facts.route)
    # A bounded metrics label: the price table's name for the model.
    priced_as = price.model if price is not None else UNPRICED
    if price is None:
        stats.unpriced_responses += 1
        price = prices.for_charge(model, request.facts.provider, request.facts.route)
        # Once per model, for the first MAX_WARNED_MODELS distinct names: a
        # client inventing names must not grow this set (or the log) for good.
        warned = ctx.warned_models
        if model not in warned and len(warned) < MAX_WARNED_MODELS:
            warned.add(model)
            log.warning(
                "no price for model; set one with the pricing API",
                model=model,
                charged=(
                    "nothing"
                    if price is None
                    else f"default ${price.input}/${price.output} per million tokens"
                ),
            )
    cost = (
        anomalies.charge(
            usage,
            price,
            max_nanos=ctx.settings.max_cost_per_response_nanos,
            state=ctx.state,
            counts=stats.anomalies,
            response=anomalies.Response(
                model,
                request.facts.provider,
                request.facts.route,
                request.request_id,
                tuple(p.id for p, _ in request.matches),
            ),
            now=ctx.clock(),
        )
        if price is not None
        else 0
    )
    if price is not None and not usage.estimated and usage.output_tokens is not None:
        # What later reservations of this model and route assume; a cut
        # stream's estimate would teach it too little.
        assert ctx.estimator is not None
        ctx.estimator.record((price.model, request.facts.route), usage.output_tokens)
    if usage.estimated:
        stats.estimated_responses += 1
    stats.metered_responses += 1
    stats.cost_nanos += cost
    _count_tokens(stats, usage)
    api = request.api
    stats.count_metered((request.facts.provider, api, priced_as), usage, cost)
    now = ctx.clock()
    if request.matches:
        ctx.state.charge(request.matches, cost, now, estimated=usage.estimated)
    # Chargeback reports count every metered response, whatever policies apply.
    ctx.state.record_rollup(
        rollups.key_of(request.facts, model, now),
        rollups.RollupSums(
            cost,
            usage.input_tokens or 0,
            usage.output_tokens or 0,
            1,
            int(usage.estimated),
        ),
    )


def _count_tokens(stats: Stats, usage: Usage) -> None:
    stats.input_tokens += usage.input_tokens or 0
    stats.output_tokens += usage.output_tokens or 0
