"""``python -m ext_proc --workers N``: one host, all its cores.

A parent starts N worker processes (``python -m ext_proc ... --worker K``)
that each bind the same listen address with SO_REUSEPORT: the kernel hands
each new connection from Envoy to one of them. Each worker is a whole data
plane of its own (``<data_plane_id>-w<k>``, journal and snapshot in
``journal_dir/w<k>``, metrics on the metrics port + k); the control plane
adds up every data plane's usage and holds, as it does for separate hosts.

The parent serves no traffic. It keeps the listen port bound (not
listening) so a worker restarted later binds the same one, even when
``listen`` asked for port 0. Each worker is a supervised task
(spendgate/supervise.py): a worker that exits while the group is not
stopping is logged at error level, counted
(``spendgate_task_failures_total{task="worker-<k>"}`` on the parent's
metrics) and started again after a backoff. A worker that exits more than
``max_exits`` times within ``exit_window_s`` sets ``failed``: the parent
stops the others and exits with status 1. SIGTERM / SIGINT / SIGHUP to the
parent reach every worker as SIGTERM (each stops gracefully: in-flight
requests finish, usage is flushed); workers run in their own session, so a
terminal's Ctrl-C reaches only the parent, and they get SIGTERM if the parent
dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import signal
import socket
import sys
from collections import deque
from collections.abc import Iterator

import structlog
from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ext_proc.config import Settings
from ext_proc.protocol.handoff import KEY_ENV as HANDOFF_KEY_ENV
from spendgate import process
from spendgate.metrics import MetricsServer, gauge, start_metrics, task_failures
from spendgate.settings import ConfigError, join_host_port, parse_host_port
from spendgate.supervise import Supervisor

log = structlog.get_logger("spendgate.ext_proc.workers")
# A worker exiting more often than this stops the group: it is crashing, not unlucky.
MAX_EXITS = 5
EXIT_WINDOW_S = 60.0
# Longer than a worker's own graceful stop (5 s for in-flight requests, then the last flush).
STOP_TIMEOUT_S = 15.0
# A worker that ran this long before exiting restarts after the shortest backoff again.
SETTLE_S = 10.0


class WorkerExited(Exception):
    """A worker process ended while the group was not stopping."""


def reserve_port(listen: str) -> socket.socket:
    """A socket bound (not listening) to ``listen`` with SO_REUSEPORT: it holds
    the port (an ephemeral one for port 0) for the workers, which bind it too.
    ConfigError naming ``listen`` when the address cannot be bound (in use by a
    process without SO_REUSEPORT, not an address of this host)."""
    host, port = parse_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"listen {listen!r}: {e.strerror or e}") from e
    return sock


class WorkerGroup:
    """The parent of ``settings.workers`` ext_proc worker processes.

    ``argv``: the parent's own command-line arguments, repeated to each worker
    (followed by ``--worker K``, the bound ``--listen`` and ``--data-plane-id``,
    which win over earlier ones). Use from one event loop.
    """

    def __init__(
        self,
        settings: Settings,
        argv: list[str],
        *,
        max_exits: int = MAX_EXITS,
        exit_window_s: float = EXIT_WINDOW_S,
    ) -> None:
        self.settings = settings
        self.argv = argv
        self.max_exits = max_exits
        self.exit_window_s = exit_window_s
        # The workers' data plane ids are `<group_id>-w<k>`, the same after a restart (so a
        # restarted worker replays its own journal under its own name).
        self.group_id = settings.identity
        self.failed = asyncio.Event()
        self.stopping = False
        self.supervisor = Supervisor(log)
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        # The workers' proof to each other on their handoff sockets
        # (ext_proc/protocol/handoff.py).
        self.env = {**os.environ, HANDOFF_KEY_ENV: secrets.token_hex(16)}
        self._exits: dict[int, deque[float]] = {}
        self._reserved: socket.socket | None = None
        self.listen = settings.listen
        self.metrics: MetricsServer | None = None
        if settings.metrics_listen:
            registry = CollectorRegistry()
            registry.register(_GroupCollector(self))
            self.metrics = MetricsServer(registry, settings.metrics_listen)

    @property
    def running(self) -> int:
        return sum(1 for p in self.procs.values() if p.returncode is None)

    async def start(self) -> None:
        self._reserved = reserve_port(self.settings.listen)
        host = parse_host_port(self.settings.listen)[0]
        self.listen = join_host_port(host, self._reserved.getsockname()[1])
        try:
            if self.metrics is not None:
                await start_metrics(self.metrics, self.settings.metrics_listen)
        except ConfigError:
            self._reserved.close()
            raise
        for k in range(1, self.settings.workers + 1):
            self.supervisor.spawn(
                f"worker-{k}",
                functools.partial(self._run_worker, k),
                doing=f"running ext_proc worker {k}",
                settle_s=SETTLE_S,
            )
        log.info(
            "ext_proc workers starting",
            workers=self.settings.workers,
            address=self.listen,
            data_plane_ids=f"{self.group_id}-w1..w{self.settings.workers}",
            metrics_port=self.metrics.port if self.metrics is not None else None,
        )

    async def _run_worker(self, k: int) -> None:
        if self.stopping or self.failed.is_set():
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ext_proc",
                *self.argv,
                *("--worker", str(k), "--listen", self.listen, "--data-plane-id", self.group_id),
                start_new_session=True,
                env=self.env,
                preexec_fn=functools.partial(process.die_with_parent, os.getpid()),
            )
        except OSError as e:  # no process to wait for: as good as one that exited at once
            self._count_exit(k, pid=None, status=None)
            raise WorkerExited(f"worker {k} could not be started: {e}") from e
        self.procs[k] = proc
        log.info("ext_proc worker started", worker=k, pid=proc.pid)
        status = await proc.wait()
        if self.stopping:
            return
        self._count_exit(k, pid=proc.pid, status=status)
        raise WorkerExited(f"worker {k} (pid {proc.pid}) exited with status {status}")

    def _count_exit(self, k: int, *, pid: int | None, status: int | None) -> None:
        """Remember worker ``k``'s exit; past ``max_exits`` in ``exit_window_s``
        the group has failed (WorkerExited, not restarted)."""
        now = asyncio.get_running_loop().time()
        exits = self._exits.setdefault(k, deque())
        exits.append(now)
        while exits and exits[0] < now - self.exit_window_s:
            exits.popleft()
        if len(exits) <= self.max_exits:
            return
        log.error(
            "ext_proc worker keeps exiting: stopping every worker",
            worker=k,
            pid=pid,
            status=status,
            exits=len(exits),
            window_s=self.exit_window_s,
        )
        self.failed.set()
        raise WorkerExited(f"worker {k} exited {len(exits)} times; not restarted")

    async def stop(self, grace: float = STOP_TIMEOUT_S) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for k, proc in self.procs.items():
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.error("ext_proc worker did not stop in time: killed", worker=k, pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await self.supervisor.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        if self._reserved is not None:
            self._reserved.close()
        log.info("ext_proc workers stopped", failed=self.failed.is_set())


class _GroupCollector(Collector):
    def __init__(self, group: WorkerGroup) -> None:
        self.group = group

    def collect(self) -> Iterator[Metric]:
        yield gauge(
            "spendgate_ext_proc_workers",
            "ext_proc worker processes configured (the workers setting).",
            self.group.settings.workers,
        )
        yield gauge(
            "spendgate_ext_proc_workers_running",
            "ext_proc worker processes running now.",
            self.group.running,
        )
        yield task_failures(self.group.supervisor.failures)
