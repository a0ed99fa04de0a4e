"""The control plane's gRPC API as its clients see it: a real grpc.aio
ControlPlaneServer on a free port, real (sync) grpc stubs, and builders for
the tests in this directory."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from control_plane.config import Settings
from control_plane.server import ControlPlaneServer
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc, dataplane_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    FakeClock,
    LoopThread,
    bearer,
    free_port,
)

USD = 1_000_000_000
T0 = datetime(2025, 3, 10, 12, 17, 30, tzinfo=UTC)
HOUR_START = datetime(2025, 3, 10, 12, tzinfo=UTC)
HOUR_END = datetime(2025, 3, 10, 13, tzinfo=UTC)
ADMIN = bearer(ADMIN_TOKEN)
READ = bearer(READ_TOKEN)
DATA = bearer(DATA_PLANE_TOKEN)
TIMEOUT = 10


@dataclass
class Api:
    loop: LoopThread
    server: ControlPlaneServer
    channel: grpc.Channel
    budgets: budget_pb2_grpc.BudgetServiceStub
    dataplane: dataplane_pb2_grpc.DataPlaneServiceStub
    clock: FakeClock
    db_path: Path | None


@contextlib.contextmanager
def running_api(database_url: str, db_path: Path | None = None, **settings_: Any) -> Iterator[Api]:
    """A control plane on ``database_url``; ``settings_`` override Settings."""
    clock = FakeClock(T0)
    loop = LoopThread("control-plane-under-test")
    port = free_port()
    settings = Settings(
        listen=f"127.0.0.1:{port}",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        read_token=READ_TOKEN,
        data_plane_token=DATA_PLANE_TOKEN,
        metrics_listen="",
        **settings_,
    )
    try:
        # grpc.aio objects must be made on the loop that runs them.
        server = loop.call(lambda: ControlPlaneServer(settings, clock=clock))
        loop.run(server.start())
    except BaseException:
        loop.stop()
        raise
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Api(
            loop,
            server,
            channel,
            budget_pb2_grpc.BudgetServiceStub(channel),
            dataplane_pb2_grpc.DataPlaneServiceStub(channel),
            clock,
            db_path,
        )
    finally:
        channel.close()
        loop.run(server.stop(grace=0))
        loop.stop()


def create(api: Api, p: pb.BudgetPolicy) -> pb.BudgetPolicy:
    return api.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(policy=p), metadata=ADMIN, timeout=TIMEOUT
    )


def list_all(api: Api, metadata: tuple[tuple[str, str]] = ADMIN) -> list[pb.BudgetPolicy]:
    resp = api.budgets.ListBudgetPolicies(
        pb.ListBudgetPoliciesRequest(), metadata=metadata, timeout=TIMEOUT
    )
    assert resp.next_page_token == ""
    return list(resp.policies)


def rpc_error(fn: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, timeout=TIMEOUT, **kwargs)  # type: ignore[operator]
    return e.value


def bad_fields(err: grpc.RpcError) -> list[str]:
    """The google.rpc.BadRequest field names of an INVALID_ARGUMENT error."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status details"
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert len(status.details) == 1
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert all(v.description for v in detail.field_violations)
    names = [v.field for v in detail.field_violations]
    for name in names:
        assert name in err.details()  # the message names the field too
    return names


def inc(
    policy_id: str, cost_nanos: int, *, member: str = "", at: datetime = T0
) -> dp.SpendIncrement:
    return dp.SpendIncrement(
        policy_id=policy_id,
        member=member,
        window_start=timestamp(at),
        cost_nanos=cost_nanos,
        request_count=1,
    )


def report(
    api: Api, batch_id: str, *incs: dp.SpendIncrement, dp_id: str = "dp-1"
) -> dp.ReportUsageResponse:
    return api.dataplane.ReportUsage(
        dp.ReportUsageRequest(data_plane_id=dp_id, batch_id=batch_id, increments=incs),
        metadata=DATA,
        timeout=TIMEOUT,
    )


def hour_spend(policy_id: str, spent: int, limit: int, requests: int) -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id=policy_id,
        window_start=timestamp(HOUR_START),
        window_end=timestamp(HOUR_END),
        spent_nanos=spent,
        limit_nanos=limit,
        exceeded=spent >= limit,
        request_count=requests,
    )


class Watch:
    """A WatchState stream read on a thread, so the test can wait with a timeout."""

    def __init__(
        self, api: Api, metadata: tuple[tuple[str, str]] = DATA, *, incremental: bool = False
    ) -> None:
        self.call = api.dataplane.WatchState(
            dp.WatchStateRequest(data_plane_id="dp-watch", incremental=incremental),
            metadata=metadata,
        )
        self.updates: queue.Queue[dp.StateUpdate | grpc.RpcError] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for update in self.call:
                self.updates.put(update)
        except grpc.RpcError as e:
            self.updates.put(e)

    def next(self) -> dp.StateUpdate:
        item = self.updates.get(timeout=TIMEOUT)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
