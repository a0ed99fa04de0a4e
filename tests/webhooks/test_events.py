"""Which crossings a window's spend has reached (pure, table-driven)."""

from __future__ import annotations

import pytest

from control_plane.webhooks.events import (
    EXCEEDED,
    THRESHOLD_CROSSED,
    crossings,
    percent_used,
)

USD = 1_000_000_000


@pytest.mark.parametrize(
    ("thresholds", "spent", "expected"),
    [
        pytest.param((), 9 * USD, [], id="below"),
        pytest.param((), 10 * USD, [(100, EXCEEDED)], id="exactly-the-amount-is-exceeded"),
        pytest.param((), 10 * USD - 1, [], id="one-nano-short"),
        pytest.param((50,), 5 * USD, [(50, THRESHOLD_CROSSED)], id="threshold-reached"),
        pytest.param(
            (100, 50, 80),
            12 * USD,
            [
                (50, THRESHOLD_CROSSED),
                (80, THRESHOLD_CROSSED),
                (100, THRESHOLD_CROSSED),
                (100, EXCEEDED),
            ],
            id="jump-over-several-in-order",
        ),
        pytest.param(
            (150,),
            15 * USD,
            [(100, EXCEEDED), (150, THRESHOLD_CROSSED)],
            id="above-100-after-exceeded",
        ),
        pytest.param((50, 50), 6 * USD, [(50, THRESHOLD_CROSSED)], id="duplicates-once"),
    ],
)
def test_crossings(
    thresholds: tuple[int, ...], spent: int, expected: list[tuple[int, str]]
) -> None:
    got = crossings(10 * USD, thresholds, spent)
    assert [(c.percent, c.kind) for c in got] == expected
    assert [c.threshold for c in got] == [p if k == THRESHOLD_CROSSED else 0 for p, k in expected]


@pytest.mark.parametrize(
    ("spent", "amount", "text"),
    [(0, 10, "0.0"), (9999, 10000, "99.9"), (10, 10, "100.0"), (21, 10, "210.0"), (1, 0, "0.0")],
)
def test_percent_used_rounds_down(spent: int, amount: int, text: str) -> None:
    assert percent_used(spent, amount) == text
