"""The only module that talks to the control plane.

Two loops: ``watch`` keeps a WatchState stream open (reconnecting with
backoff) and applies what arrives to the LocalState; ``flush`` sends unsent
usage every ``flush_interval_ms`` as ReportUsage batches. A batch keeps its id
until acknowledged, so a retry after a lost answer never counts twice. While
the control plane is unreachable, decisions continue from the last snapshot
plus local spend, and usage accumulates until it can be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import grpc
import structlog

from ext_proc import snapshot
from ext_proc.config import Settings
from ext_proc.decide import SpendKey
from ext_proc.state import LocalState
from spendgate import keepalive
from spendgate.supervise import Supervisor
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import dataplane_pb2_grpc
from spendgate.wire import timestamp

log = structlog.get_logger("spendgate.ext_proc")
REPORT_TIMEOUT_S = 5.0
# Holds are reported again at least this often (the control plane lets them
# lapse after hold_ttl_s, 30 s by default, unless refreshed).
HOLDS_REFRESH_S = 5.0
SNAPSHOT_INTERVAL_S = 1.0
# Names of the supervised tasks (spendgate/supervise.py): the `task` label of
# spendgate_task_failures_total and of the "task failed" error line.
WATCH_TASK = "watch-state"
FLUSH_TASK = "flush-usage"
SNAPSHOT_TASK = "save-snapshot"
RESERVE_TASK = "reserve"


class ControlPlaneSync:
    def __init__(
        self,
        settings: Settings,
        state: LocalState,
        clock: Callable[[], datetime],
        supervisor: Supervisor | None = None,
    ) -> None:
        self.settings = settings
        # Runs every task below: a failure is logged, counted and restarted.
        self.supervisor = supervisor or Supervisor(log)
        self.state = state
        self.clock = clock
        self.connected = asyncio.Event()
        self.on_connection_change: Callable[[bool], None] = lambda up: None
        # Called with each complete set of price overrides the control plane sends.
        self.on_price_overrides: Callable[[dp.PriceOverrides], None] = lambda o: None
        # Called with True when usage stops reaching the control plane (a
        # batch could not be delivered) and False once everything is delivered.
        self.on_backlog_change: Callable[[bool], None] = lambda piling: None
        self.backlog = False
        self._metadata = (("authorization", f"Bearer {settings.data_plane_token}"),)
        # Several comma-separated addresses: replicas of one control plane.
        # The state stream stays on one; when it breaks, the next is tried.
        self._addresses = [a.strip() for a in settings.control_plane.split(",") if a.strip()]
        self._index = 0
        self._channel = self._open_channel(self.address)
        self._stub = dataplane_pb2_grpc.DataPlaneServiceStub(self._channel)
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_lock = asyncio.Lock()
        self._holds_reported_at = 0.0
        self._reserve_queue: list[
            tuple[list[SpendKey], int, asyncio.Future[dp.ReserveVerdict | None]]
        ] = []
        self._reserve_task: asyncio.Task[None] | None = None
        self._watch_call: grpc.aio.UnaryStreamCall | None = None
        self.arbiter_failures = 0

    @property
    def address(self) -> str:
        """The control plane address in use."""
        return self._addresses[self._index]

    def _open_channel(self, address: str) -> grpc.aio.Channel:
        s = self.settings
        options = keepalive.client_options()  # what the control plane accepts
        if s.control_plane_tls:
            ca = Path(s.control_plane_ca_file).read_bytes() if s.control_plane_ca_file else None
            return grpc.aio.secure_channel(
                address, grpc.ssl_channel_credentials(ca), options=options
            )
        return grpc.aio.insecure_channel(address, options=options)

    async def _next_address(self) -> None:
        """Move to the next replica. A flush on the old channel fails and is
        retried on the new one with the same batch id."""
        if len(self._addresses) < 2:
            return
        old = self._channel
        self._index = (self._index + 1) % len(self._addresses)
        self._channel = self._open_channel(self.address)
        self._stub = dataplane_pb2_grpc.DataPlaneServiceStub(self._channel)
        log.info("trying another control plane replica", address=self.address)
        await old.close(grace=1.0)

    def start(self) -> None:
        interval = self.settings.flush_interval_ms / 1000
        spawn = self.supervisor.spawn
        self._tasks = [
            spawn(
                WATCH_TASK,
                self._supervised_watch,
                doing="receiving and applying the control plane's state stream",
            ),
            spawn(
                FLUSH_TASK,
                self._supervised_flush,
                doing="journaling usage, sending it to the control plane, reporting holds",
                # Recovered once a few flushes in a row have not failed.
                settle_s=1.0 + 3 * interval,
            ),
            spawn(
                SNAPSHOT_TASK,
                self._snapshot_loop,
                doing="saving the policy snapshot to disk",
                settle_s=1.0 + 2 * SNAPSHOT_INTERVAL_S,
            ),
        ]

    async def _supervised_watch(self) -> None:
        try:
            await self._watch()
        except Exception:
            # What arrives is not applied: this data plane is not in sync
            # until a restarted stream delivers a snapshot it can apply. The
            # broken stream is closed (the restart opens a new one).
            if self._watch_call is not None:
                self._watch_call.cancel()
            self._set_connected(False)
            raise

    async def _supervised_flush(self) -> None:
        try:
            await self._flush_loop()
        except Exception:
            self._set_backlog(True)  # usage is not flowing
            raise

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the loops, then send what is unsent (bounded by ``timeout``)."""
        if self._reserve_task is not None:
            self._tasks.append(self._reserve_task)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            pass
        except Exception:
            log.exception("the last flush failed")
        try:
            self.save_state()
        except Exception:
            log.exception("the last policy snapshot could not be saved")
        left = self.state.unsent_count()
        if left:
            journaled = self.state.journal is not None and not self.state.journal_failed
            log.error(
                "usage not delivered at shutdown"
                + ("; kept in the journal for the next start" if journaled else ""),
                windows=left,
            )
        await self._channel.close()

    def _set_connected(self, up: bool) -> None:
        if up != self.connected.is_set():
            if up:
                self.connected.set()
                log.info("connected to control plane", address=self.address)
            else:
                self.connected.clear()
                log.warning(
                    "control plane unreachable; enforcing from last snapshot",
                    address=self.address,
                )
            self.on_connection_change(up)

    async def _watch(self) -> None:
        backoff = 0.1
        while True:
            try:
                call = self._stub.WatchState(
                    dp.WatchStateRequest(data_plane_id=self.settings.identity),
                    metadata=self._metadata,
                )
                self._watch_call = call
                async for update in call:
                    self.state.apply_update(update, self.clock())
                    if update.HasField("price_overrides"):
                        self.on_price_overrides(update.price_overrides)
                    if update.full_snapshot:
                        self._set_connected(True)
                        backoff = 0.1
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("control plane refused our token", detail=e.details())
                else:
                    log.debug("state stream ended", code=e.code().name)
            self._set_connected(False)
            await self._next_address()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    async def _flush_loop(self) -> None:
        interval = self.settings.flush_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self.flush()

    async def _snapshot_loop(self) -> None:
        # A task of its own: a snapshot that cannot be saved never stops usage.
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            self.save_state()

    def save_state(self) -> None:
        """Keep the control plane's last word on disk (ext_proc/snapshot.py)."""
        state = self.state
        if state.journal is None or not state.synced or not state.snapshot_dirty:
            return
        try:
            snapshot.save(state.journal.directory, state.saved_state())
        except OSError as e:
            state.snapshot_dirty = True
            log.warning("could not save the policy snapshot", error=str(e))

    def _set_backlog(self, piling: bool) -> None:
        if piling != self.backlog:
            self.backlog = piling
            if piling:
                log.warning("usage is piling up: the control plane does not take it")
            else:
                log.info("all usage delivered to the control plane")
            self.on_backlog_change(piling)

    async def flush(self) -> None:
        """Send the pending usage and retry every unacknowledged batch, oldest first."""
        async with self._flush_lock:
            self.state.take_batch()
            sent = bool(self.state.in_flight)
            delivered = await self._send_in_flight()
            self._set_backlog(not delivered)
            if not sent and delivered:
                await self._report_holds()

    async def _report_holds(self) -> None:
        """Holds alone (no usage to carry them): when they changed, and often
        enough that the control plane does not let them lapse."""
        state = self.state
        if not state.hold_keys:
            return
        now = asyncio.get_running_loop().time()
        if not state.holds_dirty and now - self._holds_reported_at < HOLDS_REFRESH_S:
            return
        holds, unapplied = state.hold_report()
        msg = dp.ReportUsageRequest(
            data_plane_id=self.settings.identity,
            holds=holds,
            holds_seq=state.next_seq(),
            unapplied=unapplied,
        )
        try:
            resp = await self._stub.ReportUsage(
                msg, metadata=self._metadata, timeout=REPORT_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            state.holds_dirty = True
            log.debug("holds not reported; will retry", code=e.code().name)
            return
        self._holds_reported_at = now
        state.merge_spend(resp.spend)

    async def reserve(self, keys: list[SpendKey], amount_nanos: int) -> dp.ReserveVerdict | None:
        """Ask the control plane to admit a request near a budget's line
        (``keys``: its REJECT windows, already held locally). None when the
        control plane cannot answer in time: the caller decides locally.

        Requests that arrive while a call is out go together in the next one
        (one transaction for a whole burst, decided in arrival order), so a
        burst costs a few round trips, not one queued round trip per request.
        """
        if not self.connected.is_set():
            return None
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dp.ReserveVerdict | None] = loop.create_future()
        self._reserve_queue.append((keys, amount_nanos, answer))
        if self._reserve_task is None or self._reserve_task.done():
            self._reserve_task = self.supervisor.spawn(
                RESERVE_TASK,
                self._send_reserves,
                doing="asking the control plane to admit requests near a budget's line",
            )
        try:
            return await asyncio.wait_for(
                asyncio.shield(answer), self.settings.arbiter_timeout_ms / 1000
            )
        except TimeoutError:
            self._arbiter_failed("timeout")
            return None

    async def _send_reserves(self) -> None:
        state = self.state
        while self._reserve_queue:
            queued, self._reserve_queue = self._reserve_queue, []
            keys = list(dict.fromkeys(k for q in queued for k in q[0]))
            holds, unapplied = state.hold_report(keys)
            msg = dp.ReserveRequest(
                data_plane_id=self.settings.identity,
                holds=holds,
                holds_seq=state.next_seq(),
                unapplied=unapplied,
                items=[
                    dp.ReserveItem(
                        windows=[
                            dp.WindowHold(policy_id=k[0], member=k[1], window_start=timestamp(k[2]))
                            for k in item_keys
                        ],
                        amount_nanos=amount,
                    )
                    for item_keys, amount, _ in queued
                ],
            )
            verdicts: list[dp.ReserveVerdict | None] = [None] * len(queued)
            try:
                resp: dp.ReserveResponse = await self._stub.Reserve(
                    msg, metadata=self._metadata, timeout=self.settings.arbiter_timeout_ms / 1000
                )
            except grpc.aio.AioRpcError as e:
                self._arbiter_failed(e.code().name)
            else:
                state.merge_spend(resp.spend)
                verdicts = list(resp.verdicts)
            for (_, _, answer), verdict in zip(queued, verdicts, strict=True):
                if not answer.done():
                    answer.set_result(verdict)

    def _arbiter_failed(self, why: str) -> None:
        self.arbiter_failures += 1
        if self.arbiter_failures in (1, 10) or self.arbiter_failures % 1000 == 0:
            log.warning(
                "control plane did not arbitrate in time; decided on the local view",
                reason=why,
                failures=self.arbiter_failures,
            )

    async def _send_in_flight(self) -> bool:
        """False if a batch could not be delivered (the later ones are left unsent)."""
        for batch in list(self.state.in_flight.values()):
            batch.attempts += 1
            batch.sent = True
            msg = batch.message(self.settings.identity)
            if self.state.hold_keys:
                holds, unapplied = self.state.hold_report(skip=batch)
                msg.holds.extend(holds)
                msg.unapplied.extend(unapplied)
                msg.holds_seq = self.state.next_seq()
            try:
                resp = await self._stub.ReportUsage(
                    msg, metadata=self._metadata, timeout=REPORT_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                if batch.attempts in (1, 10) or batch.attempts % 100 == 0:
                    log.warning(
                        "usage batch not delivered; will retry",
                        batch_id=batch.batch_id,
                        attempts=batch.attempts,
                        code=e.code().name,
                        detail=e.details(),
                    )
                return False
            self.state.acknowledge(batch, resp)
            if msg.holds:
                self._holds_reported_at = asyncio.get_running_loop().time()
            if resp.unknown_policy_increments:
                log.info(
                    "control plane dropped usage of deleted policies",
                    count=resp.unknown_policy_increments,
                )
        return True
