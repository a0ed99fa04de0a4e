"""spendgate.v1 enums and messages <-> domain values, shared by both planes."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from google.protobuf.timestamp_pb2 import Timestamp

from spendgate.domain.policies import Action, Policy, Scope
from spendgate.domain.pricing import ModelPrice, parse_usd
from spendgate.domain.windows import WindowSpec, WindowUnit
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import pricing_pb2

UNITS: dict[pb.WindowUnit, WindowUnit] = {
    pb.WINDOW_UNIT_MINUTES: WindowUnit.MINUTES,
    pb.WINDOW_UNIT_HOURS: WindowUnit.HOURS,
    pb.WINDOW_UNIT_DAYS: WindowUnit.DAYS,
    pb.WINDOW_UNIT_WEEKS: WindowUnit.WEEKS,
    pb.WINDOW_UNIT_MONTHS: WindowUnit.MONTHS,
}
UNITS_PB: dict[WindowUnit, pb.WindowUnit] = {v: k for k, v in UNITS.items()}
SCOPES: dict[pb.Scope, Scope] = {pb.Scope.Value(f"SCOPE_{s.value}"): s for s in Scope}  # type: ignore[misc]
SCOPES_PB: dict[Scope, pb.Scope] = {v: k for k, v in SCOPES.items()}
ACTIONS: dict[pb.Action, Action] = {pb.ACTION_ALERT: Action.ALERT, pb.ACTION_REJECT: Action.REJECT}
ACTIONS_PB: dict[Action, pb.Action] = {v: k for k, v in ACTIONS.items()}
# Domain weekday index (0 = Monday) -> message value.
WEEKDAYS_PB: tuple[pb.Weekday, ...] = (
    pb.WEEKDAY_MONDAY,
    pb.WEEKDAY_TUESDAY,
    pb.WEEKDAY_WEDNESDAY,
    pb.WEEKDAY_THURSDAY,
    pb.WEEKDAY_FRIDAY,
    pb.WEEKDAY_SATURDAY,
    pb.WEEKDAY_SUNDAY,
)


def timestamp(t: datetime | int) -> Timestamp:
    """A Timestamp from an aware datetime or from Unix seconds."""
    ts = Timestamp()
    if isinstance(t, int):
        ts.seconds = t
    else:
        ts.FromDatetime(t.astimezone(UTC))
    return ts


def from_timestamp(ts: Timestamp) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC)


def policy_from_message(msg: pb.BudgetPolicy) -> Policy:
    """The domain policy from a message the control plane validated and sent.

    Raises KeyError/ValueError on a message no control plane would send.
    """
    amount = parse_usd(msg.amount_usd)
    if amount <= 0:
        # A zero REJECT budget would refuse all traffic: never trust one.
        raise ValueError(f"policy {msg.id}: amount must be > 0, got {msg.amount_usd!r}")
    return Policy(
        id=msg.id,
        name=msg.name,
        amount_nanos=amount,
        window=WindowSpec(
            unit=UNITS[msg.window.unit],
            count=msg.window.count,
            timezone=msg.timezone or "UTC",
            week_start=max(msg.window.week_start - 1, 0),
        ),
        action=ACTIONS[msg.action],
        scope=SCOPES[msg.scope],
        target=msg.target,
        alert_thresholds=tuple(msg.alert_thresholds),
        enabled=msg.enabled,
        shadow=msg.enforcement == pb.ENFORCEMENT_SHADOW,
        expose_to_clients=msg.expose_to_clients,
    )


def _decimal(text: str, field: str) -> Decimal | None:
    if not text:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{field}: {text!r} is not a decimal") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{field}: must be a non-negative decimal, got {text!r}")
    return value


def price_from_message(
    model: str, provider: str, msg: pricing_pb2.Price, *, source: str = "override"
) -> ModelPrice:
    """A ModelPrice (USD per million tokens) from a Price message.

    Raises ValueError naming the field (price.input, ...) when it is invalid.
    """
    fields = {name: _decimal(getattr(msg, name), f"price.{name}") for name in PRICE_FIELDS}
    if fields["input"] is None or fields["output"] is None:
        raise ValueError("price.input and price.output are required")
    return ModelPrice(
        provider=provider,
        model=model,
        input=fields["input"],
        output=fields["output"],
        cached_input=fields["cached_input"],
        cache_write=fields["cache_write"],
        cache_write_1h=fields["cache_write_1h"],
        source=source,
        checked="",
    )


def price_message(price: ModelPrice) -> pricing_pb2.Price:
    def text(value: Decimal | None) -> str:
        return "" if value is None else format(value.normalize(), "f")

    return pricing_pb2.Price(**{name: text(getattr(price, name)) for name in PRICE_FIELDS})


PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_1h")
