"""A data plane's view of holds across data planes (ext_proc.sync.state.LocalState):
the other data planes' holds count as spent, its own never twice, the newest
report of each wins whatever path it came by, and a silent one's lapse."""

from __future__ import annotations

from datetime import UTC, datetime

from ext_proc.sync.state import Increment, LocalState
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

USD = 10**9
DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
DAY_END = DAY_START + 86400
KEY = ("daily", "", DAY_START)


class Clock:
    """Unix seconds the test moves by hand."""

    def __init__(self, now: float = DAY_START + 5) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_state(clock: Clock | None = None) -> LocalState:
    return LocalState(identity="me", clock=clock or Clock())


def window(*holds: tuple[str, int, int], spent: int = 0, expires: int = DAY_END) -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id=KEY[0],
        member=KEY[1],
        window_start=timestamp(DAY_START),
        window_end=timestamp(DAY_END),
        spent_nanos=spent,
        holds=[
            dp.DataPlaneHold(data_plane_id=d, held_nanos=n, seq=seq, expire_time=timestamp(expires))
            for d, n, seq in holds
        ],
    )


def test_other_data_planes_holds_count_and_our_own_report_does_not() -> None:
    state = new_state()
    state.reserve([(KEY, USD)])
    state.merge_spend([window(("me", USD, 5), ("b", 2 * USD, 7), spent=3 * USD)])
    # 3 spent + b's 2 held + our own 1 held (counted locally, not from the report)
    assert state.spent(KEY) == 6 * USD


def test_the_newest_report_of_each_data_plane_wins() -> None:
    state = new_state()
    state.merge_spend([window(("b", 5 * USD, 10), ("c", USD, 3))])
    state.merge_spend([window(("b", 9 * USD, 4))])  # older news of b, by another path
    assert state.spent(KEY) == 6 * USD
    state.merge_spend([window(("b", 0, 11), ("c", 2 * USD, 4))])
    assert state.spent(KEY) == 2 * USD


def test_a_silent_data_planes_holds_lapse_when_they_expire() -> None:
    state = new_state()
    state.merge_spend([window(("b", 5 * USD, 1), expires=DAY_START + 60)])
    state.merge_spend([window(("c", USD, 1))])
    assert state.spent(KEY) == 6 * USD
    state.prune(datetime.fromtimestamp(DAY_START + 61, UTC))
    assert state.spent(KEY) == USD


def test_a_silent_data_planes_holds_stop_counting_at_expiry_without_any_update() -> None:
    """A dead data plane sends nothing more, and nothing else may arrive:
    counting itself looks at the expiry, by the injected clock."""
    clock = Clock()
    state = new_state(clock)
    state.merge_spend([window(("dead", 5 * USD, 1), spent=USD, expires=DAY_START + 30)])
    state.merge_spend([window(("alive", 2 * USD, 1), spent=USD, expires=DAY_START + 60)])
    assert state.spent(KEY) == 8 * USD
    assert state.held(KEY) == (7 * USD, 0)
    clock.now = DAY_START + 29.9
    assert state.spent(KEY) == 8 * USD
    assert state.held_elsewhere() == 7 * USD
    clock.now = DAY_START + 30
    assert state.held_elsewhere() == 2 * USD  # a metrics read sees the expiry too
    assert state.spent(KEY) == 3 * USD  # no update, no prune: the expiry alone
    assert state.held(KEY) == (2 * USD, 0)
    clock.now = DAY_START + 60
    assert state.spent(KEY) == USD and state.held(KEY) == (0, 0)
    assert state.holds_remote[KEY] == {}


def test_a_refreshed_hold_keeps_counting_past_its_first_expiry() -> None:
    clock = Clock()
    state = new_state(clock)
    state.merge_spend([window(("b", 2 * USD, 1), expires=DAY_START + 30)])
    clock.now = DAY_START + 25
    state.merge_spend([window(("b", 2 * USD, 2), expires=DAY_START + 55)])  # refreshed
    clock.now = DAY_START + 40
    assert state.spent(KEY) == 2 * USD
    clock.now = DAY_START + 55
    assert state.spent(KEY) == 0


def test_held_tells_running_requests_here_and_elsewhere_from_spend() -> None:
    state = new_state()
    state.pending[KEY] = Increment(cost_nanos=USD, requests=1)  # spent, not yet sent
    state.reserve([(KEY, 3 * USD)])
    state.reserve([(KEY, 2 * USD), (("other", "", DAY_START), USD)])
    msg = window(("b", 4 * USD, 1), spent=10 * USD)
    msg.holds[0].requests = 2
    state.merge_spend([msg])
    assert state.spent(KEY) == 20 * USD
    assert state.held(KEY) == (9 * USD, 4)
    assert state.holding_requests == 2
    holds, _ = state.hold_report([KEY])
    assert [(h.held_nanos, h.requests) for h in holds] == [(6 * USD, 2)]
    state.release([(KEY, 3 * USD)])
    assert state.held(KEY) == (6 * USD, 3) and state.holding_requests == 1


def test_a_full_snapshot_replaces_what_was_known() -> None:
    state = new_state()
    state.merge_spend([window(("b", 5 * USD, 1))])
    state.apply_update(
        dp.StateUpdate(full_snapshot=True, spend=[window(("c", USD, 1))]),
        datetime.fromtimestamp(DAY_START + 5, UTC),
    )
    assert state.spent(KEY) == USD


def test_our_hold_report_counts_running_requests_and_unapplied_usage() -> None:
    state = new_state()
    state.reserve([(KEY, 3 * USD)])
    state.pending[KEY] = Increment(cost_nanos=USD, requests=1)
    sent = state.take_batch()
    assert sent is not None
    state.pending[KEY] = Increment(cost_nanos=2 * USD, requests=1)
    holds, unapplied = state.hold_report()
    assert [(h.policy_id, h.held_nanos) for h in holds] == [("daily", 6 * USD)]
    assert [(b.batch_id, [u.held_nanos for u in b.usage]) for b in unapplied] == [
        (sent.batch_id, [USD])
    ]
    # The report that goes with the batch itself leaves the batch out.
    holds, unapplied = state.hold_report(skip=sent)
    assert holds[0].held_nanos == 5 * USD and unapplied == []


OTHER = ("weekly", "", DAY_START)


def test_a_batch_named_applied_by_a_reports_answer_stops_counting_on_its_windows() -> None:
    """A Reserve (or holds report) named an in-flight batch as unapplied; the
    control plane had applied it, and its answer's totals include it. Those
    windows count it once (in the total), not also as unsent, from that
    answer on; the batch's other windows keep it until its own answer."""
    state = new_state()
    state.pending[KEY] = Increment(cost_nanos=2 * USD, requests=1)
    state.pending[OTHER] = Increment(cost_nanos=3 * USD, requests=1)
    sent = state.take_batch()
    assert sent is not None and state.spent(KEY) == 2 * USD
    state.take_totals([window(spent=2 * USD)], [sent.batch_id])
    assert state.spent(KEY) == 2 * USD  # not 4: the total includes the batch
    assert state.spent(OTHER) == 3 * USD  # no total of it yet: still counted
    assert sent.batch_id in state.in_flight
    # Named no more in reports on that window: the hold does not count it.
    holds, unapplied = state.hold_report([KEY])
    assert [h.held_nanos for h in holds] == [0] and unapplied == []
    holds, unapplied = state.hold_report([OTHER])
    assert [h.held_nanos for h in holds] == [3 * USD]
    assert [b.batch_id for b in unapplied] == [sent.batch_id]
    # With the total of its last window (here by the state stream) it is gone.
    other_total = dp.WindowSpend(
        policy_id=OTHER[0],
        window_start=timestamp(DAY_START),
        window_end=timestamp(DAY_START + 7 * 86400),
        spent_nanos=3 * USD,
    )
    state.apply_update(
        dp.StateUpdate(
            spend=[other_total],
            applied_batches=[
                dp.AppliedBatch(data_plane_id="someone-else", batch_id="theirs"),
                dp.AppliedBatch(data_plane_id="me", batch_id=sent.batch_id),
            ],
        ),
        datetime.fromtimestamp(DAY_START + 5, UTC),
    )
    assert state.in_flight == {}
    assert (state.spent(KEY), state.spent(OTHER)) == (2 * USD, 3 * USD)


def test_a_reports_total_that_may_count_a_batch_made_since_is_not_taken() -> None:
    """A Reserve is built while $2 of usage is pending; the usage then goes
    out as a batch, which the control plane may apply before the Reserve.
    The Reserve's answer then carries a total that counts the batch, still
    ours to count until its answer or its mark on the state stream: that
    window's total waits for them (else $2 counts twice). Other windows'
    totals are taken."""
    state = new_state()
    state.pending[KEY] = Increment(cost_nanos=2 * USD, requests=1)
    known = set(state.in_flight)  # the Reserve is built: no batch yet
    sent = state.take_batch()
    assert sent is not None
    other_total = dp.WindowSpend(
        policy_id=OTHER[0],
        window_start=timestamp(DAY_START),
        window_end=timestamp(DAY_START + 7 * 86400),
        spent_nanos=5 * USD,
    )
    state.take_totals([window(spent=2 * USD), other_total], [], known)
    assert state.spent(KEY) == 2 * USD  # not 4
    assert state.spent(OTHER) == 5 * USD
    state.apply_update(
        dp.StateUpdate(
            spend=[window(spent=2 * USD)],
            applied=dp.AppliedBatch(data_plane_id="me", batch_id=sent.batch_id),
        ),
        datetime.fromtimestamp(DAY_START + 5, UTC),
    )
    assert state.spent(KEY) == 2 * USD and state.in_flight == {}


def test_an_applied_batch_named_for_windows_it_does_not_touch_stays() -> None:
    state = new_state()
    state.pending[OTHER] = Increment(cost_nanos=3 * USD, requests=1)
    sent = state.take_batch()
    assert sent is not None
    state.take_totals([window(spent=USD)], [sent.batch_id, "unknown-batch"])
    assert list(state.in_flight) == [sent.batch_id] and state.spent(OTHER) == 3 * USD


def test_a_window_reported_at_zero_is_no_longer_reported() -> None:
    state = new_state()
    state.reserve([(KEY, USD)])
    state.release([(KEY, USD)])
    assert state.holds_dirty
    holds, _ = state.hold_report()
    assert [h.held_nanos for h in holds] == [0] and not state.holds_dirty
    assert state.hold_report() == ([], [])


def test_report_order_is_strictly_increasing() -> None:
    state = new_state()
    seqs = [state.next_seq() for _ in range(1000)]
    assert seqs == sorted(set(seqs))
