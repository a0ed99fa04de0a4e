"""Control plane usage ingest: many data planes' batches, applied to the store."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from bench.topology import ADMIN, DATA_PLANE
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc, dataplane_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp


async def run(
    address: str, *, data_planes: int = 8, batch: int = 500, seconds: float = 8.0
) -> float:
    """Usage records (window increments) applied per second."""
    async with grpc.aio.insecure_channel(address) as ch:
        budgets = budget_pb2_grpc.BudgetServiceStub(ch)
        md = (("authorization", f"Bearer {ADMIN}"),)
        ids = []
        for n in range(10):
            p = await budgets.CreateBudgetPolicy(
                pb.CreateBudgetPolicyRequest(
                    policy=pb.BudgetPolicy(
                        name=f"ingest-{n}",
                        amount_usd="1000000",
                        action=pb.ACTION_ALERT,
                        scope=pb.SCOPE_USER,
                        target="*",
                        alert_thresholds=[50, 100],
                        window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                    )
                ),
                metadata=md,
            )
            ids.append(p.id)
        stub = dataplane_pb2_grpc.DataPlaneServiceStub(ch)
        dmd = (("authorization", f"Bearer {DATA_PLANE}"),)
        start_of_day = timestamp(int(time.time()) // 86400 * 86400)
        applied = 0
        deadline = time.monotonic() + seconds

        async def data_plane(k: int) -> None:
            nonlocal applied
            i = 0
            while time.monotonic() < deadline:
                incs = [
                    dp.SpendIncrement(
                        policy_id=ids[j % len(ids)],
                        member=f"user-{k}-{(i * batch + j) % 5000}",
                        window_start=start_of_day,
                        cost_nanos=1000,
                        request_count=1,
                    )
                    for j in range(batch)
                ]
                await stub.ReportUsage(
                    dp.ReportUsageRequest(
                        data_plane_id=f"dp-{k}", batch_id=uuid.uuid4().hex, increments=incs
                    ),
                    metadata=dmd,
                )
                applied += batch
                i += 1

        began = time.monotonic()
        await asyncio.gather(*(data_plane(k) for k in range(data_planes)))
        return applied / (time.monotonic() - began)
