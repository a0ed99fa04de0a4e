"""A usage batch is counted once while its ReportUsage answer is late.

The control plane publishes a batch's new totals on the state stream and
answers the ReportUsage call; the two travel separately and, on a loaded
machine, the stream can win by a long way. The stream message carries the
batch's id, so ext_proc stops counting the batch as unsent when the total
that includes it arrives: a request with room left in the budget is not
refused in between (seen once in CI as a spurious 429).

The fault is injected in the control plane: its answers to ReportUsage are
held back (after the batch is committed and published) until released.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from control_plane.service import ControlPlane
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from tests.conftest import Stack, start_stack, stop_stack
from tests.e2e.budgets import create_policy
from tests.harness import wait_until

pytestmark = pytest.mark.e2e
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}  # $0.00045 on gpt-4o-mini
COST = 450_000  # nanos


class AckGate:
    """Holds every ReportUsage answer while closed (the batch is applied)."""

    def __init__(self) -> None:
        self.open: asyncio.Event | None = None
        self.held = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = ControlPlane.apply_usage
        gate = self

        async def apply_usage(cp: ControlPlane, req: dp.ReportUsageRequest) -> Any:
            result = await original(cp, req)
            if gate.open is not None and req.increments:
                gate.held += 1
                await gate.open.wait()
            return result

        monkeypatch.setattr(ControlPlane, "apply_usage", apply_usage)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Stack, AckGate]]:
    gate = AckGate()
    gate.install(monkeypatch)
    stack = start_stack()
    try:
        yield stack, gate
    finally:
        if gate.open is not None:
            stack.loop.call(gate.open.set)
        stop_stack(stack)


def test_a_late_answer_does_not_count_the_batch_twice(gated: tuple[Stack, AckGate]) -> None:
    stack, gate = gated
    policy = create_policy(stack, amount_usd="0.0008", scope=pb.SCOPE_GLOBAL)  # two requests
    state = stack.ext.state
    gate.open = stack.loop.call(asyncio.Event)

    def call() -> int:
        return httpx.post(
            f"{stack.envoy.base_url}/v1/chat/completions",
            headers={**BIG, "authorization": "Bearer sk-test"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        ).status_code

    def ours() -> list[tuple[str, str, int]]:
        return [k for k in state.remote if k[0] == policy.id]

    assert call() == 200
    # The total reaches ext_proc by the stream only: the answer is held.
    wait_until(
        lambda: any(state.remote[k][0] == COST for k in ours()), message="total by the stream"
    )
    assert gate.held >= 1
    (key,) = ours()
    assert state.in_flight == {}
    assert state.spent(key) == COST  # not twice
    # Room is left for one more request (0.00045 of 0.0008 spent).
    assert call() == 200
    stack.loop.call(gate.open.set)
    wait_until(lambda: state.remote[key][0] == 2 * COST, message="second request counted")
    wait_until(lambda: not state.in_flight and not state.pending, message="all acknowledged")
    assert state.spent(key) == 2 * COST
    assert call() == 429
