"""`make bench`'s paced streams, in a tiny configuration: the harness streams
through plain Envoy, the protocol floor and spendgate, counts every event and
prints the side-by-side table. No timing is asserted (the numbers are the
benchmark's business); the counts and the table's shape are."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import paced, topology
from bench.__main__ import paced_streams, paced_targets

EVENTS = 6
# The role event, one per word, the stop event and [DONE]; through spendgate the
# usage event ext_proc asks for comes too.
PLAIN_EVENTS = EVENTS + 3


@pytest.fixture(scope="module")
def topo() -> Iterator[topology.Topology]:
    t = topology.start()
    try:
        topology.load_policies(t.cp_address, count=8)
        yield t
    finally:
        t.stop()


def test_every_event_of_every_stream_arrives_and_is_timed(topo: topology.Topology) -> None:
    plain, floor, sg = (
        paced.measure(t, concurrency=2, streams=3, events=EVENTS, delay_ms=1)
        for t in paced_targets(topo)
    )
    for m, per_stream in ((plain, PLAIN_EVENTS), (floor, PLAIN_EVENTS), (sg, PLAIN_EVENTS + 1)):
        r = m.result
        assert (m.target.name, r.streams, r.errors, r.events) == (
            m.target.name,
            3,
            0,
            3 * per_stream,
        )
        assert len(r.ttfb_ms) == 3
        assert len(r.transit_ms) == r.events
        assert len(r.gap_ms) == r.events - 3
        assert all(t >= 0 for t in r.transit_ms)
    assert plain.target.ext_proc_pids == ()
    assert len(sg.target.ext_proc_pids) == 1


def test_quick_mode_prints_both_runs_side_by_side(topo: topology.Topology) -> None:
    out = paced_streams(topo, quick=True)
    titles = [line for line in out if line.startswith("paced streams:")]
    assert titles == [
        "paced streams: 4 streams, 4 at a time, 20 events 2 ms apart",
        "paced streams: 4 streams, 4 at a time, 50 events 2 ms apart",
    ]
    header = out[1].split()
    assert header == ["plain", "floor", "spendgate", "+floor", "+spendgate"]
    labels = {line[:30].strip() for line in out if not line.startswith("paced")}
    assert labels >= {
        "streams (errors)",
        "time to first byte p50 ms",
        "time per event p99 ms",
        "time between events p99 ms",
        "Envoy CPU µs / event",
        "ext_proc CPU µs / event",
        "streams/s per ext_proc core",
    }
    assert [line.split()[2:5] for line in out if line.startswith("streams (errors)")] == [
        ["4", "(0)", "4"],
        ["4", "(0)", "4"],
    ]


def test_percentiles_of_short_lists() -> None:
    assert paced.pct([], 50) == 0.0
    assert paced.pct([3.0], 99) == 3.0
    assert paced.pct([float(i) for i in range(1, 102)], 50) == 51.0
