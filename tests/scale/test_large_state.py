"""A large state reaches ext_proc and the admin CLI in pieces (SQLite and
PostgreSQL, real Envoy, the official OpenAI SDK).

The store is filled directly (the API would take minutes): 10,000 policies
with descriptions of STANDARD_DESCRIPTION characters, three with descriptions
of 1 to 3.5 MB, and 100,000 members of one `*` policy (70 bytes each) in the
current window. Together far more than gRPC's 4 MB message limit, which the
whole state in one message used to exceed. Then: ext_proc syncs it all, a new
REJECT policy is enforced through Envoy, `spendgate status`, `spend` and
`policy list` work, and an ext_proc restarted from its saved snapshot syncs
again and enforces a policy created while it was down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import insert
from sqlalchemy.orm import Session

from control_plane.store import repo
from control_plane.store.db import create_db_engine, migrate
from control_plane.store.models import PolicyRow, WindowSpendRow
from ext_proc.server import SYNC_HEALTH_SERVICE, ExtProcServer
from spendgate.domain.windows import WindowSpec, WindowUnit, window_for
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness import (
    READ_TOKEN,
    FakeClock,
    env_without_spendgate,
    grpc_channel,
    wait_until,
)

pytestmark = pytest.mark.e2e
SPENDGATE = [sys.executable, "-m", "spendgate.cli.main"]
POLICIES = 10_000
MEMBERS = 100_000


def member(m: int) -> str:
    return f"user-{m:06d}@" + "example-tenant-with-a-long-name.".ljust(58, "x")


# The caller of the test's requests: one of the members already loaded.
MEMBER_0 = member(0)
STANDARD_DESCRIPTION = 2_000  # characters; descriptions of ordinary policies
LARGE_DESCRIPTIONS = (1_000_000, 2_000_000, 3_500_000)
SYNC_TIMEOUT = 240  # generous: two cores shared by many test runs


def fill(database_url: str, now: datetime) -> str:
    """Bulk-insert the large state; the id of the `*` policy."""
    engine = create_db_engine(database_url)
    migrate(engine)
    base = {
        "amount_nanos": 1000 * 10**9,
        "window_unit": WindowUnit.DAYS.value,
        "window_count": 1,
        "week_start": 0,
        "timezone": "UTC",
        "action": "REJECT",
        "alert_thresholds": "",
        "enabled": True,
        "create_time": now,
        "update_time": now,
        "created_by": "bulk",
        "updated_by": "bulk",
        "version": 1,
    }
    rows = [
        {
            **base,
            "id": repo.new_policy_id(),
            "name": f"team-{i:05d}",
            "description": f"{i:05d} " + "d" * (STANDARD_DESCRIPTION - 6),
            "scope": "WORKSPACE",
            "target": f"workspace-{i:05d}",
        }
        for i in range(POLICIES)
    ]
    for i, size in enumerate(LARGE_DESCRIPTIONS):
        rows[i]["description"] = "L" * size
    wildcard = repo.new_policy_id()
    rows.append(
        {**base, "id": wildcard, "name": "each user", "description": "", "scope": "USER",
         "target": "*"}
    )  # fmt: skip
    day = window_for(WindowSpec(WindowUnit.DAYS, 1, "UTC", 0), now)
    start, end = int(day.start.timestamp()), int(day.end.timestamp())
    with Session(engine) as s, s.begin():
        for i in range(0, len(rows), 500):
            s.execute(insert(PolicyRow), rows[i : i + 500])
        windows = [
            {
                "policy_id": wildcard,
                "member": member(m),
                "window_start": start,
                "window_end": end,
                "spent_nanos": 1000 + m,
                "request_count": 1,
                "estimated_count": 0,
                "updated_at": now,
            }
            for m in range(MEMBERS)
        ]
        assert len(windows[0]["member"]) == 70  # type: ignore[arg-type]
        for i in range(0, MEMBERS, 5000):
            s.execute(insert(WindowSpendRow), windows[i : i + 5000])
    engine.dispose()
    return wildcard


@pytest.fixture
def big(db_url: str) -> Iterator[tuple[Stack, str]]:
    clock = FakeClock(datetime.now(UTC))
    wildcard = fill(db_url, clock())
    stack = start_stack(db_url, clock=clock, ext_proc={"metrics_listen": ""})
    try:
        yield stack, wildcard
    finally:
        stop_stack(stack)


def synced(ext: ExtProcServer, policies: int) -> bool:
    return (
        ext.sync.connected.is_set()
        and len(ext.state.index) >= policies
        and len(ext.state.remote) >= MEMBERS
    )


def sync_health(ext: ExtProcServer) -> int:
    with grpc_channel(ext.port) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SYNC_HEALTH_SERVICE), timeout=10
        )
    return int(resp.status)


def reject_model(stack: Stack, model: str) -> pb.BudgetPolicy:
    """A REJECT policy on one model whose first answer spends it."""
    created: pb.BudgetPolicy = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name=f"cap-{model}-{uuid.uuid4().hex[:4]}",
                amount_usd="0.000001",
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                action=pb.ACTION_REJECT,
                scope=pb.SCOPE_MODEL,
                target=model,
            )
        ),
        metadata=stack.admin,
        timeout=30,
    )
    return created


def enforced(stack: Stack, policy: pb.BudgetPolicy, model: str) -> None:
    """The first request crosses the policy's line (and is charged), the
    next gets the SDK's RateLimitError naming it."""
    client = openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        max_retries=0,
        # The "each user" REJECT policy needs a member (missing_identity: reject).
        default_headers={"x-spendgate-user": MEMBER_0},
    )
    ask = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    client.chat.completions.create(**ask)  # type: ignore[call-overload]

    def charged() -> bool:
        resp = stack.budgets.ListSpend(
            pb.ListSpendRequest(policy_id=policy.id), metadata=stack.admin, timeout=30
        )
        return any(e.exceeded for e in resp.entries)

    wait_until(charged, timeout=30, message=f"{policy.name} charged")
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert policy.id in str(e.value)


def cli_json(stack: Stack, *args: str) -> object:
    """The spendgate command's --json output (its own process, read-only token)."""
    server = f"127.0.0.1:{stack.cp.port}"
    done = subprocess.run(
        [*SPENDGATE, *args, "--json", "--server", server, "--token", READ_TOKEN],
        capture_output=True,
        text=True,
        timeout=300,
        env=env_without_spendgate(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_a_large_state_syncs_is_enforced_listed_and_survives_a_restart(
    big: tuple[Stack, str],
) -> None:
    stack, wildcard = big
    total = POLICIES + 1
    wait_until(lambda: synced(stack.ext, total), timeout=SYNC_TIMEOUT, message="ext_proc synced")
    ext = stack.ext
    assert ext.sync.stream_stats.failures == {}
    assert ext.sync.stream_stats.resyncs == 1
    assert sync_health(ext) == health_pb2.HealthCheckResponse.SERVING
    assert ext.state.spent((wildcard, f"user-{7:06d}@" + "example-tenant-with-a-long-name."
                            .ljust(58, "x"), next(iter(ext.state.remote))[2])) >= 1007  # fmt: skip

    # A new REJECT policy after all this: pushed as an increment, enforced.
    first = reject_model(stack, "gpt-4o-mini")
    wait_until(lambda: first.id in ext.state.index.policies, message="new policy in ext_proc")
    enforced(stack, first, "gpt-4o-mini")

    # Admin reads page by size and count.
    listed = cli_json(stack, "policy", "list")
    assert isinstance(listed, list) and len(listed) == total + 1
    spend = cli_json(stack, "spend", "--policy", wildcard)
    assert isinstance(spend, list) and len(spend) == MEMBERS
    status = cli_json(stack, "status", "--top", "3")
    assert isinstance(status, dict)
    by_id = {p["id"]: p for p in status["policies"]}
    assert len(by_id) == total + 1 and by_id[first.id]["state"] == "EXCEEDED"

    # Restart ext_proc from its saved snapshot; a policy created meanwhile
    # reaches it by the resync that follows.
    settings = ext.settings
    stack.loop.run(ext.stop(grace=1))
    second = reject_model(stack, "gpt-4o")
    restarted = stack.loop.call(lambda: ExtProcServer(settings, clock=stack.clock))
    stack.ext = restarted
    assert first.id in restarted.state.index.policies  # from the saved snapshot
    assert second.id not in restarted.state.index.policies
    assert len(restarted.state.remote) >= MEMBERS
    stack.loop.run(restarted.start())
    wait_until(
        lambda: second.id in restarted.state.index.policies and synced(restarted, total + 2),
        timeout=SYNC_TIMEOUT,
        message="restarted ext_proc synced",
    )
    assert restarted.sync.stream_stats.failures == {}
    assert sync_health(restarted) == health_pb2.HealthCheckResponse.SERVING
    enforced(stack, second, "gpt-4o")
    # The first policy is still spent, as the control plane knows.
    client = openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        max_retries=0,
        # The "each user" REJECT policy needs a member (missing_identity: reject).
        default_headers={"x-spendgate-user": MEMBER_0},
    )
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
