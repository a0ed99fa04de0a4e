"""`make bench`: spendgate against plain Envoy, side by side, in one run.

Environment: BENCH_SECONDS (per wrk run, default 10), BENCH_PG (PostgreSQL
URL for the ingest measurement, default the local server), BENCH_QUICK=1
(short runs, for a smoke check of the harness itself).

    python -m bench          everything
    python -m bench paced    only the paced streams (no wrk needed)
    python -m bench scale    work that grows with the size of the state (bench/scale.py)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg

from bench import ingest, load, paced, stream, topology
from bench.procstat import cpu_seconds, rss_mb
from tests.harness import free_port, wait_until

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
QUICK = os.environ.get("BENCH_QUICK") == "1"
# ext_proc processes behind spendgate's Envoy (each a data plane of its own).
EXT_PROCS = int(os.environ.get("BENCH_EXT_PROCS", "1"))
PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def row(*cells: object) -> str:
    widths = (34, 12, 12, 12, 16)
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))


def paced_targets(topo: topology.Topology) -> list[paced.Target]:
    """Plain Envoy, the protocol floor and spendgate: the paced streams' columns."""
    return [
        paced.Target("plain", topo.plain.base_url, topo.plain.proc.pid),
        paced.Target("floor", topo.floor.base_url, topo.floor.proc.pid, (topo.floor_server.pid,)),
        paced.Target(
            "spendgate",
            topo.spendgate.base_url,
            topo.spendgate.proc.pid,
            tuple(p.pid for p in topo.ext_procs),
        ),
    ]


def paced_streams(topo: topology.Topology, *, quick: bool) -> list[str]:
    """32 streams of 200 events 10 ms apart (three rounds), then 32 of 1,000 events;
    in quick mode a few short ones."""
    targets = paced_targets(topo)
    runs = [(4, 4, 20, 2), (4, 4, 50, 2)] if quick else [(32, 96, 200, 10), (32, 32, 1000, 10)]
    out: list[str] = []
    for concurrency, streams, events, delay_ms in runs:
        progress(f"paced streams: {streams} x {events} events")
        out += paced.compare(
            targets, concurrency=concurrency, streams=streams, events=events, delay_ms=delay_ms
        )
    return out


def main() -> None:
    if sys.argv[1:] == ["scale"]:
        from bench import scale

        scale.main()
        return
    seconds = 2.0 if QUICK else SECONDS
    topo = topology.start(ext_procs=EXT_PROCS)
    out: list[str] = []
    if sys.argv[1:] == ["paced"]:
        try:
            topology.load_policies(topo.cp_address)
            out = paced_streams(topo, quick=QUICK)
        finally:
            topo.stop()
        print("\n".join(out))
        return
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
        out += paced_streams(topo, quick=QUICK)
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
