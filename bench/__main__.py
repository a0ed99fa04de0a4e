"""`make bench`: spendgate against plain Envoy, side by side, in one run.

Environment: BENCH_SECONDS (per wrk run, default 10), BENCH_PG (PostgreSQL
URL for the ingest measurement, default the local server), BENCH_QUICK=1
(short runs, for a smoke check of the harness itself).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg

from bench import ingest, load, stream, topology
from tests.harness import free_port, wait_until

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
QUICK = os.environ.get("BENCH_QUICK") == "1"
# ext_proc processes behind spendgate's Envoy (each a data plane of its own).
EXT_PROCS = int(os.environ.get("BENCH_EXT_PROCS", "1"))
PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def row(*cells: object) -> str:
    widths = (34, 12, 12, 12, 16)
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))


def main() -> None:
    seconds = 2.0 if QUICK else SECONDS
    topo = topology.start(ext_procs=EXT_PROCS)
    out: list[str] = []
    try:
        matched = topology.load_policies(topo.cp_address)
        pids = [p.pid for p in topo.ext_procs]
        lua = load.script(topo.workdir)
        chat = "/v1/chat/completions"
        for env in (topo.plain, topo.spendgate, topo.floor):  # warm up all
            load.wrk(env.base_url + chat, connections=4, seconds=1 if QUICK else 3, lua=lua)
        out.append(
            f"spendgate vs plain Envoy — 50 policies loaded, {matched} match each "
            f"request; {seconds:.0f}s per run; {os.cpu_count()} CPUs"
        )
        out.append(row("non-streaming chat", "plain", "spendgate", "ratio", "added"))
        floors: list[tuple[int, load.Result, load.Result]] = []
        for c in (1, 16, 64):
            progress(f"non-streaming, {c} connections")
            plain = load.wrk(topo.plain.base_url + chat, connections=c, seconds=seconds, lua=lua)
            before = sum(map(cpu_seconds, pids))
            sg = load.wrk(topo.spendgate.base_url + chat, connections=c, seconds=seconds, lua=lua)
            cpu_ms = (sum(map(cpu_seconds, pids)) - before) * 1000 / max(sg.requests, 1)
            assert sg.errors == 0 and plain.errors == 0, (sg, plain)
            out.append(
                row(
                    f"c={c} requests/s",
                    f"{plain.rps:,.0f}",
                    f"{sg.rps:,.0f}",
                    f"{sg.rps / plain.rps:.0%}",
                    "",
                )
            )
            out.append(
                row(
                    f"c={c} p50 ms",
                    f"{plain.p50_ms:.3f}",
                    f"{sg.p50_ms:.3f}",
                    f"{sg.p50_ms / plain.p50_ms:.2f}x",
                    f"+{sg.p50_ms - plain.p50_ms:.3f} ms",
                )
            )
            out.append(
                row(
                    f"c={c} p99 ms",
                    f"{plain.p99_ms:.3f}",
                    f"{sg.p99_ms:.3f}",
                    f"{sg.p99_ms / plain.p99_ms:.2f}x",
                    f"+{sg.p99_ms - plain.p99_ms:.3f} ms",
                )
            )
            out.append(row(f"c={c} ext_proc CPU / request", "", f"{cpu_ms:.3f} ms", "", ""))
            floors.append(
                (
                    c,
                    plain,
                    load.wrk(topo.floor.base_url + chat, connections=c, seconds=seconds, lua=lua),
                )
            )
        out.append(row("protocol floor (bench/floor.py)", "plain", "floor", "ratio", "added"))
        for c, plain, fl in floors:
            out.append(
                row(
                    f"c={c} requests/s",
                    f"{plain.rps:,.0f}",
                    f"{fl.rps:,.0f}",
                    f"{fl.rps / plain.rps:.0%}",
                    "",
                )
            )
            out.append(
                row(
                    f"c={c} p50 ms",
                    f"{plain.p50_ms:.3f}",
                    f"{fl.p50_ms:.3f}",
                    f"{fl.p50_ms / plain.p50_ms:.2f}x",
                    f"+{fl.p50_ms - plain.p50_ms:.3f} ms",
                )
            )
        n = 20 if QUICK else 200
        progress("streaming")
        ps = stream.measure(topo.plain.base_url, requests=n)
        ss = stream.measure(topo.spendgate.base_url, requests=n)
        fs = stream.measure(topo.floor.base_url, requests=n)
        for label, other in (("spendgate", ss), ("floor", fs)):
            out.append(row("streaming, 100 chunks", "plain", label, "ratio", "added"))
            for name, a, b in (
                ("TTFB p50 ms", ps.ttfb_p50_ms, other.ttfb_p50_ms),
                ("TTFB p99 ms", ps.ttfb_p99_ms, other.ttfb_p99_ms),
                ("total p50 ms", ps.total_p50_ms, other.total_p50_ms),
                ("total p99 ms", ps.total_p99_ms, other.total_p99_ms),
            ):
                out.append(row(name, f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}x", f"+{b - a:.3f} ms"))
        total = 10_000 if QUICK else 100_000
        rss0 = sum(map(rss_mb, pids))
        marks: dict[int, float] = {}
        done = 0
        url = topo.spendgate.base_url + chat
        progress(f"memory: {total:,} requests")
        while done < total:
            done += load.wrk(url, connections=16, seconds=3, lua=lua).requests
            for mark in (total // 2, total):
                if done >= mark and mark not in marks:
                    marks[mark] = sum(map(rss_mb, pids))
        half, full = marks[total // 2], marks[total]
        out.append(
            row(
                "ext_proc RSS MB",
                f"start {rss0:.1f}",
                f"{total // 2:,}: {half:.1f}",
                f"{total:,}: {full:.1f}",
                f"growth {(full - half) / half:+.1%}",
            )
        )
    finally:
        topo.stop()
    out.append(row("control plane ingest", "records/s", "", "", ""))
    for name, url in (("PostgreSQL", None), ("SQLite", "sqlite")):
        progress(f"ingest, {name}")
        rate = ingest_rate(url)
        out.append(row(f"  {name}", f"{rate:,.0f}", "", "", ""))
    print("\n".join(out))


def ingest_rate(kind: str | None) -> float:
    workdir = Path(topology.tempfile.mkdtemp(prefix="spendgate-ingest-"))
    dbname = ""
    if kind == "sqlite":
        url = f"sqlite:///{workdir}/ingest.db"
    else:
        dbname = f"spendgate_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        url = PG.rsplit("/", 1)[0] + f"/{dbname}"
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "SPENDGATE_ADMIN_TOKEN": topology.ADMIN,
        "SPENDGATE_DATA_PLANE_TOKEN": topology.DATA_PLANE,
        "SPENDGATE_LOG_LEVEL": "warning",
        "SPENDGATE_METRICS_LISTEN": "127.0.0.1:0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "control_plane", "--listen", address, "--database-url", url],
        env=env,
        stdout=(workdir / "cp.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: topology._serving(address), timeout=30, message="control plane")
        return asyncio.run(ingest.run(address, seconds=3 if QUICK else 8))
    finally:
        proc.terminate()
        proc.wait(15)
        if dbname:
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


if __name__ == "__main__":
    main()
