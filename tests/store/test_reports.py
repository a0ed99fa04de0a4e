"""Chargeback rollups in the control plane's store: applied with usage batches
exactly once, queried by any dimension and tag, paged, and forgotten after
their retention. Every test runs on SQLite and on PostgreSQL (``db_url``)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from control_plane.errors import InvalidArgument
from control_plane.service import ControlPlane
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import reports_pb2 as rp
from tests.harness import FakeClock
from tests.store.builders import HOUR_START, ts

H = ts(HOUR_START)
MAX = 2**63 - 1


def rollup(
    user: str = "alice",
    model: str = "gpt-4o",
    cost: int = 1000,
    *,
    hour: int = H,
    tags: dict[str, str] | None = None,
    requests: int = 1,
    estimated: int = 0,
    inp: int = 10,
    out: int = 5,
    route: str = "openai",
) -> rp.UsageRollup:
    return rp.UsageRollup(
        hour=hour,
        route=route,
        provider="openai",
        model=model,
        user=user,
        workspace="ws",
        api_key_hash="k" * 64,
        tags=tags or {},
        cost_nanos=cost,
        input_tokens=inp,
        output_tokens=out,
        request_count=requests,
        estimated_count=estimated,
    )


def report(batch_id: str, *rollups: rp.UsageRollup) -> dp.ReportUsageRequest:
    return dp.ReportUsageRequest(data_plane_id="dp-1", batch_id=batch_id, rollups=rollups)


def query(
    *group_by: str,
    tag_key: str = "",
    start: int = H - 86400,
    end: int | None = H + 86400,
    filters: dict[str, str] | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> rp.QuerySpendRequest:
    req = rp.QuerySpendRequest(
        group_by=group_by,
        tag_key=tag_key,
        start_time=Timestamp(seconds=start),
        filters=[rp.DimensionFilter(dimension=k, value=v) for k, v in (filters or {}).items()],
        page_size=page_size,
        page_token=page_token,
    )
    if end is not None:
        req.end_time.seconds = end
    return req


def table(resp: rp.QuerySpendResponse) -> list[tuple[object, ...]]:
    return [
        (*g.values, g.cost_nanos, g.input_tokens, g.output_tokens, g.request_count)
        for g in resp.groups
    ]


async def test_rollups_count_once_per_batch_and_group_by_any_dimension(cp: ControlPlane) -> None:
    first = report(
        "b1",
        rollup("alice", "gpt-4o", 1000, tags={"team": "red"}),
        rollup("bob", "gpt-4o", 2000, requests=2, estimated=1, tags={"team": "blue"}),
        rollup("alice", "claude", 4000, hour=H + 3600),
    )
    r = await cp.apply_usage(first)
    assert (r.duplicate, r.refused_rollups) == (False, 0)
    again = await cp.apply_usage(first)  # a retry with the same id adds nothing
    assert again.duplicate is True
    await cp.apply_usage(report("b2", rollup("alice", "gpt-4o", 7, inp=1, out=1)))

    by_user_model = await cp.query_spend(query("user", "model"))
    assert list(by_user_model.columns) == ["user", "model"]
    assert table(by_user_model) == [
        ("alice", "claude", 4000, 10, 5, 1),
        ("alice", "gpt-4o", 1007, 11, 6, 2),
        ("bob", "gpt-4o", 2000, 10, 5, 2),
    ]
    assert by_user_model.groups[1].cost_usd == "0.000001007"
    assert by_user_model.next_page_token == ""
    total = await cp.query_spend(query())
    assert table(total) == [(7007, 31, 16, 5)]
    assert total.groups[0].estimated_count == 1
    by_hour = await cp.query_spend(query("hour"))
    assert table(by_hour) == [
        ("2025-03-10T12:00:00Z", 3007, 21, 11, 4),
        ("2025-03-10T13:00:00Z", 4000, 10, 5, 1),
    ]
    only_second_hour = await cp.query_spend(query("api_key", start=H + 3600 + 59))
    assert table(only_second_hour) == [("k" * 64, 4000, 10, 5, 1)]
    filtered = await cp.query_spend(query("model", filters={"user": "alice"}))
    assert table(filtered) == [("claude", 4000, 10, 5, 1), ("gpt-4o", 1007, 11, 6, 2)]


async def test_group_by_tag_puts_untagged_requests_in_their_own_group(cp: ControlPlane) -> None:
    await cp.apply_usage(
        report(
            "b1",
            rollup("alice", cost=100, tags={"team": "red", "env": "prod"}),
            rollup("bob", cost=20, tags={"team": "blue"}),
            rollup("bob", cost=3, requests=3),  # no tag
            rollup("carol", cost=9, tags={"env": "dev"}),
        )
    )
    by_team = await cp.query_spend(query(tag_key="team"))
    assert list(by_team.columns) == ["tag:team"]
    assert table(by_team) == [("", 12, 20, 10, 4), ("blue", 20, 10, 5, 1), ("red", 100, 10, 5, 1)]
    by_user_team = await cp.query_spend(query("user", tag_key="team"))
    assert table(by_user_team) == [
        ("alice", "red", 100, 10, 5, 1),
        ("bob", "", 3, 10, 5, 3),
        ("bob", "blue", 20, 10, 5, 1),
        ("carol", "", 9, 10, 5, 1),
    ]
    red_only = await cp.query_spend(query("user", filters={"tag:team": "red"}))
    assert table(red_only) == [("alice", 100, 10, 5, 1)]
    # Every report adds up to the same total.
    assert sum(g.cost_nanos for g in by_team.groups) == 132
    with pytest.raises(InvalidArgument, match="one tag key"):
        await cp.query_spend(query(tag_key="team", filters={"tag:env": "prod"}))


async def test_pages_cover_every_group_once_and_tokens_fit_one_query(cp: ControlPlane) -> None:
    await cp.apply_usage(
        report(
            "b1", *(rollup(f"user-{n:02d}", cost=n + 1, hour=H + 3600 * (n % 3)) for n in range(25))
        )
    )
    seen: list[tuple[object, ...]] = []
    token = ""
    pages = 0
    while True:
        resp = await cp.query_spend(query("hour", "user", page_size=4, page_token=token))
        seen += table(resp)
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert pages == 7
    whole = await cp.query_spend(query("hour", "user", page_size=1000))
    assert seen == table(whole) and len(seen) == 25
    first = await cp.query_spend(query("hour", "user", page_size=4))
    with pytest.raises(InvalidArgument, match="page_token"):
        await cp.query_spend(query("user", page_size=4, page_token=first.next_page_token))
    with pytest.raises(InvalidArgument, match="page_token"):
        await cp.query_spend(query("hour", "user", page_token=first.next_page_token + "x"))


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (query("nope"), "group_by"),
        (query("user", "user"), "group_by"),
        (query(start=H, end=H), "end_time"),
        (query(start=-1), "start_time"),
        (query(end=10**12), "end_time"),
        (query(filters={"hour": "1"}), "filters[0].dimension"),
        (query(filters={"colour": "x"}), "filters[0].dimension"),
        (query(filters={"user": "a\x00b"}), "filters[0].value"),
        (query(filters={"tag:team": ""}), "filters[0]"),
        (query(tag_key="t" * 513), "tag_key"),
        (rp.QuerySpendRequest(group_by=["user"]), "start_time"),
    ],
    ids=[
        "unknown-dimension",
        "dimension-twice",
        "empty-range",
        "negative-start",
        "end-beyond-9999",
        "filter-hour",
        "filter-unknown",
        "filter-control-char",
        "tag-filter-empty",
        "tag-key-huge",
        "start-missing",
    ],
)
async def test_bad_queries_name_the_field(
    cp: ControlPlane, req: rp.QuerySpendRequest, field: str
) -> None:
    with pytest.raises(InvalidArgument) as e:
        await cp.query_spend(req)
    assert e.value.violations[0].field == field


async def test_invalid_rollups_are_dropped_and_counted_not_the_batch(cp: ControlPlane) -> None:
    bad = [
        rollup(hour=H + 1),
        rollup(cost=-1),
        rollup(requests=0),
        rollup(requests=1, estimated=2),
        rollup(user="a\x00"),
        rollup(model="m" * 513),
        rollup(tags={f"k{n}": "v" for n in range(33)}),
        rollup(tags={"team": ""}),
    ]
    r = await cp.apply_usage(report("b1", rollup(cost=5), *bad))
    assert r.refused_rollups == len(bad)
    assert table(await cp.query_spend(query())) == [(5, 10, 5, 1)]
    with pytest.raises(InvalidArgument, match="batch_id"):
        await cp.apply_usage(dp.ReportUsageRequest(data_plane_id="dp", rollups=[rollup()]))


async def test_sums_saturate_instead_of_overflowing(cp: ControlPlane) -> None:
    await cp.apply_usage(report("b1", rollup(cost=MAX - 10, inp=MAX)))
    await cp.apply_usage(report("b2", rollup(cost=1000, inp=5)))
    assert table(await cp.query_spend(query("user"))) == [("alice", MAX, MAX, 10, 2)]
    # Groups whose rows together pass the int64 maximum saturate too.
    await cp.apply_usage(report("b3", rollup("bob", cost=MAX, inp=MAX - 1)))
    await cp.apply_usage(report("b4", rollup("carol", cost=3 * 10**18, inp=7)))
    assert table(await cp.query_spend(query())) == [(MAX, MAX, 20, 4)]
    by_user = await cp.query_spend(query("user"))
    assert [(g.values[0], g.cost_nanos) for g in by_user.groups] == [
        ("alice", MAX),
        ("bob", MAX),
        ("carol", 3 * 10**18),
    ]


async def test_retention_forgets_old_hours(cp: ControlPlane, clock: FakeClock) -> None:
    await cp.apply_usage(
        report("b1", rollup("old", hour=H - 3 * 86400), rollup("new", hour=H - 3600))
    )
    assert await cp.forget_old_rollups(timedelta(days=2)) == 1
    assert await cp.forget_old_rollups(timedelta(days=2)) == 0
    left = await cp.query_spend(query("user", start=H - 10 * 86400))
    assert [g.values[0] for g in left.groups] == ["new"]


async def test_pages_without_end_time_keep_the_first_pages_end(
    cp: ControlPlane, clock: FakeClock
) -> None:
    await cp.apply_usage(report("b1", *(rollup(f"u{n}", cost=1) for n in range(3))))
    first = await cp.query_spend(query("user", end=None, page_size=2))
    assert [g.values[0] for g in first.groups] == ["u0", "u1"]
    # Time passes and usage of a later hour arrives: the next page still
    # ends where the first did.
    clock.advance(timedelta(hours=3))
    await cp.apply_usage(report("b2", rollup("u3", cost=1, hour=H + 2 * 3600)))
    rest = await cp.query_spend(
        query("user", end=None, page_size=2, page_token=first.next_page_token)
    )
    assert [g.values[0] for g in rest.groups] == ["u2"] and rest.next_page_token == ""
    fresh = await cp.query_spend(query("user", end=None, page_size=10))
    assert [g.values[0] for g in fresh.groups] == ["u0", "u1", "u2", "u3"]


async def test_every_grouping_adds_up_to_the_same_total(cp: ControlPlane) -> None:
    """Whatever the dimensions, tag and filter, the groups of a report sum to
    the total of the usage it covers."""
    data = [
        rollup("alice", "gpt-4o", 11, tags={"team": "red", "env": "prod"}, route="a"),
        rollup("alice", "claude", 13, tags={"team": "blue"}, hour=H + 3600),
        rollup("bob", "gpt-4o", 17, requests=2, route="b"),
        rollup("bob", "claude", 19, tags={"env": "dev"}, hour=H - 3600),
        rollup("carol", "gpt-4o", 23, tags={"team": "red"}),
    ]
    await cp.apply_usage(report("b1", *data))
    dims = ["hour", "route", "model", "user"]
    for mask in range(1 << len(dims)):
        group = [d for i, d in enumerate(dims) if mask >> i & 1]
        for tag in ("", "team", "env"):
            resp = await cp.query_spend(query(*group, tag_key=tag, page_size=3))
            token, groups = resp.next_page_token, list(resp.groups)
            while token:
                more = await cp.query_spend(query(*group, tag_key=tag, page_token=token))
                groups += more.groups
                token = more.next_page_token
            assert sum(g.cost_nanos for g in groups) == 83, (group, tag)
            assert sum(g.request_count for g in groups) == 6, (group, tag)
            keys = [tuple(g.values) for g in groups]
            assert keys == sorted(set(keys)), (group, tag)  # ordered, each group once
    red = await cp.query_spend(query("user", filters={"tag:team": "red", "model": "gpt-4o"}))
    assert table(red) == [("alice", 11, 10, 5, 1), ("carol", 23, 10, 5, 1)]
