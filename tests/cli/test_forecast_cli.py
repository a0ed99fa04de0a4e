"""The forecast in the CLI: --forecast-alert parsing and the status line (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.duration_pb2 import Duration

from spendgate.cli.client import CliError
from spendgate.cli.policies import forecast_alert_text, parse_forecast_alert
from spendgate.cli.status import OK, Spend, pace_text
from spendgate.v1 import budget_pb2 as pb

NOW = datetime(2026, 11, 3, 14, 48, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", pb.ForecastAlert(within=Duration(seconds=7200))),
        ("90m", pb.ForecastAlert(within=Duration(seconds=5400))),
        ("1d12h", pb.ForecastAlert(within=Duration(seconds=129_600))),
        ("45s", pb.ForecastAlert(within=Duration(seconds=45))),
        ("window-end", pb.ForecastAlert(before_window_end=True)),
        (
            " 2H , Window-End ",
            pb.ForecastAlert(within=Duration(seconds=7200), before_window_end=True),
        ),
        ("off", None),
    ],
)
def test_parse_forecast_alert(text: str, expected: pb.ForecastAlert | None) -> None:
    assert parse_forecast_alert(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        ",",
        "2",
        "h",
        "-2h",
        "2x",
        "2h,3h",
        "window-end,window-end",
        "off,2h",
        "1e30h",
        "9999999999h",
        "2h\x1b[31m",
    ],
)
def test_bad_forecast_alert_says_what_to_write(text: str) -> None:
    with pytest.raises(CliError) as e:
        parse_forecast_alert(text)
    assert "--forecast-alert" in str(e.value)
    assert "\x1b" not in str(e.value)


def test_forecast_alert_text_is_what_the_flag_takes() -> None:
    p = pb.BudgetPolicy(
        forecast_alert=pb.ForecastAlert(within=Duration(seconds=7200), before_window_end=True)
    )
    assert forecast_alert_text(p) == "2h00m,window-end"
    assert parse_forecast_alert(forecast_alert_text(p)) == p.forecast_alert
    assert forecast_alert_text(pb.BudgetPolicy()) == "-"


def _spend(exhausted_at: datetime | None, rate: str = "1.200000") -> Spend:
    return Spend(
        member="",
        spent_usd="6.00",
        limit_usd="10.00",
        remaining_usd="4.00",
        percent=60,
        state=OK,
        window_start=NOW.replace(hour=0, minute=0),
        window_end=NOW + timedelta(hours=9),
        request_count=10,
        exhausted_at=exhausted_at,
        rate_usd_per_hour=rate,
    )


def test_pace_text() -> None:
    soon = _spend(NOW + timedelta(hours=3, minutes=12))
    assert pace_text(soon, NOW) == (
        "at this pace ($1.20/h): exhausted in 3h12m (window resets in 9h00m)"
    )
    later = _spend(NOW + timedelta(hours=30), "0.324000")
    assert pace_text(later, NOW) == (
        "at this pace ($0.324/h): not exhausted before the window resets (in 9h00m)"
    )
    assert pace_text(_spend(None, ""), NOW) == ""
