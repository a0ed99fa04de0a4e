"""The budget headers a client sees: pure selection of the tightest exposed
budget (ext_proc/protocol/budget_headers.py)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from ext_proc.protocol.budget_headers import budget_headers, foreign
from spendgate.domain.policies import Action, Policy, Scope
from spendgate.domain.windows import WindowSpec, WindowUnit

USD = 10**9
NOW = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
HOUR_START = int(datetime(2025, 3, 10, 12, tzinfo=UTC).timestamp())
DAILY = Policy("daily", "daily", 10 * USD, WindowSpec(WindowUnit.DAYS), Action.REJECT,
               Scope.GLOBAL, expose_to_clients=True)  # fmt: skip
HOURLY = dataclasses.replace(
    DAILY, id="hourly", amount_nanos=USD, window=WindowSpec(WindowUnit.HOURS)
)
HIDDEN = dataclasses.replace(DAILY, id="hidden", amount_nanos=1, expose_to_clients=False)
EACH = dataclasses.replace(DAILY, id="each", scope=Scope.USER, target="*", amount_nanos=5 * USD)


@pytest.mark.parametrize(
    ("matches", "spent", "want"),
    [
        pytest.param([(HIDDEN, "")], {}, {}, id="never-a-policy-without-the-flag"),
        pytest.param([], {}, {}, id="no-policy"),
        pytest.param(
            [(DAILY, ""), (HOURLY, ""), (HIDDEN, "")],
            {},
            ("1.00", "1.00", "2025-03-10T13:00:00Z", "hourly"),
            id="least-remaining-wins",
        ),
        pytest.param(
            [(DAILY, ""), (HOURLY, "")],
            {("daily", "", DAY_START): 9_500_000_000},
            ("10.00", "0.50", "2025-03-11T00:00:00Z", "daily"),
            id="spend-decides-not-the-limit",
        ),
        pytest.param(
            [(DAILY, "")],
            {("daily", "", DAY_START): 12 * USD},
            ("10.00", "0.00", "2025-03-11T00:00:00Z", "daily"),
            id="remaining-never-negative",
        ),
        pytest.param(
            [(EACH, "alice")],
            {("each", "alice", DAY_START): 1, ("each", "bob", DAY_START): 5 * USD},
            ("5.00", "4.999999999", "2025-03-11T00:00:00Z", "each"),
            id="a-wildcard-shows-the-callers-own-budget",
        ),
        pytest.param(
            [(dataclasses.replace(DAILY, amount_nanos=USD), ""), (HOURLY, "")],
            {},
            ("1.00", "1.00", "2025-03-10T13:00:00Z", "hourly"),
            id="a-tie-goes-to-the-earlier-reset",
        ),
    ],
)
def test_tightest_exposed_budget(
    matches: list[tuple[Policy, str]],
    spent: dict[tuple[str, str, int], int],
    want: tuple[str, str, str, str] | dict[str, str],
) -> None:
    got = budget_headers(matches, lambda k: spent.get(k, 0), NOW)
    if isinstance(want, dict):
        assert got == want
        return
    assert got == {
        "x-spendgate-budget-limit": want[0],
        "x-spendgate-budget-remaining": want[1],
        "x-spendgate-budget-reset": want[2],
        "x-spendgate-budget-policy": want[3],
    }


def test_foreign_budget_headers_are_found_for_removal() -> None:
    headers = {"x-spendgate-budget-limit": "9", "x-spendgate-policy": "p", "content-type": "x"}
    assert foreign(headers) == ["x-spendgate-budget-limit"]
