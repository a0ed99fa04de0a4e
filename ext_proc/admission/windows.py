"""``window_for`` on the request path, remembered.

Every metered request looks up the window of each policy it matches several
times (admission, reservation, charge). Windows partition time, so the window
of a spec found for one instant is the answer for every instant inside it:
the last one per spec is kept and reused while ``now`` falls in it, which is
exact (a clock that jumps, forwards or back, just misses and recomputes).
ext_proc runs one event loop, so a plain dict serves.
"""

from __future__ import annotations

from datetime import datetime

from spendgate.domain.windows import Window, WindowSpec, window_for

_MAX_SPECS = 1024  # distinct specs remembered; far above any real policy set
_last: dict[WindowSpec, tuple[Window, int]] = {}


def current(spec: WindowSpec, now: datetime) -> tuple[Window, int]:
    """The window of ``spec`` containing ``now``, and its start in epoch seconds
    (the key that spend is kept under)."""
    hit = _last.get(spec)
    # Compared directly, not with Window.contains: its awareness check costs
    # four times the rest (ext_proc's clock is always UTC-aware).
    if hit is not None and hit[0].start <= now < hit[0].end:
        return hit
    window = window_for(spec, now)
    if len(_last) >= _MAX_SPECS:
        _last.clear()
    hit = _last[spec] = (window, int(window.start.timestamp()))
    return hit
