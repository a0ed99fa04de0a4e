"""DataPlaneService over the wire: usage reports, the state stream, spend
following the clock, and a PostgreSQL smoke run.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from grpc_health.v1 import health_pb2, health_pb2_grpc

from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.api.apiserver import (
    ADMIN,
    DATA,
    HOUR_END,
    HOUR_START,
    READ,
    T0,
    TIMEOUT,
    USD,
    Api,
    Watch,
    bad_fields,
    create,
    hour_spend,
    inc,
    list_all,
    report,
    rpc_error,
    running_api,
)
from tests.store.builders import policy

# ---- data plane -------------------------------------------------------------------


def test_report_usage_and_watch_state(api: Api) -> None:
    p = create(api, policy("hourly", amount="10"))
    r1 = report(api, "b1", inc(p.id, 1_500_000_000), dp_id="dp-1")
    assert r1 == dp.ReportUsageResponse(spend=[hour_spend(p.id, 1_500_000_000, 10 * USD, 1)])
    again = report(api, "b1", inc(p.id, 1_500_000_000), dp_id="dp-1")
    assert again == dp.ReportUsageResponse(
        duplicate=True, spend=[hour_spend(p.id, 1_500_000_000, 10 * USD, 1)]
    )
    unknown = report(api, "b-unknown", inc("bp_gone", 1))
    assert unknown == dp.ReportUsageResponse(unknown_policy_increments=1)
    # A bad record is quarantined, not a reason to refuse the batch.
    neg = report(api, "b-neg", inc(p.id, -1), dp_id="dp-1")
    assert neg.quarantined_increments == 1
    err = rpc_error(
        api.dataplane.ReportUsage,
        dp.ReportUsageRequest(batch_id="x" * 81, increments=[inc(p.id, 1)]),
        metadata=DATA,
    )
    assert bad_fields(err) == ["batch_id"]

    watch = Watch(api)
    try:
        first = watch.next()
        assert first == dp.StateUpdate(
            policies=dp.PolicySnapshot(policies=[p]),
            spend=[hour_spend(p.id, 1_500_000_000, 10 * USD, 1)],
            full_snapshot=True,
            server_time=timestamp(T0),
            price_overrides=dp.PriceOverrides(),  # none set: an empty, complete set
        )

        # A new policy: the whole policy set is pushed.
        q = create(api, policy("per model", scope=pb.SCOPE_MODEL, target="gpt-4o"))
        pushed = watch.next()
        assert pushed == dp.StateUpdate(
            policies=dp.PolicySnapshot(policies=sorted([p, q], key=lambda x: x.id))
        )

        # Another data plane reports: the new total is pushed.
        report(api, "b2", inc(p.id, 9 * USD), dp_id="dp-2")
        pushed = watch.next()
        assert pushed == dp.StateUpdate(spend=[hour_spend(p.id, 10_500_000_000, 10 * USD, 2)])
        assert pushed.spend[0].exceeded is True

        # A duplicate pushes nothing; the next real change comes next.
        report(api, "b2", inc(p.id, 9 * USD), dp_id="dp-2")
        api.budgets.DeleteBudgetPolicy(
            pb.DeleteBudgetPolicyRequest(id=q.id), metadata=ADMIN, timeout=TIMEOUT
        )
        assert watch.next() == dp.StateUpdate(policies=dp.PolicySnapshot(policies=[p]))
        assert watch.updates.empty()
    finally:
        watch.close()


def test_list_spend_over_the_api_follows_the_clock(api: Api) -> None:
    p = create(api, policy("hourly", amount="10"))
    users = create(api, policy("users", amount="2", scope=pb.SCOPE_USER, target="*"))
    report(api, "b1", inc(p.id, 4 * USD), inc(users.id, 3 * USD, member="dana"))

    def entries(**kw: str) -> list[pb.SpendEntry]:
        resp = api.budgets.ListSpend(pb.ListSpendRequest(**kw), metadata=READ, timeout=TIMEOUT)
        assert resp.next_page_token == ""
        return list(resp.entries)

    def entry(
        pol: pb.BudgetPolicy, member: str, spent: str, left: str, n: int, start: datetime
    ) -> pb.SpendEntry:
        return pb.SpendEntry(
            policy_id=pol.id,
            policy_name=pol.name,
            scope=pol.scope,
            target=pol.target,
            member=member,
            action=pol.action,
            window_start=timestamp(start),
            window_end=timestamp(start + timedelta(hours=1)),
            spent_usd=spent,
            limit_usd=pol.amount_usd,
            remaining_usd=left,
            exceeded=spent != "0.00" and left == "0.00",
            request_count=n,
            held_usd="0.00",
        )

    assert entries() == sorted(
        [
            entry(p, "", "4.00", "6.00", 1, HOUR_START),
            entry(users, "dana", "3.00", "0.00", 1, HOUR_START),
        ],
        key=lambda e: e.policy_id,
    )
    assert entries(member="dana") == [entry(users, "dana", "3.00", "0.00", 1, HOUR_START)]

    api.clock.set(HOUR_END)
    assert entries() == [entry(p, "", "0.00", "10.00", 0, HOUR_END)]


def test_postgresql_smoke(pg_url: str) -> None:
    with running_api(pg_url) as api:
        p = create(api, policy("pg", amount="3", scope=pb.SCOPE_USER, target="*"))
        assert list_all(api) == [p]
        r = report(api, "b1", inc(p.id, 2 * USD, member="erin"), inc(p.id, USD, member="erin"))
        assert r.spend == [
            dp.WindowSpend(
                policy_id=p.id,
                member="erin",
                window_start=timestamp(HOUR_START),
                window_end=timestamp(HOUR_END),
                spent_nanos=3 * USD,
                limit_nanos=3 * USD,
                exceeded=True,
                request_count=2,
            )
        ]
        assert report(api, "b1", inc(p.id, 2 * USD, member="erin")).duplicate is True
        spend = api.budgets.ListSpend(pb.ListSpendRequest(), metadata=READ, timeout=TIMEOUT)
        assert [(e.member, e.spent_usd, e.exceeded) for e in spend.entries] == [
            ("erin", "3.00", True)
        ]
        health = health_pb2_grpc.HealthStub(api.channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        api.budgets.DeleteBudgetPolicy(
            pb.DeleteBudgetPolicyRequest(id=p.id, etag=p.etag), metadata=ADMIN, timeout=TIMEOUT
        )
        assert list_all(api) == []
