"""What the gRPC health service says, derived from named problems.

A health service is SERVING exactly when no problem is recorded against it
(``report``). Problems come from the service's own checks (the database is
unreachable, the control plane is, usage is piling up) and from supervised
tasks that failed and have not recovered (spendgate/supervise.py). Changes
are published to the grpc.aio health servicer by one task (``run``), always
with the latest statuses, so bursts of changes cannot be applied out of order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from grpc_health.v1 import health, health_pb2

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthBoard:
    def __init__(self, servicer: health.aio.HealthServicer, services: Iterable[str]) -> None:
        self.servicer = servicer
        self.problems: dict[str, set[str]] = {name: set() for name in services}
        self._published: dict[str, int] = {}
        self._changed = asyncio.Event()

    def report(self, problem: str, present: bool, services: Iterable[str]) -> None:
        """Record (``present``) or clear ``problem`` against ``services``."""
        for name in services:
            problems = self.problems.setdefault(name, set())
            if present:
                problems.add(problem)
            else:
                problems.discard(problem)
        self._changed.set()

    def serving(self, service: str) -> bool:
        return not self.problems.get(service)

    def status(self, service: str) -> int:
        return SERVING if self.serving(service) else NOT_SERVING

    async def publish(self) -> None:
        """Set every status that differs from what was last published."""
        self._changed.clear()
        for name in list(self.problems):
            status = self.status(name)
            if self._published.get(name) != status:
                await self.servicer.set(name, status)
                self._published[name] = status

    async def run(self) -> None:
        """Publish whenever something changed; runs until cancelled."""
        while True:
            await self._changed.wait()
            await self.publish()
