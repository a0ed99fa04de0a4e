"""Admin requests built from the services' own descriptors, so every method
of BudgetService, WebhookService and PricingService (and any method added
later) is driven, with plausible values mixed with hostile ones."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf import message as pmessage
from google.protobuf import message_factory
from hypothesis import strategies as st

import spendgate.v1
from spendgate.v1 import budget_pb2, webhooks_pb2
from tests.fuzz import values
from tests.fuzz.proof import CANARY_MODEL


def _admin_services() -> tuple[d.ServiceDescriptor, ...]:
    """Every service of spendgate.v1 but the data planes' own: a service
    added later is fuzzed without a change here."""
    found = []
    for info in pkgutil.iter_modules(spendgate.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"spendgate.v1.{info.name}")
            found += [s for s in module.DESCRIPTOR.services_by_name.values()]
    return tuple(sorted((s for s in found if s.name != "DataPlaneService"), key=lambda s: s.name))


SERVICES = _admin_services()
METHODS = tuple(
    m for s in SERVICES for m in s.methods if not (m.client_streaming or m.server_streaming)
)
MAX_DEPTH = 3
_MAX_SMALL = 100_000


@dataclass(frozen=True)
class FromPool:
    """An id (or etag) of something this example created, chosen at call time."""

    index: int
    etag: bool = False


F = d.FieldDescriptor
_INT_BITS = {
    F.TYPE_INT32: (32, True),
    F.TYPE_SINT32: (32, True),
    F.TYPE_SFIXED32: (32, True),
    F.TYPE_INT64: (64, True),
    F.TYPE_SINT64: (64, True),
    F.TYPE_SFIXED64: (64, True),
    F.TYPE_UINT32: (32, False),
    F.TYPE_FIXED32: (32, False),
    F.TYPE_UINT64: (64, False),
    F.TYPE_FIXED64: (64, False),
}
PRICE_NAMES = ("input", "output", "cached_input", "cache_write", "cache_write_1h")


def _plausible_text(field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    name, owner = field.name, field.containing_type.name
    if name in ("id", "policy_id", "webhook_id", "event_id") or name == "etag":
        return st.integers(0, 7).map(lambda i: FromPool(i, etag=name == "etag"))
    if name.endswith("_usd") or (owner == "Price" and name in PRICE_NAMES):
        return values.decimal_text(_MAX_SMALL)
    if name == "timezone":
        return st.sampled_from(
            ["UTC", "Europe/Paris", "America/New_York", "Pacific/Chatham", "Etc/GMT+12", "utc"]
        )
    if name == "target":
        return st.sampled_from(["*", "alice", "team=ml", "gpt-4o", "openai", "openai-prod"])
    if name == "url":
        return st.sampled_from(
            [
                "https://hooks.example.invalid/spendgate",
                "https://hooks.slack.com/services/T0/B0/x",
                "https://events.pagerduty.com/v2/enqueue",
                "http://127.0.0.1:9/",
                "https://10.0.0.1/",
                "https://[::1]/",
                "javascript:alert(1)",
                "https://user:pass@hooks.example.invalid/",
            ]
        )
    if name in ("events", "type"):
        return st.sampled_from(
            ["budget_policy.exceeded", "budget_policy.threshold_crossed", "usage.anomaly", "*"]
        )
    if name in ("model", "model_contains"):
        return st.sampled_from(["gpt-4o", "claude-3-5-haiku-20241022", "gemini-2.0-flash", "x"])
    if name == "provider":
        return st.sampled_from(["openai", "anthropic", "google", "bedrock", "OpenAI"])
    if name == "page_token":
        return st.sampled_from(["", "A" * _MAX_SMALL, "AAAA", "eyJ4IjoxfQ==", "%%%"])
    return st.text(max_size=30)


def field_value(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """One (non-repeated) value of ``field``."""
    if field.type == F.TYPE_MESSAGE:
        return message_spec(field.message_type, depth + 1)
    if field.type == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), values.wild_int(32))
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type in (F.TYPE_STRING, F.TYPE_BYTES):
        text = st.one_of(_plausible_text(field), values.wild_text(max_small=_MAX_SMALL))
        if field.type == F.TYPE_BYTES:
            return text.map(lambda t: t.encode() if isinstance(t, str) else t)
        return text
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(width=32 if field.type == F.TYPE_FLOAT else 64)
    bits, signed = _INT_BITS[field.type]
    return values.wild_int(bits, signed)


def field_spec(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    one = field_value(field, depth)
    if not field.is_repeated:
        return one
    if field.type == F.TYPE_INT32:  # alert thresholds: 20 allowed, 1,000 and 3,000 are not
        many = st.sampled_from([21, 1000, 3000]).flatmap(
            lambda n: st.lists(st.integers(1, 1000), min_size=n, max_size=n)
        )
        return st.one_of(st.lists(one, max_size=6), many)
    return st.lists(one, max_size=4)


def message_spec(desc: d.Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of field name -> value spec for ``desc`` (some fields left out)."""
    if desc.full_name == "google.protobuf.Timestamp":
        return st.fixed_dictionaries({"seconds": values.wild_int(64), "nanos": values.wild_int(32)})
    if desc.full_name == "google.protobuf.FieldMask":
        return st.fixed_dictionaries(
            {
                "paths": st.lists(
                    st.one_of(
                        st.sampled_from(_PATHS), st.sampled_from(_PATHS), st.text(max_size=30)
                    ),
                    max_size=3,
                )
            }
        )
    if depth > MAX_DEPTH:
        return st.just({})
    wild = st.fixed_dictionaries({}, optional={f.name: field_spec(f, depth) for f in desc.fields})
    base = VALID.get(desc.full_name)
    if base is None:
        return wild
    # Mostly a valid entity with one or two fields changed, so examples get
    # past the first check and into the store, the data planes and the events.
    names = sorted(desc.fields_by_name)
    mutated = st.lists(st.sampled_from(names), max_size=2, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries(
            {n: field_spec(desc.fields_by_name[n], depth) for n in chosen}
        )
    )
    return st.one_of(mutated.map(lambda m: {**base, **m}), wild)


VALID: dict[str, dict[str, Any]] = {
    "spendgate.v1.BudgetPolicy": {
        "id": FromPool(-1),  # the newest entity this example created, if any
        "etag": FromPool(-1, etag=True),
        "name": "fuzz",
        "amount_usd": "10",
        "window": {"unit": budget_pb2.WINDOW_UNIT_DAYS, "count": 1},
        "action": budget_pb2.ACTION_ALERT,
        "scope": budget_pb2.SCOPE_GLOBAL,
        "alert_thresholds": [50, 100],
    },
    "spendgate.v1.Webhook": {
        "id": FromPool(-1),
        "etag": FromPool(-1, etag=True),
        "name": "fuzz",
        "url": "https://hooks.example.invalid/spendgate",
        "events": ["budget_policy.exceeded", "budget_policy.threshold_crossed"],
        "format": webhooks_pb2.WEBHOOK_FORMAT_GENERIC,
    },
    "spendgate.v1.PriceOverride": {"model": "gpt-4o", "price": {"input": "1", "output": "2"}},
}


_PATHS = (
    "name",
    "description",
    "amount_usd",
    "window",
    "window.count",
    "alert_thresholds",
    "url",
    "events",
    "secret",
    "enabled",
    "id",
    "etag",
    "create_time",
)


@dataclass
class Pool:
    """What this example created: (id, etag), newest last."""

    items: list[tuple[str, str]]

    def resolve(self, ref: FromPool) -> str:
        if not self.items:
            return ""
        item = self.items[ref.index % len(self.items)]
        return item[1] if ref.etag else item[0]

    def remember(self, response: pmessage.Message) -> None:
        found = _created(response)
        if found is not None:
            self.items = [i for i in self.items if i[0] != found[0]] + [found]


def _created(msg: pmessage.Message) -> tuple[str, str] | None:
    for name in ("id", "policy", "webhook", "override"):
        field = msg.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            continue
        if field.type == F.TYPE_MESSAGE and not field.is_repeated:
            inner = getattr(msg, name)
            if getattr(inner, "id", ""):
                return inner.id, getattr(inner, "etag", "")
        elif name == "id" and msg.id:
            return msg.id, getattr(msg, "etag", "")
    return None


def build(desc: d.Descriptor, spec: dict[str, Any], pool: Pool) -> pmessage.Message:
    msg = message_factory.GetMessageClass(desc)()
    for name, value in spec.items():
        field = desc.fields_by_name[name]
        items = value if field.is_repeated else [value]
        for item in items:
            v = pool.resolve(item) if isinstance(item, FromPool) else item
            if field.type == F.TYPE_MESSAGE:
                sub = build(field.message_type, v, pool)
                if field.is_repeated:
                    getattr(msg, name).add().CopyFrom(sub)
                else:
                    getattr(msg, name).CopyFrom(sub)
            elif field.is_repeated:
                getattr(msg, name).append(v)
            else:
                setattr(msg, name, v)
    _keep_canary_price(msg)
    return msg


def _keep_canary_price(msg: pmessage.Message) -> None:
    """A price override of the canary's model would change the proof's price."""
    if msg.DESCRIPTOR.full_name == "spendgate.v1.PriceOverride" and (
        msg.model.strip().lower() == CANARY_MODEL  # type: ignore[attr-defined]
    ):
        msg.model = "not-" + CANARY_MODEL  # type: ignore[attr-defined]


# Raw wire tricks applied to the serialized request.
UNKNOWN_FIELDS = (
    b"",
    b"\xb8\x3e\x2a",  # field 999, varint 42
    b"\xba\x3e\x03abc",  # field 999, 3 bytes
    b"\xf8\xff\xff\xff\x0f\x01",  # the highest field number, varint
)


@dataclass(frozen=True)
class Call:
    method_name: str  # full name: spendgate.v1.BudgetService.GetBudgetPolicy
    spec: dict[str, Any]
    unknown: bytes
    twice: bool  # the request's bytes sent twice: every field duplicated

    @property
    def method(self) -> d.MethodDescriptor:
        return BY_NAME[self.method_name]

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints this
        p.text(repr(self))

    def __repr__(self) -> str:
        text = repr(self.spec)
        if len(text) > 2000:
            text = text[:2000] + f"...({len(text)} chars)"
        return f"Call({self.method_name}, {text}, unknown={self.unknown!r}, twice={self.twice})"


BY_NAME = {m.full_name: m for m in METHODS}


_CREATE = {
    "spendgate.v1.BudgetService.CreateBudgetPolicy": ("policy", "spendgate.v1.BudgetPolicy"),
    "spendgate.v1.WebhookService.CreateWebhook": ("webhook", "spendgate.v1.Webhook"),
    "spendgate.v1.PricingService.SetPriceOverride": ("override", "spendgate.v1.PriceOverride"),
}


def calls() -> st.SearchStrategy[list[Call]]:
    """One to four calls; often the first creates something valid, so the
    calls after it (Get, Update, Delete, TestWebhook, ...) act on it."""
    create = st.sampled_from(sorted(_CREATE)).map(
        lambda name: Call(name, {_CREATE[name][0]: dict(VALID[_CREATE[name][1]])}, b"", False)
    )
    then = st.lists(call(), min_size=1, max_size=3)
    return st.one_of(
        st.lists(call(), min_size=1, max_size=4),
        st.tuples(create, then).map(lambda t: [t[0], *t[1]]),
    )


def call() -> st.SearchStrategy[Call]:
    return st.sampled_from(sorted(BY_NAME)).flatmap(
        lambda name: st.builds(
            Call,
            st.just(name),
            message_spec(BY_NAME[name].input_type),
            st.sampled_from(UNKNOWN_FIELDS),
            st.booleans(),
        ).map(lambda c: c)  # printed with Call.__repr__ (long values shortened)
    )
