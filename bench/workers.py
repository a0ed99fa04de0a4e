"""``python -m bench.workers``: ext_proc ``--workers 1`` and ``--workers 2``
on this machine, each beside plain Envoy in the same topology run, and the
CPU numbers behind the sizing table in docs/performance.md.

Per worker count: short non-streaming requests (wrk, c=16 and c=64) through
plain Envoy and through spendgate, with the CPU of ext_proc (all workers),
spendgate's Envoy, the control plane and the PostgreSQL backends serving it;
then paced streams (``STREAMS`` concurrent OpenAI chat streams of ``EVENTS``
events ``GAP_MS`` apart, from the fake provider) through both Envoys, with
the CPU each spent per stream. Environment: BENCH_SECONDS (per load step,
default 10), BENCH_PG (the PostgreSQL server the control plane uses, default
the local one), BENCH_QUICK=1 (a smoke run).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from bench import load, topology
from tests.harness import wait_until

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
QUICK = os.environ.get("BENCH_QUICK") == "1"
PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
STREAMS = 32
EVENTS = 100
GAP_MS = 10
CHAT = "/v1/chat/completions"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def backends(dbname: str) -> list[int]:
    """PostgreSQL backends serving ``dbname`` (their process title names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres:") and f" {dbname} " in title:
            found.append(int(entry.name))
    return found


@dataclass
class Cpu:
    """CPU seconds of groups of processes over one measurement."""

    groups: dict[str, Callable[[], list[int]]]

    def __post_init__(self) -> None:
        self.start = {name: self._read(pids) for name, pids in self.groups.items()}
        self.t0 = time.monotonic()

    def _read(self, pids: Callable[[], list[int]]) -> dict[int, float]:
        return {p: cpu_seconds(p) for p in pids()}

    def used(self) -> dict[str, float]:
        """Seconds each group used since the start (processes started since count from 0)."""
        out = {}
        for name, pids in self.groups.items():
            now = self._read(pids)
            out[name] = sum(v - self.start[name].get(p, 0.0) for p, v in now.items())
        return out


@dataclass(frozen=True)
class Streams:
    completed: int
    events: int
    mean_s: float  # a stream's mean duration, request sent to last byte


async def _paced_streams(base_url: str, seconds: float) -> Streams:
    """STREAMS clients streaming back to back for ``seconds``."""
    headers = {
        **load.HEADERS,
        "x-fake-chunks": str(EVENTS),
        "x-fake-chunk-delay-ms": str(GAP_MS),
    }
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "s"}]}
    deadline = time.monotonic() + seconds
    durations: list[float] = []
    events = 0

    async def client() -> None:
        nonlocal events
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            while time.monotonic() < deadline:
                start = time.monotonic()
                async with http.stream(
                    "POST", "/demo/v1/chat/completions", json=body, headers=headers
                ) as r:
                    assert r.status_code == 200, r.status_code
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            events += 1
                durations.append(time.monotonic() - start)

    await asyncio.gather(*(client() for _ in range(STREAMS)))
    return Streams(len(durations), events, sum(durations) / max(len(durations), 1))


def paced_streams(base_url: str, seconds: float) -> Streams:
    return asyncio.run(_paced_streams(base_url, seconds))


def progress(text: str) -> None:
    print(f"bench.workers: {text}", file=sys.stderr, flush=True)


def row(*cells: object) -> str:
    widths = (30, 14, 14, 10, 14, 14, 14, 14)
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))


def measure(workers: int, seconds: float, out: list[str]) -> None:
    dbname = f"spendgate_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    args = ["--workers", str(workers)] if workers > 1 else []
    topo = topology.start(ext_proc_args=args, database_url=PG.rsplit("/", 1)[0] + f"/{dbname}")
    try:
        parent = topo.ext_procs[0].pid
        if workers > 1:
            wait_until(lambda: len(children(parent)) == workers, timeout=30, message="workers")

        def ext_proc() -> list[int]:
            return children(parent) if workers > 1 else [parent]

        topology.load_policies(topo.cp_address)
        lua = load.script(topo.workdir)
        for env in (topo.plain, topo.spendgate):  # warm up (both workers: many connections)
            load.wrk(env.base_url + CHAT, connections=64, seconds=1 if QUICK else 3, lua=lua)
        groups: dict[str, Callable[[], list[int]]] = {
            "ext_proc": ext_proc,
            "envoy": lambda: [topo.spendgate.proc.pid],
            "plain envoy": lambda: [topo.plain.proc.pid],
            "control plane": lambda: [topo.control_plane.pid],
            "postgresql": lambda: backends(dbname),
        }
        for c in (16, 64):
            progress(f"--workers {workers}: short requests, c={c}")
            cpu = Cpu(groups)
            plain = load.wrk(topo.plain.base_url + CHAT, connections=c, seconds=seconds, lua=lua)
            plain_envoy = cpu.used()["plain envoy"]
            cpu = Cpu(groups)
            sg = load.wrk(topo.spendgate.base_url + CHAT, connections=c, seconds=seconds, lua=lua)
            used = cpu.used()
            assert sg.errors == 0 and plain.errors == 0, (sg, plain)
            per = {k: v * 1000 / max(sg.requests, 1) for k, v in used.items()}
            out.append(
                row(
                    f"w={workers} c={c} short",
                    f"{plain.rps:,.0f}/s",
                    f"{sg.rps:,.0f}/s",
                    f"{sg.rps / plain.rps:.0%}",
                    f"{per['ext_proc']:.3f} ms",
                    f"{per['envoy']:.3f} ms ({plain_envoy * 1000 / max(plain.requests, 1):.3f})",
                    f"{per['control plane'] * 1000:.1f} µs",
                    f"{per['postgresql'] * 1000:.1f} µs",
                )
            )
        stream_s = 3.0 if QUICK else seconds
        progress(f"--workers {workers}: {STREAMS} paced streams")
        cpu = Cpu(groups)
        plain = paced_streams(topo.plain.base_url, stream_s)
        plain_envoy = cpu.used()["plain envoy"] * 1000 / max(plain.completed, 1)
        cpu = Cpu(groups)
        sg = paced_streams(topo.spendgate.base_url, stream_s)
        used = cpu.used()
        per = {k: v * 1000 / max(sg.completed, 1) for k, v in used.items()}
        out.append(
            row(
                f"w={workers} {STREAMS} streams, mean",
                f"{plain.mean_s * 1000:,.0f} ms",
                f"{sg.mean_s * 1000:,.0f} ms",
                f"{sg.mean_s / plain.mean_s:.2f}x",
                f"{per['ext_proc']:.2f} ms",
                f"{per['envoy']:.2f} ms ({plain_envoy:.2f})",
                f"{per['control plane'] * 1000:.0f} µs",
                f"{per['postgresql'] * 1000:.0f} µs",
            )
        )
        out.append(
            row(
                f"w={workers} per stream event",
                "",
                f"{sg.events / max(sg.completed, 1):.0f} ev/stream",
                "",
                f"{used['ext_proc'] * 1e6 / max(sg.events, 1):.0f} µs",
                f"{used['envoy'] * 1e6 / max(sg.events, 1):.0f} µs",
                "",
                "",
            )
        )
        # 1,000 streams open at all times, each lasting mean_s: 1000 / mean_s streams a second.
        out.append(
            row(
                f"w={workers} cores / 1k streams",
                "",
                "",
                "",
                f"{per['ext_proc'] / 1000 * 1000 / sg.mean_s:.2f}",
                f"{per['envoy'] / 1000 * 1000 / sg.mean_s:.2f}",
                "",
                "",
            )
        )
    finally:
        topo.stop()
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def main() -> None:
    seconds = 2.0 if QUICK else SECONDS
    out = [
        f"ext_proc --workers N — {os.cpu_count()} CPUs, {seconds:.0f} s per step; CPU per "
        f"request or stream (plain Envoy's in brackets); streams: {EVENTS} events "
        f"{GAP_MS} ms apart",
        row(
            "",
            "plain Envoy",
            "spendgate",
            "ratio",
            "ext_proc CPU",
            "Envoy CPU",
            "control plane",
            "PostgreSQL",
        ),
    ]
    for workers in (1, 2):
        measure(workers, seconds, out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
