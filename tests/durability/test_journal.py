"""The usage journal: format, replay, acks, compaction and damaged tails."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from ext_proc.sync.journal import (
    FILE_NAME,
    HEADER,
    Journal,
    JournalError,
    encode_ack,
    encode_batch,
    scan,
)
from ext_proc.sync.state import Batch, Increment, LocalState
from spendgate.domain.policies import Action, Policy, Scope
from spendgate.domain.windows import WindowSpec, WindowUnit
from spendgate.v1 import dataplane_pb2 as dp

NOW = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
DAILY = Policy("daily", "daily", 10**10, WindowSpec(WindowUnit.DAYS), Action.REJECT, Scope.GLOBAL)
KEY = ("daily", "", DAY_START)


def batch(batch_id: str, cost: int) -> dp.ReportUsageRequest:
    return Batch(batch_id, {KEY: Increment(cost, 1, 0)}).message("")


def open_journal(path: Path) -> tuple[Journal, list[dp.ReportUsageRequest]]:
    j = Journal(path)
    return j, j.open()


def test_append_then_replay_keeps_ids_and_sums_parts(tmp_path: Path) -> None:
    j, replayed = open_journal(tmp_path)
    assert replayed == []
    j.append(batch("b1", 5))
    j.append(batch("b2", 7))
    j.append(batch("b1", 3))  # b1 extended before it was sent
    j.close()
    j, replayed = open_journal(tmp_path)
    assert [m.batch_id for m in replayed] == ["b1", "b2"]
    assert Batch.from_message(replayed[0]).increments == {KEY: Increment(8, 2, 0)}
    assert Batch.from_message(replayed[1]).increments == {KEY: Increment(7, 1, 0)}
    j.close()


def test_acknowledged_batches_are_not_replayed_and_the_file_empties(tmp_path: Path) -> None:
    j, _ = open_journal(tmp_path)
    j.append(batch("b1", 5))
    j.append(batch("b2", 7))
    j.acknowledge("b1")
    j.close()
    j, replayed = open_journal(tmp_path)
    assert [m.batch_id for m in replayed] == ["b2"]
    j.acknowledge("b2")
    assert (tmp_path / FILE_NAME).stat().st_size == 0
    j.close()
    j, replayed = open_journal(tmp_path)
    assert replayed == []
    j.close()


def test_compaction_keeps_only_live_batches(tmp_path: Path) -> None:
    j = Journal(tmp_path, compact_bytes=200)
    j.open()
    for n in range(10):
        j.append(batch(f"b{n}", n))
    j.acknowledge("b0")
    assert j.needs_compaction()
    j.compact([batch("b9", 9)])
    assert j.size == (tmp_path / FILE_NAME).stat().st_size == len(encode_batch(batch("b9", 9)))
    j.append(batch("b10", 10))
    j.close()
    j, replayed = open_journal(tmp_path)
    assert [m.batch_id for m in replayed] == ["b9", "b10"]
    j.close()


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size, HEADER.size + 3])
def test_truncated_tail_is_ignored_and_cut_off(tmp_path: Path, cut: int) -> None:
    good = encode_batch(batch("b1", 5))
    torn = encode_batch(batch("b2", 7))[:cut]
    (tmp_path / FILE_NAME).write_bytes(good + torn)
    j, replayed = open_journal(tmp_path)
    assert [m.batch_id for m in replayed] == ["b1"]
    assert (tmp_path / FILE_NAME).stat().st_size == len(good)
    j.append(batch("b3", 1))  # appends after the good prefix, not after garbage
    j.close()
    j, replayed = open_journal(tmp_path)
    assert [m.batch_id for m in replayed] == ["b1", "b3"]
    j.close()


def test_crc_mismatch_stops_replay(tmp_path: Path) -> None:
    good = encode_batch(batch("b1", 5))
    bad = bytearray(encode_batch(batch("b2", 7)))
    bad[-1] ^= 0xFF
    after = encode_batch(batch("b3", 9))
    data = good + bytes(bad) + after
    found = scan(data)
    assert found.problem == "CRC mismatch"
    assert found.good_bytes == len(good)
    assert [m.batch_id for m in found.batches] == ["b1"]
    (tmp_path / FILE_NAME).write_bytes(data)
    j, replayed = open_journal(tmp_path)  # logged, never raised
    assert [m.batch_id for m in replayed] == ["b1"]
    j.close()


def test_garbage_length_and_unknown_kind(tmp_path: Path) -> None:
    assert scan(b"\xff" * 16).problem is not None
    assert scan(HEADER.pack(0, 0)).problem is not None
    found = scan(encode_batch(batch("b1", 1)) + encode_ack("b1") + encode_ack("zz"))
    assert found.problem is None and found.batches == []


def test_one_owner_per_directory(tmp_path: Path) -> None:
    j, _ = open_journal(tmp_path)
    with pytest.raises(JournalError):
        Journal(tmp_path)
    j.close()
    Journal(tmp_path).close()


def test_state_journals_before_sending_and_marks_acks(tmp_path: Path) -> None:
    state = LocalState(journal=Journal(tmp_path))
    assert state.journal is not None
    state.restore(state.journal.open())
    state.charge([(DAILY, "")], 5, NOW, estimated=False)
    b1 = state.take_batch()
    assert b1 is not None
    b1.sent = True
    state.charge([(DAILY, "")], 7, NOW, estimated=False)
    b2 = state.take_batch()
    assert b2 is not None and b2 is not b1
    state.acknowledge(b1, dp.ReportUsageResponse())
    state.journal.close()  # "crash": b2 was never acknowledged

    again = LocalState(journal=Journal(tmp_path))
    assert again.journal is not None
    again.restore(again.journal.open())
    assert list(again.in_flight) == [b2.batch_id]
    replayed = again.in_flight[b2.batch_id]
    assert replayed.sent  # may have reached the control plane: never extended
    assert replayed.increments == {KEY: Increment(7, 1, 0)}
    again.charge([(DAILY, "")], 1, NOW, estimated=False)
    b3 = again.take_batch()
    assert b3 is not None and b3.batch_id != b2.batch_id
    assert again.spent(KEY) == 8
    again.journal.close()


def test_memory_stays_bounded_while_the_control_plane_is_down(tmp_path: Path) -> None:
    """Only the batch being retried and one never-sent batch stay in memory."""
    state = LocalState(journal=Journal(tmp_path))
    assert state.journal is not None
    state.journal.open()
    for _ in range(1000):  # 1000 flush intervals without an answer
        state.charge([(DAILY, "")], 1, NOW, estimated=False)
        state.take_batch()
        oldest = next(iter(state.in_flight.values()))
        oldest.sent = True  # flush only ever tries the oldest, and fails
    assert len(state.in_flight) == 2
    assert state.unsent_count() == 2
    assert state.spent(KEY) == 1000
    size = state.journal.size
    assert size > 0  # the usage spilled to disk as it came
    state.journal.close()
    again = Journal(tmp_path)
    replayed = again.open()
    assert sum(Batch.from_message(m).increments[KEY].cost_nanos for m in replayed) == 1000
    again.close()


def test_disk_errors_never_stop_metering(tmp_path: Path) -> None:
    state = LocalState(journal=Journal(tmp_path))
    assert state.journal is not None
    state.journal.open()
    state.journal.close()  # every write now fails with EBADF
    state.charge([(DAILY, "")], 5, NOW, estimated=False)
    assert state.take_batch() is not None
    assert state.journal_failed
    assert state.spent(KEY) == 5


def test_a_batch_applied_by_stream_then_by_answer_is_journaled_once(tmp_path: Path) -> None:
    state = LocalState(journal=Journal(tmp_path), identity="dp-1")
    assert state.journal is not None
    state.restore(state.journal.open())
    state.charge([(DAILY, "")], 5, NOW, estimated=False)
    b1 = state.take_batch()
    assert b1 is not None
    b1.sent = True
    state.charge([(DAILY, "")], 7, NOW, estimated=False)
    b2 = state.take_batch()
    assert b2 is not None
    size = state.journal.size
    applied = dp.StateUpdate()
    applied.applied.data_plane_id = "dp-1"
    applied.applied.batch_id = b1.batch_id
    state.apply_update(applied, NOW)
    after_stream = state.journal.size
    assert after_stream > size  # the ack record
    state.acknowledge(b1, dp.ReportUsageResponse())
    assert state.journal.size == after_stream  # not written twice
    state.journal.close()

    again = LocalState(journal=Journal(tmp_path))
    assert again.journal is not None
    again.restore(again.journal.open())
    assert list(again.in_flight) == [b2.batch_id]
    again.journal.close()
