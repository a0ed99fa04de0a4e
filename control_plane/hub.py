"""Fan-out of state changes to every connected data plane (WatchState streams).

Every published change is cut to size (control_plane/statepush.py) and
numbered: ``seq`` counts the changes this hub has published, so the changes
a stream delivers are numbered without gaps and a data plane can tell it
missed one. Each subscriber has a bounded queue (by count and by bytes). A
subscriber that falls too far behind loses its queue and is resynced on its
stream instead (``RESYNC``): the resync reads the current state, which
includes everything it was not sent. Memory stays bounded and the data plane
keeps its connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from control_plane.statepush import PAGE_BYTES, split
from spendgate.v1 import dataplane_pb2 as dp

QUEUE_LIMIT = 10_000
QUEUE_BYTES = 64 << 20


class _Resync:
    """Queue marker: the subscriber must be sent a full resync now."""


RESYNC: Final = _Resync()


class Subscription:
    def __init__(self, hub: StateHub) -> None:
        self._hub = hub
        self.queue: asyncio.Queue[tuple[dp.StateUpdate | _Resync, int]] = asyncio.Queue()
        self._bytes = 0
        # Set while a resync is owed: changes are dropped until it starts,
        # since the resync reads them from the database anyway.
        self.resync_owed = False
        self.resyncs = 0

    def offer(self, update: dp.StateUpdate, size: int) -> None:
        if self.resync_owed:
            return
        if self.queue.qsize() >= QUEUE_LIMIT or self._bytes + size > QUEUE_BYTES:
            self.want_resync()
            return
        self._bytes += size
        self.queue.put_nowait((update, size))

    def want_resync(self) -> None:
        if self.resync_owed:
            return
        self._drain()
        self.resync_owed = True
        self.queue.put_nowait((RESYNC, 0))

    def begin_resync(self) -> int:
        """Start a resync: what is queued is dropped (the resync's reads,
        which begin after this call, include it). Returns the seq of the last
        change the resync includes; the next change queued is seq + 1."""
        self._drain()
        self.resync_owed = False
        self.resyncs += 1
        return self._hub.seq

    def _drain(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self._bytes = 0

    async def next(self) -> dp.StateUpdate | _Resync:
        update, size = await self.queue.get()
        self._bytes -= size
        return update


class StateHub:
    """Not thread-safe: call publish from the event loop only."""

    def __init__(self, page_bytes: int = PAGE_BYTES) -> None:
        self._subs: set[Subscription] = set()
        self.page_bytes = page_bytes
        self.seq = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        sub = Subscription(self)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    def publish(self, update: dp.StateUpdate) -> None:
        """Send a change (committed already) to every subscriber, in pieces
        that fit a message, each with the next ``seq``."""
        for piece in split(update, self.page_bytes):
            self.seq += 1
            piece.seq = self.seq
            size = piece.ByteSize()
            for sub in list(self._subs):
                sub.offer(piece, size)

    def request_resync(self) -> None:
        """Resync every subscriber (changes may have been missed, e.g. while
        the replica listener was disconnected)."""
        for sub in list(self._subs):
            sub.want_resync()
