"""PricingService: thin async methods over control_plane.pricing."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from control_plane.api.auth import AuthInterceptor
from control_plane.api.errors import check_id, unary
from control_plane.errors import InvalidArgument
from control_plane.pricing import PricingAdmin
from spendgate.v1 import pricing_pb2 as pp
from spendgate.v1 import pricing_pb2_grpc


class PricingServicer(pricing_pb2_grpc.PricingServiceServicer):
    def __init__(self, admin: PricingAdmin, auth: AuthInterceptor) -> None:
        self.admin = admin
        self.auth = auth

    @unary
    async def ListPrices(
        self, request: pp.ListPricesRequest, context: grpc.aio.ServicerContext
    ) -> pp.ListPricesResponse:
        prices, token = await self.admin.list_prices(
            request.provider, request.model_contains, request.page_size, request.page_token
        )
        return pp.ListPricesResponse(prices=prices, next_page_token=token)

    @unary
    async def ListPriceOverrides(
        self, request: pp.ListPriceOverridesRequest, context: grpc.aio.ServicerContext
    ) -> pp.ListPriceOverridesResponse:
        return pp.ListPriceOverridesResponse(overrides=await self.admin.list_overrides())

    @unary
    async def SetPriceOverride(
        self, request: pp.SetPriceOverrideRequest, context: grpc.aio.ServicerContext
    ) -> pp.PriceOverride:
        if not request.HasField("override"):
            raise InvalidArgument.one("override", "is required")
        return await self.admin.set_override(request.override, self.auth.author(context))

    @unary
    async def DeletePriceOverride(
        self, request: pp.DeletePriceOverrideRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        check_id("id", request.id)
        if len(request.etag) > 64:
            raise InvalidArgument.one("etag", "must be at most 64 characters")
        await self.admin.delete_override(request.id, self.auth.author(context), request.etag)
        return empty_pb2.Empty()
