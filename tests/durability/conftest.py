"""Helpers for the durability tests: a control plane that can come and go."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from control_plane.config import Settings as CPSettings
from control_plane.server import ControlPlaneServer
from ext_proc.config import Settings as EPSettings
from ext_proc.server import ExtProcServer
from spendgate.domain.policies import Policy
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc
from spendgate.wire import policy_from_message
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    FakeClock,
    LoopThread,
    free_port,
)

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
DATA = (("authorization", f"Bearer {DATA_PLANE_TOKEN}"),)


@dataclass
class Env:
    loop: LoopThread
    clock: FakeClock
    db: str
    journal: Path
    cp_port: int

    def start_cp(self) -> ControlPlaneServer:
        settings = CPSettings(
            listen=f"127.0.0.1:{self.cp_port}",
            database_url=self.db,
            admin_token=ADMIN_TOKEN,
            read_token=READ_TOKEN,
            data_plane_token=DATA_PLANE_TOKEN,
            metrics_listen="",
        )
        cp = self.loop.call(lambda: ControlPlaneServer(settings, clock=self.clock))
        self.loop.run(cp.start())
        return cp

    def start_ext(self) -> ExtProcServer:
        settings = EPSettings(
            listen="127.0.0.1:0",
            control_plane=f"127.0.0.1:{self.cp_port}",
            data_plane_token=DATA_PLANE_TOKEN,
            data_plane_id="durable-dp",
            flush_interval_ms=20,
            journal_dir=str(self.journal),
            metrics_listen="",
            # These tests drive one stream per request, as Envoy with one
            # ext_proc filter does (tests/extproc/test_observe.py: observe).
            response_metering="inline",
        )
        ext = self.loop.call(lambda: ExtProcServer(settings, clock=self.clock))
        self.loop.run(ext.start())
        return ext

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.cp_port}")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    loop = LoopThread("durability")
    yield Env(loop, FakeClock(), f"sqlite:///{tmp_path}/cp.db", tmp_path / "journal", free_port())
    loop.stop()


def create_policy(env: Env) -> Policy:
    """A daily global budget, created while a control plane runs (then stopped)."""
    cp = env.start_cp()
    with env.channel() as ch:
        created = budget_pb2_grpc.BudgetServiceStub(ch).CreateBudgetPolicy(
            pb.CreateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(
                    name="durable",
                    amount_usd="1000",
                    window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                    scope=pb.SCOPE_GLOBAL,
                    action=pb.ACTION_REJECT,
                )
            ),
            metadata=ADMIN,
            timeout=10,
        )
    env.loop.run(cp.stop(grace=0))
    return policy_from_message(created)


def spend(env: Env, policy_id: str) -> tuple[Decimal, int]:
    with env.channel() as ch:
        resp = budget_pb2_grpc.BudgetServiceStub(ch).ListSpend(
            pb.ListSpendRequest(policy_id=policy_id), metadata=ADMIN, timeout=10
        )
    if not resp.entries:
        return Decimal(0), 0
    (entry,) = resp.entries
    return Decimal(entry.spent_usd), entry.request_count
