"""``python -m control_plane``: wiring only."""

from __future__ import annotations

import argparse
import sys

from control_plane.config import load_settings
from control_plane.server import ControlPlaneServer
from spendgate import process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m control_plane")
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--listen", help="host:port (default 127.0.0.1:50051)")
    parser.add_argument("--database-url", help="sqlite:///path or postgresql://...")
    parser.add_argument(
        "--metrics-listen",
        help='host:port for Prometheus metrics at /metrics (default 127.0.0.1:9464; "" disables)',
    )
    args = parser.parse_args(argv)
    return process.run(
        "control plane",
        lambda: load_settings(
            file=args.config,
            listen=args.listen,
            database_url=args.database_url,
            metrics_listen=args.metrics_listen,
        ),
        ControlPlaneServer,
    )


if __name__ == "__main__":
    sys.exit(main())
