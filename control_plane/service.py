"""The control plane's use cases behind one object: ControlPlane.

Each use case runs one transaction (control_plane/runtime.py: the store's
thread pool, the hub, the clock) and lives with its concern:

    policies.py     policy CRUD, pushing policy changes to data planes
    usage.py        ReportUsage: a usage batch applied exactly once
    spend_list.py   ListSpend pages (by key, or top spenders)
    holds.py        Reserve: the arbiter near a budget's line
    adjustments.py  spend corrections
    quarantine.py   usage records that cannot be applied
    reports.py      chargeback rollups, QuerySpend
    resync.py       the data-plane state, in pages or in one message
    maintenance.py  what is forgotten on a timer

This class only composes them, so servicers, background tasks and tests hold
one object (and a test may patch one use case on it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import timedelta

from control_plane import (
    adjustments,
    holds,
    maintenance,
    policies,
    quarantine,
    reports,
    resync,
    spend_list,
    usage,
)
from control_plane.runtime import (
    ChangeHook,
    ChangeKeys,
    Clock,
    Runtime,
    clamp_page_size,
    utc_now,
)
from control_plane.store.models import PolicyRow
from control_plane.usage import UsageResult
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import reports_pb2 as rp


class ControlPlane(Runtime):
    # ---- policies -------------------------------------------------------

    async def create_policy(self, msg: pb.BudgetPolicy, author: str) -> pb.BudgetPolicy:
        return await policies.create_policy(self, msg, author)

    async def get_policy(self, policy_id: str) -> pb.BudgetPolicy:
        return await policies.get_policy(self, policy_id)

    async def list_policies(
        self, page_size: int, page_token: str
    ) -> tuple[list[pb.BudgetPolicy], str]:
        return await policies.list_policies(self, page_size, page_token)

    async def update_policy(
        self,
        policy_id: str,
        merge: Callable[[pb.BudgetPolicy], pb.BudgetPolicy],
        expected_etag: str,
        author: str,
    ) -> pb.BudgetPolicy:
        return await policies.update_policy(self, policy_id, merge, expected_etag, author)

    async def delete_policy(self, policy_id: str, expected_etag: str, author: str) -> None:
        await policies.delete_policy(self, policy_id, expected_etag, author)

    def publish_policy_changes(
        self, upserts: Iterable[PolicyRow] = (), deleted: Iterable[str] = ()
    ) -> None:
        policies.publish_policy_changes(self, upserts, deleted)

    async def publish_policies(self, ids: Collection[str]) -> None:
        await policies.publish_policies(self, ids)

    # ---- usage and spend ------------------------------------------------

    async def apply_usage(self, req: dp.ReportUsageRequest) -> UsageResult:
        return await usage.apply_usage(self, req)

    async def list_quarantined(
        self, page_size: int, page_token: str
    ) -> tuple[list[pb.QuarantinedUsage], str, int]:
        return await quarantine.list_quarantined(self, page_size, page_token)

    async def list_spend(
        self, policy_id: str, member: str, page_size: int, page_token: str
    ) -> tuple[list[pb.SpendEntry], str]:
        return await spend_list.list_spend(self, policy_id, member, page_size, page_token)

    async def list_top_spend(
        self, policy_id: str, page_size: int, page_token: str, top: int
    ) -> tuple[list[pb.SpendEntry], str, list[pb.MemberCounts]]:
        return await spend_list.list_top_spend(self, policy_id, page_size, page_token, top)

    async def reserve(self, req: dp.ReserveRequest) -> dp.ReserveResponse:
        return await holds.reserve(self, req)

    # ---- spend adjustments ----------------------------------------------

    async def create_adjustment(
        self, msg: pb.SpendAdjustment, author: str, request_id: str = ""
    ) -> pb.SpendAdjustment:
        return await adjustments.create_adjustment(self, msg, author, request_id)

    async def list_adjustments(
        self, policy_id: str, member: str, page_size: int, page_token: str
    ) -> tuple[list[pb.SpendAdjustment], str]:
        return await adjustments.list_adjustments(self, policy_id, member, page_size, page_token)

    # ---- chargeback reports ---------------------------------------------

    async def query_spend(self, req: rp.QuerySpendRequest) -> rp.QuerySpendResponse:
        return await reports.query_spend(self, req)

    # ---- data-plane state -----------------------------------------------

    async def snapshot(self) -> dp.StateUpdate:
        return await resync.snapshot(self)

    async def policy_snapshot(self) -> dp.PolicySnapshot:
        return await resync.policy_snapshot(self)

    # ---- maintenance ----------------------------------------------------

    async def forget_expired_holds(self) -> int:
        return await maintenance.forget_expired_holds(self)

    async def forget_old_spend(
        self, retention: timedelta, chunk: int = maintenance.SPEND_CHUNK
    ) -> int:
        return await maintenance.forget_old_spend(self, retention, chunk)

    async def forget_old_batches(self, retention: timedelta) -> int:
        return await maintenance.forget_old_batches(self, retention)

    async def forget_old_rollups(self, retention: timedelta) -> int:
        return await maintenance.forget_old_rollups(self, retention)

    async def forget_old_deliveries(self, retention: timedelta) -> int:
        return await maintenance.forget_old_deliveries(self, retention)


__all__: Sequence[str] = (
    "ChangeHook",
    "ChangeKeys",
    "Clock",
    "ControlPlane",
    "UsageResult",
    "clamp_page_size",
    "utc_now",
)
