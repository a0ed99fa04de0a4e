"""ReportService: chargeback reports over the hourly usage rollups."""

from __future__ import annotations

import grpc

from control_plane.api.errors import unary
from control_plane.service import ControlPlane
from spendgate.v1 import reports_pb2 as rp
from spendgate.v1 import reports_pb2_grpc


class ReportServicer(reports_pb2_grpc.ReportServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    @unary
    async def QuerySpend(
        self, request: rp.QuerySpendRequest, context: grpc.aio.ServicerContext
    ) -> rp.QuerySpendResponse:
        return await self.cp.query_spend(request)
