"""Fault injection and observation for the supervision tests: a step that
raises a given number of times, the gRPC health service's transitions as a
Watch stream sees them, and the error lines the services log."""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class InjectedFault(RuntimeError):
    """What a faulty step raises (no code in spendgate catches it on purpose)."""


class Fault:
    """Replaces ``owner.attr`` (a function or coroutine function) with one that
    raises ``exc`` on its first ``times`` calls and then behaves as before.
    ``undo`` restores the original."""

    def __init__(self, owner: Any, attr: str, times: int, exc: Exception | None = None) -> None:
        self.owner, self.attr = owner, attr
        self.original = getattr(owner, attr)
        self.left = times
        self.raised = 0
        self.first_raised_at: float | None = None  # time.monotonic()
        self.calls_after = 0
        self.exc = exc or InjectedFault(f"injected fault in {attr}")
        self._lock = threading.Lock()
        original = self.original
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def async_step(*args: Any, **kwargs: Any) -> Any:
                self._maybe_raise()
                return await original(*args, **kwargs)

            setattr(owner, attr, async_step)
        else:

            @functools.wraps(original)
            def step(*args: Any, **kwargs: Any) -> Any:
                self._maybe_raise()
                return original(*args, **kwargs)

            setattr(owner, attr, step)

    def _maybe_raise(self) -> None:
        with self._lock:
            if self.left > 0:
                self.left -= 1
                self.raised += 1
                if self.first_raised_at is None:
                    self.first_raised_at = time.monotonic()
                raise self.exc
            self.calls_after += 1

    @property
    def spent(self) -> bool:
        """Every planned failure happened."""
        return self.left == 0

    def undo(self) -> None:
        setattr(self.owner, self.attr, self.original)


class HealthWatch:
    """Every status a gRPC health Watch stream reports for ``service``."""

    def __init__(self, port: int, service: str) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(
            health_pb2.HealthCheckRequest(service=service)
        )
        self.seen: list[int] = []
        self.seen_at: list[float] = []  # time.monotonic() of each
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_until(lambda: self.seen, message=f"first health status of {service!r}")
        self.start = len(self.seen) - 1  # the status before the fault

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.seen_at.append(time.monotonic())
                self.seen.append(resp.status)
        except grpc.RpcError:
            pass

    def wait_broken_then_serving(self, timeout: float = 30.0) -> None:
        """NOT_SERVING was reported after the watch began, and SERVING after it."""

        def recovered() -> bool:
            later = self.seen[self.start :]
            if NOT_SERVING not in later:
                return False
            return SERVING in later[later.index(NOT_SERVING) :]

        wait_until(recovered, timeout=timeout, message=f"NOT_SERVING then SERVING: {self.seen}")

    def recovered_at(self) -> float | None:
        """When SERVING followed the first NOT_SERVING after the watch began."""
        later = self.seen[self.start :]
        if NOT_SERVING not in later:
            return None
        broken = self.start + later.index(NOT_SERVING)
        for i in range(broken, len(self.seen)):
            if self.seen[i] == SERVING:
                return self.seen_at[i]
        return None

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def check(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(resp.status)


@contextmanager
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event logged meanwhile, by any thread."""
    with structlog.testing.capture_logs() as events:
        yield events


def failure_lines(events: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [e for e in list(events) if e.get("event") == "task failed" and e.get("task") == task]


def assert_failure_logged(events: list[dict[str, Any]], task: str, times: int, doing: str) -> None:
    """``times`` error lines for ``task``, each saying what it was doing and
    carrying the traceback."""
    lines = failure_lines(events, task)
    assert len(lines) == times, lines
    for n, line in enumerate(lines, 1):
        assert line["log_level"] == "error"
        assert line["exc_info"] is True
        assert doing in line["doing"]
        assert line["failures"] >= n


def wait_for(predicate: Callable[[], Any], message: str, timeout: float = 30.0) -> Any:
    return wait_until(predicate, timeout=timeout, message=message)
