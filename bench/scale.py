"""`python -m bench scale`: work that grows with the size of the state.

For each database (SQLite, PostgreSQL) and each size, the store is filled in
bulk directly (SQLAlchemy inserts of policy and window_spend rows; the admin
API would take minutes at 100,000 policies), then a fresh control plane and
ext_proc start on it and ext_proc syncs it by the ordinary resync. Sizes:

    policies   10 / 1,000 / 10,000 / 100,000 (one of them a `*` USER policy with 1 member)
    members    1 / 10,000 / 100,000 / 1,000,000 of one `*` USER policy (10 policies)

Measured per size, all through the real processes:
- sync: time from starting the services to ext_proc reporting itself in sync,
  then how long (and how much CPU) ext_proc stays busy after it (the first
  snapshot save writes every window); the rest is measured after that;
- ext_proc RSS after the sync;
- admission: wrk at c=1 through spendgate's Envoy (the request matches the
  `*` policy), p50/p99 and ext_proc CPU per request from /proc;
- `spendgate status` and `spendgate spend --policy <the * policy>` wall time;
- policy change: CreateBudgetPolicy and UpdateBudgetPolicy through the admin
  API (p50 of 20) and until ext_proc applied it, seen through Envoy: each
  probe policy has expose_to_clients, so the response's budget headers name
  the new policy / show the new amount once ext_proc has it;
- rollover (in-process, the services take no injected clock outside tests):
  a LocalState fed N members the way a resync does (replace_view), then
  prune() with no window ended, and the boundary the way ext_proc's
  save-snapshot task prunes (ControlPlaneSync.prune): prune() at the
  boundary, then slice after slice with the event loop running between
  them; its longest slice, all slices together, and the longest stall the
  event loop saw (the longest gap between two runs of a callback).

Environment: BENCH_QUICK=1 (only the smallest sizes), BENCH_SCALE_DBS
(comma list of sqlite,postgresql), BENCH_SCALE_POLICIES / BENCH_SCALE_MEMBERS
(comma lists of sizes), BENCH_PG (PostgreSQL server URL).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import grpc
import psycopg
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import insert
from sqlalchemy.orm import Session

from bench import load, topology
from bench.procstat import cpu_seconds, rss_mb
from control_plane.store import repo
from control_plane.store.db import create_db_engine, migrate
from control_plane.store.models import PolicyRow, WindowSpendRow
from ext_proc.server import SYNC_HEALTH_SERVICE
from ext_proc.sync.state import LocalState
from spendgate.domain.windows import WindowSpec, WindowUnit, window_for
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp

QUICK = os.environ.get("BENCH_QUICK") == "1"
PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
CHANGES = 3 if QUICK else 20
PROBE_MODEL = load.BODY.split('"model":"', 1)[1].split('"', 1)[0]
USER = load.HEADERS["x-spendgate-user"]
SPENDGATE = [sys.executable, "-m", "spendgate.cli.main"]
JOURNAL_ENV = "SPENDGATE_EXT_PROC_JOURNAL_DIR"


def sizes(name: str, full: str, quick: str) -> list[int]:
    text = os.environ.get(name) or (quick if QUICK else full)
    return [int(s) for s in text.split(",") if s]


def member(m: int) -> str:
    return f"user-{m:07d}@example-tenant.test"


@dataclass
class Size:
    policies: int
    members: int

    @property
    def label(self) -> str:
        return f"{self.policies:,} policies / {self.members:,} members"


def fill(url: str, size: Size, now: datetime) -> str:
    """Bulk-insert ``size``: policies - 1 WORKSPACE policies that no bench
    request matches, and one `*` USER policy with ``members`` members in its
    current window. Returns the `*` policy's id."""
    engine = create_db_engine(url)
    migrate(engine)
    base = {
        "amount_nanos": 1_000_000 * 10**9,
        "window_unit": WindowUnit.DAYS.value,
        "window_count": 1,
        "week_start": 0,
        "timezone": "UTC",
        "action": "REJECT",
        "alert_thresholds": "50,80,100",
        "enabled": True,
        "create_time": now,
        "update_time": now,
        "created_by": "bulk",
        "updated_by": "bulk",
        "version": 1,
        "description": "",
    }
    wildcard = repo.new_policy_id()
    day = window_for(WindowSpec(WindowUnit.DAYS, 1, "UTC", 0), now)
    start, end = int(day.start.timestamp()), int(day.end.timestamp())
    with Session(engine) as s, s.begin():
        s.execute(
            insert(PolicyRow),
            [{**base, "id": wildcard, "name": "each user", "scope": "USER", "target": "*"}],
        )
        for i in range(0, size.policies - 1, 5000):
            s.execute(
                insert(PolicyRow),
                [
                    {
                        **base,
                        "id": repo.new_policy_id(),
                        "name": f"team-{j:06d}",
                        "scope": "WORKSPACE",
                        "target": f"workspace-{j:06d}",
                    }
                    for j in range(i, min(i + 5000, size.policies - 1))
                ],
            )
        for i in range(0, size.members, 10_000):
            s.execute(
                insert(WindowSpendRow),
                [
                    {
                        "policy_id": wildcard,
                        "member": member(m),
                        "window_start": start,
                        "window_end": end,
                        "spent_nanos": 1000 + m,
                        "request_count": 1,
                        "estimated_count": 0,
                        "updated_at": now,
                    }
                    for m in range(i, min(i + 10_000, size.members))
                ],
            )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()
    return wildcard


@contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        path = workdir / f"scale-{uuid.uuid4().hex[:6]}.db"
        try:
            yield f"sqlite:///{path}"
        finally:  # about 200 MB at 1,000,000 members
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    name = f"spendgate_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def in_sync(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=SYNC_HEALTH_SERVICE), timeout=5
            )
        except grpc.RpcError:
            return False
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


def idle(pid: int, seconds: float = 1.0) -> bool:
    """``pid`` used under a tenth of a core for ``seconds``."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before < seconds / 10


def wait(check: Callable[[], bool], timeout: float, what: str, poll: float = 0.0) -> float:
    """Seconds until ``check()`` holds (SystemExit after ``timeout``)."""
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"bench scale: {what} not reached in {timeout:.0f}s")
        if poll:
            time.sleep(poll)
    return time.perf_counter() - t0


class Probe:
    """Short requests through spendgate's Envoy on one keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def headers(self) -> dict[str, str]:
        self.conn.request("POST", "/v1/chat/completions", body=load.BODY, headers=load.HEADERS)
        resp = self.conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"bench scale: probe request answered {resp.status}")
        return {k.lower(): v for k, v in resp.getheaders()}

    def until(self, header: str, value: str) -> None:
        """Request until a response's ``header`` is ``value`` (ext_proc applied the change)."""
        wait(lambda: self.headers().get(header) == value, 120, f"{header}: {value}")


@dataclass
class Changes:
    create_ms: float
    create_applied_ms: float
    update_ms: float
    update_applied_ms: float


def policy_changes(stub: budget_pb2_grpc.BudgetServiceStub, probe: Probe) -> Changes:
    """CHANGES creates, then CHANGES updates of the last one, each followed by
    requests through Envoy until its budget headers show the change."""
    md = (("authorization", f"Bearer {topology.ADMIN}"),)
    day = pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1)
    create: list[float] = []
    create_applied: list[float] = []
    update: list[float] = []
    update_applied: list[float] = []
    policy = pb.BudgetPolicy()
    for i in range(CHANGES):
        t0 = time.perf_counter()
        policy = stub.CreateBudgetPolicy(
            pb.CreateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(
                    name=f"probe-{i}",
                    # Each new one the tightest exposed budget: its id is shown.
                    amount_usd=str(900_000 - i),
                    window=day,
                    action=pb.ACTION_ALERT,
                    scope=pb.SCOPE_MODEL,
                    target=PROBE_MODEL,
                    expose_to_clients=True,
                )
            ),
            metadata=md,
            timeout=600,
        )
        create.append(time.perf_counter() - t0)
        probe.until("x-spendgate-budget-policy", policy.id)
        create_applied.append(time.perf_counter() - t0)
    for i in range(CHANGES):
        amount = str(800_000 - i)
        t0 = time.perf_counter()
        stub.UpdateBudgetPolicy(
            pb.UpdateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(id=policy.id, amount_usd=amount),
                update_mask=FieldMask(paths=["amount_usd"]),
            ),
            metadata=md,
            timeout=600,
        )
        update.append(time.perf_counter() - t0)
        probe.until("x-spendgate-budget-limit", f"{amount}.00")
        update_applied.append(time.perf_counter() - t0)
    return Changes(
        *(statistics.median(xs) * 1000 for xs in (create, create_applied, update, update_applied))
    )


def cli_seconds(address: str, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [*SPENDGATE, *args, "--server", address, "--token", topology.ADMIN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=True,
        timeout=3600,
    )
    return time.perf_counter() - t0


@dataclass
class Rollover:
    feed_ms: float
    prune_ms: float  # prune() with no window ended
    boundary_ms: float  # prune() at the boundary: ends them all, deletes the first slice
    slice_ms: float  # the longest of the slices after it (prune_more)
    all_ms: float  # the boundary's prune() and every slice
    stall_ms: float  # the event loop's longest gap between two runs of a callback


def rollover(members: int) -> Rollover:
    """ext_proc's side of a window boundary with ``members`` known windows, in-process."""
    now = datetime.now(UTC)
    day = window_for(WindowSpec(WindowUnit.DAYS, 1, "UTC", 0), now)
    start = Timestamp(seconds=int(day.start.timestamp()))
    end = Timestamp(seconds=int(day.end.timestamp()))
    spend = [
        dp.WindowSpend(
            policy_id="bp_x", member=member(m), window_start=start, window_end=end, spent_nanos=m
        )
        for m in range(members)
    ]
    state = LocalState()
    t0 = time.perf_counter()
    state.replace_view((), (), spend, now)
    t1 = time.perf_counter()
    state.prune(now)
    t2 = time.perf_counter()
    boundary, slices, stall = asyncio.run(_boundary(state, day.end + timedelta(seconds=1)))
    assert not state.remote
    return Rollover(
        (t1 - t0) * 1000,
        (t2 - t1) * 1000,
        boundary * 1000,
        max(slices, default=0) * 1000,
        (boundary + sum(slices)) * 1000,
        stall * 1000,
    )


async def _boundary(state: LocalState, after: datetime) -> tuple[float, list[float], float]:
    """Prune at ``after`` as ControlPlaneSync.prune does, timing each step,
    while a callback that reschedules itself measures the loop's gaps.
    Returns (the prune() call, each slice after it, the longest gap) in s."""
    loop = asyncio.get_running_loop()
    last, longest, done = time.perf_counter(), 0.0, False

    def tick() -> None:
        nonlocal last, longest
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
        if not done:
            loop.call_soon(tick)

    tick()
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    state.prune(after)
    boundary = time.perf_counter() - t0
    slices = []
    while state.pruning:
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        state.prune_more()
        slices.append(time.perf_counter() - t0)
    await asyncio.sleep(0)
    done = True
    return boundary, slices, longest


def row(*cells: object) -> str:
    widths = (44, 14, 14, 14, 14, 14, 14)
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))


def progress(text: str) -> None:
    print(f"bench scale: {text}", file=sys.stderr, flush=True)


def measure(kind: str, size: Size) -> list[str]:
    out: list[str] = [f"{kind}, {size.label}"]
    workdir = Path(tempfile.mkdtemp(prefix="spendgate-scale-"))
    with database(kind, workdir) as url:
        t0 = time.perf_counter()
        wildcard = fill(url, size, datetime.now(UTC))
        out.append(row("  bulk load s", f"{time.perf_counter() - t0:.1f}"))
        t0 = time.perf_counter()
        # ext_proc's journal and snapshot (about 70 MB at 1,000,000 members)
        # in the run's folder, removed with it.
        journal = os.environ.get(JOURNAL_ENV)
        os.environ[JOURNAL_ENV] = str(workdir / "ext_proc-{port}")
        try:
            topo = topology.start(database_url=url)
        finally:
            if journal is None:
                del os.environ[JOURNAL_ENV]
            else:
                os.environ[JOURNAL_ENV] = journal
        try:
            pid = topo.ext_procs[0].pid
            args = cast(list[str], topo.ext_procs[0].args)  # ... --listen HOST:PORT ...
            port = int(args[args.index("--listen") + 1].rsplit(":", 1)[1])
            wait(lambda: in_sync(port), 3600, "ext_proc in sync", poll=0.2)
            out.append(row("  start + sync s", f"{time.perf_counter() - t0:.1f}"))
            # The first snapshot save after a resync writes every window (in a
            # thread, then at most SNAPSHOT_SHARE of the time): measure after it.
            cpu0, t1 = cpu_seconds(pid), time.perf_counter()
            wait(lambda: idle(pid), 3600, "ext_proc idle after the sync")
            settle = f"{time.perf_counter() - t1:.1f}", f"CPU {cpu_seconds(pid) - cpu0:.1f}"
            out.append(row("  ext_proc busy after sync s", *settle))
            out.append(row("  ext_proc RSS MB", f"{rss_mb(pid):.1f}"))
            lua = load.script(workdir)
            chat = topo.spendgate.base_url + "/v1/chat/completions"
            load.wrk(chat, connections=1, seconds=1, lua=lua)
            before = cpu_seconds(pid)
            r = load.wrk(chat, connections=1, seconds=2 if QUICK else 8, lua=lua)
            cpu_ms = (cpu_seconds(pid) - before) * 1000 / max(r.requests, 1)
            if r.errors:
                raise SystemExit(f"bench scale: {r.errors} non-2xx answers")
            out.append(row("  admission c=1 p50 / p99 ms", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}"))
            out.append(row("  ext_proc CPU / request ms", f"{cpu_ms:.3f}"))
            out.append(row("  ext_proc RSS MB after", f"{rss_mb(pid):.1f}"))
            status = cli_seconds(topo.cp_address, "status")
            spend = cli_seconds(topo.cp_address, "spend", "--policy", wildcard)
            out.append(row("  status / spend --policy s", f"{status:.2f}", f"{spend:.2f}"))
            probe = Probe(topo.spendgate.port)
            with grpc.insecure_channel(topo.cp_address) as channel:
                try:
                    stub = budget_pb2_grpc.BudgetServiceStub(channel)  # type: ignore[no-untyped-call]
                    c = policy_changes(stub, probe)
                finally:
                    probe.conn.close()
            out.append(row(f"  create p50 ms (of {CHANGES})", f"{c.create_ms:.1f}",
                           f"applied {c.create_applied_ms:.1f}"))  # fmt: skip
            out.append(row(f"  update p50 ms (of {CHANGES})", f"{c.update_ms:.1f}",
                           f"applied {c.update_applied_ms:.1f}"))  # fmt: skip
        finally:
            topo.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def main() -> None:
    dbs = (os.environ.get("BENCH_SCALE_DBS") or "sqlite,postgresql").split(",")
    policies = sizes("BENCH_SCALE_POLICIES", "10,1000,10000,100000", "10")
    members = sizes("BENCH_SCALE_MEMBERS", "1,10000,100000,1000000", "1")
    runs = [Size(p, 1) for p in policies] + [Size(10, m) for m in members if m != 1]
    out: list[str] = []
    for kind in dbs:
        for size in runs:
            progress(f"{kind}, {size.label}")
            lines = measure(kind, size)
            print("\n".join(lines), flush=True)
            out += lines
    title = (
        "rollover, ext_proc in-process ms: resync feed / prune, none ended / boundary:"
        " prune / longest slice / all slices / longest loop stall"
    )
    print(title, flush=True)
    out.append(title)
    for m in members:
        r = rollover(m)
        line = row(f"  {m:,} members", f"{r.feed_ms:.1f}", f"{r.prune_ms:.3f}",
                   f"{r.boundary_ms:.1f}", f"{r.slice_ms:.1f}", f"{r.all_ms:.1f}",
                   f"{r.stall_ms:.1f}")  # fmt: skip
        print(line, flush=True)
        out.append(line)


if __name__ == "__main__":
    main()
