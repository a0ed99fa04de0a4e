"""`spendgate up` owns its children: closing the terminal (SIGHUP) or killing
`up` outright (SIGKILL) leaves no child running and no port bound, and a port
already taken is named, with its process, before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from spendgate.ports import in_use
from tests.harness import (
    SPENDGATE_CLI,
    UP_PORT_OPTIONS,
    env_without_spendgate,
    free_port,
    start_spendgate_up,
    wait_until,
)

pytestmark = pytest.mark.e2e


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
        done = _up([f"--{k}={v}" for k, v in ports.items()], tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""  # nothing printed, nothing started
    port = ports["control-plane-port"]
    assert done.stderr.startswith(
        f"spendgate: port {port} is in use by pid {os.getpid()} ("  # this test's process
    ), done.stderr
    assert "pytest" in done.stderr
    assert "--control-plane-port" in done.stderr
    assert not (tmp_path / ".spendgate").exists()


def test_ext_proc_workers_run_under_up_and_die_with_it(tmp_path: Path) -> None:
    ports = {name: free_port() for name in UP_PORT_OPTIONS}
    proc, printed = start_spendgate_up(
        ["--demo", "--demo-port", str(free_port()), "--ext-proc-workers", "2"]
        + [f"--{k}={v}" for k, v in ports.items()],
        tmp_path,
    )
    try:
        assert f"127.0.0.1:{ports['ext-proc-port']}  (2 workers)" in "".join(printed)
        ext_proc = [p for p in _children(proc.pid) if " -m ext_proc " in _cmdline(p)]
        assert len(ext_proc) == 1
        workers = _children(ext_proc[0])
        assert len(workers) == 2 and all("--worker" in _cmdline(w) for w in workers)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['port']}/demo/v1", api_key="demo")
        for _ in range(4):
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.usage is not None and answer.usage.total_tokens > 0
        # Each worker serves its own metrics on the ext_proc metrics port + k.
        for k in (1, 2):
            url = f"http://127.0.0.1:{ports['ext-proc-metrics-port'] + k}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                assert b"spendgate_ext_proc_requests_admitted_total" in r.read()
    finally:
        proc.kill()  # up dies at once: its children go, and theirs
        proc.wait(10)
    for pid in [*ext_proc, *workers]:
        wait_until(lambda pid=pid: not _alive(pid), timeout=60, message=f"process {pid} exits")
    assert not in_use(ports["ext-proc-port"])


def test_a_taken_worker_metrics_port_is_named_before_anything_starts(tmp_path: Path) -> None:
    ports = {name: free_port() for name in UP_PORT_OPTIONS}
    worker_2 = ports["ext-proc-metrics-port"] + 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", worker_2))
        taken.listen()
        done = _up(["--ext-proc-workers", "3", *(f"--{k}={v}" for k, v in ports.items())], tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"spendgate: port {worker_2} is in use"), done.stderr
    assert "--ext-proc-metrics-port + 2 (worker 2)" in done.stderr
    too_many = _up(["--ext-proc-workers", "65"], tmp_path)
    assert too_many.returncode == 1
    assert "--ext-proc-workers must be between 1 and 64, not 65" in too_many.stderr


def _up(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``spendgate up ARGS``, run to its end (it is expected to refuse to start)."""
    return subprocess.run(
        [*SPENDGATE_CLI, "up", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env_without_spendgate(),
        timeout=60,
    )


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
