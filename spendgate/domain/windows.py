"""Budget windows: calendar-aligned time buckets in an IANA timezone.

A window is ``count`` units (minutes, hours, days, weeks, months) counted from a
fixed origin, so every process computes the same windows without coordination:

* DAYS / WEEKS / MONTHS start at local midnight (of the ``week_start`` weekday
  for weeks, of the 1st for months). Unit indexes count from local 1970-01-01
  (weeks: from the first ``week_start`` weekday on/after it) and window index
  is ``floor(unit_index / count)``, so MONTHS x 3 are calendar quarters and
  MONTHS x 12 calendar years. A local midnight inside a DST gap resolves to the
  first real instant after the gap; an ambiguous one to the earlier instant.
* MINUTES / HOURS boundaries are the instants at which the local wall clock
  reads a multiple of ``count`` units since local 1970-01-01 00:00. A repeated
  (fall-back) hour therefore yields two distinct windows, and boundaries that
  fall in a spring-forward gap are skipped: the window simply runs to the next
  boundary the clock actually reads.

Windows tile time: each instant lies in exactly one ``[start, end)`` and each
window ends where the next starts. Returned datetimes are aware UTC. Stdlib only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MAX_COUNT = 10_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DATE = _EPOCH.date()
_ONE_US = timedelta(microseconds=1)
# Offset changes are searched in slices of this length. tzdata never has two
# changes closer than ~7 days (checked for all zones, 1960-2100), so a slice
# holds at most one change and comparing its endpoints cannot miss a pair.
_SCAN = timedelta(days=1)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class WindowUnit(enum.Enum):
    MINUTES = "MINUTES"
    HOURS = "HOURS"
    DAYS = "DAYS"
    WEEKS = "WEEKS"
    MONTHS = "MONTHS"


_UNIT_MINUTES = {WindowUnit.MINUTES: 1, WindowUnit.HOURS: 60}


class InvalidWindow(ValueError):
    """A WindowSpec field is invalid; ``field`` names it, ``message`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@lru_cache(maxsize=1024)
def _zone(name: str) -> tzinfo:
    """tzinfo for an IANA name (raises like ZoneInfo). "UTC" maps to the fixed
    ``datetime.UTC`` so the common case skips transition handling."""
    if name == "UTC":
        return UTC
    return ZoneInfo(name)


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """``count`` x ``unit`` windows in ``timezone``; validated on construction.

    ``week_start`` (0=Monday .. 6=Sunday, like ``date.weekday()``) only affects
    WEEKS. Raises InvalidWindow with field "count", "timezone" or "week_start".
    """

    unit: WindowUnit
    count: int = 1
    timezone: str = "UTC"
    week_start: int = 0

    def __post_init__(self) -> None:
        # `type() is int` rejects bool: True as a count is a caller bug, not 1.
        if type(self.count) is not int or not 1 <= self.count <= MAX_COUNT:
            raise InvalidWindow(
                "count", f"must be an integer in 1..{MAX_COUNT}, got {self.count!r}"
            )
        if type(self.week_start) is not int or not 0 <= self.week_start <= 6:
            raise InvalidWindow(
                "week_start", f"must be 0 (Monday) .. 6 (Sunday), got {self.week_start!r}"
            )
        try:
            _zone(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError, TypeError) as exc:
            raise InvalidWindow("timezone", f"unknown IANA timezone {self.timezone!r}") from exc


@dataclass(frozen=True, slots=True)
class Window:
    """The half-open interval ``[start, end)``; both aware UTC datetimes."""

    start: datetime
    end: datetime

    def contains(self, t: datetime) -> bool:
        """True iff ``start <= t < end``. ``t`` must be timezone-aware."""
        _require_aware(t)
        return self.start <= t < self.end


def window_for(spec: WindowSpec, now: datetime) -> Window:
    """The window of ``spec`` that contains ``now`` (timezone-aware, any zone).

    Raises ValueError for a naive ``now``. Result satisfies
    ``start <= now < end`` and ``window_for(spec, result.end).start == result.end``.
    """
    _require_aware(now)
    t = now.astimezone(UTC)
    minutes = _UNIT_MINUTES.get(spec.unit)
    if minutes is not None:
        tz = _zone(spec.timezone)
        step = timedelta(minutes=minutes * spec.count)
        return Window(
            _boundary_at_or_before(tz, step, t), _boundary_at_or_after(tz, step, t + _ONE_US)
        )
    k = _unit_index(spec, t.astimezone(_zone(spec.timezone)).date()) // spec.count
    window = _calendar_window(spec, k)
    # The local date almost always picks the right window; it can be off by one
    # only if the clock jumps back across midnight, and boundaries are monotonic
    # in k, so stepping towards `t` is exact.
    while t < window.start:
        k -= 1
        window = _calendar_window(spec, k)
    while t >= window.end:
        k += 1
        window = _calendar_window(spec, k)
    return window


def window_starting_at(spec: WindowSpec, start: datetime) -> Window:
    """The window containing ``start`` (= window_for); recovers an end from a start."""
    return window_for(spec, start)


def describe(spec: WindowSpec) -> str:
    """Human text: "1 day", "15 minutes", "2 weeks (from Monday)", plus " (<tz>)" unless UTC."""
    noun = spec.unit.value.lower().removesuffix("s")
    text = f"{spec.count} {noun}{'' if spec.count == 1 else 's'}"
    if spec.unit is WindowUnit.WEEKS:
        text += f" (from {_WEEKDAYS[spec.week_start]})"
    if spec.timezone != "UTC":
        text += f" ({spec.timezone})"
    return text


def _require_aware(t: datetime) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware, got naive {t!r}")


# --- DAYS / WEEKS / MONTHS -------------------------------------------------


def _week_origin(week_start: int) -> date:
    """First ``week_start`` weekday on/after 1970-01-01 (a Thursday)."""
    return _EPOCH_DATE + timedelta(days=(week_start - _EPOCH_DATE.weekday()) % 7)


def _unit_index(spec: WindowSpec, d: date) -> int:
    """Index of the day/week/month containing local date ``d`` (floor, so pre-1970 works)."""
    if spec.unit is WindowUnit.DAYS:
        return (d - _EPOCH_DATE).days
    if spec.unit is WindowUnit.WEEKS:
        return (d - _week_origin(spec.week_start)).days // 7
    return (d.year - 1970) * 12 + d.month - 1


def _unit_start(spec: WindowSpec, index: int) -> date:
    """Inverse of _unit_index: the first local date of unit ``index``."""
    if spec.unit is WindowUnit.DAYS:
        return _EPOCH_DATE + timedelta(days=index)
    if spec.unit is WindowUnit.WEEKS:
        return _week_origin(spec.week_start) + timedelta(weeks=index)
    years, month0 = divmod(index, 12)
    return date(1970 + years, month0 + 1, 1)


@lru_cache(maxsize=4096)
def _calendar_window(spec: WindowSpec, k: int) -> Window:
    # Cached: per-request lookups hit the same few (spec, k) pairs all window long.
    tz = _zone(spec.timezone)
    return Window(
        _local_midnight(tz, _unit_start(spec, k * spec.count)),
        _local_midnight(tz, _unit_start(spec, (k + 1) * spec.count)),
    )


def _local_midnight(tz: tzinfo, d: date) -> datetime:
    """UTC instant of local midnight on ``d``: earlier instant if ambiguous,
    first instant after the gap if it does not exist."""
    naive = datetime.combine(d, time())
    candidates = sorted(naive.replace(tzinfo=tz, fold=f).astimezone(UTC) for f in (0, 1))
    for instant in candidates:  # earlier first, so an ambiguous midnight gets fold=0
        if _wall(tz, instant) == naive:
            return instant
    # In a gap the two folds map to either side of the transition (PEP 495).
    return _bisect_change(tz, candidates[0], candidates[1])


# --- MINUTES / HOURS, and offset helpers shared with the calendar units ------


def _wall(tz: tzinfo, t: datetime) -> datetime:  # naive local wall-clock reading of `t`
    return t.astimezone(tz).replace(tzinfo=None)


def _offset(tz: tzinfo, t: datetime) -> timedelta:
    return _wall(tz, t) - t.replace(tzinfo=None)


def _boundary_at_or_before(tz: tzinfo, step: timedelta, t: datetime) -> datetime:
    """Latest instant <= t at which the wall clock reads a multiple of ``step``."""
    while True:
        candidate = t - (t + _offset(tz, t) - _EPOCH) % step
        change = _change_in(tz, candidate, t, latest=True)
        if change is None:
            return candidate
        # No boundary in [change, t] under this offset; continue in the previous one.
        t = change - _ONE_US


def _boundary_at_or_after(tz: tzinfo, step: timedelta, t: datetime) -> datetime:
    """Earliest instant >= t at which the wall clock reads a multiple of ``step``."""
    while True:
        candidate = t + (_EPOCH - t - _offset(tz, t)) % step
        change = _change_in(tz, t, candidate, latest=False)
        if change is None:
            return candidate
        # The offset changed before the clock reached `candidate`; re-aim from there
        # (the change instant itself may be a boundary, e.g. 03:00 after 01:59:59).
        t = change


def _change_in(tz: tzinfo, lo: datetime, hi: datetime, *, latest: bool) -> datetime | None:
    """The latest (or earliest) UTC-offset change instant in ``(lo, hi]``, or None."""
    if isinstance(tz, timezone):  # fixed offset (e.g. UTC): nothing to find
        return None
    # Walk _SCAN-sized slices from the end we care about; the first slice whose
    # endpoint offsets differ holds the wanted change.
    while lo < hi:
        a, b = (max(lo, hi - _SCAN), hi) if latest else (lo, min(hi, lo + _SCAN))
        if _offset(tz, a) != _offset(tz, b):
            return _bisect_change(tz, a, b)
        lo, hi = (lo, a) if latest else (b, hi)
    return None


def _bisect_change(tz: tzinfo, lo: datetime, hi: datetime) -> datetime:
    """The offset change instant in ``(lo, hi]``; offsets at lo and hi must differ
    and exactly one change may lie between (guaranteed by ``_SCAN``)."""
    before = _offset(tz, lo)
    while hi - lo > _ONE_US:
        mid = lo + (hi - lo) // 2
        if _offset(tz, mid) == before:
            lo = mid
        else:
            hi = mid
    return hi
