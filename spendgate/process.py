"""How a spendgate service process runs: build, start, wait for SIGINT,
SIGTERM or SIGHUP (its terminal closed), stop gracefully. Shared by ``python -m control_plane`` and
``python -m ext_proc``."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Callable
from typing import Protocol, TypeVar

from spendgate import logs
from spendgate.settings import ConfigError

S = TypeVar("S")


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self, grace: float = ...) -> None: ...


async def serve_until_signalled(make: Callable[[], Service]) -> None:
    # grpc.aio objects belong to the loop they are created on: build inside it.
    server = make()
    await server.start()
    # What startup built (modules, price tables, servers) lives as long as the
    # process: keep it out of the cyclic collector's full passes, which would
    # otherwise walk all of it (~6 ms for ext_proc) in the middle of requests.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def run(name: str, load: Callable[[], S], make: Callable[[S], Service]) -> int:
    """Load settings (a bad one exits 2 with a one-line message naming the
    key), configure logging, and serve on uvloop until signalled."""
    import uvloop

    try:
        settings = load()
    except ConfigError as e:
        print(f"spendgate {name}: bad configuration: {e}", file=sys.stderr)
        return 2
    logs.configure(json=settings.log_json, level=settings.log_level)  # type: ignore[attr-defined]
    try:
        uvloop.run(serve_until_signalled(lambda: make(settings)))
    except ConfigError as e:  # found while starting, e.g. an address in use
        print(f"spendgate {name}: bad configuration: {e}", file=sys.stderr)
        return 2
    return 0
