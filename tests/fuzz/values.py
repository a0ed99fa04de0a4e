"""Hostile values: what a careless admin, a hostile client and a broken
provider send. Shared by the fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st

# Sizes that cross limits: gRPC's 4 MB message, ext_proc's buffers, logs.
BIG_SIZES = (1_000, 65_536, 1_000_000, 5_000_000)
ODD_STRINGS = (
    "*",
    " ",
    "\x00",
    "a\x00b",
    "\x1b[31mred\x1b[0m\x07",
    "line\r\nbreak",
    "\u202eevil",
    "💸",
    "Ω≈ç√",
    "\ufeffbom",
    "NaN",
    "-1",
    "1e30",
    "0",
    "A" * 100_000,
    "9" * 400,
)


def big_text(sizes: tuple[int, ...] = BIG_SIZES) -> st.SearchStrategy[str]:
    return st.builds(
        lambda n, c: (c * n)[:n], st.sampled_from(sizes), st.sampled_from(["x", "é", "\x00", "💸"])
    )


def wild_text(big: bool = True, max_small: int = 100_000) -> st.SearchStrategy[str]:
    """Text of every kind; ``max_small`` caps all but the 5 MB strings."""
    small = st.one_of(
        st.just(""),
        st.sampled_from([s for s in ODD_STRINGS if len(s) <= max_small]),
        st.text(max_size=40),
        st.text(alphabet=st.characters(codec="ascii"), max_size=300),
    )
    if not big:
        return small
    return st.one_of(small, big_text((*(n for n in BIG_SIZES if n <= max_small), 5_000_000)))


def decimal_text(max_small: int = 100_000) -> st.SearchStrategy[str]:
    """Amounts and prices, as the API takes them: decimal strings."""
    return st.one_of(
        st.sampled_from(
            [
                "10",
                "0.000000001",
                "0.0000000001",
                "1e30",
                "1E-30",
                "-5",
                "+5",
                "0",
                "-0",
                "1_000",
                " 10 ",
                "0x10",
                "\uff11\uff10",  # fullwidth digits
                "Infinity",
                "NaN",
                "sNaN",
                "100000",
                "100000.000000001",
                "9" * 40,
                "1e999999999",
            ]
        ),
        st.decimals(allow_nan=True, allow_infinity=True).map(str),
        st.integers().map(str),
        wild_text(big=False, max_small=max_small),
    )


def wild_int(bits: int, signed: bool = True) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted({lo, hi, 0, 1, 2, 7, 8, 20, 21, 100, 101, 1000, max(lo, -1), max(lo, -42)})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def token_count() -> st.SearchStrategy[object]:
    """A provider's token count: JSON values no honest provider sends among them."""
    return st.one_of(
        st.integers(0, 10_000),
        st.sampled_from([-1, -(2**63), 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([1.5, 1e308, -0.0, 1e-300]),
        st.sampled_from(["12", "abc", "", "1e3", "0x10", None, True, False, [], {}, [1], {"a": 1}]),
        big_text().map(lambda s: s[:1_000_000]),
    )
