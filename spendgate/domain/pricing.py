"""Model prices and the arithmetic that turns a :class:`Usage` into money.

Pure: standard library only, no I/O apart from reading the bundled catalog
``spendgate/data/prices.json`` (a package resource) on first use.

Money is carried as integer **nano-USD** (1 USD = 10**9 nanos) so budgets can be
added and compared exactly; prices are :class:`~decimal.Decimal` USD per
1,000,000 tokens, exactly as providers publish them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, localcontext
from importlib import resources
from typing import Any

from spendgate.domain.usage import Usage

NANOS_PER_USD = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are USD per million tokens

# Nanos per (USD per million tokens) per token: 10**9 / 10**6.
_NANOS_PER_MTOK_UNIT = Decimal(NANOS_PER_USD // TOKENS_PER_PRICE_UNIT)

# Plenty for token counts up to 10**15 times prices with many decimals.
_CONTEXT = Context(prec=60)

# The largest cost spendgate represents: the int64 nano-dollar maximum
# (about $9.22 billion). A single response, a window's spend and every sum of
# costs saturate here instead of overflowing the wire (int64 fields) or the
# database (BIGINT); reaching it is a usage anomaly.
MAX_COST_NANOS = 2**63 - 1
# The highest price an operator may set, in USD per million tokens.
MAX_PRICE_PER_MTOK = Decimal(100_000)

_PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_1h")
_REQUIRED_PRICE_FIELDS = frozenset({"input", "output"})

# Decorations stripped, in this order, when a model name has no exact match.
_REGION_PREFIXES = ("us-gov.", "global.", "apac.", "us.", "eu.", "jp.", "au.", "ca.")
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")
_LATEST_SUFFIX = "-latest"

_FUZZY_CACHE_MAX = 4096

_USD_TEXT = re.compile(r"^(?P<s1>[+-]?)\$?(?P<s2>[+-]?)(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?$")
_ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


class PriceCatalogError(ValueError):
    """The price catalog is malformed; the message names the model and field."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Prices of one model, in USD per 1M tokens.

    ``None`` means the provider has no such price; the tokens concerned are then
    priced at the input rate (``cache_write_1h`` first falls back to
    ``cache_write``).
    """

    provider: str
    model: str
    input: Decimal
    output: Decimal
    cached_input: Decimal | None
    cache_write: Decimal | None
    cache_write_1h: Decimal | None
    source: str
    checked: str


class PriceBook:
    """An indexed set of :class:`ModelPrice`, looked up by model name.

    Exact names and aliases (case-insensitive) are answered from dicts built
    once here. Anything else goes through :meth:`lookup`'s decoration stripping,
    whose results (hits and misses alike) are remembered in a bounded dict so
    repeated unknown names cost one dict probe.
    """

    __slots__ = ("_any", "_by_provider", "_fuzzy", "_prices")

    _prices: tuple[ModelPrice, ...]
    _by_provider: dict[tuple[str, str], ModelPrice]
    _any: dict[str, ModelPrice]
    _fuzzy: dict[tuple[str, str | None], ModelPrice | None]

    def __init__(
        self, prices: Iterable[ModelPrice], aliases: Mapping[str, str] | None = None
    ) -> None:
        """``aliases`` maps an extra name to a model name (of any provider)."""
        price_list = list(prices)
        extra: dict[str, list[str]] = {}
        known = {p.model.lower() for p in price_list}
        for alias, target in (aliases or {}).items():
            if target.lower() not in known:
                raise PriceCatalogError(f"alias {alias!r} points at unknown model {target!r}")
            extra.setdefault(target.lower(), []).append(alias)
        self._index([(p, tuple(extra.get(p.model.lower(), ()))) for p in price_list])

    def _index(self, entries: list[tuple[ModelPrice, tuple[str, ...]]]) -> None:
        self._prices = tuple(price for price, _ in entries)
        self._by_provider = {}
        self._any = {}
        self._fuzzy = {}
        for price, aliases in entries:
            provider = price.provider.lower()
            for name in (price.model, *aliases):
                key = name.strip().lower()
                if not key:
                    raise PriceCatalogError(f"{price.model!r}: empty model name or alias")
                if (provider, key) in self._by_provider:
                    raise PriceCatalogError(
                        f"{price.model!r}: duplicate model/alias {name!r} for provider {provider!r}"
                    )
                self._by_provider[(provider, key)] = price
                self._any.setdefault(key, price)

    # -- construction -------------------------------------------------------

    @classmethod
    def bundled(cls) -> PriceBook:
        """The catalog shipped in ``spendgate/data/prices.json`` (parsed once)."""
        global _BUNDLED
        book = _BUNDLED
        if book is None:
            data = resources.files("spendgate").joinpath("data/prices.json").read_bytes()
            book = _BUNDLED = cls.from_json(data)
        return book

    @classmethod
    def from_json(cls, data: bytes | str) -> PriceBook:
        """Parse a catalog in the ``prices.json`` format.

        Raises :class:`PriceCatalogError` naming the model and field on bad data:
        prices must be non-negative decimal *strings* (never JSON numbers).
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PriceCatalogError(f"catalog is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise PriceCatalogError("catalog: top level must be a JSON object")
        if doc.get("currency", "USD") != "USD":
            raise PriceCatalogError(
                f"catalog: field 'currency' must be 'USD', got {doc['currency']!r}"
            )
        if doc.get("unit", "per_million_tokens") != "per_million_tokens":
            raise PriceCatalogError(
                f"catalog: field 'unit' must be 'per_million_tokens', got {doc['unit']!r}"
            )
        default_checked = doc.get("checked")
        if default_checked is not None:
            _check_date("catalog", "checked", default_checked)
        models = doc.get("models")
        if not isinstance(models, list):
            raise PriceCatalogError("catalog: field 'models' must be a list")
        entries = [_parse_entry(i, raw, default_checked) for i, raw in enumerate(models)]
        book = cls.__new__(cls)
        book._index(entries)
        return book

    # -- queries ------------------------------------------------------------

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The price of ``model``, or ``None`` when it is not in the catalog.

        Case-insensitive exact model or alias first, preferring ``provider``'s
        entry when given. Failing that, these decorations are stripped in order,
        retrying after each: a ``vendor/`` or ``models/`` path prefix, a Bedrock
        region prefix (``us.``, ``eu.``, ``apac.``, ``global.``, ...), a trailing
        ``-YYYY-MM-DD`` / ``-YYYYMMDD`` snapshot date, a trailing ``-latest``.
        A name is never matched to a model it merely starts with.
        """
        key = model.strip().lower()
        prov = provider.strip().lower() if provider else None
        hit = self._exact(key, prov)
        if hit is not None:
            return hit
        cache_key = (key, prov)
        try:
            return self._fuzzy[cache_key]
        except KeyError:
            pass
        found = self._strip_and_retry(key, prov)
        if len(self._fuzzy) >= _FUZZY_CACHE_MAX:
            self._fuzzy.clear()
        self._fuzzy[cache_key] = found
        return found

    def _exact(self, key: str, provider: str | None) -> ModelPrice | None:
        if provider is not None:
            hit = self._by_provider.get((provider, key))
            if hit is not None:
                return hit
        return self._any.get(key)

    def _strip_and_retry(self, key: str, provider: str | None) -> ModelPrice | None:
        name = key
        if "/" in name:
            name = name.rsplit("/", 1)[1]
            hit = self._exact(name, provider)
            if hit is not None:
                return hit
        for prefix in _REGION_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                hit = self._exact(name, provider)
                if hit is not None:
                    return hit
                break
        dated = _DATE_SUFFIX.search(name)
        if dated is not None:
            name = name[: dated.start()]
            hit = self._exact(name, provider)
            if hit is not None:
                return hit
        if name.endswith(_LATEST_SUFFIX):
            name = name[: -len(_LATEST_SUFFIX)]
            return self._exact(name, provider)
        return None

    def __len__(self) -> int:
        return len(self._prices)

    def __iter__(self) -> Iterator[ModelPrice]:
        return iter(self._prices)


_BUNDLED: PriceBook | None = None


def saturating_add(a: int, b: int) -> int:
    """``a + b`` capped at :data:`MAX_COST_NANOS`."""
    return min(a + b, MAX_COST_NANOS)


def cost_nanos(usage: Usage, price: ModelPrice) -> int:
    """:func:`exact_cost_nanos` saturated at :data:`MAX_COST_NANOS`."""
    return min(exact_cost_nanos(usage, price), MAX_COST_NANOS)


def exact_cost_nanos(usage: Usage, price: ModelPrice) -> int:
    """Cost of ``usage`` at ``price``, in integer nano-USD, unbounded.

    Counts not reported (``None``) count as 0; negative counts are treated as 0.
    Input tokens not read from or written to a cache are priced at ``input``;
    the uncached count is ``input - cached - cache_write - cache_write_1h`` and
    never below 0. Cache reads use ``cached_input``, 5-minute writes
    ``cache_write``, 1-hour writes ``cache_write_1h`` (else ``cache_write``), each
    falling back to ``input`` when the provider has no such price. Output tokens
    (reasoning included) use ``output``.

    Rounding: the sum is computed exactly in :class:`~decimal.Decimal`
    (USD = sum(tokens * price) / 1e6) and converted to nanos once, at the end,
    rounding to the nearest nano with ties to even (``ROUND_HALF_EVEN``), so
    sub-nano remainders neither accumulate nor bias totals up or down.
    """
    inp = _count(usage.input_tokens)
    cached = _count(usage.cached_input_tokens)
    cw = _count(usage.cache_write_tokens)
    cw1h = _count(usage.cache_write_1h_tokens)
    out = _count(usage.output_tokens)
    uncached = max(inp - cached - cw - cw1h, 0)

    cached_rate = price.input if price.cached_input is None else price.cached_input
    cw_rate = price.input if price.cache_write is None else price.cache_write
    cw1h_rate = cw_rate if price.cache_write_1h is None else price.cache_write_1h

    with localcontext(_CONTEXT):
        per_million = (
            uncached * price.input
            + cached * cached_rate
            + cw * cw_rate
            + cw1h * cw1h_rate
            + out * price.output
        )
        value = per_million * _NANOS_PER_MTOK_UNIT
        if value >= MAX_COST_NANOS:
            # Beyond any representable cost (and possibly beyond the context's
            # precision for quantize): sub-nano rounding no longer matters.
            return int(value)
        nanos = value.quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    return int(nanos)


def format_usd(nanos: int) -> str:
    """``$12.34`` for whole cents, more digits only when needed (``$0.000123``).

    Never uses scientific notation; negatives render as ``-$1.50``.
    """
    sign = "-" if nanos < 0 else ""
    dollars, frac = divmod(abs(nanos), NANOS_PER_USD)
    digits = f"{frac:09d}".rstrip("0")
    if len(digits) < 2:
        digits = digits.ljust(2, "0")
    return f"{sign}${dollars}.{digits}"


def parse_usd(text: str) -> int:
    """``"12.34"`` or ``"$12.34"`` (optionally signed) to nano-USD.

    Raises :class:`ValueError` for non-numeric text, NaN/infinity, exponents and
    more than 9 decimals (finer than a nano).
    """
    match = _USD_TEXT.match(text.strip())
    if match is None:
        raise ValueError(f"not a dollar amount: {text!r}")
    s1, s2 = match.group("s1"), match.group("s2")
    whole, frac = match.group("int"), match.group("frac") or ""
    if (s1 and s2) or not (whole or frac):
        raise ValueError(f"not a dollar amount: {text!r}")
    if len(frac) > 9:
        raise ValueError(f"more than 9 decimals (finer than a nano-dollar): {text!r}")
    nanos = int(whole or "0") * NANOS_PER_USD + int(frac.ljust(9, "0"))
    return -nanos if "-" in (s1, s2) else nanos


# -- helpers -----------------------------------------------------------------


def _count(value: int | None) -> int:
    return value if value is not None and value > 0 else 0


def _check_date(where: str, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise PriceCatalogError(
            f"{where}: field {field!r} must be a YYYY-MM-DD string, got {value!r}"
        )
    try:
        if _ISO_DATE.match(value) is None:
            raise ValueError(value)
        date.fromisoformat(value)
    except ValueError as exc:
        raise PriceCatalogError(
            f"{where}: field {field!r} is not a YYYY-MM-DD date: {value!r}"
        ) from exc
    return value


def _parse_price(where: str, field: str, value: Any) -> Decimal | None:
    if value is None:
        if field in _REQUIRED_PRICE_FIELDS:
            raise PriceCatalogError(f"{where}: field {field!r} is required")
        return None
    if not isinstance(value, str):
        raise PriceCatalogError(
            f"{where}: field {field!r} must be a decimal string, "
            f"got {type(value).__name__} {value!r}"
        )
    try:
        price = Decimal(value.strip())
    except InvalidOperation as exc:
        raise PriceCatalogError(f"{where}: field {field!r} is not a decimal: {value!r}") from exc
    if not price.is_finite() or price < 0:
        raise PriceCatalogError(f"{where}: field {field!r} must be finite and >= 0, got {value!r}")
    return price


def _parse_entry(
    index: int, raw: Any, default_checked: str | None
) -> tuple[ModelPrice, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise PriceCatalogError(f"models[{index}]: entry must be a JSON object")
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise PriceCatalogError(f"models[{index}]: field 'model' must be a non-empty string")
    where = f"models[{index}] ({model})"
    provider = raw.get("provider")
    if not isinstance(provider, str) or not provider.strip():
        raise PriceCatalogError(f"{where}: field 'provider' must be a non-empty string")
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise PriceCatalogError(f"{where}: field 'aliases' must be a list of non-empty strings")
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise PriceCatalogError(f"{where}: field 'source' must be a non-empty string")
    checked = _check_date(where, "checked", raw.get("checked", default_checked))
    note = raw.get("note")
    if note is not None and not isinstance(note, str):
        raise PriceCatalogError(f"{where}: field 'note' must be a string")
    prices = {field: _parse_price(where, field, raw.get(field)) for field in _PRICE_FIELDS}
    inp, out = prices["input"], prices["output"]
    assert inp is not None and out is not None  # required fields, checked above
    price = ModelPrice(
        provider=provider.strip().lower(),
        model=model.strip(),
        input=inp,
        output=out,
        cached_input=prices["cached_input"],
        cache_write=prices["cache_write"],
        cache_write_1h=prices["cache_write_1h"],
        source=source.strip(),
        checked=checked,
    )
    return price, tuple(aliases)
