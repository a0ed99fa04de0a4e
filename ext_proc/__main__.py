"""``python -m ext_proc``: wiring only."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from ext_proc.config import ConfigError, Settings, load_settings
from ext_proc.server import ExtProcServer
from spendgate import logs


async def serve(settings: Settings) -> None:
    # grpc.aio objects belong to the loop they are created on: build inside it.
    server = ExtProcServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ext_proc")
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--listen", help="host:port for Envoy (default 127.0.0.1:50052)")
    parser.add_argument("--control-plane", help="control plane host:port")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(
            file=args.config, listen=args.listen, control_plane=args.control_plane
        )
    except ConfigError as e:
        print(f"spendgate ext_proc: bad configuration: {e}", file=sys.stderr)
        return 2
    logs.configure(json=settings.log_json, level=settings.log_level)
    # uvloop trims the event loop's share of each ext_proc message (measured in
    # bench/: about 10-15 % less CPU per request than the default loop).
    uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
