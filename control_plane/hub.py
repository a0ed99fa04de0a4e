"""Fan-out of state changes to every connected data plane (WatchState streams).

Each subscriber has a bounded queue. A subscriber that falls too far behind
is cut off rather than allowed to grow memory without bound: its stream ends,
the data plane reconnects and starts again from a full snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from spendgate.v1 import dataplane_pb2 as dp

QUEUE_LIMIT = 10_000


class SubscriberTooSlow(Exception):
    pass


class Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dp.StateUpdate | None] = asyncio.Queue(QUEUE_LIMIT)

    def offer(self, update: dp.StateUpdate) -> bool:
        try:
            self.queue.put_nowait(update)
            return True
        except asyncio.QueueFull:
            return False

    async def next(self) -> dp.StateUpdate:
        update = await self.queue.get()
        if update is None:
            raise SubscriberTooSlow
        return update


class StateHub:
    """Not thread-safe: call publish from the event loop only."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        sub = Subscription()
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    def publish(self, update: dp.StateUpdate) -> None:
        for sub in list(self._subs):
            if not sub.offer(update):
                # Make room for the poison pill; the stream ends and resyncs.
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)
                self._subs.discard(sub)
