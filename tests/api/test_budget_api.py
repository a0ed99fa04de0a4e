"""The control plane's gRPC API, through a real grpc.aio ControlPlaneServer on a
free port and real (sync) grpc stubs: validation with rich error details,
status codes, auth roles, health, reflection and the data-plane stream.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from control_plane.config import Settings
from control_plane.server import ControlPlaneServer
from spendgate.domain.policies import hash_api_key
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc, dataplane_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    FakeClock,
    LoopThread,
    bearer,
    free_port,
)

USD = 1_000_000_000
T0 = datetime(2025, 3, 10, 12, 17, 30, tzinfo=UTC)
HOUR_START = datetime(2025, 3, 10, 12, tzinfo=UTC)
HOUR_END = datetime(2025, 3, 10, 13, tzinfo=UTC)
ADMIN = bearer(ADMIN_TOKEN)
READ = bearer(READ_TOKEN)
DATA = bearer(DATA_PLANE_TOKEN)
TIMEOUT = 10


@dataclass
class Api:
    loop: LoopThread
    server: ControlPlaneServer
    channel: grpc.Channel
    budgets: budget_pb2_grpc.BudgetServiceStub
    dataplane: dataplane_pb2_grpc.DataPlaneServiceStub
    clock: FakeClock
    db_path: Path | None


@contextlib.contextmanager
def running_api(database_url: str, db_path: Path | None = None) -> Iterator[Api]:
    clock = FakeClock(T0)
    loop = LoopThread("control-plane-under-test")
    port = free_port()
    settings = Settings(
        listen=f"127.0.0.1:{port}",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        read_token=READ_TOKEN,
        data_plane_token=DATA_PLANE_TOKEN,
        metrics_listen="",
    )
    try:
        # grpc.aio objects must be made on the loop that runs them.
        server = loop.call(lambda: ControlPlaneServer(settings, clock=clock))
        loop.run(server.start())
    except BaseException:
        loop.stop()
        raise
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Api(
            loop,
            server,
            channel,
            budget_pb2_grpc.BudgetServiceStub(channel),
            dataplane_pb2_grpc.DataPlaneServiceStub(channel),
            clock,
            db_path,
        )
    finally:
        channel.close()
        loop.run(server.stop(grace=0))
        loop.stop()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    db = tmp_path / "spendgate.db"
    with running_api(f"sqlite:///{db}", db) as a:
        yield a


def policy(
    name: str = "team budget",
    *,
    amount: str = "10.00",
    unit: int = pb.WINDOW_UNIT_HOURS,
    count: int = 1,
    timezone: str = "",
    scope: int = pb.SCOPE_GLOBAL,
    target: str = "",
    action: int = pb.ACTION_REJECT,
    thresholds: tuple[int, ...] = (),
) -> pb.BudgetPolicy:
    return pb.BudgetPolicy(
        name=name,
        amount_usd=amount,
        window=pb.BudgetWindow(unit=unit, count=count),
        timezone=timezone,
        action=action,
        scope=scope,
        target=target,
        alert_thresholds=thresholds,
    )


def create(api: Api, p: pb.BudgetPolicy) -> pb.BudgetPolicy:
    return api.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(policy=p), metadata=ADMIN, timeout=TIMEOUT
    )


def list_all(api: Api, metadata: tuple[tuple[str, str]] = ADMIN) -> list[pb.BudgetPolicy]:
    resp = api.budgets.ListBudgetPolicies(
        pb.ListBudgetPoliciesRequest(), metadata=metadata, timeout=TIMEOUT
    )
    assert resp.next_page_token == ""
    return list(resp.policies)


def rpc_error(fn: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, timeout=TIMEOUT, **kwargs)  # type: ignore[operator]
    return e.value


def bad_fields(err: grpc.RpcError) -> list[str]:
    """The google.rpc.BadRequest field names of an INVALID_ARGUMENT error."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status details"
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert len(status.details) == 1
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert all(v.description for v in detail.field_violations)
    names = [v.field for v in detail.field_violations]
    for name in names:
        assert name in err.details()  # the message names the field too
    return names


def inc(
    policy_id: str, cost_nanos: int, *, member: str = "", at: datetime = T0
) -> dp.SpendIncrement:
    return dp.SpendIncrement(
        policy_id=policy_id,
        member=member,
        window_start=timestamp(at),
        cost_nanos=cost_nanos,
        request_count=1,
    )


def report(
    api: Api, batch_id: str, *incs: dp.SpendIncrement, dp_id: str = "dp-1"
) -> dp.ReportUsageResponse:
    return api.dataplane.ReportUsage(
        dp.ReportUsageRequest(data_plane_id=dp_id, batch_id=batch_id, increments=incs),
        metadata=DATA,
        timeout=TIMEOUT,
    )


def hour_spend(policy_id: str, spent: int, limit: int, requests: int) -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id=policy_id,
        window_start=timestamp(HOUR_START),
        window_end=timestamp(HOUR_END),
        spent_nanos=spent,
        limit_nanos=limit,
        exceeded=spent >= limit,
        request_count=requests,
    )


class Watch:
    """A WatchState stream read on a thread, so the test can wait with a timeout."""

    def __init__(self, api: Api, metadata: tuple[tuple[str, str]] = DATA) -> None:
        self.call = api.dataplane.WatchState(
            dp.WatchStateRequest(data_plane_id="dp-watch"), metadata=metadata
        )
        self.updates: queue.Queue[dp.StateUpdate | grpc.RpcError] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for update in self.call:
                self.updates.put(update)
        except grpc.RpcError as e:
            self.updates.put(e)

    def next(self) -> dp.StateUpdate:
        item = self.updates.get(timeout=TIMEOUT)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


# ---- validation -------------------------------------------------------------


def _without(field: str) -> pb.BudgetPolicy:
    p = policy()
    p.ClearField(field)
    return p


def _window(**kw: int) -> pb.BudgetPolicy:
    p = policy()
    p.window.CopyFrom(pb.BudgetWindow(**kw))
    return p


INVALID_POLICIES = {
    "negative amount": (policy(amount="-5"), ["amount_usd"]),
    "zero amount": (policy(amount="0"), ["amount_usd"]),
    "non-numeric amount": (policy(amount="abc"), ["amount_usd"]),
    "too many decimals": (policy(amount="1.0000000001"), ["amount_usd"]),
    "missing amount": (_without("amount_usd"), ["amount_usd"]),
    "missing name": (policy(name="  "), ["name"]),
    "unknown timezone": (policy(timezone="Mars/Olympus"), ["timezone"]),
    "window count 0": (_window(unit=pb.WINDOW_UNIT_DAYS, count=0), ["window.count"]),
    "window count too large": (_window(unit=pb.WINDOW_UNIT_DAYS, count=10_001), ["window.count"]),
    "missing window unit": (_window(count=1), ["window.unit"]),
    "missing action": (_without("action"), ["action"]),
    "missing scope": (_without("scope"), ["scope"]),
    "tag target without '='": (policy(scope=pb.SCOPE_TAG, target="team"), ["target"]),
    "global with a target": (policy(target="everyone"), ["target"]),
    "user without a target": (policy(scope=pb.SCOPE_USER), ["target"]),
    "threshold 0": (policy(thresholds=(50, 0)), ["alert_thresholds"]),
    "threshold repeated": (policy(thresholds=(50, 50)), ["alert_thresholds"]),
}


@pytest.mark.parametrize("case", list(INVALID_POLICIES))
def test_create_rejects_invalid_policy_naming_the_field(api: Api, case: str) -> None:
    msg, expected = INVALID_POLICIES[case]
    err = rpc_error(
        api.budgets.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(policy=msg), metadata=ADMIN
    )
    assert bad_fields(err) == expected
    assert list_all(api) == []


def test_create_names_every_bad_field_at_once(api: Api) -> None:
    msg = pb.BudgetPolicy(
        name="",
        amount_usd="abc",
        window=pb.BudgetWindow(count=0),
        timezone="Mars/Olympus",
        scope=pb.SCOPE_TAG,
        target="no-equals-sign",
        alert_thresholds=[0, 2000],
    )
    err = rpc_error(
        api.budgets.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(policy=msg), metadata=ADMIN
    )
    assert sorted(bad_fields(err)) == sorted(
        [
            "amount_usd",
            "name",
            "alert_thresholds",
            "alert_thresholds",
            "window.unit",
            "window.count",
            "timezone",
            "action",
            "target",
        ]
    )
    assert list_all(api) == []

    err = rpc_error(api.budgets.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(), metadata=ADMIN)
    assert bad_fields(err) == ["policy"]
    assert list_all(api) == []


def test_update_validation_not_found_and_stale_etag(api: Api) -> None:
    created = create(api, policy("orig"))
    assert created.created_by == "admin" and created.etag == "v1"

    err = rpc_error(
        api.budgets.UpdateBudgetPolicy,
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, name="x"),
            update_mask=FieldMask(paths=["name", "etag", "no_such_field"]),
        ),
        metadata=ADMIN,
    )
    assert bad_fields(err) == ["update_mask"]
    assert "etag" in err.details() and "no_such_field" in err.details()

    err = rpc_error(
        api.budgets.UpdateBudgetPolicy,
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, timezone="Mars/Olympus"),
            update_mask=FieldMask(paths=["timezone"]),
        ),
        metadata=ADMIN,
    )
    assert bad_fields(err) == ["timezone"]

    err = rpc_error(
        api.budgets.UpdateBudgetPolicy,
        pb.UpdateBudgetPolicyRequest(policy=pb.BudgetPolicy(name="x")),
        metadata=ADMIN,
    )
    assert bad_fields(err) == ["policy.id"]

    # A good update bumps the etag ...
    updated = api.budgets.UpdateBudgetPolicy(
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, amount_usd="25", etag=created.etag),
            update_mask=FieldMask(paths=["amount_usd"]),
        ),
        metadata=ADMIN,
        timeout=TIMEOUT,
    )
    assert (updated.amount_usd, updated.etag, updated.name) == ("25.00", "v2", "orig")

    # ... so the first etag is now stale: ABORTED, for update and delete.
    err = rpc_error(
        api.budgets.UpdateBudgetPolicy,
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, amount_usd="1", etag=created.etag),
            update_mask=FieldMask(paths=["amount_usd"]),
        ),
        metadata=ADMIN,
    )
    assert err.code() == grpc.StatusCode.ABORTED
    err = rpc_error(
        api.budgets.DeleteBudgetPolicy,
        pb.DeleteBudgetPolicyRequest(id=created.id, etag=created.etag),
        metadata=ADMIN,
    )
    assert err.code() == grpc.StatusCode.ABORTED
    assert list_all(api) == [updated]

    for call, req in (
        (api.budgets.GetBudgetPolicy, pb.GetBudgetPolicyRequest(id="bp_unknown")),
        (api.budgets.DeleteBudgetPolicy, pb.DeleteBudgetPolicyRequest(id="bp_unknown")),
        (
            api.budgets.UpdateBudgetPolicy,
            pb.UpdateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(id="bp_unknown", name="x"),
                update_mask=FieldMask(paths=["name"]),
            ),
        ),
        (api.budgets.ListSpend, pb.ListSpendRequest(policy_id="bp_unknown")),
    ):
        err = rpc_error(call, req, metadata=ADMIN)
        assert err.code() == grpc.StatusCode.NOT_FOUND, call
        assert "bp_unknown" in err.details()

    err = rpc_error(api.budgets.GetBudgetPolicy, pb.GetBudgetPolicyRequest(), metadata=ADMIN)
    assert bad_fields(err) == ["id"]
    err = rpc_error(
        api.budgets.ListBudgetPolicies,
        pb.ListBudgetPoliciesRequest(page_token="bogus!"),
        metadata=ADMIN,
    )
    assert bad_fields(err) == ["page_token"]

    api.budgets.DeleteBudgetPolicy(
        pb.DeleteBudgetPolicyRequest(id=created.id, etag="v2"), metadata=ADMIN, timeout=TIMEOUT
    )
    assert list_all(api) == []


def test_api_key_is_only_ever_stored_hashed(api: Api, capfd: pytest.CaptureFixture[str]) -> None:
    raw = "sk-live-THIS-IS-A-RAW-KEY-5f3a9c"
    hashed = hash_api_key(raw)
    created = create(api, policy("key budget", scope=pb.SCOPE_API_KEY, target=raw))
    assert created.target == hashed
    assert hashed.startswith("sha256:") and len(hashed) == len("sha256:") + 64
    got = api.budgets.GetBudgetPolicy(
        pb.GetBudgetPolicyRequest(id=created.id), metadata=READ, timeout=TIMEOUT
    )
    assert got == created
    assert list_all(api) == [created]

    # An update that sets the key again hashes it too.
    raw2 = "sk-live-ANOTHER-RAW-KEY-77e1d0"
    updated = api.budgets.UpdateBudgetPolicy(
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, target=raw2),
            update_mask=FieldMask(paths=["target"]),
        ),
        metadata=ADMIN,
        timeout=TIMEOUT,
    )
    assert updated.target == hash_api_key(raw2)
    # The hashed form is accepted as is.
    already = create(api, policy("hashed", scope=pb.SCOPE_API_KEY, target=hashed))
    assert already.target == hashed

    assert api.db_path is not None
    files = sorted(api.db_path.parent.glob(api.db_path.name + "*"))  # db, -wal, -shm
    assert api.db_path in files
    stored = b"".join(f.read_bytes() for f in files)
    assert hashed.encode() in stored  # the bytes searched do hold the policies
    assert hash_api_key(raw2).encode() in stored
    assert raw.encode() not in stored
    assert raw2.encode() not in stored
    # ... nor in the server's logs.
    out, err = capfd.readouterr()
    assert "policy created" in out + err
    assert raw not in out + err and raw2 not in out + err


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
    }


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
    err = rpc_error(
        api.dataplane.ReportUsage,
        dp.ReportUsageRequest(batch_id="b-neg", increments=[inc(p.id, -1)]),
        metadata=DATA,
    )
    assert bad_fields(err) == ["increments[0]"]

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
