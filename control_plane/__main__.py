"""``python -m control_plane``: wiring only."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from control_plane.config import ConfigError, Settings, load_settings
from control_plane.server import ControlPlaneServer
from spendgate import logs


async def serve(settings: Settings) -> None:
    # grpc.aio objects belong to the loop they are created on: build inside it.
    server = ControlPlaneServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m control_plane")
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--listen", help="host:port (default 127.0.0.1:50051)")
    parser.add_argument("--database-url", help="sqlite:///path or postgresql://...")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(
            file=args.config, listen=args.listen, database_url=args.database_url
        )
    except ConfigError as e:
        print(f"spendgate control plane: bad configuration: {e}", file=sys.stderr)
        return 2
    logs.configure(json=settings.log_json, level=settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
