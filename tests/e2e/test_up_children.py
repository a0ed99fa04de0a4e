"""`spendgate up` owns its children: closing the terminal (SIGHUP) or killing
`up` outright (SIGKILL) leaves no child running and no port bound, and a port
already taken is named, with its process, before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spendgate.ports import in_use
from tests.harness import (
    UP_PORT_OPTIONS,
    env_without_spendgate,
    free_port,
    start_spendgate_up,
    wait_until,
)

pytestmark = pytest.mark.e2e
SPENDGATE = [sys.executable, "-m", "spendgate.cli.main"]


@dataclass
class Up:
    proc: subprocess.Popen[str]
    ports: dict[str, int]
    children: list[int]


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie holds nothing
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    ports = {name: free_port() for name in UP_PORT_OPTIONS}
    proc, _ = start_spendgate_up([*(f"--{k}={v}" for k, v in ports.items())], tmp_path)
    children = _children(proc.pid)
    assert len(children) == 3  # control plane, ext_proc, envoy
    u = Up(proc, ports, children)
    yield u
    for pid in [proc.pid, *children]:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)


def _nothing_left(up: Up) -> None:
    for pid in up.children:
        wait_until(lambda pid=pid: not _alive(pid), timeout=60, message=f"child {pid} exits")
    for name, port in up.ports.items():
        assert not in_use(port), f"--{name} {port} still bound"


def test_sighup_stops_every_child(up: Up) -> None:
    up.proc.send_signal(signal.SIGHUP)
    rest, _ = up.proc.communicate(timeout=60)
    assert up.proc.returncode == 0, rest
    assert "stopping spendgate" in rest and "ext_proc stopped" in rest
    _nothing_left(up)


def test_sigkill_of_up_stops_every_child(up: Up) -> None:
    up.proc.kill()
    up.proc.wait(10)
    _nothing_left(up)


def test_a_taken_port_is_named_before_anything_starts(tmp_path: Path) -> None:
    ports = {name: free_port() for name in UP_PORT_OPTIONS}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["control-plane-port"]))
        taken.listen()
        done = subprocess.run(
            [*SPENDGATE, "up", *(f"--{k}={v}" for k, v in ports.items())],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env_without_spendgate(),
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stdout == ""  # nothing printed, nothing started
    port = ports["control-plane-port"]
    assert done.stderr.startswith(
        f"spendgate: port {port} is in use by pid {os.getpid()} ("  # this test's process
    ), done.stderr
    assert "pytest" in done.stderr
    assert "--control-plane-port" in done.stderr
    assert not (tmp_path / ".spendgate").exists()
