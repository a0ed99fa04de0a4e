"""``python -m ext_proc``: wiring only."""

from __future__ import annotations

import argparse
import sys

from ext_proc.config import Settings, load_settings
from ext_proc.server import ExtProcServer
from ext_proc.workers import WorkerGroup
from spendgate import process


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m ext_proc")
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--listen", help="host:port for Envoy (default 127.0.0.1:50052)")
    parser.add_argument("--control-plane", help="control plane host:port")
    parser.add_argument(
        "--metrics-listen",
        help='host:port for Prometheus metrics at /metrics (default 127.0.0.1:9465; "" disables)',
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="processes serving --listen, each a data plane of its own (default 1; "
        "see docs/operations/workers.md)",
    )
    parser.add_argument("--data-plane-id", help="this data plane's name (default <host>-<pid>)")
    # Set by the parent of a --workers group for each worker it starts.
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    def make(settings: Settings) -> process.Service:
        if args.worker is not None:
            return ExtProcServer(
                settings.for_worker(args.worker, settings.listen, settings.identity)
            )
        if settings.workers > 1:
            return WorkerGroup(settings, argv)
        return ExtProcServer(settings)

    # Both run on uvloop: it trims the event loop's share of each ext_proc
    # message (about 10-15 % less CPU per request in bench/ runs).
    return process.run(
        "ext_proc",
        lambda: load_settings(
            file=args.config,
            listen=args.listen,
            control_plane=args.control_plane,
            metrics_listen=args.metrics_listen,
            workers=args.workers,
            data_plane_id=args.data_plane_id,
        ),
        make,
    )


if __name__ == "__main__":
    sys.exit(main())
