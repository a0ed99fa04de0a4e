"""The bundled price catalog (spendgate/data/prices.json) and the format
PriceBook.from_json reads."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from importlib import resources
from typing import Any

import pytest

from spendgate.domain.pricing import (
    PriceBook,
    PriceCatalogError,
)

PROVIDERS = {"openai", "anthropic", "google", "bedrock", "mistral"}
PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_1h")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DECIMAL_TEXT = re.compile(r"^\d+(\.\d+)?$")


def _raw_catalog() -> dict[str, Any]:
    text = resources.files("spendgate").joinpath("data/prices.json").read_text("utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


RAW = _raw_catalog()
ENTRIES: list[dict[str, Any]] = RAW["models"]
ENTRY_IDS = [f"{e['provider']}:{e['model']}" for e in ENTRIES]

# ---------------------------------------------------------------- the catalog


def test_catalog_header() -> None:
    assert RAW["currency"] == "USD"
    assert RAW["unit"] == "per_million_tokens"
    assert DATE.match(RAW["checked"])


def test_catalog_loads_with_at_least_60_models() -> None:
    book = PriceBook.bundled()
    assert len(book) == len(ENTRIES) >= 60
    assert {p.provider for p in book} == PROVIDERS


def test_bundled_is_parsed_once() -> None:
    assert PriceBook.bundled() is PriceBook.bundled()


@pytest.mark.parametrize("entry", ENTRIES, ids=ENTRY_IDS)
def test_catalog_entry_is_sourced_and_well_formed(entry: dict[str, Any]) -> None:
    assert entry["provider"] in PROVIDERS
    assert entry["model"] == entry["model"].lower() == entry["model"].strip()
    assert isinstance(entry["source"], str) and entry["source"].startswith("https://")
    assert isinstance(entry["checked"], str) and DATE.match(entry["checked"])
    assert isinstance(entry["aliases"], list)
    for field in PRICE_FIELDS:
        value = entry[field]  # every field present, null or a string
        if value is None:
            assert field not in ("input", "output"), field
            continue
        assert isinstance(value, str), f"{field} must be a decimal string, not {value!r}"
        assert DECIMAL_TEXT.match(value), f"{field}={value!r}"
        assert Decimal(value) >= 0
    if entry["cached_input"] is not None:
        assert Decimal(entry["cached_input"]) <= Decimal(entry["input"])


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_catalog_has_no_duplicate_names_within_a_provider(provider: str) -> None:
    seen: dict[str, str] = {}
    for entry in ENTRIES:
        if entry["provider"] != provider:
            continue
        for name in (entry["model"], *entry["aliases"]):
            key = name.lower()
            assert key not in seen, f"{name!r} in {entry['model']!r} and {seen[key]!r}"
            seen[key] = entry["model"]


@pytest.mark.parametrize(
    "model",
    [
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "gpt-4o",
        "gpt-4o-mini",
        "o1",
        "o3",
        "o3-mini",
        "o4-mini",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "claude-opus-4-1",
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
        "claude-3-5-haiku",
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gemini-2.0-flash",
        "anthropic.claude-sonnet-4-20250514-v1:0",
        "amazon.nova-micro-v1:0",
        "amazon.nova-lite-v1:0",
        "amazon.nova-pro-v1:0",
        "meta.llama3-3-70b-instruct-v1:0",
        "cohere.command-r-v1:0",
        "mistral.mistral-7b-instruct-v0:2",
        "mistral-large-latest",
        "mistral-medium-latest",
        "mistral-small-latest",
        "codestral-latest",
    ],
)
def test_catalog_covers_required_model(model: str) -> None:
    assert PriceBook.bundled().lookup(model) is not None


# ------------------------------------------------------------------ from_json


def _doc(**entry_overrides: Any) -> str:
    entry: dict[str, Any] = {
        "provider": "openai",
        "model": "gpt-test",
        "aliases": [],
        "input": "1.00",
        "cached_input": None,
        "cache_write": None,
        "cache_write_1h": None,
        "output": "2.00",
        "source": "https://example.test/pricing",
        "checked": "2026-11-28",
    }
    for key, value in entry_overrides.items():
        if value is _DELETE:
            del entry[key]
        else:
            entry[key] = value
    return json.dumps(
        {
            "checked": "2026-11-28",
            "currency": "USD",
            "unit": "per_million_tokens",
            "models": [entry],
        }
    )


_DELETE = object()


def test_from_json_minimal() -> None:
    book = PriceBook.from_json(_doc(aliases=["gpt-test-alias"], cached_input="0.5"))
    price = book.lookup("gpt-test-alias")
    assert price is not None
    assert price.cached_input == Decimal("0.5")
    assert price.cache_write is None
    assert len(book) == 1
    assert PriceBook.from_json(_doc().encode()).lookup("gpt-test") is not None


def test_from_json_missing_optional_prices_and_checked_default() -> None:
    book = PriceBook.from_json(
        _doc(cached_input=_DELETE, cache_write=_DELETE, cache_write_1h=_DELETE, checked=_DELETE)
    )
    price = book.lookup("gpt-test")
    assert price is not None and price.checked == "2026-11-28"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"input": 2.5}, "input", id="float-price"),
        pytest.param({"output": 10}, "output", id="int-price"),
        pytest.param({"input": None}, "input", id="required-null"),
        pytest.param({"output": _DELETE}, "output", id="required-missing"),
        pytest.param({"cached_input": "cheap"}, "cached_input", id="not-decimal"),
        pytest.param({"cache_write": "-1"}, "cache_write", id="negative"),
        pytest.param({"cache_write_1h": "NaN"}, "cache_write_1h", id="nan"),
        pytest.param({"input": "Infinity"}, "input", id="infinity"),
        pytest.param({"source": ""}, "source", id="empty-source"),
        pytest.param({"source": None}, "source", id="null-source"),
        pytest.param({"checked": "28/11/2026"}, "checked", id="bad-date"),
        pytest.param({"checked": "2026-02-30"}, "checked", id="impossible-date"),
        pytest.param({"aliases": "gpt-x"}, "aliases", id="aliases-not-list"),
        pytest.param({"provider": 3}, "provider", id="provider-not-string"),
        pytest.param({"note": 5}, "note", id="note-not-string"),
    ],
)
def test_from_json_errors_name_the_model_and_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(PriceCatalogError) as info:
        PriceBook.from_json(_doc(**overrides))
    message = str(info.value)
    assert repr(field) in message
    assert "gpt-test" in message


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        pytest.param("{not json", "JSON", id="not-json"),
        pytest.param("[]", "object", id="not-object"),
        pytest.param('{"models": {}}', "'models'", id="models-not-list"),
        pytest.param('{"models": [1]}', "models[0]", id="entry-not-object"),
        pytest.param('{"models": [{"model": ""}]}', "'model'", id="empty-model"),
        pytest.param('{"currency": "EUR", "models": []}', "'currency'", id="currency"),
        pytest.param('{"unit": "per_token", "models": []}', "'unit'", id="unit"),
    ],
)
def test_from_json_structural_errors(data: str, needle: str) -> None:
    with pytest.raises(PriceCatalogError, match=re.escape(needle)):
        PriceBook.from_json(data)


def test_from_json_rejects_duplicate_alias_within_provider() -> None:
    doc = json.loads(_doc(aliases=["dup"]))
    second = dict(doc["models"][0], model="gpt-other", aliases=["DUP"])
    doc["models"].append(second)
    with pytest.raises(PriceCatalogError, match="duplicate model/alias 'DUP'"):
        PriceBook.from_json(json.dumps(doc))


def test_from_json_allows_same_name_across_providers() -> None:
    doc = json.loads(_doc())
    doc["models"].append(dict(doc["models"][0], provider="bedrock", input="3"))
    book = PriceBook.from_json(json.dumps(doc))
    bedrock = book.lookup("gpt-test", provider="bedrock")
    assert bedrock is not None and bedrock.input == Decimal("3")
