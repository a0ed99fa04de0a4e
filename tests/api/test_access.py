"""Admin API access: bearer-token roles, and health and reflection without one."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from tests.api.apiserver import (
    ADMIN,
    DATA,
    READ,
    TIMEOUT,
    USD,
    Api,
    Watch,
    create,
    hour_spend,
    inc,
    list_all,
    report,
    rpc_error,
)
from tests.harness import (
    ADMIN_TOKEN,
    bearer,
)
from tests.store.builders import policy

# ---- auth, health, reflection ---------------------------------------------------


def test_auth_roles(api: Api) -> None:
    created = create(api, policy())
    get = pb.GetBudgetPolicyRequest(id=created.id)
    b = api.budgets

    for metadata in (
        None,
        bearer("wrong-token-0123456789abc"),
        (("authorization", f"Basic {ADMIN_TOKEN}"),),
        (("authorization", ADMIN_TOKEN),),
    ):
        for call, req in (
            (b.GetBudgetPolicy, get),
            (b.ListBudgetPolicies, pb.ListBudgetPoliciesRequest()),
            (b.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(policy=policy())),
            (api.dataplane.ReportUsage, dp.ReportUsageRequest(batch_id="x")),
        ):
            err = rpc_error(call, req, metadata=metadata)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, call)
    # A server stream refuses too.
    w = Watch(api, metadata=())
    with pytest.raises(grpc.RpcError) as e:
        w.next()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    w.close()

    # Read-only: Get/List/ListSpend, nothing that writes, no data plane.
    assert b.GetBudgetPolicy(get, metadata=READ, timeout=TIMEOUT) == created
    assert list_all(api, READ) == [created]
    spend = b.ListSpend(pb.ListSpendRequest(), metadata=READ, timeout=TIMEOUT)
    assert [e.policy_id for e in spend.entries] == [created.id]
    for call, req in (
        (b.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(policy=policy())),
        (
            b.UpdateBudgetPolicy,
            pb.UpdateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(id=created.id, name="x"),
                update_mask=FieldMask(paths=["name"]),
            ),
        ),
        (b.DeleteBudgetPolicy, pb.DeleteBudgetPolicyRequest(id=created.id)),
        (api.dataplane.ReportUsage, dp.ReportUsageRequest(batch_id="x")),
    ):
        err = rpc_error(call, req, metadata=READ)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, call

    # Data plane: its own service only.
    r = report(api, "b1", inc(created.id, USD))
    assert r.spend == [hour_spend(created.id, USD, 10 * USD, 1)]
    for call, req in (
        (b.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(policy=policy())),
        (b.DeleteBudgetPolicy, pb.DeleteBudgetPolicyRequest(id=created.id)),
        (b.GetBudgetPolicy, get),
        (b.ListSpend, pb.ListSpendRequest()),
    ):
        err = rpc_error(call, req, metadata=DATA)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, call

    # Nothing the refused calls attempted was stored.
    assert list_all(api) == [created]
    # The admin may use the data-plane service.
    r = api.dataplane.ReportUsage(
        dp.ReportUsageRequest(batch_id="b2", increments=[inc(created.id, USD)]),
        metadata=ADMIN,
        timeout=TIMEOUT,
    )
    assert r.spend == [hour_spend(created.id, 2 * USD, 10 * USD, 2)]


def test_health_and_reflection_need_no_token(api: Api) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "spendgate.v1.BudgetService", "spendgate.v1.DataPlaneService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    err = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    db = ProtoReflectionDescriptorDatabase(api.channel)
    services = set(db.get_services())
    assert {
        "spendgate.v1.BudgetService",
        "spendgate.v1.DataPlaneService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName("spendgate.v1.BudgetService")
    assert {m.name for m in svc.methods} == {
        "CreateBudgetPolicy",
        "GetBudgetPolicy",
        "ListBudgetPolicies",
        "UpdateBudgetPolicy",
        "DeleteBudgetPolicy",
        "ListSpend",
        "ListQuarantinedUsage",
        "CreateSpendAdjustment",
        "ListSpendAdjustments",
    }
