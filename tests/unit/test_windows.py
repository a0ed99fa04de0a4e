"""Tests for spendgate.domain.windows: table tests plus hypothesis properties.

Expected instants are written as ISO strings with explicit UTC offsets, so DST
cases state exactly which of two identical wall-clock readings they mean.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.domain.windows import (
    InvalidWindow,
    Window,
    WindowSpec,
    WindowUnit,
    describe,
    window_for,
    window_starting_at,
)

M, H, D, W, MO = (
    WindowUnit.MINUTES,
    WindowUnit.HOURS,
    WindowUnit.DAYS,
    WindowUnit.WEEKS,
    WindowUnit.MONTHS,
)
NY = "America/New_York"
LH = "Australia/Lord_Howe"


def at(iso: str) -> datetime:
    """Aware datetime from ISO text; a bare "Z"/no offset means UTC."""
    parsed = datetime.fromisoformat(iso)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def case(name: str, spec: WindowSpec, now: str, start: str, end: str) -> pytest.ParameterSet:
    """One table row: the window of `spec` containing `now` is [start, end)."""
    return pytest.param(spec, now, start, end, id=name)


# fmt: off
WINDOW_CASES = [
    # --- each unit x1 in UTC
    case("minutes-utc", WindowSpec(M),
         "2026-05-14T10:37:42.5", "2026-05-14T10:37", "2026-05-14T10:38"),
    case("hours-utc", WindowSpec(H), "2026-05-14T10:37", "2026-05-14T10:00", "2026-05-14T11:00"),
    case("days-utc", WindowSpec(D), "2026-05-14T10:37", "2026-05-14", "2026-05-15"),
    case("weeks-utc-thursday", WindowSpec(W), "2026-05-14T10:37", "2026-05-11", "2026-05-18"),
    case("months-utc", WindowSpec(MO), "2026-05-14T10:37", "2026-05-01", "2026-06-01"),
    case("days-now-exactly-at-start", WindowSpec(D),
         "2026-05-14T00:00", "2026-05-14", "2026-05-15"),
    case("days-last-microsecond", WindowSpec(D),
         "2026-05-14T23:59:59.999999", "2026-05-14", "2026-05-15"),
    case("now-in-other-zone-is-converted", WindowSpec(D),
         "2026-05-14T22:00-04:00", "2026-05-15", "2026-05-16"),
    # --- counts > 1 (grouped from the 1970 origin)
    case("days-x2-epoch", WindowSpec(D, 2), "1970-01-02T12:00", "1970-01-01", "1970-01-03"),
    case("days-x2-odd-day-index", WindowSpec(D, 2), "2026-05-14T10:37", "2026-05-13", "2026-05-15"),
    case("hours-x6", WindowSpec(H, 6), "2026-05-14T10:37", "2026-05-14T06:00", "2026-05-14T12:00"),
    case("minutes-x15", WindowSpec(M, 15),
         "2026-05-14T10:37", "2026-05-14T10:30", "2026-05-14T10:45"),
    case("minutes-x90", WindowSpec(M, 90),
         "2026-05-14T10:37", "2026-05-14T10:30", "2026-05-14T12:00"),
    case("minutes-x7-not-dividing-a-day", WindowSpec(M, 7),
         "2026-05-14T10:40", "2026-05-14T10:37", "2026-05-14T10:44"),
    case("weeks-x2", WindowSpec(W, 2), "2026-05-14T10:37", "2026-05-11", "2026-05-25"),
    case("months-x3-quarter", WindowSpec(MO, 3), "2026-05-14T10:37", "2026-04-01", "2026-07-01"),
    case("months-x3-q4", WindowSpec(MO, 3),
         "2026-12-31T23:59:59.999999", "2026-10-01", "2027-01-01"),
    case("months-x5-from-origin", WindowSpec(MO, 5),
         "2026-05-14T10:37", "2026-04-01", "2026-09-01"),
    case("months-x12-year", WindowSpec(MO, 12), "2026-05-14T10:37", "2026-01-01", "2027-01-01"),
    # --- week start
    case("weeks-monday-on-monday", WindowSpec(W, week_start=0),
         "2026-05-11T00:00", "2026-05-11", "2026-05-18"),
    case("weeks-monday-on-sunday", WindowSpec(W, week_start=0),
         "2026-05-17T23:00", "2026-05-11", "2026-05-18"),
    case("weeks-sunday", WindowSpec(W, week_start=6),
         "2026-05-14T10:37", "2026-05-10", "2026-05-17"),
    case("weeks-sunday-on-sunday", WindowSpec(W, week_start=6),
         "2026-05-17T00:00", "2026-05-17", "2026-05-24"),
    case("weeks-saturday", WindowSpec(W, week_start=5),
         "2026-05-14T10:37", "2026-05-09", "2026-05-16"),
    # --- month ends
    case("months-jan-31", WindowSpec(MO), "2026-01-31T23:59:59", "2026-01-01", "2026-02-01"),
    case("months-feb-1", WindowSpec(MO), "2026-02-01T00:00", "2026-02-01", "2026-03-01"),
    case("months-leap-feb-29", WindowSpec(MO), "2028-02-29T12:00", "2028-02-01", "2028-03-01"),
    case("days-leap-feb-29", WindowSpec(D), "2028-02-29T12:00", "2028-02-29", "2028-03-01"),
    case("months-dec-to-jan", WindowSpec(MO),
         "2026-12-31T23:59:59.999999", "2026-12-01", "2027-01-01"),
    case("months-jan-after-rollover", WindowSpec(MO),
         "2027-01-01T00:00", "2027-01-01", "2027-02-01"),
    # --- timezones
    case("days-new-york", WindowSpec(D, timezone=NY),
         "2026-05-14T02:00", "2026-05-13T00:00-04:00", "2026-05-14T00:00-04:00"),
    case("months-berlin", WindowSpec(MO, timezone="Europe/Berlin"),
         "2026-04-30T22:30", "2026-05-01T00:00+02:00", "2026-06-01T00:00+02:00"),
    case("weeks-berlin-sunday", WindowSpec(W, week_start=6, timezone="Europe/Berlin"),
         "2026-05-16T22:30", "2026-05-17T00:00+02:00", "2026-05-24T00:00+02:00"),
    case("hours-kolkata-half-hour-offset", WindowSpec(H, timezone="Asia/Kolkata"),
         "2026-05-14T10:10", "2026-05-14T15:00+05:30", "2026-05-14T16:00+05:30"),
    case("days-kolkata", WindowSpec(D, timezone="Asia/Kolkata"),
         "2026-05-14T19:00", "2026-05-15T00:00+05:30", "2026-05-16T00:00+05:30"),
    case("days-lord-howe-fall-back-24h30", WindowSpec(D, timezone=LH),
         "2026-04-05T12:00+10:30", "2026-04-05T00:00+11:00", "2026-04-06T00:00+10:30"),
    case("hours-lord-howe-fall-back-first-pass", WindowSpec(H, timezone=LH),
         "2026-04-05T01:45+11:00", "2026-04-05T01:00+11:00", "2026-04-05T02:00+10:30"),
    case("hours-lord-howe-fall-back-second-pass", WindowSpec(H, timezone=LH),
         "2026-04-05T01:45+10:30", "2026-04-05T01:00+11:00", "2026-04-05T02:00+10:30"),
    case("minutes-x30-lord-howe-ends-at-jump", WindowSpec(M, 30, LH),
         "2026-04-05T01:45+11:00", "2026-04-05T01:30+11:00", "2026-04-05T01:30+10:30"),
    case("hours-lord-howe-spring-forward-30min-gap", WindowSpec(H, timezone=LH),
         "2026-10-04T01:30+10:30", "2026-10-04T01:00+10:30", "2026-10-04T03:00+11:00"),
    # --- DST in New York
    case("days-ny-spring-forward-23h", WindowSpec(D, timezone=NY),
         "2026-03-08T12:00-04:00", "2026-03-08T00:00-05:00", "2026-03-09T00:00-04:00"),
    case("days-ny-fall-back-25h", WindowSpec(D, timezone=NY),
         "2026-11-01T12:00-05:00", "2026-11-01T00:00-04:00", "2026-11-02T00:00-05:00"),
    case("weeks-ny-across-spring-forward", WindowSpec(W, timezone=NY),
         "2026-03-08T12:00-04:00", "2026-03-02T00:00-05:00", "2026-03-09T00:00-04:00"),
    case("hours-ny-fall-back-first-0100", WindowSpec(H, timezone=NY),
         "2025-11-02T01:30-04:00", "2025-11-02T01:00-04:00", "2025-11-02T01:00-05:00"),
    case("hours-ny-fall-back-second-0100", WindowSpec(H, timezone=NY),
         "2025-11-02T01:30-05:00", "2025-11-02T01:00-05:00", "2025-11-02T02:00-05:00"),
    case("minutes-x15-ny-fall-back-ends-at-jump", WindowSpec(M, 15, NY),
         "2025-11-02T01:50-04:00", "2025-11-02T01:45-04:00", "2025-11-02T01:00-05:00"),
    case("hours-ny-spring-forward-before-gap", WindowSpec(H, timezone=NY),
         "2025-03-09T01:30-05:00", "2025-03-09T01:00-05:00", "2025-03-09T03:00-04:00"),
    case("hours-ny-spring-forward-after-gap", WindowSpec(H, timezone=NY),
         "2025-03-09T03:30-04:00", "2025-03-09T03:00-04:00", "2025-03-09T04:00-04:00"),
    case("hours-x2-ny-skips-missing-0200", WindowSpec(H, 2, NY),
         "2025-03-09T01:30-05:00", "2025-03-09T00:00-05:00", "2025-03-09T04:00-04:00"),
    # --- local midnight that does not exist / is ambiguous / a whole skipped day
    case("days-santiago-missing-midnight", WindowSpec(D, timezone="America/Santiago"),
         "2026-09-06T12:00-03:00", "2026-09-06T01:00-03:00", "2026-09-07T00:00-03:00"),
    case("days-santiago-day-before-ends-after-gap", WindowSpec(D, timezone="America/Santiago"),
         "2026-09-05T23:59-04:00", "2026-09-05T00:00-04:00", "2026-09-06T01:00-03:00"),
    case("months-havana-missing-midnight", WindowSpec(MO, timezone="America/Havana"),
         "2026-03-08T12:00-04:00", "2026-03-01T00:00-05:00", "2026-04-01T00:00-04:00"),
    case("days-havana-ambiguous-midnight-first-pass", WindowSpec(D, timezone="America/Havana"),
         "2026-11-01T00:30-04:00", "2026-11-01T00:00-04:00", "2026-11-02T00:00-05:00"),
    case("days-havana-ambiguous-midnight-second-pass", WindowSpec(D, timezone="America/Havana"),
         "2026-11-01T00:30-05:00", "2026-11-01T00:00-04:00", "2026-11-02T00:00-05:00"),
    case("days-apia-dec-29-ends-where-dec-30-was-skipped", WindowSpec(D, timezone="Pacific/Apia"),
         "2011-12-29T23:30-10:00", "2011-12-29T00:00-10:00", "2011-12-31T00:00+14:00"),
    case("days-apia-after-skipped-day", WindowSpec(D, timezone="Pacific/Apia"),
         "2011-12-31T00:00+14:00", "2011-12-31T00:00+14:00", "2012-01-01T00:00+14:00"),
    # Friday 2011-12-30 never happened in Apia: that week starts right after the gap.
    case("weeks-friday-apia-skipped-week-start", WindowSpec(W, 1, "Pacific/Apia", week_start=4),
         "2011-12-31T12:00+14:00", "2011-12-31T00:00+14:00", "2012-01-06T00:00+14:00"),
    # --- before 1970
    case("days-pre-1970", WindowSpec(D), "1969-12-31T12:00", "1969-12-31", "1970-01-01"),
    case("days-x2-pre-1970", WindowSpec(D, 2), "1969-12-31T12:00", "1969-12-30", "1970-01-01"),
    case("weeks-before-origin-monday", WindowSpec(W),
         "1970-01-01T00:00", "1969-12-29", "1970-01-05"),
    case("months-x3-pre-1970", WindowSpec(MO, 3), "1969-11-15T00:00", "1969-10-01", "1970-01-01"),
    case("months-x12-1960", WindowSpec(MO, 12), "1960-02-29T00:00", "1960-01-01", "1961-01-01"),
    case("hours-x5-pre-1970", WindowSpec(H, 5),
         "1969-12-31T23:30", "1969-12-31T19:00", "1970-01-01T00:00"),
    case("days-ny-1965", WindowSpec(D, timezone=NY),
         "1965-07-04T12:00-04:00", "1965-07-04T00:00-04:00", "1965-07-05T00:00-04:00"),
]
# fmt: on


@pytest.mark.parametrize(("spec", "now", "start", "end"), WINDOW_CASES)
def test_window_for(spec: WindowSpec, now: str, start: str, end: str) -> None:
    window = window_for(spec, at(now))
    assert (window.start, window.end) == (at(start), at(end))
    assert window.start.tzinfo is UTC and window.end.tzinfo is UTC
    assert window.contains(at(now))
    assert window_starting_at(spec, window.start) == window


@pytest.mark.parametrize(
    ("spec", "day", "hours"),
    [
        pytest.param(
            WindowSpec(D, timezone=NY), "2026-03-08T12:00-04:00", 23, id="ny-spring-forward-23h"
        ),
        pytest.param(
            WindowSpec(D, timezone=NY), "2026-11-01T12:00-05:00", 25, id="ny-fall-back-25h"
        ),
        pytest.param(
            WindowSpec(D, timezone=NY), "2026-05-14T12:00-04:00", 24, id="ny-ordinary-24h"
        ),
        pytest.param(
            WindowSpec(D, timezone=LH), "2026-10-04T12:00+11:00", 23.5, id="lord-howe-23h30"
        ),
        pytest.param(
            WindowSpec(H, timezone=NY), "2025-03-09T01:30-05:00", 1, id="ny-hour-across-gap-is-1h"
        ),
        pytest.param(
            WindowSpec(H, 2, NY), "2025-03-09T01:30-05:00", 3, id="ny-2h-across-gap-is-3h"
        ),
    ],
)
def test_window_length(spec: WindowSpec, day: str, hours: float) -> None:
    window = window_for(spec, at(day))
    assert window.end - window.start == timedelta(hours=hours)


def test_fall_back_hour_gives_two_consecutive_windows() -> None:
    spec = WindowSpec(H, timezone=NY)
    first = window_for(spec, at("2025-11-02T01:00-04:00"))
    second = window_for(spec, first.end)
    assert second.start == first.end == at("2025-11-02T01:00-05:00")
    assert second.end == at("2025-11-02T02:00-05:00")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"count": 0}, "count", id="count-zero"),
        pytest.param({"count": -1}, "count", id="count-negative"),
        pytest.param({"count": 10_001}, "count", id="count-too-large"),
        pytest.param({"count": True}, "count", id="count-bool"),
        pytest.param({"count": 1.5}, "count", id="count-float"),
        pytest.param({"timezone": "Mars/Olympus"}, "timezone", id="timezone-unknown"),
        pytest.param({"timezone": ""}, "timezone", id="timezone-empty"),
        pytest.param({"timezone": "../etc/passwd"}, "timezone", id="timezone-path-escape"),
        pytest.param({"timezone": "zone.tab"}, "timezone", id="timezone-not-tzif"),
        pytest.param({"week_start": 7}, "week_start", id="week-start-7"),
        pytest.param({"week_start": -1}, "week_start", id="week-start-negative"),
    ],
)
def test_invalid_spec(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidWindow) as info:
        WindowSpec(WindowUnit.DAYS, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert info.value.message
    assert isinstance(info.value, ValueError)


def test_valid_spec_bounds() -> None:
    WindowSpec(M, 10_000, "Pacific/Chatham", week_start=6)  # no raise


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda t: window_for(WindowSpec(D), t), id="window_for"),
        pytest.param(lambda t: window_for(WindowSpec(H, timezone=NY), t), id="window_for-hours"),
        pytest.param(lambda t: window_starting_at(WindowSpec(MO), t), id="window_starting_at"),
        pytest.param(
            lambda t: Window(at("2026-01-01"), at("2026-01-02")).contains(t), id="contains"
        ),
    ],
)
def test_naive_datetime_rejected(call: Callable[[datetime], object]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        call(datetime(2026, 5, 14, 10, 37))


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        pytest.param(WindowSpec(D), "1 day", id="day"),
        pytest.param(WindowSpec(D, 2), "2 days", id="days"),
        pytest.param(WindowSpec(W, 2), "2 weeks (from Monday)", id="weeks-monday"),
        pytest.param(WindowSpec(W, week_start=6), "1 week (from Sunday)", id="week-sunday"),
        pytest.param(WindowSpec(MO), "1 month", id="month"),
        pytest.param(WindowSpec(MO, 12), "12 months", id="months"),
        pytest.param(WindowSpec(M, 15), "15 minutes", id="minutes"),
        pytest.param(WindowSpec(H), "1 hour", id="hour"),
        pytest.param(WindowSpec(D, timezone=NY), "1 day (America/New_York)", id="day-tz"),
        pytest.param(
            WindowSpec(W, timezone=NY), "1 week (from Monday) (America/New_York)", id="week-tz"
        ),
    ],
)
def test_describe(spec: WindowSpec, text: str) -> None:
    assert describe(spec) == text


# --- brute-force oracle for MINUTES/HOURS around transitions ------------------


def _wall_aligned(t: datetime, tz: ZoneInfo, minutes: int) -> bool:
    """Does the local wall clock at `t` read a multiple of `minutes` since 1970-01-01 00:00?"""
    wall = t.astimezone(tz).replace(tzinfo=None)
    return (wall - datetime(1970, 1, 1)) % timedelta(minutes=minutes) == timedelta(0)


@pytest.mark.parametrize(
    ("zone", "day", "unit", "count"),
    [
        pytest.param(NY, "2025-03-09", M, 15, id="ny-spring-minutes-x15"),
        pytest.param(NY, "2025-11-02", M, 15, id="ny-fall-minutes-x15"),
        pytest.param(NY, "2025-11-02", H, 1, id="ny-fall-hours"),
        pytest.param(NY, "2025-03-09", H, 2, id="ny-spring-hours-x2"),
        pytest.param(LH, "2026-04-05", H, 1, id="lord-howe-fall-hours"),
        pytest.param(LH, "2026-10-04", M, 20, id="lord-howe-spring-minutes-x20"),
        pytest.param("Pacific/Apia", "2011-12-29", H, 3, id="apia-skipped-day-hours-x3"),
        pytest.param("America/Santiago", "2026-09-06", M, 45, id="santiago-minutes-x45"),
        pytest.param("Asia/Kolkata", "2026-05-14", M, 7, id="kolkata-minutes-x7"),
    ],
)
def test_subday_boundaries_match_brute_force(
    zone: str, day: str, unit: WindowUnit, count: int
) -> None:
    """Walk every UTC minute around a transition day: window starts are exactly
    the minutes at which the local wall clock reads a multiple of the length."""
    tz = ZoneInfo(zone)
    step = count * (60 if unit is H else 1)
    lo = datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC) - timedelta(hours=6)
    hi = lo + timedelta(hours=48)
    minutes = (lo + timedelta(minutes=i) for i in range(1, 48 * 60 + 1))
    expected = [t for t in minutes if _wall_aligned(t, tz, step)]
    assert len(expected) >= 48 * 60 // step - 2  # the oracle itself is not vacuous
    spec = WindowSpec(unit, count, zone)
    starts, window = [], window_for(spec, lo)
    while window.end <= hi:
        starts.append(window.end)
        window = window_for(spec, window.end)
    assert starts == expected


# --- properties ---------------------------------------------------------------

ZONES = [
    "UTC", NY, "Europe/Berlin", "Asia/Kolkata", LH, "America/Santiago", "America/Havana",
    "Asia/Beirut", "Pacific/Apia", "Pacific/Chatham", "Asia/Kathmandu", "America/St_Johns",
    "Africa/Casablanca", "Europe/Dublin", "Asia/Tehran", "Antarctica/Troll", "Pacific/Kiritimati",
    "America/Sao_Paulo", "Australia/Adelaide", "Europe/London",
]  # fmt: skip

specs = st.builds(
    WindowSpec,
    unit=st.sampled_from(WindowUnit),
    count=st.integers(1, 40) | st.sampled_from([45, 90, 168, 1440, 10_000]),
    timezone=st.sampled_from(ZONES),
    week_start=st.integers(0, 6),
)
instants = st.datetimes(
    min_value=datetime(1960, 1, 1), max_value=datetime(2100, 12, 31), timezones=st.just(UTC)
)


@settings(max_examples=400, deadline=None)
@given(spec=specs, t=instants)
def test_windows_tile_time(spec: WindowSpec, t: datetime) -> None:
    window = window_for(spec, t)
    assert window.start <= t < window.end
    assert window.start.tzinfo is UTC and window.end.tzinfo is UTC
    assert window_for(spec, window.end).start == window.end  # next window starts at our end
    assert window_for(spec, window.start) == window
    assert window_for(spec, window.end - timedelta(microseconds=1)) == window
    assert window_for(spec, t.astimezone(ZoneInfo(spec.timezone))) == window


def _unit_aligned(spec: WindowSpec, day: date) -> bool:
    """Is local `day` the first day of a window of `spec` (counting from the 1970 origin)?"""
    if spec.unit is MO:
        return day.day == 1 and ((day.year - 1970) * 12 + day.month - 1) % spec.count == 0
    if spec.unit is W:
        origin = date(1970, 1, 1) + timedelta(days=(spec.week_start - 3) % 7)  # 1970-01-01: Thu
        return day.weekday() == spec.week_start and (day - origin).days // 7 % spec.count == 0
    return (day - date(1970, 1, 1)).days % spec.count == 0


@settings(max_examples=300, deadline=None)
@given(spec=specs, t=instants)
def test_window_starts_are_aligned(spec: WindowSpec, t: datetime) -> None:
    tz = ZoneInfo(spec.timezone)
    start = window_for(spec, t).start
    if spec.unit in (M, H):
        assert _wall_aligned(start, tz, spec.count * (60 if spec.unit is H else 1))
        return
    wall = start.astimezone(tz)
    just_before = (start - timedelta(microseconds=1)).astimezone(tz)
    if just_before.utcoffset() == wall.utcoffset():  # no transition: a real local midnight
        assert wall.time() == datetime.min.time()
        assert _unit_aligned(spec, wall.date())
    else:  # start is a transition; the gap ending here swallowed the aligned midnight
        first = just_before.date() + timedelta(days=1)
        swallowed = [first + timedelta(days=i) for i in range((wall.date() - first).days + 1)]
        assert any(_unit_aligned(spec, day) for day in swallowed)
