"""ext_proc given several control plane replicas moves to another one when
its replica goes away, and keeps receiving state and delivering usage."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ext_proc.config import Settings as EPSettings
from ext_proc.server import ExtProcServer
from spendgate.domain.policies import Scope
from spendgate.v1 import budget_pb2 as pb
from tests.harness import DATA_PLANE_TOKEN, FakeClock, LoopThread, free_port, wait_until
from tests.replicas.test_replicas import ADMIN, replica

pytestmark = pytest.mark.postgres
T0 = datetime(2025, 3, 10, 12, 17, 30, tzinfo=UTC)


def policy(name: str) -> pb.CreateBudgetPolicyRequest:
    return pb.CreateBudgetPolicyRequest(
        policy=pb.BudgetPolicy(
            name=name,
            amount_usd="10",
            action=pb.ACTION_ALERT,
            scope=pb.SCOPE_GLOBAL,
            window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
        )
    )


def test_ext_proc_fails_over_to_another_replica(pg_url: str) -> None:
    clock = FakeClock(T0)
    with replica(pg_url, clock) as b:
        a_ctx = replica(pg_url, clock)
        a = a_ctx.__enter__()
        a_address = f"127.0.0.1:{a.server.port}"
        loop = LoopThread("ext-proc-under-test")
        ext = loop.call(
            lambda: ExtProcServer(
                EPSettings(
                    listen=f"127.0.0.1:{free_port()}",
                    control_plane=f"{a_address},127.0.0.1:{b.server.port}",
                    data_plane_token=DATA_PLANE_TOKEN,
                    flush_interval_ms=20,
                    journal_dir="",
                    metrics_listen="",
                ),
                clock=clock,
            )
        )
        loop.run(ext.start())
        try:
            wait_until(lambda: ext.sync.connected.is_set(), message="connected")
            assert ext.sync.address == a_address
            first = a.budgets.CreateBudgetPolicy(policy("first"), metadata=ADMIN)
            wait_until(lambda: first.id in ext.state.index.policies, message="policy via A")
            a_ctx.__exit__(None, None, None)  # replica A goes away
            second = b.budgets.CreateBudgetPolicy(policy("second"), metadata=ADMIN)
            wait_until(
                lambda: second.id in ext.state.index.policies,
                timeout=15,
                message="ext_proc follows B",
            )
            assert ext.sync.address == f"127.0.0.1:{b.server.port}"
            # Usage still reaches the database through B.
            matches = [
                (p, "") for p in ext.state.index.policies.values() if p.scope is Scope.GLOBAL
            ]
            loop.call(lambda: ext.state.charge(matches, 7 * 10**9, clock(), estimated=False))

            def spent() -> set[str]:
                entries = b.budgets.ListSpend(pb.ListSpendRequest(), metadata=ADMIN).entries
                return {e.spent_usd for e in entries}

            wait_until(lambda: spent() == {"7.00"}, message="usage delivered through B")
        finally:
            loop.run(ext.stop(grace=0))
            loop.stop()
