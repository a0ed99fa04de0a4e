"""The fault-injection run behind the table in docs/operations/reliability.md.

    python -m tests.supervision.fault_run      (PostgreSQL at 127.0.0.1:5432
                                                 for the replication rows)

One whole stack (fake provider, real Envoy, ext_proc, control plane on a fresh
PostgreSQL database, or SQLite without one), production timings (supervisor
backoff from 0.1 s, database checked every 5 s; usage flushed every 20 ms and
maintenance every 5 s instead of 1 h) on a real clock. A GLOBAL
ALERT policy counts every request. For each supervised task in turn: break one
step (raise N times), send traffic through the official OpenAI SDK, and
record the error line, what the dependent health service said while it was
broken, how long until it said SERVING again (from the first failure), and
whether the control plane's spend then equals, to the nano-dollar, what the
provider billed. Prints a Markdown table.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import openai
import psycopg

from control_plane import server as server_module
from control_plane.replicas import CHANNEL, libpq_url
from control_plane.server import (
    MAINTENANCE_HEALTH,
    REPLICATION_HEALTH,
    WEBHOOKS_HEALTH,
)
from ext_proc.server import SYNC_HEALTH_SERVICE, USAGE_HEALTH_SERVICE
from ext_proc.sync.statestream import StateStream
from spendgate.domain.pricing import NANOS_PER_USD, PriceBook, cost_nanos
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import dataplane_pb2_grpc, webhooks_pb2_grpc
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.wire import timestamp
from tests.conftest import PG_ADMIN_URL, Stack, start_stack, stop_stack
from tests.harness import DATA_PLANE_TOKEN, FakeClock, bearer, grpc_channel, wait_until
from tests.supervision.faults import NOT_SERVING, Fault, HealthWatch, captured_logs
from tests.webhooks.receiver import Receiver

PRICES = PriceBook.bundled()
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}  # $0.00045
STATUS = {1: "SERVING", 2: "NOT_SERVING"}


class RealClock(FakeClock):
    """The wall clock: leases and windows pass as in production."""

    def __call__(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class Row:
    task: str
    fault: str
    error_line: str
    health: str
    recovered_s: str
    spend: str


class Run:
    def __init__(self, stack: Stack, receiver: Receiver) -> None:
        self.s = stack
        self.receiver = receiver
        self.policy = self.create(name="everything", amount_usd="1000000")
        self.rows: list[Row] = []

    # ---- the stack ---------------------------------------------------------

    def create(self, **fields: Any) -> pb.BudgetPolicy:
        fields.setdefault("window", pb.BudgetWindow(unit=pb.WINDOW_UNIT_MONTHS, count=1))
        fields.setdefault("action", pb.ACTION_ALERT)
        fields.setdefault("scope", pb.SCOPE_GLOBAL)
        fields.setdefault("amount_usd", "1000000")
        fields.setdefault("name", f"run-{uuid.uuid4().hex[:6]}")
        p = self.s.budgets.CreateBudgetPolicy(
            pb.CreateBudgetPolicyRequest(policy=pb.BudgetPolicy(**fields)), metadata=self.s.admin
        )
        wait_until(lambda: p.id in self.s.ext.state.index.policies, timeout=30)
        return p

    def delete(self, p: pb.BudgetPolicy) -> None:
        self.s.budgets.DeleteBudgetPolicy(
            pb.DeleteBudgetPolicyRequest(id=p.id), metadata=self.s.admin
        )

    def chat(self, n: int) -> None:
        with openai.OpenAI(
            base_url=self.s.envoy.base_url + "/v1",
            api_key="sk-run",
            default_headers=BIG,
            max_retries=0,
        ) as client:
            for _ in range(n):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
                )

    def billed(self) -> Decimal:
        total = 0
        for b in self.s.provider.log.billed:
            price = PRICES.lookup(b.model)
            assert price is not None
            total += cost_nanos(b.usage, price)
        return Decimal(total) / NANOS_PER_USD

    def recorded(self) -> Decimal:
        resp = self.s.budgets.ListSpend(
            pb.ListSpendRequest(policy_id=self.policy.id), metadata=self.s.admin
        )
        return sum((Decimal(e.spent_usd) for e in resp.entries), Decimal(0))

    def spend_check(self) -> str:
        """One more request, then: does spend equal the provider's bill?"""
        self.chat(1)
        want = self.billed()
        try:
            wait_until(lambda: self.recorded() == want, timeout=60)
        except AssertionError:
            return f"**no**: ${self.recorded()} recorded, ${want} billed"
        return f"yes: ${want} = ${want} ({len(self.s.provider.log.billed)} responses)"

    # ---- one row -------------------------------------------------------------

    @contextmanager
    def row(
        self,
        task: str,
        fault_text: str,
        port: int,
        service: str | None,
        fault: Callable[[], Fault],
    ) -> Iterator[Fault]:
        watch = HealthWatch(port, service) if service is not None else None
        with captured_logs() as events:
            f = fault()
            try:
                yield f
                wait_until(lambda: f.spent, timeout=60, message=f"{task}: failures")
                if watch is not None:
                    watch.wait_broken_then_serving(timeout=120)
            finally:
                f.undo()
                if watch is not None:
                    watch.close()
        line = next(e for e in events if e.get("event") == "task failed" and e["task"] == task)
        shown = {k: line[k] for k in ("task", "doing", "failures", "restart_in_s") if k in line}
        error_line = (
            "`[error] task failed "
            + " ".join(f"{k}={v!r}" if k == "doing" else f"{k}={v}" for k, v in shown.items())
            + "` + traceback"
        )
        if watch is not None:
            broken = f"{service or '(overall)'}: {STATUS[NOT_SERVING]}"
            assert f.first_raised_at is not None
            back = watch.recovered_at()
            assert back is not None
            recovered = f"{back - f.first_raised_at:.1f} s"
        else:
            broken = "— (the health publisher itself)"
            recovered = f"{_restart_seconds(line):.1f} s (restart)"
        self.rows.append(
            Row(task, f"{fault_text}, {f.raised} times", error_line, broken, recovered, "")
        )
        self.rows[-1].spend = self.spend_check()

    # ---- the faults ------------------------------------------------------------

    def ext_proc_rows(self) -> None:
        ext = self.s.ext
        steps: list[tuple[str, Callable[[], Fault]]] = [
            (
                "the flush step: `ValueError: Value out of range` (the reported bug's error)",
                lambda: Fault(ext.sync, "flush", 3, ValueError("Value out of range")),
            ),
            ("sending the batches", lambda: Fault(ext.sync, "_send_in_flight", 3)),
            ("reporting holds", lambda: Fault(ext.sync, "_report_holds", 3)),
        ]
        for text, make in steps:
            with self.row("flush-usage", text, ext.port, USAGE_HEALTH_SERVICE, make):
                self.chat(3)
        with self.row(
            "watch-state",
            "receiving a state update",
            ext.port,
            SYNC_HEALTH_SERVICE,
            lambda: Fault(StateStream, "receive", 2),
        ):
            p = self.create()
        self.delete(p)
        with self.row(
            "save-snapshot",
            "saving the snapshot: `OSError: No space left on device`",
            ext.port,
            SYNC_HEALTH_SERVICE,
            lambda: Fault(ext.sync, "save_state", 2, OSError(28, "No space left on device")),
        ):
            pass
        # Room for about 22 requests: each is admitted by the control plane
        # (fewer than arbiter_headroom_requests = 100 fit).
        near = self.create(amount_usd="0.01", action=pb.ACTION_REJECT)
        try:
            with self.row(
                "reserve",
                "the Reserve call (decided on the local view meanwhile)",
                ext.port,
                SYNC_HEALTH_SERVICE,
                lambda: Fault(ext.sync._stub, "Reserve", 1),
            ):
                self.chat(1)
        finally:
            self.delete(near)
        with self.row(
            "health",
            "publishing a health status",
            ext.port,
            None,
            lambda: Fault(ext.board, "publish", 1),
        ):
            self.s.loop.call(lambda: ext.board.report("run", False, (USAGE_HEALTH_SERVICE,)))

    def control_plane_rows(self) -> None:
        cp = self.s.cp
        with self.row(
            "watch-database", "checking the database", cp.port, "", lambda: Fault(cp.cp, "ping", 2)
        ):
            pass
        with self.row(
            "maintenance",
            "forgetting old batch ids",
            cp.port,
            MAINTENANCE_HEALTH,
            lambda: Fault(cp.cp, "forget_old_batches", 2),
        ):
            pass
        webhooks_pb2_grpc.WebhookServiceStub(grpc_channel(cp.port)).CreateWebhook(
            wpb.CreateWebhookRequest(
                webhook=wpb.Webhook(
                    name="ops", format=wpb.WEBHOOK_FORMAT_GENERIC, url=self.receiver.url
                )
            ),
            metadata=self.s.admin,
            timeout=10,
        )
        with self.row(
            "webhook-dispatcher",
            "claiming due deliveries",
            cp.port,
            WEBHOOKS_HEALTH,
            lambda: Fault(cp.dispatcher, "dispatch_due", 3),
        ):
            self.crossing()
        self.receiver.wait_for(1, timeout=60)
        with self.row(
            "webhook-delivery",
            "sending one delivery (sent again when its lease runs out)",
            cp.port,
            WEBHOOKS_HEALTH,
            lambda: Fault(cp.dispatcher, "_attempt", 1),
        ):
            self.crossing()
        self.receiver.wait_for(2, timeout=60)
        if cp.replicas is None:
            return
        replicas = cp.replicas
        with self.row(
            "replica-listen",
            "handling a notification",
            cp.port,
            REPLICATION_HEALTH,
            lambda: Fault(replicas, "_received", 1),
        ):
            self.notify()
        with self.row(
            "replica-publish",
            "publishing another replica's change",
            cp.port,
            REPLICATION_HEALTH,
            lambda: Fault(cp.cp, "publish_policies", 2),
        ):
            self.notify(ids=["bp_changed_elsewhere"])

    def crossing(self) -> None:
        """A policy whose 50 % threshold the next report crosses: one delivery."""
        p = self.create(amount_usd="1", alert_thresholds=[50])
        dataplane_pb2_grpc.DataPlaneServiceStub(grpc_channel(self.s.cp.port)).ReportUsage(
            dp.ReportUsageRequest(
                data_plane_id="run-dp",
                batch_id=uuid.uuid4().hex,
                increments=[
                    dp.SpendIncrement(
                        policy_id=p.id,
                        window_start=timestamp(self.s.clock()),
                        cost_nanos=600_000_000,
                        request_count=1,
                    )
                ],
            ),
            metadata=bearer(DATA_PLANE_TOKEN),
            timeout=10,
        )

    def notify(self, ids: list[str] | None = None) -> None:
        """What another replica sends: the ids of the policies it changed
        (none: an earlier release's replica, and every stream resyncs)."""
        payload = {"r": "other", "k": "policies", **({"i": ids} if ids else {})}
        with psycopg.connect(libpq_url(self.s.cp.engine), autocommit=True) as conn:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(payload)))


def _restart_seconds(line: dict[str, Any]) -> float:
    return float(line.get("restart_in_s", 0.0))


def fresh_pg() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            name = f"spendgate_faults_{uuid.uuid4().hex[:8]}"
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError:
        return None
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def main() -> int:
    # Maintenance runs hourly in production; here every 5 s, so that its
    # restarted run shows up within the run.
    server_module.MAINTENANCE_INTERVAL_S = 5.0
    db = fresh_pg()
    receiver = Receiver().start()
    stack = start_stack(
        db,
        clock=RealClock(),
        control_plane={
            "webhook_allow_http": True,
            "webhook_allow_private_ranges": "127.0.0.0/8",
            "webhook_poll_interval_s": 0.05,
            "webhook_connect_timeout_s": 1.0,
            "webhook_read_timeout_s": 1.0,
        },
    )
    started = time.monotonic()
    try:
        run = Run(stack, receiver)
        run.ext_proc_rows()
        run.control_plane_rows()
    finally:
        stop_stack(stack)
        receiver.stop()
        if db:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db.rsplit("/", 1)[1]}" WITH (FORCE)')
    print(f"database: {'PostgreSQL' if db else 'SQLite'}; {time.monotonic() - started:.0f} s\n")
    head = ("Task", "Fault injected", "Error line", "Health while broken", "Recovered after")
    print("| " + " | ".join((*head, "Spend = billed")) + " |")
    print("|---" * (len(head) + 1) + "|")
    for r in run.rows:
        cells = (f"`{r.task}`", r.fault, r.error_line, r.health, r.recovered_s, r.spend)
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
