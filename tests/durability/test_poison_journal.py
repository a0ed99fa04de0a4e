"""A poison record in the journal at restart is quarantined, not replayed
forever (issue 12, item 2), on SQLite and PostgreSQL.

The journal below is what an ext_proc wrote before records were bounded: a
batch over gRPC's 4 MB limit (a 5 MB member next to a good record), a batch
with a member the control plane cannot store, and a good batch. Before, the
first was retried forever and blocked the others, on every restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from ext_proc.sync.journal import FILE_NAME, Journal
from ext_proc.sync.quarantine import FILE_NAME as QUARANTINE_FILE
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.durability.conftest import ADMIN, Env, create_policy, spend
from tests.harness import FakeClock, LoopThread, free_port, wait_until


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> Iterator[Env]:
    loop = LoopThread("durability")
    yield Env(loop, FakeClock(), db_url, tmp_path / "journal", free_port())
    loop.stop()


def test_poison_records_in_the_journal_are_quarantined_at_restart(env: Env) -> None:
    policy = create_policy(env)
    start = int(env.clock().timestamp()) // 86400 * 86400

    def inc(cost: int, member: str = "") -> dp.SpendIncrement:
        return dp.SpendIncrement(
            policy_id=policy.id,
            member=member,
            window_start=timestamp(start),
            cost_nanos=cost,
            request_count=1,
        )

    huge = "u" * (5 * 1024 * 1024)
    journal = Journal(env.journal)
    journal.open()
    journal.append(dp.ReportUsageRequest(batch_id="a" * 32, increments=[inc(1_000), inc(7, huge)]))
    journal.append(dp.ReportUsageRequest(batch_id="b" * 32, increments=[inc(9, "v" * 600)]))
    journal.append(dp.ReportUsageRequest(batch_id="c" * 32, increments=[inc(2_000)]))
    journal.close()

    cp = env.start_cp()
    try:
        ext = env.start_ext()
        assert len(ext.state.in_flight) == 3
        wait_until(lambda: not ext.state.in_flight, timeout=20, message="journal drained")
        wait_until(lambda: ext.sync.backlog is False, message="backlog cleared")
        env.loop.run(ext.stop(grace=0))
        assert spend(env, policy.id) == (Decimal(3_000) / 10**9, 2)

        with env.channel() as ch:
            listed = budget_pb2_grpc.BudgetServiceStub(ch).ListQuarantinedUsage(
                pb.ListQuarantinedUsageRequest(), metadata=ADMIN, timeout=10
            )
        assert listed.total_size == 2
        assert sorted(r.reason for r in listed.records) == ["member_too_long", "too_large"]
        too_large = next(r for r in listed.records if r.reason == "too_large")
        assert too_large.member_bytes == len(huge) and too_large.cost_usd == "0.000000007"
        lines = (env.journal / QUARANTINE_FILE).read_text().splitlines()
        assert [json.loads(line)["reason"] for line in lines] == ["too_large"]
        assert (env.journal / FILE_NAME).stat().st_size == 0

        # Started again: nothing is replayed, nothing is counted twice.
        ext = env.start_ext()
        assert not ext.state.in_flight
        env.loop.run(ext.stop(grace=0))
        assert spend(env, policy.id) == (Decimal(3_000) / 10**9, 2)
    finally:
        env.loop.run(cp.stop(grace=0))
