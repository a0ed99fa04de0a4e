"""Holds are honest, through a real Envoy with the OpenAI SDK:

* a hold is the request's plausible cost (what the model produced on the
  route recently), so a burst against a budget with room for 4.5 requests
  admits 4 or 5, and one request with an absurd ``max_tokens`` does not lock
  other callers out of a shared budget;
* the 429, ``spendgate status`` and ``spendgate spend`` tell spent from held;
* a dead data plane's holds stop counting at their expiry on the data plane
  that sees them, with no update arriving (the shared FakeClock is moved past
  ``hold_ttl_s``; nothing else changes).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import openai
import pytest

from ext_proc.config import Settings as EPSettings
from ext_proc.server import ExtProcServer
from spendgate import envoy_config
from spendgate.cli.main import main
from spendgate.domain.pricing import PriceBook, cost_nanos, format_usd
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.e2e.streams import GatedStream
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    EnvoyProcess,
    FakeClock,
    free_port,
    wait_until,
)

MODEL = "gpt-4o-mini"
PROMPT, COMPLETION = 20, 200
# Every answer of the burst costs the same: 20 prompt + 200 completion tokens.
ANSWER = {"x-fake-prompt-tokens": str(PROMPT), "x-fake-completion-tokens": str(COMPLETION)}
PRICE = PriceBook.bundled().lookup(MODEL)
assert PRICE is not None
COST = cost_nanos(Usage(input_tokens=PROMPT, output_tokens=COMPLETION), PRICE)
RUNS, BURST = 10, 50
NOON = datetime(2026, 6, 15, 12, tzinfo=UTC)  # far from a day's edge while the clock moves


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = start_stack(clock=FakeClock(NOON))
    yield s
    stop_stack(s)


def policy(stack: Stack, amount_nanos: int, **fields: object) -> pb.BudgetPolicy:
    created = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name=f"holds-{uuid.uuid4().hex[:6]}",
                amount_usd=format_usd(amount_nanos).removeprefix("$"),
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                action=pb.ACTION_REJECT,
                **fields,  # type: ignore[arg-type]
            )
        ),
        metadata=stack.admin,
    )
    wait_until(
        lambda: created.id in stack.ext.state.index.policies, message="policy reaches ext_proc"
    )
    return created


def client(base_url: str, user: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": user, **headers},
        max_retries=0,
    )


def ask(c: openai.OpenAI, **kw: object) -> int:
    """One chat completion; its HTTP status."""
    try:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello spendgate"}],
            **kw,  # type: ignore[arg-type]
        )
        return 200
    except openai.APIStatusError as e:
        return e.status_code


def spend_entry(stack: Stack, policy_id: str) -> pb.SpendEntry:
    resp = stack.budgets.ListSpend(pb.ListSpendRequest(policy_id=policy_id), metadata=stack.admin)
    (entry,) = resp.entries
    return entry


def burst(stack: Stack, user: str) -> int:
    """BURST requests released at once; how many were admitted."""
    c = client(stack.envoy.base_url, user, **ANSWER)
    gate = threading.Barrier(BURST)
    statuses: list[int] = []

    def one() -> None:
        gate.wait(30)
        statuses.append(ask(c, max_tokens=4096))

    threads = [threading.Thread(target=one, daemon=True) for _ in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    c.close()
    assert len(statuses) == BURST and set(statuses) <= {200, 429}, statuses
    return statuses.count(200)


def test_room_for_four_and_a_half_admits_four_or_five(stack: Stack) -> None:
    """Requests with max_tokens 4096 whose answers always use 200 tokens: once
    the estimator has seen a few, each holds about its real cost. (Holding
    max_tokens, as before, admitted 1 to 4.)"""
    warm = client(stack.envoy.base_url, "warm-up", **ANSWER)
    assert [ask(warm, max_tokens=4096) for _ in range(6)] == [200] * 6
    warm.close()
    admitted = []
    for run in range(RUNS):
        user = f"burst-{run}-{uuid.uuid4().hex[:6]}"
        p = policy(stack, COST * 9 // 2, scope=pb.SCOPE_USER, target=user)
        admitted.append(burst(stack, user))
        wait_until(
            lambda p=p, n=admitted[-1]: spend_entry(stack, p.id).request_count == n,
            message="spend recorded",
        )
        entry = spend_entry(stack, p.id)
        assert entry.spent_usd == format_usd(admitted[-1] * COST).removeprefix("$")
    print(
        f"\n{BURST} concurrent requests, room for 4.5, {RUNS} runs: admitted {admitted} "
        f"(min {min(admitted)}, max {max(admitted)})"
    )
    assert set(admitted) <= {4, 5}, admitted


def test_an_absurd_max_tokens_does_not_block_other_callers(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """$10 a day for everyone; one request asks for max_tokens 10^12 ($600,000
    of output) and runs: it holds what such a request plausibly costs, the
    others are admitted, and every view tells spent from held."""
    shared = policy(stack, 10 * 10**9, scope=pb.SCOPE_GLOBAL)
    big = GatedStream(stack, client(stack.envoy.base_url, "big"), max_tokens=10**12)
    wait_until(lambda: stack.ext.state.holding_requests == 1, message="the big request holds")
    (held,) = stack.ext.state.reserved.values()
    # 4096 output tokens (no answers seen yet) and the input, far from $600,000.
    assert 0 < held <= cost_nanos(Usage(input_tokens=100, output_tokens=4096), PRICE)
    others = client(stack.envoy.base_url, "small")
    assert [ask(others) for _ in range(5)] == [200] * 5
    others.close()

    wait_until(
        lambda: (e := spend_entry(stack, shared.id)).held_requests == 1 and e.request_count == 5,
        message="usage and holds reported",
    )
    entry = spend_entry(stack, shared.id)
    assert entry.held_usd == format_usd(held).removeprefix("$")
    server = ["--server", f"127.0.0.1:{stack.cp.port}", "--token", ADMIN_TOKEN]
    assert main(["status", *server]) == 0
    status = capsys.readouterr().out
    print(status)
    assert f"spent ${entry.spent_usd} of $10.00" in status
    assert f"; ${entry.held_usd} more held by 1 request in flight" in status
    assert main(["spend", *server]) == 0
    spend = capsys.readouterr().out
    assert f"${entry.held_usd} (1 running)" in spend

    assert big.finish() is None
    wait_until(lambda: spend_entry(stack, shared.id).held_requests == 0, message="hold released")
    assert spend_entry(stack, shared.id).held_usd == "0.00"
    assert stack.ext.state.reserved == {}


def start_second_pair(stack: Stack) -> tuple[ExtProcServer, EnvoyProcess]:
    """Another ext_proc (and its Envoy) on the same control plane and clock."""
    port = free_port()
    ext = stack.loop.call(
        lambda: ExtProcServer(
            EPSettings(
                listen=f"127.0.0.1:{port}",
                control_plane=f"127.0.0.1:{stack.cp.port}",
                data_plane_token=DATA_PLANE_TOKEN,
                data_plane_id="victim-dp",
                flush_interval_ms=20,
                journal_dir=str(stack.workdir / "victim-journal"),
                metrics_listen="",
                trusted_header_sources="127.0.0.1/32",  # the user header names the caller
            ),
            clock=stack.clock,
        )
    )
    stack.loop.run(ext.start())
    config = envoy_config.adapt(
        envoy_config.load(),
        ext_proc=("127.0.0.1", ext.port),
        providers_to=("127.0.0.1", stack.provider.port),
        demo_to=("127.0.0.1", stack.provider.port),
    )
    return ext, EnvoyProcess(config, stack.workdir)


async def die(ext: ExtProcServer) -> None:
    """What kill -9 leaves behind: no last report, no release sent; the
    control plane only sees the streams end."""
    for task in ext.sync._tasks:
        task.cancel()
    await ext.server.stop(None)


def test_a_dead_data_planes_hold_stops_blocking_after_hold_ttl_s(stack: Stack) -> None:
    user = f"shared-{uuid.uuid4().hex[:6]}"
    # One request's hold (its estimate capped at the policy's amount) fills it.
    p = policy(stack, 100_000, scope=pb.SCOPE_USER, target=user)
    victim, victim_envoy = start_second_pair(stack)
    big: GatedStream | None = None
    try:
        wait_until(lambda: p.id in victim.state.index.policies, message="policy reaches victim")
        big = GatedStream(stack, client(victim_envoy.base_url, user))
        key = next(iter(victim.state.reserved))
        wait_until(
            lambda: stack.ext.state.held(key) == (100_000, 1),
            message="the victim's hold reaches the other data plane",
        )
        mine = client(stack.envoy.base_url, user)
        with pytest.raises(openai.RateLimitError) as rejected:
            mine.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello spendgate"}]
            )
        assert "$0.00 spent; $0.0001 more held by 1 request in flight" in str(rejected.value)

        stack.loop.run(die(victim))
        ttl = stack.cp.settings.hold_ttl_s
        stack.clock.advance(timedelta(seconds=ttl - 1))
        assert ask(mine) == 429  # the hold is still valid: the victim might be alive
        stack.clock.advance(timedelta(seconds=2))  # hold_ttl_s + 1 after the last report
        assert ask(mine) == 200  # no update arrived; the expiry alone
        mine.close()
    finally:
        if big is not None:
            big.finish()
        victim_envoy.stop()
        stack.loop.run(victim.stop(grace=0))
