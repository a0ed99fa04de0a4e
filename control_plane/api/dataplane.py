"""DataPlaneService: usage batches in, state snapshots and changes out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog

from control_plane.api.errors import streaming, unary
from control_plane.hub import SubscriberTooSlow
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
        # Subscribe before reading the snapshot so no change falls between.
        async with self.cp.hub.subscribe() as sub:
            snapshot = await self.cp.snapshot()
            snapshot.MergeFrom(await self.pricing.overrides_update())
            yield snapshot
            log.info("data plane connected", data_plane_id=request.data_plane_id)
            try:
                while True:
                    yield await sub.next()
            except SubscriberTooSlow:
                log.warning(
                    "data plane too slow; ending its stream so it resyncs",
                    data_plane_id=request.data_plane_id,
                )
            finally:
                log.info("data plane disconnected", data_plane_id=request.data_plane_id)
