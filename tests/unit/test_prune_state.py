"""Forgetting ended windows (LocalState.prune, ext_proc/sync/remote.py): the
work is what ended, never what is known; many windows ending together are
deleted in slices, unseen from the moment they end; and the indexes agree
with the windows through every way they are written."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.config import Settings
from ext_proc.sync.client import ControlPlaneSync
from ext_proc.sync.remote import RemoteWindows
from ext_proc.sync.state import PRUNE_SLICE, LocalState
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
DAY_END = DAY_START + 86400
WEEK_END = DAY_START + 7 * 86400


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def spend(
    policy: str,
    member: str,
    end: int,
    nanos: int,
    *,
    start: int = DAY_START,
    seq: int = 0,
    holds: tuple[tuple[str, int, int, int], ...] = (),
) -> dp.WindowSpend:
    """A window total; ``holds``: (data plane, nanos, seq, expiry) each."""
    return dp.WindowSpend(
        policy_id=policy,
        member=member,
        window_start=timestamp(start),
        window_end=timestamp(end),
        spent_nanos=nanos,
        adjustment_seq=seq,
        holds=[
            dp.DataPlaneHold(
                data_plane_id=d, held_nanos=n, seq=s, expire_time=timestamp(x), requests=1
            )
            for d, n, s, x in holds
        ],
    )


def members(policy: str, n: int, end: int) -> list[dp.WindowSpend]:
    return [spend(policy, f"m{i}", end, i + 1) for i in range(n)]


class Watched(dict[Any, Any]):
    """A dict that counts every walk over it and every deletion from it."""

    touched = 0

    def _touch(self) -> None:
        type(self).touched += 1

    def __iter__(self) -> Iterator[Any]:
        self._touch()
        return super().__iter__()

    def items(self) -> Any:
        self._touch()
        return super().items()

    def keys(self) -> Any:
        self._touch()
        return super().keys()

    def values(self) -> Any:
        self._touch()
        return super().values()

    def __delitem__(self, key: Any) -> None:
        self._touch()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self._touch()
        return super().pop(*args)


def test_a_prune_with_nothing_ended_touches_no_window() -> None:
    state = LocalState(clock=lambda: DAY_START + 5)
    state.replace_view((), (), members("daily", 1000, DAY_END), utc(DAY_START + 1))
    state.merge_spend([spend("daily", "m1", DAY_END, 9, holds=(("b", 5, 1, DAY_START + 60),))])
    w = state.windows
    w.totals, w.seqs, w.holds = Watched(w.totals), Watched(w.seqs), Watched(w.holds)
    w.held_others, w.held_others_until = Watched(w.held_others), Watched(w.held_others_until)
    Watched.touched = 0
    for t in (DAY_START + 10, DAY_START + 59, DAY_END - 1):
        state.prune(utc(t))
    assert Watched.touched == 0
    assert len(state.remote) == 1000 and not state.pruning
    # The hold that expires is looked at when it does, by its key: no walk.
    state.prune(utc(DAY_START + 60))
    assert state.holds_remote["daily", "m1", DAY_START] == {}
    assert state.windows.held_others_until["daily", "m1", DAY_START] == 0
    assert Watched.touched == 0


def test_a_boundary_deletes_in_slices_and_ended_windows_never_count() -> None:
    n = 3 * PRUNE_SLICE + 7
    state = LocalState(clock=lambda: DAY_END - 10)
    ended = members("daily", n, DAY_END)
    ended[0].holds.append(
        dp.DataPlaneHold(
            data_plane_id="b", held_nanos=50, seq=1, expire_time=timestamp(WEEK_END), requests=1
        )
    )
    state.replace_view((), (), [*ended, *members("weekly", 3, WEEK_END)], utc(DAY_START))
    first = ("daily", "m0", DAY_START)
    assert state.spent(first) == 1 + 50 and state.held(first) == (50, 1)
    deleted = Watched(state.windows.totals)
    state.windows.totals = deleted
    Watched.touched = 0

    state.prune(utc(DAY_END))
    slices = [Watched.touched]
    for _ in range(10):
        # Between slices: nothing of the ended day counts, the week does.
        assert state.spent(first) == 0 and state.held(first) == (0, 0)
        assert state.spent(("daily", f"m{n - 1}", DAY_START)) == 0
        assert [state.spent(("weekly", f"m{i}", DAY_START)) for i in range(3)] == [1, 2, 3]
        assert state.held_elsewhere() == 0
        if not state.pruning:
            break
        Watched.touched = 0
        assert state.prune_more() is (sum(slices) + PRUNE_SLICE < n)
        slices.append(Watched.touched)
    assert slices == [PRUNE_SLICE, PRUNE_SLICE, PRUNE_SLICE, 7]
    weekly = {("weekly", f"m{i}", DAY_START): (i + 1, WEEK_END) for i in range(3)}
    assert dict(state.remote) == weekly
    assert state.holds_remote == {} and state.windows.held_others == {}
    assert_consistent(state.windows)


def test_a_snapshot_taken_between_slices_leaves_the_ended_windows_out() -> None:
    state = LocalState(prune_slice=10)
    state.replace_view((), (), members("daily", 25, DAY_END) + members("w", 2, WEEK_END), utc(0))
    state.prune(utc(DAY_END))
    assert state.pruning
    assert set(state.snapshot_parts().spend) == {("w", "m0", DAY_START), ("w", "m1", DAY_START)}


def test_a_late_total_of_an_ended_window_is_unseen_and_pruned_next_time() -> None:
    state = LocalState()
    state.merge_spend([spend("daily", "", DAY_END, 10)])
    state.prune(utc(DAY_END))
    assert state.remote == {}
    key = ("daily", "", DAY_START)
    state.merge_spend([spend("daily", "", DAY_END, 12)])  # e.g. the ack of the day's last batch
    assert state.spent(key) == 0
    state.prune(utc(DAY_END + 1))
    assert state.remote == {}
    assert_consistent(state.windows)


async def test_the_sync_client_prunes_in_slices_and_the_loop_runs_between() -> None:
    """ControlPlaneSync.prune (run every second by the save-snapshot task)."""
    state = LocalState(prune_slice=100)
    state.replace_view((), (), members("daily", 1000, DAY_END), utc(DAY_START))
    sync = ControlPlaneSync(
        Settings(data_plane_token="data-plane-token-0123", control_plane="127.0.0.1:1"),
        state,
        lambda: utc(DAY_END),
    )
    seen: list[int] = []  # windows left, each time another callback of the loop ran
    stop = False

    def tick() -> None:
        seen.append(len(state.remote))
        if not stop:
            asyncio.get_running_loop().call_soon(tick)

    tick()
    await sync.prune()
    stop = True
    await sync._channel.close()
    assert state.remote == {} and not state.pruning
    # The loop ran between the slices: it saw 900, 800, ... windows left.
    assert set(range(100, 1000, 100)) <= set(seen)


# ---- the indexes against a brute-force model -------------------------------


def assert_consistent(w: RemoteWindows) -> None:
    """Every window is indexed under its end (or waits in ``ending``,
    ended); every window with holds under its first hold's expiry. The
    indexes may also hold keys whose time changed or that are gone: checked
    when their time comes."""
    indexed = set(w.ends.items())
    ending = {k for bucket in w.ending for k in bucket if k is not None}
    for key, (_, end) in w.totals.items():
        assert (key, end) in indexed or (key in ending and end <= w.ended_at)
    assert sorted(w.ends.times()) == sorted({at for _, at in indexed})
    assert set(w.holds) <= set(w.totals)
    assert set(w.held_others) == set(w.holds) == set(w.held_others_until)
    expiring = set(w.expiries.items())
    assert all((k, u) in expiring for k, u in w.held_others_until.items() if u)


@dataclass
class Model:
    """What LocalState did before its indexes, walking everything: totals
    merged by the same rules, and a prune at t deletes every window ending at
    or before t (or an earlier prune's t: time never goes back for windows).
    A late total of a window that ended is not seen (deleted at the next
    prune), and never blocks a total of the same key with a later end."""

    totals: dict[tuple[str, str, int], tuple[int, int]] = field(default_factory=dict)
    seqs: dict[tuple[str, str, int], int] = field(default_factory=dict)
    holds: dict[tuple[str, str, int], dict[str, tuple[int, int, int]]] = field(default_factory=dict)
    ended_at: float = 0

    def merge(self, msgs: list[dp.WindowSpend], now: float) -> None:
        for ws in msgs:
            key = (ws.policy_id, ws.member, ws.window_start.seconds)
            if key in self.totals and self.totals[key][1] <= self.ended_at:
                self.forget(key)  # a late total of an ended window: gone at once
            old, known = self.totals.get(key), self.seqs.get(key, 0)
            seq = ws.adjustment_seq
            if seq > known or (seq == known and (old is None or ws.spent_nanos >= old[0])):
                self.totals[key] = (ws.spent_nanos, ws.window_end.seconds)
                if seq:
                    self.seqs[key] = seq
            if not ws.holds and key not in self.holds:
                continue
            mine = self.holds.setdefault(key, {})
            for h in ws.holds:
                if h.data_plane_id != "me":
                    was = mine.get(h.data_plane_id)
                    if was is None or h.seq >= was[0]:
                        mine[h.data_plane_id] = (h.seq, h.held_nanos, h.expire_time.seconds)
            # Expired holds are forgotten when a window's holds are counted.
            for d in [d for d, h in mine.items() if h[2] <= now]:
                del mine[d]

    def forget(self, key: tuple[str, str, int]) -> None:
        del self.totals[key]
        self.seqs.pop(key, None)
        self.holds.pop(key, None)

    def prune(self, t: float) -> None:
        self.ended_at = max(self.ended_at, t)
        for key in [k for k, v in self.totals.items() if v[1] <= self.ended_at]:
            self.forget(key)
        for known in self.holds.values():
            for d in [d for d, h in known.items() if h[2] <= t]:
                del known[d]

    def spent(self, key: tuple[str, str, int], now: float) -> tuple[int, int, int]:
        """(spent, held nanos, held requests) of a window not ended, else zeros."""
        total = self.totals.get(key)
        if total is None or total[1] <= self.ended_at:
            return 0, 0, 0
        live = [h for h in self.holds.get(key, {}).values() if h[2] > now]
        held = sum(h[1] for h in live)
        # held() counts the requests of holds only when they hold something.
        return total[0] + held, held, len(live) if held else 0


T0 = DAY_START
KEYS = [(p, m, T0 + s) for p in ("a", "b") for m in ("", "x") for s in (0, 60)]
hold_st = st.tuples(
    st.sampled_from(["dp1", "dp2", "me"]),
    st.integers(0, 50),
    st.just(0),  # numbered by the test
    st.sampled_from([T0 + 15, T0 + 35, T0 + 200]),
)
window_st = st.builds(
    lambda key, end, nanos, seq, holds: spend(
        key[0], key[1], end, nanos, start=key[2], seq=seq, holds=tuple(holds)
    ),
    st.sampled_from(KEYS),
    st.sampled_from([T0 + 20, T0 + 40, T0 + 100]),
    st.integers(0, 100),
    st.integers(0, 2),
    st.lists(hold_st, max_size=2),
)
op_st = st.one_of(
    st.tuples(st.just("merge"), st.lists(window_st, max_size=5)),
    st.tuples(st.just("resync"), st.lists(window_st, max_size=5)),
    st.tuples(st.just("prune"), st.sampled_from([T0 + 10 * i for i in range(12)])),
    st.tuples(st.just("more"), st.none()),
    st.tuples(st.just("clock"), st.integers(0, 30)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op_st, max_size=30))
def test_the_indexes_follow_every_write(ops: list[tuple[str, Any]]) -> None:
    clock = [float(T0)]
    state = LocalState(identity="me", clock=lambda: clock[0], prune_slice=2)
    model = Model()
    numbers = itertools.count(1)
    for op, arg in ops:
        # Reports numbered upwards, as data planes number them (holds arriving
        # out of order: test_holds_state.py); an expired report's number
        # would otherwise matter only until a read forgets it.
        for ws in arg if op in ("merge", "resync") else ():
            for h in ws.holds:
                h.seq = next(numbers)
        if op == "merge":
            state.merge_spend(arg)
            model.merge(arg, clock[0])
        elif op == "resync":
            state.replace_view((), (), arg, utc(clock[0]))
            model = Model(ended_at=model.ended_at)
            model.merge(arg, clock[0])
            model.prune(clock[0])
        elif op == "prune":
            state.prune(utc(arg))
            model.prune(arg)
        elif op == "more":
            state.prune_more()
        else:
            clock[0] += arg
        assert_consistent(state.windows)
        for key in KEYS:
            spent, nanos, requests = model.spent(key, clock[0])
            assert (state.spent(key), state.held(key)) == (spent, (nanos, requests)), key
        visible = {k: v for k, v in state.remote.items() if v[1] > model.ended_at}
        assert visible == {k: v for k, v in model.totals.items() if v[1] > model.ended_at}
    # Pruned again and drained, nothing ended is left.
    state.prune(utc(model.ended_at))
    while state.prune_more():
        pass
    model.prune(model.ended_at)
    assert state.remote == model.totals
    assert_consistent(state.windows)
