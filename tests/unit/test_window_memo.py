"""ext_proc.admission.windows.current must always equal window_for, whatever order the
instants come in (a clock that jumps back, boundaries, zones with DST)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.admission import windows
from spendgate.domain.windows import WindowSpec, WindowUnit, window_for

SPECS = st.builds(
    WindowSpec,
    unit=st.sampled_from(list(WindowUnit)),
    count=st.integers(1, 3),
    timezone=st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]),
    week_start=st.integers(0, 6),
)
BASE = datetime(2026, 3, 1, tzinfo=UTC)
INSTANTS = st.lists(st.integers(0, 90 * 24 * 3600), min_size=1, max_size=30).map(
    lambda xs: [BASE + timedelta(seconds=x) for x in xs]
)


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(SPECS, min_size=1, max_size=3), instants=INSTANTS)
def test_current_equals_window_for_in_any_order(
    specs: list[WindowSpec], instants: list[datetime]
) -> None:
    for t in instants:
        for spec in specs:
            expected = window_for(spec, t)
            assert windows.current(spec, t) == (expected, int(expected.start.timestamp()))


def test_the_end_of_a_window_belongs_to_the_next() -> None:
    spec = WindowSpec(WindowUnit.DAYS)
    day, _ = windows.current(spec, BASE + timedelta(hours=5))
    assert windows.current(spec, day.end)[0].start == day.end
    assert windows.current(spec, day.end - timedelta(microseconds=1))[0] == day
