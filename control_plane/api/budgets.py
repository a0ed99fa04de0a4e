"""BudgetService: thin async methods over control_plane.service."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2
from google.protobuf.field_mask_pb2 import FieldMask

from control_plane.api.auth import AuthInterceptor
from control_plane.api.errors import check_id, check_text, unary
from control_plane.errors import InvalidArgument
from control_plane.service import ControlPlane
from spendgate.domain.limits import MAX_MEMBER_FILTER_CHARS
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc

WRITABLE_PATHS = frozenset(
    {
        "name",
        "description",
        "amount_usd",
        "window",
        "window.unit",
        "window.count",
        "window.week_start",
        "timezone",
        "action",
        "scope",
        "target",
        "alert_thresholds",
        "enabled",
        "apply_marker",
        "enforcement",
        "expose_to_clients",
        "forecast_alert",
        "forecast_alert.within",
        "forecast_alert.before_window_end",
    }
)

# ListSpendRequest.top_members: at most one page of a wildcard policy's members.
MAX_TOP_MEMBERS = 1000


def mask_merger(patch: pb.BudgetPolicy, mask: FieldMask) -> MaskMerge:
    bad = [p for p in mask.paths if p not in WRITABLE_PATHS]
    if bad:
        raise InvalidArgument.one(
            "update_mask",
            f"unknown or read-only path(s): {', '.join(bad)}; writable: "
            + ", ".join(sorted(WRITABLE_PATHS)),
        )
    return MaskMerge(patch, mask)


class MaskMerge:
    def __init__(self, patch: pb.BudgetPolicy, mask: FieldMask) -> None:
        self.patch = patch
        self.mask = mask

    def __call__(self, stored: pb.BudgetPolicy) -> pb.BudgetPolicy:
        if not self.mask.paths:
            return self.patch  # empty mask: replace every writable field
        merged = pb.BudgetPolicy()
        merged.CopyFrom(stored)
        self.mask.MergeMessage(
            self.patch, merged, replace_message_field=True, replace_repeated_field=True
        )
        return merged


class BudgetServicer(budget_pb2_grpc.BudgetServiceServicer):
    def __init__(self, cp: ControlPlane, auth: AuthInterceptor) -> None:
        self.cp = cp
        self.auth = auth

    @unary
    async def CreateBudgetPolicy(
        self, request: pb.CreateBudgetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.BudgetPolicy:
        if not request.HasField("policy"):
            raise InvalidArgument.one("policy", "is required")
        return await self.cp.create_policy(request.policy, self.auth.author(context))

    @unary
    async def GetBudgetPolicy(
        self, request: pb.GetBudgetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.BudgetPolicy:
        check_id("id", request.id)
        return await self.cp.get_policy(request.id)

    @unary
    async def ListBudgetPolicies(
        self, request: pb.ListBudgetPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBudgetPoliciesResponse:
        policies, token = await self.cp.list_policies(request.page_size, request.page_token)
        return pb.ListBudgetPoliciesResponse(policies=policies, next_page_token=token)

    @unary
    async def UpdateBudgetPolicy(
        self, request: pb.UpdateBudgetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.BudgetPolicy:
        check_id("policy.id", request.policy.id)
        merge = mask_merger(request.policy, request.update_mask)
        return await self.cp.update_policy(
            request.policy.id, merge, request.policy.etag, self.auth.author(context)
        )

    @unary
    async def DeleteBudgetPolicy(
        self, request: pb.DeleteBudgetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        check_id("id", request.id)
        await self.cp.delete_policy(request.id, request.etag, self.auth.author(context))
        return empty_pb2.Empty()

    @unary
    async def ListSpend(
        self, request: pb.ListSpendRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSpendResponse:
        check_id("policy_id", request.policy_id, required=False)
        if len(request.member) > MAX_MEMBER_FILTER_CHARS:
            raise InvalidArgument.one(
                "member", f"must be at most {MAX_MEMBER_FILTER_CHARS} characters"
            )
        check_text("member", request.member)
        top = request.top_members
        if not 0 <= top <= MAX_TOP_MEMBERS:
            raise InvalidArgument.one("top_members", f"must be between 0 and {MAX_TOP_MEMBERS}")
        if top and request.member:
            raise InvalidArgument.one("top_members", "cannot be combined with member")
        if top:
            entries, token, counts = await self.cp.list_top_spend(
                request.policy_id, request.page_size, request.page_token, top
            )
            return pb.ListSpendResponse(
                entries=entries, next_page_token=token, member_counts=counts
            )
        entries, token = await self.cp.list_spend(
            request.policy_id, request.member, request.page_size, request.page_token
        )
        return pb.ListSpendResponse(entries=entries, next_page_token=token)

    @unary
    async def ListQuarantinedUsage(
        self, request: pb.ListQuarantinedUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListQuarantinedUsageResponse:
        records, token, total = await self.cp.list_quarantined(
            request.page_size, request.page_token
        )
        return pb.ListQuarantinedUsageResponse(
            records=records, next_page_token=token, total_size=total
        )

    @unary
    async def CreateSpendAdjustment(
        self, request: pb.CreateSpendAdjustmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SpendAdjustment:
        if not request.HasField("adjustment"):
            raise InvalidArgument.one("adjustment", "is required")
        return await self.cp.create_adjustment(
            request.adjustment, self.auth.author(context), request.request_id
        )

    @unary
    async def ListSpendAdjustments(
        self, request: pb.ListSpendAdjustmentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSpendAdjustmentsResponse:
        if len(request.policy_id) > 40:
            raise InvalidArgument.one("policy_id", "is at most 40 characters")
        if len(request.member) > 512:
            raise InvalidArgument.one("member", "is at most 512 characters")
        found, token = await self.cp.list_adjustments(
            request.policy_id, request.member, request.page_size, request.page_token
        )
        return pb.ListSpendAdjustmentsResponse(adjustments=found, next_page_token=token)
