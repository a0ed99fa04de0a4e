"""DataPlaneService: usage batches in, state snapshots and changes out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog

from control_plane import resync
from control_plane.api.errors import streaming, unary
from control_plane.hub import RESYNC, Subscription
from control_plane.pricing import PricingAdmin
from control_plane.service import ControlPlane
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import dataplane_pb2_grpc

log = structlog.get_logger("spendgate.control_plane")


class DataPlaneServicer(dataplane_pb2_grpc.DataPlaneServiceServicer):
    def __init__(self, cp: ControlPlane, pricing: PricingAdmin) -> None:
        self.cp = cp
        self.pricing = pricing

    @unary
    async def ReportUsage(
        self, request: dp.ReportUsageRequest, context: grpc.aio.ServicerContext
    ) -> dp.ReportUsageResponse:
        result = await self.cp.apply_usage(request)
        return dp.ReportUsageResponse(
            duplicate=result.duplicate,
            spend=result.spend,
            unknown_policy_increments=result.unknown_policy_increments,
            quarantined_increments=result.quarantined_increments,
            refused_rollups=result.refused_rollups,
            applied_batch_ids=result.applied_batch_ids,
        )

    @unary
    async def Reserve(
        self, request: dp.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> dp.ReserveResponse:
        return await self.cp.reserve(request)

    @streaming
    async def WatchState(
        self, request: dp.WatchStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dp.StateUpdate]:
        # Subscribe before reading any state so no change falls between.
        async with self.cp.hub.subscribe() as sub:
            log.info(
                "data plane connected",
                data_plane_id=request.data_plane_id,
                incremental=request.incremental,
            )
            try:
                stream = self._incremental if request.incremental else self._whole_sets
                async for update in stream(sub, request.data_plane_id):
                    yield update
            finally:
                log.info("data plane disconnected", data_plane_id=request.data_plane_id)

    async def _incremental(
        self, sub: Subscription, data_plane_id: str
    ) -> AsyncIterator[dp.StateUpdate]:
        """A paged resync, then changes; another resync whenever the hub asks."""
        while True:
            seq = sub.begin_resync()
            self.cp.metrics.resyncs += 1
            if sub.resyncs > 1:
                log.warning("resyncing a data plane on its stream", data_plane_id=data_plane_id)
            async for page in resync.pages(self.cp, self.pricing, seq, self.cp.hub.page_bytes):
                yield page
            while (update := await sub.next()) is not RESYNC:
                assert isinstance(update, dp.StateUpdate)
                yield update

    async def _whole_sets(
        self, sub: Subscription, data_plane_id: str
    ) -> AsyncIterator[dp.StateUpdate]:
        """The stream data planes of earlier releases understand: one full
        snapshot, the whole policy set or override set on any change of it.
        It grows with the state (a very large one exceeds gRPC's limit)."""
        yield await self._snapshot()
        while True:
            update = await sub.next()
            if update is RESYNC:
                sub.begin_resync()
                yield await self._snapshot()
                continue
            assert isinstance(update, dp.StateUpdate)
            whole = dp.StateUpdate(spend=update.spend)
            if update.HasField("policy_changes"):
                whole.policies.CopyFrom(await self.cp.policy_snapshot())
            if update.HasField("price_changes"):
                whole.MergeFrom(await self.pricing.overrides_update())
            if whole.ByteSize():
                yield whole

    async def _snapshot(self) -> dp.StateUpdate:
        snapshot = await self.cp.snapshot()
        snapshot.MergeFrom(await self.pricing.overrides_update())
        return snapshot
