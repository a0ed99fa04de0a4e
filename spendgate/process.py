"""How a spendgate service process runs: build, start, wait for SIGINT,
SIGTERM or SIGHUP (its terminal closed), stop gracefully. Shared by ``python -m control_plane`` and
``python -m ext_proc``."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
import signal
import sys
from collections.abc import Callable
from typing import Protocol, TypeVar

from spendgate import logs
from spendgate.settings import ConfigError

S = TypeVar("S")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Most worker processes one ext_proc parent starts (`workers`, ext_proc/workers.py).
MAX_WORKERS = 64


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self, grace: float = ...) -> None: ...


def die_with_parent(parent: int) -> None:
    """In a child, before exec: get SIGTERM when the parent dies (Linux).
    If the parent died already (before this ran), stop now."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


async def serve_until_signalled(make: Callable[[], Service]) -> int:
    """Serve until a stop signal (exit status 0) or, for a service with a
    ``failed`` asyncio.Event, until that is set (exit status 1)."""
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
    failed: asyncio.Event | None = getattr(server, "failed", None)
    waits = [asyncio.ensure_future(stop.wait())]
    if failed is not None:
        waits.append(asyncio.ensure_future(failed.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    await server.stop()
    return 1 if failed is not None and failed.is_set() else 0


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
        return uvloop.run(serve_until_signalled(lambda: make(settings)))
    except ConfigError as e:  # found while starting, e.g. an address in use
        print(f"spendgate {name}: bad configuration: {e}", file=sys.stderr)
        return 2
