"""Supervised tasks: nothing a service runs in the background dies silently.

Every long-lived task of both services (ext_proc's usage flush, state watch,
snapshot saving; the control plane's database watch, maintenance, webhook
dispatcher, LISTEN/NOTIFY loops) and every short one started on demand
(ext_proc's Reserve sender, a webhook delivery) is started through one
``Supervisor``. When the coroutine raises:

- an error line is logged at once: ``task failed`` with ``task`` (its name),
  ``doing`` (what it was doing), ``failures`` and the traceback;
- ``failures[name]`` grows (exported as ``spendgate_task_failures_total{task}``);
- the task is *broken* (``on_change(name, True)``: the service turns the health
  service that depends on it NOT_SERVING) until it *recovers*: once it has run
  ``settle_s`` without failing again, or returned normally;
- it is started again after a backoff that doubles from ``min_backoff_s`` up
  to ``max_backoff_s`` (and starts over once a run has recovered).

A task started with ``restart=False`` is not run again here: whatever retries
it (e.g. a webhook delivery's lease running out) does so; it recovers when a
later run of the same name ends normally.

Cancellation (shutdown) is not a failure. Use from one event loop; no grpc here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 30.0
SETTLE_S = 1.0


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    run: Callable[[], Awaitable[None]]
    doing: str
    restart: bool
    settle_s: float


class Supervisor:
    """Starts named tasks, logs and counts their failures, restarts them.

    ``on_change(name, broken)`` is called when a task of that name becomes
    broken (it failed) and when it recovers; it must not raise.
    """

    def __init__(
        self,
        logger: Any = None,
        *,
        on_change: Callable[[str, bool], None] | None = None,
        min_backoff_s: float = MIN_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.log = logger if logger is not None else structlog.get_logger("spendgate")
        self.on_change: Callable[[str, bool], None] = on_change or (lambda name, broken: None)
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        # Every name ever started, with its failure count (0 included, so a
        # scrape shows the series before the first failure).
        self.failures: dict[str, int] = {}
        self.broken: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        *,
        doing: str,
        restart: bool = True,
        settle_s: float = SETTLE_S,
    ) -> asyncio.Task[None]:
        """Start ``run()`` as the task ``name``; ``doing`` says, for the error
        line, what it does. ``settle_s``: how long a restarted run must last
        without failing to count as recovered (longer than the task's own
        period, so a step that fails every time keeps it broken)."""
        self.failures.setdefault(name, 0)
        spec = _Spec(name, run, doing, restart, settle_s)
        task = asyncio.get_running_loop().create_task(self._supervise(spec), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        """Cancel every task still running and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _set_broken(self, name: str, broken: bool) -> None:
        if broken == (name in self.broken):
            return
        if broken:
            self.broken.add(name)
        else:
            self.broken.discard(name)
            self.log.info("task recovered", task=name)
        self.on_change(name, broken)

    async def _supervise(self, spec: _Spec) -> None:
        loop = asyncio.get_running_loop()
        failed_runs = 0  # in a row, without a recovery between them
        while True:
            settled: asyncio.TimerHandle | None = None
            if spec.name in self.broken and spec.restart:
                settled = loop.call_later(spec.settle_s, self._set_broken, spec.name, False)
            started = loop.time()
            try:
                await spec.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures[spec.name] += 1
                if loop.time() - started >= spec.settle_s:
                    failed_runs = 0  # it had been running fine
                backoff = min(self.min_backoff_s * 2**failed_runs, self.max_backoff_s)
                failed_runs = min(failed_runs + 1, 32)  # 2**32 x min is past any cap
                fields: dict[str, Any] = {
                    "task": spec.name,
                    "doing": spec.doing,
                    "failures": self.failures[spec.name],
                }
                if spec.restart:
                    fields["restart_in_s"] = round(backoff, 2)
                self.log.error("task failed", exc_info=True, **fields)
                self._set_broken(spec.name, True)
                if not spec.restart:
                    return
                await asyncio.sleep(backoff)
                continue
            else:
                self._set_broken(spec.name, False)
                return
            finally:
                if settled is not None:
                    settled.cancel()
