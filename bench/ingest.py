"""Control plane usage ingest: many data planes' batches, applied to the store.

Each batch carries what a data plane sends for the responses behind it:
window increments (the records counted) and, for chargeback reports, one
hourly rollup per user (every user of a batch distinct, each with a tag: the
costly case, two report rows per rollup)."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from bench.topology import ADMIN, DATA_PLANE
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc, dataplane_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import reports_pb2 as rp
from spendgate.wire import timestamp


async def run(
    address: str,
    *,
    data_planes: int = 8,
    batch: int = 500,
    seconds: float = 8.0,
    rollups: bool = True,
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
        hour = int(time.time()) // 3600 * 3600
        applied = 0
        deadline = time.monotonic() + seconds

        made: dict[str, rp.UsageRollup] = {}

        def rollup_of(k: int, member: str) -> rp.UsageRollup:
            """A user's rollup, made once: building messages is the data
            planes' work (other machines), not the control plane's."""
            r = made.get(member)
            if r is None:
                r = made[member] = rp.UsageRollup(
                    hour=hour,
                    route="openai",
                    provider="openai",
                    model="gpt-4o-mini",
                    user=member,
                    workspace="bench",
                    api_key_hash="0" * 64,
                    tags={"team": f"team-{int(member.rsplit('-', 1)[1]) % 20}"},
                    cost_nanos=1000,
                    input_tokens=100,
                    output_tokens=20,
                    request_count=1,
                )
            return r

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
                rows = [rollup_of(k, inc.member) for inc in incs] if rollups else []
                await stub.ReportUsage(
                    dp.ReportUsageRequest(
                        data_plane_id=f"dp-{k}",
                        batch_id=uuid.uuid4().hex,
                        increments=incs,
                        rollups=rows,
                    ),
                    metadata=dmd,
                )
                applied += batch
                i += 1

        began = time.monotonic()
        await asyncio.gather(*(data_plane(k) for k in range(data_planes)))
        return applied / (time.monotonic() - began)
