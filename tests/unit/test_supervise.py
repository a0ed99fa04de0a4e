"""The supervisor on its own: backoff, recovery, cancellation, one-shot tasks."""

from __future__ import annotations

import asyncio
from typing import Any

from spendgate.supervise import Supervisor


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))


def supervisor(**kw: Any) -> tuple[Supervisor, Recorder, list[tuple[str, bool]]]:
    log = Recorder()
    changes: list[tuple[str, bool]] = []
    sup = Supervisor(log, on_change=lambda n, b: changes.append((n, b)), **kw)
    return sup, log, changes


async def test_backoff_doubles_up_to_the_cap_and_the_task_recovers() -> None:
    sup, log, changes = supervisor(min_backoff_s=0.01, max_backoff_s=0.04)
    runs = 0
    done = asyncio.Event()

    async def step() -> None:
        nonlocal runs
        runs += 1
        if runs <= 5:
            raise ValueError(f"boom {runs}")
        done.set()
        await asyncio.sleep(3600)

    task = sup.spawn("t", step, doing="testing", settle_s=0.05)
    await asyncio.wait_for(done.wait(), 10)
    failed = [kw for event, kw in log.lines if event == "task failed"]
    assert [kw["restart_in_s"] for kw in failed] == [0.01, 0.02, 0.04, 0.04, 0.04]
    assert [kw["failures"] for kw in failed] == [1, 2, 3, 4, 5]
    assert all(kw["exc_info"] is True and kw["doing"] == "testing" for kw in failed)
    assert sup.failures == {"t": 5} and sup.broken == {"t"}
    while sup.broken:  # recovered once the sixth run lasted settle_s
        await asyncio.sleep(0.01)
    assert changes == [("t", True), ("t", False)]
    await sup.stop()
    assert task.cancelled()
    assert sup.failures == {"t": 5}  # cancelling is no failure


async def test_a_one_shot_task_is_not_restarted_and_a_later_success_recovers_it() -> None:
    sup, log, changes = supervisor()

    async def crash() -> None:
        raise RuntimeError("crash")

    async def fine() -> None:
        return None

    await sup.spawn("delivery", crash, doing="sending", restart=False)
    assert sup.broken == {"delivery"} and sup.failures == {"delivery": 1}
    [(event, kw)] = log.lines
    assert event == "task failed" and "restart_in_s" not in kw
    await sup.spawn("delivery", fine, doing="sending", restart=False)
    assert sup.broken == set()
    assert changes == [("delivery", True), ("delivery", False)]


async def test_a_task_that_ran_fine_for_a_while_restarts_at_the_shortest_backoff() -> None:
    sup, log, _ = supervisor(min_backoff_s=0.01, max_backoff_s=10)
    runs = 0
    done = asyncio.Event()

    async def step() -> None:
        nonlocal runs
        runs += 1
        if runs in (1, 2):
            raise ValueError("early")
        if runs == 3:
            await asyncio.sleep(0.05)  # longer than settle_s
            raise ValueError("late")
        done.set()

    await sup.spawn("t", step, doing="testing", settle_s=0.02)
    assert done.is_set()
    delays = [kw["restart_in_s"] for e, kw in log.lines if e == "task failed"]
    assert delays == [0.01, 0.02, 0.01]
