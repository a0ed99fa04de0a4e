"""BudgetService.CreateSpendAdjustment / ListSpendAdjustments as gRPC clients
see them: roles, field violations, the data planes' view, pagination."""

from __future__ import annotations

import grpc

from spendgate.v1 import budget_pb2 as pb
from tests.api.apiserver import (
    ADMIN,
    READ,
    TIMEOUT,
    USD,
    Api,
    Watch,
    bad_fields,
    create,
    hour_spend,
    inc,
    report,
    rpc_error,
)
from tests.store.builders import policy


def adjust(api: Api, adjustment: pb.SpendAdjustment) -> pb.SpendAdjustment:
    return api.budgets.CreateSpendAdjustment(
        pb.CreateSpendAdjustmentRequest(adjustment=adjustment), metadata=ADMIN, timeout=TIMEOUT
    )


def test_adjustment_reaches_data_planes_and_spend(api: Api) -> None:
    p = create(api, policy(amount="10"))
    report(api, "b1", inc(p.id, 11 * USD))
    watch = Watch(api)
    try:
        watch.next()  # the snapshot
        a = adjust(
            api, pb.SpendAdjustment(policy_id=p.id, amount_usd="-3", reason="double-reported")
        )
        assert (a.amount_usd, a.spent_before_usd, a.spent_after_usd) == ("-3.00", "11.00", "8.00")
        assert a.created_by == "admin"  # the role of the token, as for policies
        pushed = watch.next()
        expected = hour_spend(p.id, 8 * USD, 10 * USD, 1)
        expected.adjustment_seq = 1
        assert list(pushed.spend) == [expected]
    finally:
        watch.close()
    [entry] = api.budgets.ListSpend(
        pb.ListSpendRequest(policy_id=p.id), metadata=READ, timeout=TIMEOUT
    ).entries
    assert (entry.spent_usd, entry.adjusted_usd, entry.adjustment_count) == ("8.00", "-3.00", 1)
    # The read-only token lists adjustments, but may not make one.
    listed = api.budgets.ListSpendAdjustments(
        pb.ListSpendAdjustmentsRequest(policy_id=p.id), metadata=READ, timeout=TIMEOUT
    )
    assert list(listed.adjustments) == [a] and listed.next_page_token == ""
    err = rpc_error(
        api.budgets.CreateSpendAdjustment,
        pb.CreateSpendAdjustmentRequest(
            adjustment=pb.SpendAdjustment(policy_id=p.id, amount_usd="-1", reason="r")
        ),
        metadata=READ,
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_invalid_adjustments_name_their_fields(api: Api) -> None:
    p = create(api, policy(amount="10"))
    users = create(api, policy(name="u", amount="1", scope=pb.SCOPE_USER, target="*"))
    create_call = api.budgets.CreateSpendAdjustment
    cases = [
        (pb.CreateSpendAdjustmentRequest(), ["adjustment"]),
        (
            pb.CreateSpendAdjustmentRequest(adjustment=pb.SpendAdjustment(policy_id=p.id)),
            ["adjustment.amount_usd", "adjustment.reason"],
        ),
        (
            pb.CreateSpendAdjustmentRequest(
                adjustment=pb.SpendAdjustment(policy_id=p.id, amount_usd="1e9", reason="\x1b]0;x")
            ),
            ["adjustment.amount_usd", "adjustment.reason"],
        ),
        (
            pb.CreateSpendAdjustmentRequest(
                adjustment=pb.SpendAdjustment(policy_id=p.id, amount_usd="-1", reason="r")
            ),
            ["adjustment.amount_usd"],  # spend is $0: it would become negative
        ),
        (
            pb.CreateSpendAdjustmentRequest(
                adjustment=pb.SpendAdjustment(
                    policy_id=users.id, amount_usd="1", reason="r", member="x" * 100_000
                )
            ),
            ["adjustment.member"],
        ),
        (
            pb.CreateSpendAdjustmentRequest(
                adjustment=pb.SpendAdjustment(policy_id=users.id, amount_usd="1", reason="r")
            ),
            ["adjustment.member"],
        ),
        (
            pb.CreateSpendAdjustmentRequest(
                adjustment=pb.SpendAdjustment(policy_id="x" * 1000, amount_usd="1", reason="r")
            ),
            ["adjustment.policy_id"],
        ),
    ]
    for req, fields in cases:
        assert bad_fields(rpc_error(create_call, req, metadata=ADMIN)) == fields, req
    err = rpc_error(
        create_call,
        pb.CreateSpendAdjustmentRequest(
            adjustment=pb.SpendAdjustment(policy_id="bp_nope", amount_usd="1", reason="r")
        ),
        metadata=ADMIN,
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    list_call = api.budgets.ListSpendAdjustments
    for req, fields in [
        (pb.ListSpendAdjustmentsRequest(page_size=-1), ["page_size"]),
        (pb.ListSpendAdjustmentsRequest(page_token="A" * 100_000), ["page_token"]),
        (pb.ListSpendAdjustmentsRequest(member="x" * 10_000), ["member"]),
    ]:
        assert bad_fields(rpc_error(list_call, req, metadata=READ)) == fields, req
