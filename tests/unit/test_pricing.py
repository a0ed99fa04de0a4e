"""spendgate.domain.pricing: lookup, exact cost and USD text."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spendgate.domain.pricing import (
    NANOS_PER_USD,
    ModelPrice,
    PriceBook,
    PriceCatalogError,
    cost_nanos,
    format_usd,
    parse_usd,
)
from spendgate.domain.usage import Usage


def _price(
    input: str = "1",
    output: str = "2",
    cached_input: str | None = None,
    cache_write: str | None = None,
    cache_write_1h: str | None = None,
    model: str = "m",
    provider: str = "openai",
) -> ModelPrice:
    def dec(v: str | None) -> Decimal | None:
        return None if v is None else Decimal(v)

    return ModelPrice(
        provider=provider,
        model=model,
        input=Decimal(input),
        output=Decimal(output),
        cached_input=dec(cached_input),
        cache_write=dec(cache_write),
        cache_write_1h=dec(cache_write_1h),
        source="https://example.test/pricing",
        checked="2026-11-28",
    )


# ------------------------------------------------------------------- lookup


@pytest.mark.parametrize(
    ("name", "provider", "expected_provider", "expected_model", "expected_input"),
    [
        pytest.param("gpt-4o", None, "openai", "gpt-4o", "2.50", id="exact"),
        pytest.param("GPT-4o", None, "openai", "gpt-4o", "2.50", id="case-insensitive"),
        pytest.param(
            "claude-sonnet-4-20250514", None, "anthropic", "claude-sonnet-4", "3.00", id="alias"
        ),
        pytest.param(
            "claude-3-5-haiku-latest",
            None,
            "anthropic",
            "claude-3-5-haiku",
            "0.80",
            id="alias-latest",
        ),
        pytest.param(
            "gpt-4o-mini-2024-07-18", None, "openai", "gpt-4o-mini", "0.15", id="dated-alias"
        ),
        pytest.param(
            "gpt-4o-mini-2025-12-31", None, "openai", "gpt-4o-mini", "0.15", id="dated-suffix"
        ),
        pytest.param("o3-20250416", None, "openai", "o3", "2.00", id="compact-dated-suffix"),
        pytest.param(
            "gpt-4o-2024-05-13", None, "openai", "gpt-4o-2024-05-13", "5.00", id="own-dated-entry"
        ),
        pytest.param(
            "models/gemini-2.5-flash",
            None,
            "google",
            "gemini-2.5-flash",
            "0.30",
            id="models-prefix",
        ),
        pytest.param(
            "openai/gpt-4.1-mini", None, "openai", "gpt-4.1-mini", "0.40", id="vendor-prefix"
        ),
        pytest.param(
            "us.anthropic.claude-sonnet-4-20250514-v1:0",
            None,
            "bedrock",
            "anthropic.claude-sonnet-4-20250514-v1:0",
            "3.00",
            id="bedrock-region-prefix",
        ),
        pytest.param(
            "global.anthropic.claude-haiku-4-5-20251001-v1:0",
            None,
            "bedrock",
            "anthropic.claude-haiku-4-5-20251001-v1:0",
            "1.00",
            id="bedrock-global-alias",
        ),
        pytest.param(
            "eu.anthropic.claude-sonnet-4-5-20250929-v1:0",
            None,
            "bedrock",
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "3.30",
            id="bedrock-regional-premium",
        ),
        pytest.param(
            "apac.amazon.nova-pro-v1:0", None, "bedrock", "amazon.nova-pro-v1:0", "0.80", id="apac"
        ),
        pytest.param(
            "bedrock/us.anthropic.claude-3-haiku-20240307-v1:0",
            None,
            "bedrock",
            "anthropic.claude-3-haiku-20240307-v1:0",
            "0.25",
            id="prefix-then-region",
        ),
        pytest.param(
            "mistral-large-latest", "mistral", "mistral", "mistral-large-2512", "0.50", id="latest"
        ),
        pytest.param(
            "claude-haiku-4-5", "anthropic", "anthropic", "claude-haiku-4-5", "1.00", id="provider"
        ),
        pytest.param(
            "claude-haiku-4-5",
            "bedrock",
            "anthropic",
            "claude-haiku-4-5",
            "1.00",
            id="provider-preferred-not-required",
        ),
    ],
)
def test_lookup(
    name: str,
    provider: str | None,
    expected_provider: str,
    expected_model: str,
    expected_input: str,
) -> None:
    price = PriceBook.bundled().lookup(name, provider)
    assert price is not None
    assert (price.provider, price.model, price.input) == (
        expected_provider,
        expected_model,
        Decimal(expected_input),
    )


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("no-such-model", id="unknown"),
        pytest.param("", id="empty"),
        pytest.param("gpt-4o-mini-xyz", id="no-false-prefix-match"),
        pytest.param("gpt-4o-experimental", id="no-prefix-of-gpt-4o"),
        pytest.param("gpt-5-turbo-2025-08-07", id="dated-unknown"),
        pytest.param("claude", id="too-short"),
        pytest.param("models/", id="bare-prefix"),
    ],
)
def test_lookup_unknown_returns_none(name: str) -> None:
    book = PriceBook.bundled()
    assert book.lookup(name) is None
    assert book.lookup(name) is None  # cached miss, same answer


def test_lookup_prefers_the_given_provider() -> None:
    book = PriceBook(
        [
            _price(model="shared", provider="openai", input="1"),
            _price(model="shared", provider="bedrock", input="2"),
        ]
    )
    assert book.lookup("shared") == _price(model="shared", provider="openai", input="1")
    bedrock = book.lookup("shared", provider="bedrock")
    assert bedrock is not None and bedrock.input == Decimal("2")
    fuzzy = book.lookup("us.shared-2026-01-01", provider="bedrock")
    assert fuzzy is not None and fuzzy.input == Decimal("2")
    fallback = book.lookup("shared", provider="mistral")
    assert fallback is not None and fallback.provider == "openai"


def test_constructor_aliases_and_errors() -> None:
    book = PriceBook([_price(model="base")], aliases={"Nick": "base"})
    assert book.lookup("nick") is book.lookup("BASE") is not None
    with pytest.raises(PriceCatalogError, match="unknown model"):
        PriceBook([_price(model="base")], aliases={"nick": "other"})
    with pytest.raises(PriceCatalogError, match="duplicate"):
        PriceBook([_price(model="base"), _price(model="BASE")])


def test_fuzzy_cache_is_bounded() -> None:
    book = PriceBook([_price(model="base")])
    for i in range(10_000):
        assert book.lookup(f"unknown-{i}") is None
    assert len(book._fuzzy) <= 4096
    assert book.lookup("base-2026-01-01") is not None


# ---------------------------------------------------------------- cost_nanos


@pytest.mark.parametrize(
    ("model", "usage", "expected_nanos"),
    [
        # 600 uncached * 2.50 + 400 cached * 1.25 + 500 out * 10 = 7000 $/M-units
        pytest.param(
            "gpt-4o",
            Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=500),
            7_000_000,
            id="openai-cached",
        ),
        # reasoning tokens are already inside output_tokens: priced once, as output
        pytest.param(
            "o3",
            Usage(input_tokens=1000, output_tokens=3000, reasoning_tokens=2500),
            2 * 1000 * 1000 + 8 * 3000 * 1000,
            id="reasoning-in-output",
        ),
        # 4000*3 + 2000*0.30 + 3000*3.75 + 1000*6 + 500*15 = 37350
        pytest.param(
            "claude-sonnet-4-5",
            Usage(
                input_tokens=10_000,
                cached_input_tokens=2000,
                cache_write_tokens=3000,
                cache_write_1h_tokens=1000,
                output_tokens=500,
            ),
            37_350_000,
            id="anthropic-5m-and-1h-writes",
        ),
        # Haiku 3: 0.25 in, 0.30 5m write, 0.50 1h write, 0.03 read, 1.25 out
        pytest.param(
            "claude-3-haiku-20240307",
            Usage(
                input_tokens=1_000_000,
                cached_input_tokens=100_000,
                cache_write_tokens=200_000,
                cache_write_1h_tokens=300_000,
                output_tokens=1_000_000,
            ),
            (400_000 * 250 + 100_000 * 30 + 200_000 * 300 + 300_000 * 500 + 1_000_000 * 1250),
            id="anthropic-old-cache-rates",
        ),
        # Bedrock Sonnet 4 has no 1h write price: 1h writes fall back to the 5m rate
        pytest.param(
            "anthropic.claude-sonnet-4-20250514-v1:0",
            Usage(input_tokens=1000, cache_write_1h_tokens=1000),
            3750 * 1000,
            id="1h-falls-back-to-5m",
        ),
        # OpenAI has no cache-write price: writes fall back to the input rate
        pytest.param(
            "gpt-4.1",
            Usage(input_tokens=1000, cache_write_tokens=600, cache_write_1h_tokens=400),
            2 * 1000 * 1000,
            id="write-falls-back-to-input",
        ),
        pytest.param("gpt-4o", Usage(), 0, id="all-none"),
        pytest.param(
            "gpt-4o", Usage(input_tokens=None, output_tokens=100), 1_000_000, id="input-none"
        ),
        pytest.param(
            "gpt-4o", Usage(input_tokens=100, output_tokens=None), 250_000, id="output-none"
        ),
        # cached > input (bad report): uncached clamps to 0, cached still billed
        pytest.param(
            "gpt-4o",
            Usage(input_tokens=10, cached_input_tokens=20),
            20 * 1250,
            id="uncached-never-negative",
        ),
        pytest.param(
            "text-embedding-3-small", Usage(input_tokens=1_000_000), 20_000_000, id="embedding"
        ),
        # 1 cached token on Gemini 2.0 Flash-Lite: 0.01875 * 1000 = 18.75 nanos -> 19
        pytest.param(
            "gemini-2.0-flash-lite",
            Usage(input_tokens=1, cached_input_tokens=1),
            19,
            id="sub-nano-rounds",
        ),
    ],
)
def test_cost_nanos_catalog(model: str, usage: Usage, expected_nanos: int) -> None:
    price = PriceBook.bundled().lookup(model)
    assert price is not None
    assert cost_nanos(usage, price) == expected_nanos


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        pytest.param(1, 0, id="0.5-to-even-0"),
        pytest.param(3, 2, id="1.5-to-even-2"),
        pytest.param(5, 2, id="2.5-to-even-2"),
        pytest.param(7, 4, id="3.5-to-even-4"),
        pytest.param(2, 1, id="exact-1"),
    ],
)
def test_cost_nanos_rounds_half_even(tokens: int, expected: int) -> None:
    # 0.0005 USD per 1M tokens = 0.5 nano per token
    price = _price(input="0.0005", output="0")
    assert cost_nanos(Usage(input_tokens=tokens), price) == expected


def test_cost_nanos_rounds_once_at_the_end() -> None:
    # each part is 0.5 nano; rounded separately they would give 0 + 0 = 0
    price = _price(input="0.0005", output="0.0005")
    assert cost_nanos(Usage(input_tokens=1, output_tokens=1), price) == 1


def test_cost_nanos_honours_a_zero_cached_price() -> None:
    price = _price(input="3", output="15", cached_input="0")
    assert cost_nanos(Usage(input_tokens=1000, cached_input_tokens=1000), price) == 0


def test_cost_nanos_negative_counts_count_as_zero() -> None:
    price = _price(input="3", output="15")
    assert cost_nanos(Usage(input_tokens=-5, output_tokens=-5), price) == 0


def test_cost_nanos_large_counts_stay_exact() -> None:
    price = _price(input="0.075", output="0.30")
    usage = Usage(input_tokens=123_456_789_012, output_tokens=987_654_321)
    expected = Decimal("123456789012") * Decimal("75") + Decimal("987654321") * Decimal("300")
    assert cost_nanos(usage, price) == int(expected)


# ------------------------------------------------------- format_usd / parse_usd


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        pytest.param(12_340_000_000, "$12.34", id="cents"),
        pytest.param(5 * NANOS_PER_USD, "$5.00", id="whole-dollars"),
        pytest.param(0, "$0.00", id="zero"),
        pytest.param(123_000, "$0.000123", id="sub-cent"),
        pytest.param(1, "$0.000000001", id="one-nano"),
        pytest.param(1_234_500_000, "$1.2345", id="extra-digits"),
        pytest.param(100_000_000, "$0.10", id="ten-cents"),
        pytest.param(-1_500_000_000, "-$1.50", id="negative"),
        pytest.param(-7, "-$0.000000007", id="negative-nanos"),
        pytest.param(10**18, "$1000000000.00", id="huge-no-exponent"),
    ],
)
def test_format_usd(nanos: int, text: str) -> None:
    assert format_usd(nanos) == text
    assert parse_usd(text) == nanos


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        pytest.param("12.34", 12_340_000_000, id="plain"),
        pytest.param("$12.34", 12_340_000_000, id="dollar-sign"),
        pytest.param(" $12.34 ", 12_340_000_000, id="whitespace"),
        pytest.param("7", 7 * NANOS_PER_USD, id="integer"),
        pytest.param("7.", 7 * NANOS_PER_USD, id="trailing-dot"),
        pytest.param(".5", 500_000_000, id="leading-dot"),
        pytest.param("0.000000001", 1, id="nine-decimals"),
        pytest.param("-$1.50", -1_500_000_000, id="negative-before-sign"),
        pytest.param("$-1.50", -1_500_000_000, id="negative-after-sign"),
        pytest.param("+2", 2 * NANOS_PER_USD, id="plus"),
    ],
)
def test_parse_usd(text: str, nanos: int) -> None:
    assert parse_usd(text) == nanos


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("$", id="bare-dollar"),
        pytest.param(".", id="bare-dot"),
        pytest.param("abc", id="non-numeric"),
        pytest.param("NaN", id="nan"),
        pytest.param("inf", id="inf"),
        pytest.param("-Infinity", id="neg-infinity"),
        pytest.param("1e3", id="exponent"),
        pytest.param("1,000", id="thousands-separator"),
        pytest.param("1.0000000001", id="ten-decimals"),
        pytest.param("--1", id="double-sign"),
        pytest.param("-$-1", id="sign-twice"),
        pytest.param("$1.2.3", id="two-dots"),
        pytest.param("USD 5", id="currency-code"),
    ],
)
def test_parse_usd_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_usd(text)


@pytest.mark.parametrize("nanos", [0, 1, 999, 10_000_000, 123_456_789, 98_765_432_100, -42])
def test_usd_round_trip(nanos: int) -> None:
    assert parse_usd(format_usd(nanos)) == nanos
