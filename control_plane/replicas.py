"""Replicated control plane: changes made through one replica reach the data
planes connected to every replica, through PostgreSQL LISTEN/NOTIFY.

Each use case that changes what data planes see calls ``ControlPlane.on_change``
inside its transaction; here that issues ``pg_notify`` on CHANNEL, so the
notification is delivered if, and only if, the change commits. Every replica
LISTENs on one dedicated autocommit connection, ignores its own notifications
(its hub already published them), reads the current state of what changed and
publishes it to its own hub:

- ``policies`` / ``prices``: the policies or overrides named in the payload
  as they are now (or deleted); no ids means "resync every data plane";
- ``spend``: the window rows named in the payload, with their totals (absolute,
  so arrival order does not matter); no keys means "every window open now".

Payloads stay under PostgreSQL's 8000-byte NOTIFY limit: keys and ids are
split over several notifications, and a very large change sends one keyless
notification. Notifications that arrive together are coalesced. The listener
reconnects with backoff when its connection drops, and after reconnecting
resyncs every data plane stream (control_plane/resync.py) to cover whatever
was missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import Sequence

import psycopg
import structlog
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from control_plane import convert
from control_plane.errors import Unavailable
from control_plane.pricing import PricingAdmin
from control_plane.service import ControlPlane
from control_plane.store import repo
from control_plane.store.models import PolicyRow
from spendgate.supervise import Supervisor
from spendgate.v1 import dataplane_pb2 as dp

log = structlog.get_logger("spendgate.control_plane")

CHANNEL = "spendgate_state"
MAX_PAYLOAD_BYTES = 7900  # PostgreSQL refuses payloads of 8000 bytes or more
MAX_SPEND_CHUNKS = 32  # beyond this, one keyless "spend": re-read open windows
HEARTBEAT_S = 10.0  # an idle listener checks its connection this often
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
# Supervised task names (spendgate/supervise.py).
LISTEN_TASK = "replica-listen"
PUBLISH_TASK = "replica-publish"

SpendKey = tuple[str, str, int]  # policy_id, member, window_start


def libpq_url(engine: Engine) -> str:
    """The engine's URL as psycopg (libpq) accepts it."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def encode(replica: str, kind: str, keys: Sequence[SpendKey] | Sequence[str] = ()) -> list[str]:
    """Payloads for one change; each below MAX_PAYLOAD_BYTES.

    Each key is encoded once and the chunks are joined (a batch of thousands
    of windows costs linear time, not a re-encoding per key). Spend keys go
    in "w", policy and override ids in "i".
    """
    everything = json.dumps({"r": replica, "k": kind}, separators=(",", ":"))
    if not keys:
        return [everything]
    head = everything[:-1] + (',"w":[' if kind == "spend" else ',"i":[')
    tail = "]}"
    fixed = len(head) + len(tail)  # ensure_ascii: characters are bytes
    payloads: list[str] = []
    chunk: list[str] = []
    size = fixed
    for key in keys:
        item = json.dumps(key if isinstance(key, str) else list(key), separators=(",", ":"))
        if fixed + len(item) > MAX_PAYLOAD_BYTES:
            return [head + tail]  # a key too long to name: everyone re-reads open windows
        if size + len(item) + bool(chunk) > MAX_PAYLOAD_BYTES:
            payloads.append(head + ",".join(chunk) + tail)
            chunk, size = [], fixed
            if len(payloads) >= MAX_SPEND_CHUNKS:
                return [head + tail]
        size += len(item) + bool(chunk)
        chunk.append(item)
    if chunk:
        payloads.append(head + ",".join(chunk) + tail)
    return payloads


class _Pending:
    """Changes announced by other replicas, not yet published here."""

    def __init__(self) -> None:
        self.resync = False  # every data plane stream resyncs
        self.policies: set[str] = set()
        self.prices: set[str] = set()
        self.all_spend = False
        self.spend: set[SpendKey] = set()

    def __bool__(self) -> bool:
        return (
            self.resync
            or bool(self.policies)
            or bool(self.prices)
            or self.all_spend
            or bool(self.spend)
        )


class ReplicaSync:
    """Notifier (``notify``, called in a use-case transaction) and listener
    (``start`` / ``stop``) of one control plane replica."""

    def __init__(
        self, cp: ControlPlane, pricing: PricingAdmin, supervisor: Supervisor | None = None
    ) -> None:
        self.cp = cp
        self.supervisor = supervisor or Supervisor(log)
        self.pricing = pricing
        self.replica_id = uuid.uuid4().hex[:16]
        self.url = libpq_url(cp.engine)
        self.backend_pid: int | None = None  # of the LISTEN connection, when connected
        self.reconnects = 0
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- notifier ----------------------------------------------------------

    def notify(
        self, session: Session, kind: str, keys: Sequence[SpendKey] | Sequence[str] = ()
    ) -> None:
        # One statement, however many payloads (all delivered at commit).
        session.execute(
            text("SELECT pg_notify(:c, p) FROM unnest(CAST(:ps AS text[])) AS p"),
            {"c": CHANNEL, "ps": encode(self.replica_id, kind, keys)},
        )

    # ---- listener ----------------------------------------------------------

    async def start(self, ready_timeout: float = 10.0) -> None:
        """Start listening; returns once LISTEN is in place (or, if the database
        is not reachable within ``ready_timeout``, keeps trying in the background)."""
        self._tasks = [
            self.supervisor.spawn(
                LISTEN_TASK,
                self._listen,
                doing="listening for other replicas' changes (LISTEN/NOTIFY)",
                settle_s=HEARTBEAT_S + 1.0,
            ),
            self.supervisor.spawn(
                PUBLISH_TASK,
                self._supervised_publish,
                doing="publishing other replicas' changes to this replica's data planes",
            ),
        ]
        try:
            await asyncio.wait_for(self._listening.wait(), ready_timeout)
        except TimeoutError:
            log.warning("replica listener not connected yet; retrying in the background")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _listen(self) -> None:
        backoff = BACKOFF_MIN_S
        first = not self._listening.is_set()  # a restarted listener resyncs too
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=5
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.backend_pid = conn.info.backend_pid
                    self._listening.set()
                    log.info("replica listening", replica=self.replica_id, pid=self.backend_pid)
                    if not first:
                        # Notifications sent while we were away are lost: resync.
                        self.reconnects += 1
                        self._pending.resync = True
                        self._wake.set()
                    first = False
                    backoff = BACKOFF_MIN_S
                    while True:
                        async for n in conn.notifies(timeout=HEARTBEAT_S):
                            self._received(n.payload)
                        await asyncio.wait_for(conn.execute("SELECT 1"), HEARTBEAT_S)
            except (psycopg.Error, OSError, TimeoutError) as e:  # connection lost or refused
                self.backend_pid = None
                log.warning(
                    "replica listener disconnected; reconnecting",
                    error=str(e).splitlines()[0] if str(e) else type(e).__name__,
                    retry_in_s=round(backoff, 2),
                )
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _received(self, payload: str) -> None:
        try:
            msg = json.loads(payload)
            if msg.get("r") == self.replica_id:
                return
            kind = msg.get("k")
            if kind in ("policies", "prices"):
                # Replicas of earlier releases name no ids: resync then.
                ids = [str(i) for i in msg.get("i") or []]
                if not ids:
                    self._pending.resync = True
                (self._pending.policies if kind == "policies" else self._pending.prices).update(ids)
            elif kind == "spend":
                keys = msg.get("w") or []
                if not keys:
                    self._pending.all_spend = True
                for p, m, w in keys:
                    self._pending.spend.add((str(p), str(m), int(w)))
            else:
                return
        except (ValueError, TypeError, AttributeError):
            log.warning("ignoring malformed replica notification", payload=payload[:200])
            return
        self._wake.set()

    async def _supervised_publish(self) -> None:
        if self._pending:
            self._wake.set()  # work a failed run merged back
        await self._publish_loop()

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, _Pending()
            if not pending:
                continue
            try:
                await self._publish(pending)
            except Exception as e:
                # Keep the work. Database gone for now: try again shortly; any
                # other failure goes to the supervisor (logged, counted, restarted).
                self._merge_back(pending)
                if not isinstance(e, Unavailable):
                    raise
                await asyncio.sleep(BACKOFF_MAX_S / 5)
                self._wake.set()

    def _merge_back(self, old: _Pending) -> None:
        p = self._pending
        p.resync |= old.resync
        p.policies |= old.policies
        p.prices |= old.prices
        p.all_spend |= old.all_spend
        p.spend |= old.spend

    async def _publish(self, pending: _Pending) -> None:
        if pending.resync:
            # Every stream rereads everything, changes above included.
            self.cp.hub.request_resync()
            return
        if pending.policies:
            await self.cp.publish_policies(sorted(pending.policies))
        if pending.prices:
            await self.pricing.publish_overrides(sorted(pending.prices))
        if pending.all_spend or pending.spend:
            spend = await self.cp.run(lambda s: _spend(s, pending, self.cp))
            if spend:
                self.cp.hub.publish(dp.StateUpdate(spend=spend))


def _spend(s: Session, pending: _Pending, cp: ControlPlane) -> list[dp.WindowSpend]:
    if pending.all_spend:
        rows = list(repo.current_spend(s, active_at=int(cp.clock().timestamp())))
    else:
        rows = repo.spend_rows(s, sorted(pending.spend))
    held = repo.holds_by_window(
        s,
        None if pending.all_spend else [(r.policy_id, r.member, r.window_start) for r in rows],
        int(cp.clock().timestamp()),
    )
    ids = {r.policy_id for r in rows}
    limits = {
        pid: amount
        for pid, amount in s.execute(
            select(PolicyRow.id, PolicyRow.amount_nanos).where(PolicyRow.id.in_(ids))
        )
    }
    return [
        convert.window_spend_message(
            policy_id=r.policy_id,
            member=r.member,
            window_start=r.window_start,
            window_end=r.window_end,
            spent_nanos=r.spent_nanos,
            limit_nanos=limits[r.policy_id],
            request_count=r.request_count,
            holds=held.get((r.policy_id, r.member, r.window_start), ()),
            adjustment_seq=r.adjustment_count,
        )
        for r in rows
        if r.policy_id in limits
    ]
