"""Chargeback rollups in the data plane's LocalState: summed per key, carried
by usage batches within their record and byte bounds, journaled, split and
quarantined like spend increments (ext_proc/sync/rollups.py, state.py)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

from ext_proc.sync import rollups
from ext_proc.sync.journal import Journal
from ext_proc.sync.rollups import RollupKey, RollupSums
from ext_proc.sync.state import MAX_BATCH_RECORDS, Batch, LocalState
from spendgate.domain.policies import RequestFacts

NOW = datetime(2025, 3, 10, 12, 30, 5, tzinfo=UTC)
HOUR = int(datetime(2025, 3, 10, 12, tzinfo=UTC).timestamp())


def facts(user: str = "alice", **tags: str) -> RequestFacts:
    return RequestFacts(
        route="openai",
        user=user,
        api_key_hash="h" * 64,
        workspace="ws",
        provider="openai",
        model="gpt-4o",
        tags=tags,
    )


def key(user: str = "alice", **tags: str) -> RollupKey:
    return rollups.key_of(facts(user, **tags), "GPT-4o", NOW)


def sums(cost: int, inp: int = 10, out: int = 5, estimated: int = 0) -> RollupSums:
    return RollupSums(cost, inp, out, 1, estimated)


def everything(state: LocalState) -> dict[RollupKey, RollupSums]:
    """Every rollup the in-flight batches carry, summed."""
    total: dict[RollupKey, RollupSums] = {}
    for b in state.in_flight.values():
        for k, s in b.rollups.items():
            total.setdefault(k, RollupSums()).add(s)
    return total


def test_key_is_the_hour_and_normalised_dimensions() -> None:
    assert key(team="red", env="prod") == (
        HOUR,
        "openai",
        "openai",
        "gpt-4o",
        "alice",
        "ws",
        "h" * 64,
        (("env", "prod"), ("team", "red")),
    )


def test_responses_sum_per_key_and_ride_a_batch_without_any_policy() -> None:
    state = LocalState()
    state.record_rollup(key(), sums(100))
    state.record_rollup(key(), sums(20, estimated=1))
    state.record_rollup(key("bob", team="red"), sums(3))
    batch = state.take_batch()
    assert batch is not None and not batch.increments
    msg = batch.message("dp-1")
    got = {(r.user, tuple(sorted(r.tags.items()))): r for r in msg.rollups}
    alice = got[("alice", ())]
    assert (alice.hour, alice.model, alice.cost_nanos, alice.input_tokens) == (
        HOUR,
        "gpt-4o",
        120,
        20,
    )
    assert (alice.output_tokens, alice.request_count, alice.estimated_count) == (10, 2, 1)
    assert got[("bob", (("team", "red"),))].cost_nanos == 3
    assert state.unsent_count() == 2
    assert state.take_batch() is None


def test_many_distinct_users_make_more_batches_never_larger_ones() -> None:
    state = LocalState(max_batch_bytes=64 * 1024)
    n = MAX_BATCH_RECORDS + 500
    for i in range(n):
        state.record_rollup(key(f"user-{i}"), sums(i))
    state.take_batch()
    assert len(state.in_flight) > 2
    for b in state.in_flight.values():
        assert b.records <= MAX_BATCH_RECORDS
        assert b.message("dp-1").ByteSize() <= 64 * 1024
    total = everything(state)
    assert len(total) == n
    assert sum(s.cost_nanos for s in total.values()) == n * (n - 1) // 2


def test_batches_are_journaled_with_their_rollups_and_replayed(tmp_path: Path) -> None:
    state = LocalState(journal=Journal(tmp_path))
    assert state.journal is not None
    state.journal.open()
    state.record_rollup(key(), sums(5))
    first = state.take_batch()
    state.record_rollup(key(), sums(7))
    state.record_rollup(key("bob"), sums(1))
    assert state.take_batch() is first  # never sent: extended, journaled in parts
    state.journal.close()

    again = Journal(tmp_path)
    replayed = [Batch.from_message(m) for m in again.open()]
    again.close()
    assert len(replayed) == 1 and first is not None
    assert replayed[0].batch_id == first.batch_id
    assert replayed[0].rollups == {key(): RollupSums(12, 20, 10, 2, 0), key("bob"): sums(1)}


def test_split_and_quarantine_cover_rollups(tmp_path: Path) -> None:
    state = LocalState()
    for i in range(7):
        state.record_rollup(key(f"u{i}"), sums(1))
    batch = state.take_batch()
    assert batch is not None
    halves = state.split(batch, "h")
    assert [b.records for b in halves] == [3, 4]
    assert len(everything(state)) == 7
    single = state.split(halves[0], "h")[0]
    assert single.records == 1
    state.quarantine_batch(single, "refused", "INVALID_ARGUMENT: test")
    reports = state.quarantine.pending or [
        r for b in state.in_flight.values() for r in b.quarantined
    ]
    assert len(reports) == 1
    assert reports[0].member == "rollup user=u0 model=gpt-4o route=openai"
    assert reports[0].cost_nanos == 1
    assert len(everything(state)) == 6


def test_a_long_route_name_is_bounded_and_stays_distinct() -> None:
    long_a, long_b = "r" * 300 + "a", "r" * 300 + "b"
    a = rollups.key_of(dataclasses.replace(facts(), route=long_a), "m", NOW)[1]
    b = rollups.key_of(dataclasses.replace(facts(), route=long_b), "m", NOW)[1]
    assert len(a) == len(b) == rollups.MAX_VALUE_CHARS and a != b
    assert a.startswith("r" * 200)
    assert rollups.key_of(facts(), "m", NOW)[1] == "openai"
