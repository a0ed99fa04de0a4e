"""Two Envoy + ext_proc pairs on two control plane replicas, all real processes.

::

    client ─▶ Envoy 0 ─▶ ext_proc 0 ──(prefers)──▶ control plane A ─┐
                 │        (A,B)                                     ├─ PostgreSQL
    client ─▶ Envoy 1 ─▶ ext_proc 1 ──(prefers)──▶ control plane B ─┘
                 │        (B,A)
                 └──────────────┴─▶ fake provider (in this process: its log is the bill)

Each pair prefers a different replica, so whatever one pair does reaches the
other only through PostgreSQL (LISTEN/NOTIFY between the replicas). Control
planes and ext_procs are ``python -m control_plane`` / ``python -m ext_proc``
subprocesses that a test may SIGTERM, SIGKILL and start again on the same
port (and, for ext_proc, the same journal directory).

``start_two_pairs`` is the entry point; the returned ``TwoPairs`` is a context
manager that stops everything it started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.config import Settings as CPSettings
from control_plane.store.db import create_db_engine, migrate
from ext_proc.config import Settings as EPSettings
from ext_proc.server import SYNC_HEALTH_SERVICE, USAGE_HEALTH_SERVICE
from spendgate import envoy_config
from spendgate.demo.fake_provider import FakeProviderServer
from spendgate.v1 import budget_pb2_grpc, dataplane_pb2_grpc
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    EnvoyProcess,
    env_without_spendgate,
    free_port,
    tempdir,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_TIMEOUT_S = 30.0


def health(port: int, service: str = "") -> int:
    """The gRPC health status of ``service`` on 127.0.0.1:``port``; -1 if unreachable."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        return int(resp.status)
    except grpc.RpcError:
        return -1


def settings_env(section: str, fields: type, values: Mapping[str, Any]) -> dict[str, str]:
    """``values`` (setting name -> value) as SPENDGATE_<SECTION>_<NAME> variables."""
    names = {f.name for f in dataclasses.fields(fields)}
    env = {}
    for name, value in values.items():
        assert name in names, f"{section} has no setting {name!r}"
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        env[f"SPENDGATE_{section.upper()}_{name.upper()}"] = text
    return env


def no_metrics_port(section: str, fields: type) -> dict[str, str]:
    """Several processes of one kind run side by side here: a metrics HTTP
    listener on a fixed default port would collide, so turn it off."""
    if "metrics_listen" in {f.name for f in dataclasses.fields(fields)}:
        return {f"SPENDGATE_{section.upper()}_METRICS_LISTEN": ""}
    return {}


class ServiceProcess:
    """One ``python -m <module>`` process that can be stopped, killed and
    started again with the same port, environment and log file."""

    module = ""

    def __init__(self, name: str, port: int, args: list[str], env: dict[str, str], log: Path):
        self.name = name
        self.port = port
        self.args = args
        self.env = env
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        with self.log_path.open("ab") as out:
            out.write(f"---- start #{self.starts + 1} ----\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                cwd=ROOT,
                env=env_without_spendgate() | self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        def ready() -> bool:
            self.check_alive()
            return self.is_ready()

        try:
            wait_until(ready, timeout=timeout, interval=0.05, message=f"{self.name} ready")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None

    def is_ready(self) -> bool:
        return health(self.port) == SERVING

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(
                    f"{self.name} did not exit within {timeout} s of {sig.name}"
                ) from None
        return self.proc.returncode

    def kill(self) -> None:
        """``kill -9``."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.start()
        self.wait_ready()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines this process wrote, across all its starts."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events


class ControlPlaneProcess(ServiceProcess):
    module = "control_plane"


class ExtProcProcess(ServiceProcess):
    module = "ext_proc"

    def __init__(self, *args: Any, journal: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journal = journal

    def is_synced(self) -> bool:
        """Connected to a control plane (its state stream is open)."""
        return health(self.port, SYNC_HEALTH_SERVICE) == SERVING

    def usage_delivered(self) -> bool:
        """Every batch it produced has been acknowledged by a control plane."""
        return health(self.port, USAGE_HEALTH_SERVICE) == SERVING

    def connected_to(self) -> str | None:
        """The control plane address this process last reported connecting to."""
        found = None
        for e in self.log_events():
            if e.get("event") == "connected to control plane":
                found = e.get("address")
        return found


@dataclasses.dataclass
class TwoPairs:
    """Everything ``start_two_pairs`` started. Index 0 and 1 name the pairs
    (Envoy i -> ext_proc i); control planes are "A" (index 0) and "B"."""

    database_url: str
    workdir: Path
    provider: FakeProviderServer
    control_planes: list[ControlPlaneProcess]
    ext_procs: list[ExtProcProcess]
    envoys: list[EnvoyProcess]
    channels: list[grpc.Channel]
    # Admin stubs on A and B, and a data-plane stub on A (tests that inject usage).
    budgets: budget_pb2_grpc.BudgetServiceStub
    budgets_b: budget_pb2_grpc.BudgetServiceStub
    dataplane: dataplane_pb2_grpc.DataPlaneServiceStub
    flush_interval_ms: int

    @property
    def base_urls(self) -> list[str]:
        return [e.base_url for e in self.envoys]

    @property
    def admin(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {ADMIN_TOKEN}"),)

    @property
    def data(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {DATA_PLANE_TOKEN}"),)

    @property
    def cp_addresses(self) -> list[str]:
        return [f"127.0.0.1:{cp.port}" for cp in self.control_planes]

    # ---- faults --------------------------------------------------------------

    def stop_control_planes(self, *signals: signal.Signals) -> None:
        """Stop A and B, with one signal each (default SIGTERM for both)."""
        for cp, sig in zip(self.control_planes, signals or (signal.SIGTERM,) * 2, strict=True):
            cp.stop(sig)

    def start_control_planes(self) -> None:
        for cp in self.control_planes:
            cp.start()
        for cp in self.control_planes:
            cp.wait_ready()

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Until every ext_proc has a state stream to a control plane."""
        for ep in self.ext_procs:
            wait_until(
                lambda ep=ep: ep.check_alive() or ep.is_synced(),
                timeout=timeout,
                interval=0.05,
                message=f"{ep.name} connected to a control plane",
            )

    def wait_usage_delivered(self, timeout: float = 30.0) -> None:
        """Until no ext_proc holds unacknowledged usage (checked after a few
        flush intervals, so usage charged just before the call is included)."""
        time.sleep(3 * self.flush_interval_ms / 1000)
        for ep in self.ext_procs:
            wait_until(
                lambda ep=ep: ep.check_alive() or ep.usage_delivered(),
                timeout=timeout,
                interval=0.05,
                message=f"{ep.name} delivered its usage",
            )

    def check_alive(self) -> None:
        for p in (*self.control_planes, *self.ext_procs):
            p.check_alive()

    # ---- reading the database ------------------------------------------------

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, connect_timeout=5) as conn:
            return list(conn.execute(sql, params).fetchall())

    def spent_nanos(self, policy_id: str) -> int:
        """All spend the control planes recorded for a policy, over every
        window and member (so a window boundary during a test loses nothing)."""
        ((total,),) = self.query(
            "SELECT COALESCE(SUM(spent_nanos), 0) FROM window_spend WHERE policy_id = %s",
            policy_id,
        )
        return int(total)

    # ---- teardown ------------------------------------------------------------

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        for envoy in self.envoys:
            envoy.stop()
        for p in (*self.ext_procs, *self.control_planes):
            if p.proc is not None and p.proc.poll() is None:
                # An AssertionError here means it was killed instead: nothing more to do.
                with contextlib.suppress(AssertionError):
                    p.stop(signal.SIGTERM, timeout=10)
        self.provider.shutdown()
        self.provider.server_close()

    def __enter__(self) -> TwoPairs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_two_pairs(
    database_url: str,
    *,
    ext_proc_args: Mapping[str, Any] | None = None,
    control_plane_args: Mapping[str, Any] | None = None,
    workdir: Path | None = None,
) -> TwoPairs:
    """Start the provider, control planes A and B (migrated first, so the two
    do not race to create the schema), ext_proc 0 (prefers A) and 1 (prefers
    B), and one Envoy in front of each ext_proc; return once every ext_proc is
    connected to its preferred replica.

    ``ext_proc_args`` / ``control_plane_args`` are settings (names as in
    ext_proc/config.py and control_plane/config.py) given to every process of
    that kind, e.g. ``{"reservations": False}``.
    """
    workdir = workdir or tempdir()
    ep_settings = {
        "flush_interval_ms": 100,
        # The traffic names users and workspaces in headers, from loopback.
        "trusted_header_sources": "127.0.0.1/32",
        **(ext_proc_args or {}),
    }
    engine = create_db_engine(database_url)
    try:
        migrate(engine)
    finally:
        engine.dispose()

    provider = FakeProviderServer()
    provider.start_in_thread()
    started: list[ServiceProcess] = []
    envoys: list[EnvoyProcess] = []
    try:
        cp_env = (
            {
                "SPENDGATE_ADMIN_TOKEN": ADMIN_TOKEN,
                "SPENDGATE_READ_TOKEN": READ_TOKEN,
                "SPENDGATE_DATA_PLANE_TOKEN": DATA_PLANE_TOKEN,
                "SPENDGATE_CONTROL_PLANE_DATABASE_URL": database_url,
                "SPENDGATE_CONTROL_PLANE_LOG_LEVEL": "info",
            }
            | no_metrics_port("control_plane", CPSettings)
            | settings_env("control_plane", CPSettings, control_plane_args or {})
        )
        cps = []
        for name in ("A", "B"):
            port = free_port()
            cps.append(
                ControlPlaneProcess(
                    f"control plane {name}",
                    port,
                    ["--listen", f"127.0.0.1:{port}"],
                    cp_env,
                    workdir / f"control-plane-{name}.log",
                )
            )
        for cp in cps:
            cp.start()
            started.append(cp)
        for cp in cps:
            cp.wait_ready()

        addresses = [f"127.0.0.1:{cp.port}" for cp in cps]
        eps = []
        for i, order in enumerate((addresses, addresses[::-1])):
            port = free_port()
            journal = workdir / f"journal-{i}"
            env = (
                {
                    "SPENDGATE_DATA_PLANE_TOKEN": DATA_PLANE_TOKEN,
                    "SPENDGATE_EXT_PROC_DATA_PLANE_ID": f"pair-{i}",
                    "SPENDGATE_EXT_PROC_JOURNAL_DIR": str(journal),
                }
                | no_metrics_port("ext_proc", EPSettings)
                | settings_env("ext_proc", EPSettings, ep_settings)
            )
            eps.append(
                ExtProcProcess(
                    f"ext_proc {i}",
                    port,
                    ["--listen", f"127.0.0.1:{port}", "--control-plane", ",".join(order)],
                    env,
                    workdir / f"ext-proc-{i}.log",
                    journal=journal,
                )
            )
        for ep in eps:
            ep.start()
            started.append(ep)
        for ep, order in zip(eps, (addresses, addresses[::-1]), strict=True):
            ep.wait_ready()
            wait_until(
                lambda ep=ep: ep.check_alive() or ep.is_synced(),
                timeout=START_TIMEOUT_S,
                message=f"{ep.name} synced",
            )
            assert ep.connected_to() == order[0], f"{ep.name} is not on its preferred replica"

        for ep in eps:
            config = envoy_config.adapt(
                envoy_config.load(),
                ext_proc=("127.0.0.1", ep.port),
                providers_to=("127.0.0.1", provider.port),
                demo_to=("127.0.0.1", provider.port),
            )
            envoys.append(EnvoyProcess(config, workdir))
        channels = [grpc.insecure_channel(a) for a in addresses]
        return TwoPairs(
            database_url=database_url,
            workdir=workdir,
            provider=provider,
            control_planes=cps,
            ext_procs=eps,
            envoys=envoys,
            channels=channels,
            budgets=budget_pb2_grpc.BudgetServiceStub(channels[0]),
            budgets_b=budget_pb2_grpc.BudgetServiceStub(channels[1]),
            dataplane=dataplane_pb2_grpc.DataPlaneServiceStub(channels[0]),
            flush_interval_ms=int(ep_settings["flush_interval_ms"]),
        )
    except BaseException:
        for envoy in envoys:
            envoy.stop()
        for p in reversed(started):
            if p.running:
                p.kill()
        provider.shutdown()
        provider.server_close()
        raise


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
