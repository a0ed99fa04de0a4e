"""Every supervised ext_proc task, broken on purpose through a real stack
(official SDK -> real Envoy -> ext_proc -> fake provider; control plane in
process): the failure is logged at error level with what the task was doing,
counted in spendgate_task_failures_total{task}, shown by the gRPC health
service that depends on it (NOT_SERVING, then SERVING once it recovered),
and the restarted task works again — usage spent meanwhile reaches the
control plane exactly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal

import openai
import psycopg
import pytest

from ext_proc.server import SYNC_HEALTH_SERVICE, USAGE_HEALTH_SERVICE
from ext_proc.sync import snapshot
from ext_proc.sync.client import FLUSH_TASK, RESERVE_TASK, SNAPSHOT_TASK, WATCH_TASK
from ext_proc.sync.statestream import StateStream
from spendgate.domain.pricing import NANOS_PER_USD, PriceBook, cost_nanos
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness import wait_until
from tests.metrics.scrape import scrape
from tests.supervision.faults import (
    SERVING,
    Fault,
    HealthWatch,
    assert_failure_logged,
    captured_logs,
    check,
)

pytestmark = pytest.mark.e2e
METRICS = {"metrics_listen": "127.0.0.1:0"}
PRICES = PriceBook.bundled()
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}  # $0.00045


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def sv(request: pytest.FixtureRequest) -> Iterator[Stack]:
    database_url = None  # SQLite in the stack's own folder
    name = ""
    if request.param == "postgresql":
        server = request.getfixturevalue("pg_server")
        name = f"spendgate_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        database_url = server.rsplit("/", 1)[0] + f"/{name}"
    stack = start_stack(database_url, ext_proc=METRICS, control_plane=METRICS)
    # Broken for at least half a second per failure: long enough for a
    # health Watch stream to report it on a busy machine.
    stack.ext.supervisor.min_backoff_s = 0.5
    yield stack
    stop_stack(stack)
    if name:
        with psycopg.connect(request.getfixturevalue("pg_server"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create(sv: Stack, **fields: object) -> pb.BudgetPolicy:
    fields.setdefault("window", pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1))
    fields.setdefault("action", pb.ACTION_ALERT)
    fields.setdefault("amount_usd", "1000")
    fields.setdefault("scope", pb.SCOPE_GLOBAL)
    fields.setdefault("name", f"sup-{uuid.uuid4().hex[:6]}")
    policy = sv.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(policy=pb.BudgetPolicy(**fields)),  # type: ignore[arg-type]
        metadata=sv.admin,
    )
    return policy


def delete(sv: Stack, policy: pb.BudgetPolicy) -> None:
    sv.budgets.DeleteBudgetPolicy(pb.DeleteBudgetPolicyRequest(id=policy.id), metadata=sv.admin)


def arrived(sv: Stack, policy: pb.BudgetPolicy) -> bool:
    return policy.id in sv.ext.state.index.policies


def chat(sv: Stack, n: int) -> None:
    with openai.OpenAI(
        base_url=sv.envoy.base_url + "/v1", api_key="sk-test", default_headers=BIG, max_retries=0
    ) as client:
        for _ in range(n):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
            )


def billed(sv: Stack) -> Decimal:
    total = 0
    for b in sv.provider.log.billed:
        price = PRICES.lookup(b.model)
        assert price is not None
        total += cost_nanos(b.usage, price)
    return Decimal(total) / NANOS_PER_USD


def recorded(sv: Stack, policy: pb.BudgetPolicy) -> Decimal:
    resp = sv.budgets.ListSpend(pb.ListSpendRequest(policy_id=policy.id), metadata=sv.admin)
    return sum((Decimal(e.spent_usd) for e in resp.entries), Decimal(0))


def failures(sv: Stack, task: str) -> float:
    return scrape(sv.ext.metrics_port).value("spendgate_task_failures_total", task=task)


def wait_spend_equals_billed(sv: Stack, policy: pb.BudgetPolicy) -> Decimal:
    want = billed(sv)
    assert want > 0
    wait_until(lambda: recorded(sv, policy) == want, timeout=30, message=f"spend {want}")
    return want


@pytest.fixture
def policy(sv: Stack) -> Iterator[pb.BudgetPolicy]:
    """A fresh GLOBAL policy (ALERT) known to ext_proc; the provider's bill
    starts empty, so what it bills from here is what the policy must record."""
    p = create(sv)
    wait_until(lambda: arrived(sv, p), message="policy reaches ext_proc")
    sv.provider.log.clear()
    yield p
    delete(sv, p)


def _flush_fault(sv: Stack, step: str, times: int) -> Fault:
    if step == "flush":
        # The reported bug: a cost beyond int64 made protobuf encoding raise
        # inside the flush, which killed the task for good.
        return Fault(sv.ext.sync, "flush", times, ValueError("Value out of range: 10**20"))
    if step == "send":
        return Fault(sv.ext.sync, "_send_in_flight", times)
    assert step == "holds"
    return Fault(sv.ext.sync, "_report_holds", times)


# Each step of the flush loop (every flush interval): the whole flush, sending
# the batches, reporting holds (when no batch carried them).
@pytest.mark.parametrize("step", ["flush", "send", "holds"])
def test_flush_usage(sv: Stack, policy: pb.BudgetPolicy, step: str) -> None:
    times = 3
    before = failures(sv, FLUSH_TASK)
    watch = HealthWatch(sv.ext.port, USAGE_HEALTH_SERVICE)
    with captured_logs() as events:
        fault = _flush_fault(sv, step, times)
        try:
            chat(sv, 3)  # answered while usage delivery is broken
            wait_until(lambda: fault.spent, timeout=30, message="every injected failure")
            watch.wait_broken_then_serving()
        finally:
            fault.undo()
            watch.close()
        chat(sv, 2)
        total = wait_spend_equals_billed(sv, policy)
    assert total == Decimal("0.00225")  # 5 x $0.00045, nothing lost or doubled
    assert_failure_logged(events, FLUSH_TASK, times, "sending it to the control plane")
    assert failures(sv, FLUSH_TASK) == before + times
    assert check(sv.ext.port, USAGE_HEALTH_SERVICE) == SERVING


def test_watch_state(sv: Stack) -> None:
    before = failures(sv, WATCH_TASK)
    watch = HealthWatch(sv.ext.port, SYNC_HEALTH_SERVICE)
    with captured_logs() as events:
        # The pushed policy, then the first resync page of the restarted
        # stream, fail to be received (a bug, not a message StateStream refuses).
        fault = Fault(StateStream, "receive", 2)
        try:
            p = create(sv)
            wait_until(lambda: fault.spent, timeout=30, message="every injected failure")
            watch.wait_broken_then_serving()
        finally:
            fault.undo()
            watch.close()
    try:
        # The restarted stream delivered the policy it missed: it is enforced and charged.
        wait_until(lambda: arrived(sv, p), message="policy reaches ext_proc")
        sv.provider.log.clear()
        chat(sv, 2)
        assert wait_spend_equals_billed(sv, p) == Decimal("0.0009")
    finally:
        delete(sv, p)
    # The broken streams were closed: the control plane serves one, not three.
    wait_until(lambda: sv.cp.cp.hub.subscriber_count == 1, message="one state stream")
    assert_failure_logged(events, WATCH_TASK, 2, "state stream")
    assert failures(sv, WATCH_TASK) == before + 2
    assert check(sv.ext.port, SYNC_HEALTH_SERVICE) == SERVING


def test_save_snapshot(sv: Stack, policy: pb.BudgetPolicy) -> None:
    before = failures(sv, SNAPSHOT_TASK)
    watch = HealthWatch(sv.ext.port, SYNC_HEALTH_SERVICE)
    with captured_logs() as events:
        fault = Fault(sv.ext.sync, "save_state", 2, OSError(28, "No space left on device"))
        try:
            wait_until(lambda: fault.spent, timeout=30, message="every injected failure")
            watch.wait_broken_then_serving()
        finally:
            fault.undo()
            watch.close()
    # Saving works again: a policy created now is in the snapshot on disk.
    p = create(sv)
    try:
        journal = sv.ext.state.journal
        assert journal is not None

        def saved() -> bool:
            s = snapshot.load(journal.directory)
            return s is not None and any(x.policy.id == p.id for x in s.policy_changes.upserts)

        wait_until(saved, timeout=30, message="the policy in the saved snapshot")
        chat(sv, 1)  # usage kept flowing all along
        wait_spend_equals_billed(sv, policy)
    finally:
        delete(sv, p)
    assert_failure_logged(events, SNAPSHOT_TASK, 2, "saving the policy snapshot")
    assert failures(sv, SNAPSHOT_TASK) == before + 2


def test_reserve(sv: Stack) -> None:
    # Room for about 22 requests of $0.00045: every request is close enough
    # to the line to be admitted by the control plane (arbiter_headroom_requests).
    p = create(sv, amount_usd="0.01", action=pb.ACTION_REJECT)
    wait_until(lambda: arrived(sv, p), message="policy reaches ext_proc")
    sv.provider.log.clear()
    stats = sv.ext.ctx.stats
    try:
        chat(sv, 1)
        assert stats.arbitrations.get("admitted", 0) >= 1
        before = failures(sv, RESERVE_TASK)
        watch = HealthWatch(sv.ext.port, SYNC_HEALTH_SERVICE)
        unanswered = stats.arbitrations.get("unanswered", 0)
        with captured_logs() as events:
            fault = Fault(sv.ext.sync._stub, "Reserve", 1)
            try:
                chat(sv, 1)  # decided on the local view after arbiter_timeout_ms
                assert fault.spent
                watch.wait_broken_then_serving()
            finally:
                fault.undo()
                watch.close()
        assert stats.arbitrations.get("unanswered", 0) == unanswered + 1
        admitted = stats.arbitrations.get("admitted", 0)
        chat(sv, 1)  # the control plane arbitrates again
        assert stats.arbitrations.get("admitted", 0) == admitted + 1
        assert wait_spend_equals_billed(sv, p) == Decimal("0.00135")
    finally:
        delete(sv, p)
    assert_failure_logged(events, RESERVE_TASK, 1, "admit requests near a budget's line")
    assert failures(sv, RESERVE_TASK) == before + 1


def test_health_publisher(sv: Stack) -> None:
    ext = sv.ext
    before = failures(sv, "health")
    with captured_logs() as events:
        fault = Fault(ext.board, "publish", 1)
        try:
            sv.loop.call(lambda: ext.board.report("test", True, (USAGE_HEALTH_SERVICE,)))
            wait_until(lambda: fault.spent, message="the injected failure")
            # Restarted, it publishes what changed meanwhile.
            wait_until(
                lambda: check(ext.port, USAGE_HEALTH_SERVICE) != SERVING,
                message="NOT_SERVING published",
            )
        finally:
            fault.undo()
            sv.loop.call(lambda: ext.board.report("test", False, (USAGE_HEALTH_SERVICE,)))
    wait_until(lambda: check(ext.port, USAGE_HEALTH_SERVICE) == SERVING, message="SERVING")
    assert_failure_logged(events, "health", 1, "publishing health")
    assert failures(sv, "health") == before + 1
