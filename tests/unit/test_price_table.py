"""ext_proc's PriceTable: catalog, overrides (most specific wins), unpriced modes."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ext_proc.metering.pricing import PriceOverride, PriceTable
from spendgate.domain.pricing import ModelPrice, PriceBook

CATALOG = PriceBook.bundled()


def price(inp: str, out: str = "1") -> ModelPrice:
    return ModelPrice(
        provider="",
        model="x",
        input=Decimal(inp),
        output=Decimal(out),
        cached_input=None,
        cache_write=None,
        cache_write_1h=None,
        source="override",
        checked="",
    )


def table(*overrides: PriceOverride, unpriced: str = "default") -> PriceTable:
    t = PriceTable(CATALOG, unpriced=unpriced)
    t.set_overrides(overrides)
    return t


@pytest.mark.parametrize(
    ("model", "provider", "route", "expected_input"),
    [
        pytest.param("gpt-4o", "openai", "openai", "1", id="route-and-provider-override"),
        pytest.param("gpt-4o", "azure", "openai", "2", id="route-override-any-provider"),
        pytest.param("gpt-4o", "openai", "demo", "3", id="provider-override"),
        pytest.param("gpt-4o", "azure", "demo", "4", id="model-override"),
        pytest.param("GPT-4o-2024-08-06", "azure", "demo", "4", id="dated-alias-uses-override"),
        pytest.param("gpt-4o-mini", "openai", "demo", "0.15", id="catalog-when-no-override"),
        pytest.param("my-llama", "", "", "0.5", id="override-for-unknown-model"),
    ],
)
def test_most_specific_override_wins(
    model: str, provider: str, route: str, expected_input: str
) -> None:
    t = table(
        PriceOverride("gpt-4o", price("1"), "openai", "openai"),
        PriceOverride("gpt-4o", price("2"), "", "openai"),
        PriceOverride("gpt-4o", price("3"), "openai", ""),
        PriceOverride("gpt-4o", price("4")),
        PriceOverride("my-llama", price("0.5")),
    )
    found = t.lookup(model, provider, route)
    assert found is not None and found.input == Decimal(expected_input)


def test_replacing_overrides_drops_the_old_ones() -> None:
    t = table(PriceOverride("gpt-4o", price("9")))
    t.set_overrides([])
    found = t.lookup("gpt-4o", "openai")
    assert found is not None and found.input == Decimal("2.50")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        pytest.param("default", (Decimal(15), Decimal(75)), id="default-price"),
        pytest.param("reject", (Decimal(15), Decimal(75)), id="reject-charges-default-if-seen"),
        pytest.param("free", None, id="free"),
    ],
)
def test_unpriced_modes(mode: str, expected: tuple[Decimal, Decimal] | None) -> None:
    t = table(unpriced=mode)
    assert t.lookup("no-such-model") is None
    charged = t.for_charge("no-such-model")
    assert (None if charged is None else (charged.input, charged.output)) == expected


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unpriced_models"):
        PriceTable(CATALOG, unpriced="maybe")
