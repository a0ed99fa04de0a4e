"""The only module that talks to the control plane.

Two loops: ``watch`` keeps a WatchState stream open (reconnecting with
backoff) and applies what arrives to the LocalState (a paged resync, then
numbered changes: ext_proc/sync/statestream.py; a failure is a warning at once
and a new stream); ``flush`` sends unsent
usage every ``flush_interval_ms`` as ReportUsage batches. A batch keeps its id
until acknowledged, so a retry after a lost answer never counts twice. While
the control plane is unreachable, decisions continue from the last snapshot
plus local spend, and usage accumulates until it can be sent. A third, ``save-snapshot``,
keeps the control plane's last word on disk and forgets the windows that
have ended (in slices, between which the event loop serves requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import grpc
import structlog

from ext_proc.admission.decide import SpendKey
from ext_proc.config import Settings
from ext_proc.sync import snapshot
from ext_proc.sync.batch import Batch
from ext_proc.sync.state import LocalState
from ext_proc.sync.statestream import Received, StateStream, StreamBroken, StreamStats
from spendgate import keepalive
from spendgate.domain.pricing import MAX_COST_NANOS
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
SNAPSHOT_SHARE = 0.05
BACKOFF_MAX_S = 5.0
# A stream in sync this long before it failed starts the backoff over.
STABLE_S = 30.0
# After this many failures in a row of streams that had begun (a resync read
# for nothing each time), the wait between tries grows up to a minute.
COSTLY_FAILURES = 3
BACKOFF_MAX_COSTLY_S = 60.0
# A state stream that keeps failing is warned about again this often.
WATCH_WARN_EVERY_S = 60.0

# A batch whose sending raised (not a gRPC error) this many times is set aside.
POISON_ATTEMPTS = 3


def permanent(e: grpc.aio.AioRpcError) -> bool:
    """Errors no retry can fix: the control plane refused the values, or the
    message is larger than one side allows. Anything else (unreachable,
    deadline, database down, auth) is retried with the same batch id."""
    code = e.code()
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in (e.details() or "")


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
        self._save_every = SNAPSHOT_INTERVAL_S
        self._reserve_queue: list[
            tuple[list[tuple[SpendKey, int]], asyncio.Future[dp.ReserveVerdict | None]]
        ] = []
        self._reserve_task: asyncio.Task[None] | None = None
        self._watch_call: grpc.aio.UnaryStreamCall | None = None
        self.arbiter_failures = 0
        self.stream_stats = StreamStats()
        self._watch_failing = 0  # failures since the state stream was last in sync
        self._watch_warned_at = 0.0

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
                doing="forgetting ended windows and saving the policy snapshot to disk",
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
            await self.save_state()
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
        loop = asyncio.get_running_loop()
        backoff = 0.1
        costly = 0  # failures in a row after the control plane began to send
        while True:
            stream = StateStream(self.state, self.clock)
            synced_at: float | None = None
            call = self._stub.WatchState(
                dp.WatchStateRequest(data_plane_id=self.settings.identity, incremental=True),
                metadata=self._metadata,
            )
            try:
                self._watch_call = call
                async for update in call:
                    prices = self.state.overrides.version
                    if stream.receive(update) is Received.SYNCED:
                        self._synced(stream)
                        synced_at = loop.time()
                    if self.state.overrides.version != prices:
                        self.on_price_overrides(self.state.overrides.message())
                self._watch_failed("stream", "the control plane ended the state stream")
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("control plane refused our token", detail=e.details())
                self._watch_failed("stream", f"{e.code().name}: {e.details()}")
            except StreamBroken as e:
                call.cancel()
                self._watch_failed(e.reason, str(e))
            self._set_connected(False)
            if synced_at is not None and loop.time() - synced_at >= STABLE_S:
                backoff, costly = 0.1, 0  # it had been working: start over
            # A stream that failed after the control plane began sending made
            # it read state for us (a resync reads everything): when that keeps
            # happening, retry less often, so one broken data plane cannot keep
            # a control plane busy. Failing to connect costs it nothing.
            costly = costly + 1 if stream.received else 0
            await self._next_address()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            cap = BACKOFF_MAX_S if costly < COSTLY_FAILURES else BACKOFF_MAX_COSTLY_S
            backoff = min(backoff * 2, cap)

    def _synced(self, stream: StateStream) -> None:
        self.stream_stats.resyncs += 1
        if self._watch_failing:
            log.info(
                "state stream in sync again", address=self.address, failures=self._watch_failing
            )
            self._watch_failing = 0
        log.info(
            "state resynced from the control plane",
            address=self.address,
            pages=stream.pages,
            policies=len(self.state.index),
            windows=len(self.state.remote),
        )
        self._set_connected(True)

    def _watch_failed(self, reason: str, detail: str) -> None:
        """A state stream that fails or cannot be applied is a warning at once
        (enforcement goes on from a view that is no longer kept up to date),
        then again at most every WATCH_WARN_EVERY_S while it keeps failing."""
        self.stream_stats.failed(reason)
        self._watch_failing += 1
        now = asyncio.get_running_loop().time()
        if self._watch_failing == 1 or now - self._watch_warned_at >= WATCH_WARN_EVERY_S:
            self._watch_warned_at = now
            log.warning(
                "state stream from the control plane failed; enforcing from the last view and"
                " resyncing",
                address=self.address,
                reason=reason,
                detail=detail,
                failures=self._watch_failing,
            )
        else:
            log.debug("state stream failed again", reason=reason, detail=detail)

    async def _flush_loop(self) -> None:
        interval = self.settings.flush_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self.flush()

    async def _snapshot_loop(self) -> None:
        # A task of its own: a snapshot that cannot be saved never stops usage.
        # Every second it forgets the windows that have ended; it saves every
        # _save_every, after the prune (the snapshot then leaves them out).
        loop = asyncio.get_running_loop()
        saved_at = loop.time()
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            await self.prune()
            if loop.time() - saved_at >= self._save_every:
                await self.save_state()
                saved_at = loop.time()

    async def prune(self) -> None:
        """Forget the windows that have ended (LocalState.prune): a slice
        at a time, letting the event loop run between slices, so a boundary
        where a million windows end together never stalls requests for long."""
        state = self.state
        state.prune(self.clock())
        while state.pruning:
            await asyncio.sleep(0)
            state.prune_more()

    async def save_state(self) -> None:
        """Keep the control plane's last word on disk (ext_proc/sync/snapshot.py):
        a copy taken here, built and written in a thread (the loop keeps serving)."""
        state = self.state
        if state.journal is None or not state.synced or not state.snapshot_dirty:
            return
        started = time.perf_counter()
        try:
            parts = state.snapshot_parts()
            await asyncio.to_thread(snapshot.write, state.journal.directory, parts)
        except asyncio.CancelledError:
            # The thread goes on and may still fail: save again at the next chance.
            state.snapshot_dirty = True
            raise
        except OSError as e:
            state.snapshot_dirty = True
            log.warning("could not save the policy snapshot", error=str(e))
        # A large state (many policies, members) takes a while to write, and the
        # thread building it holds the GIL for much of that time: keep saving
        # from costing more than about SNAPSHOT_SHARE of the process.
        took = time.perf_counter() - started
        self._save_every = max(SNAPSHOT_INTERVAL_S, took / SNAPSHOT_SHARE)

    def _set_backlog(self, piling: bool) -> None:
        if piling != self.backlog:
            self.backlog = piling
            if piling:
                log.warning("usage is piling up: the control plane does not take it")
            else:
                log.info("all usage delivered to the control plane")
            self.on_backlog_change(piling)

    async def flush(self) -> None:
        """Send the pending usage and retry every unacknowledged batch, oldest first.

        Usage is journaled (take_batch) before anything is encoded for the
        wire, and nothing one batch holds can stop the loop: a bug in here is
        logged, the batch stays journaled, and the next flush tries again.
        """
        async with self._flush_lock:
            try:
                self.state.take_batch()
            except Exception:
                log.exception("could not move usage into a batch; it stays pending")
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
        known = set(state.in_flight)
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
        state.take_totals(resp.spend, resp.applied_batch_ids, known)

    async def reserve(self, holds: list[tuple[SpendKey, int]]) -> dp.ReserveVerdict | None:
        """Ask the control plane to admit a request near a budget's line
        (``holds``: its REJECT windows and what it holds on each, already
        held locally). None when the control plane cannot answer in time:
        the caller decides locally.

        Requests that arrive while a call is out go together in the next one
        (one transaction for a whole burst, decided in arrival order), so a
        burst costs a few round trips, not one queued round trip per request.
        """
        if not self.connected.is_set():
            return None
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dp.ReserveVerdict | None] = loop.create_future()
        self._reserve_queue.append((holds, answer))
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
            keys = list(dict.fromkeys(k for q in queued for k, _ in q[0]))
            holds, unapplied = state.hold_report(keys)
            known = set(state.in_flight)
            msg = dp.ReserveRequest(
                data_plane_id=self.settings.identity,
                holds=holds,
                holds_seq=state.next_seq(),
                unapplied=unapplied,
                items=[
                    dp.ReserveItem(
                        windows=[
                            dp.WindowHold(
                                policy_id=k[0],
                                member=k[1],
                                window_start=timestamp(k[2]),
                                held_nanos=min(held, MAX_COST_NANOS),
                            )
                            for k, held in item_holds
                        ],
                        # For a control plane that reads no per-window amount.
                        amount_nanos=min(
                            max((held for _, held in item_holds), default=0), MAX_COST_NANOS
                        ),
                    )
                    for item_holds, _ in queued
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
                state.take_totals(resp.spend, resp.applied_batch_ids, known)
                verdicts = list(resp.verdicts)
            for (_, answer), verdict in zip(queued, verdicts, strict=True):
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
        """False if a batch could not be delivered for now (the later ones are
        left unsent, in order). A batch the control plane can never take does
        not block the others: it is split, or its one record quarantined."""
        tried: set[str] = set()
        while True:
            batch = next(
                (b for b in self.state.in_flight.values() if b.batch_id not in tried), None
            )
            if batch is None:
                return True
            tried.add(batch.batch_id)
            try:
                if not await self._send_batch(batch):
                    return False
            except Exception as e:
                # A bug must not kill the flush loop: the batch stays
                # journaled; one that fails like this every time is poison.
                log.exception("usage batch could not be sent", batch_id=batch.batch_id)
                if batch.attempts >= POISON_ATTEMPTS:
                    self._set_aside(batch, "unencodable", f"{type(e).__name__}: {e}")
                    continue
                return False

    async def _send_batch(self, batch: Batch) -> bool:
        """True once ``batch`` is acknowledged, split or quarantined; False
        when it must be retried later (the control plane is unreachable)."""
        batch.attempts += 1
        batch.sent = True
        limit = self.settings.usage_message_max_bytes
        msg = batch.message(self.settings.identity)
        if msg.ByteSize() > limit:
            self._set_aside(batch, "too_large", f"{msg.ByteSize()} bytes, over {limit}")
            return True
        if not batch.without_holds:
            # Even with no holds: it orders the batch among our hold reports
            # (DataPlaneService.ReportUsage, holds_seq).
            msg.holds_seq = self.state.next_seq()
        if self.state.hold_keys and not batch.without_holds:
            holds, unapplied = self.state.hold_report(skip=batch)
            msg.holds.extend(holds)
            msg.unapplied.extend(unapplied)
            if msg.ByteSize() > limit:  # this time without them
                self.state.holds_dirty = True
                del msg.holds[:]
                del msg.unapplied[:]
        try:
            resp = await self._stub.ReportUsage(
                msg, metadata=self._metadata, timeout=REPORT_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            if permanent(e):
                if msg.holds or msg.unapplied:
                    # The holds may be what was refused: try again without.
                    log.error(
                        "control plane refused a usage batch with holds; sending it without",
                        batch_id=batch.batch_id,
                        code=e.code().name,
                        detail=e.details(),
                    )
                    batch.without_holds = True
                    return await self._send_batch(batch)
                self._set_aside(batch, "refused", f"{e.code().name}: {e.details()}")
                return True
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
        if resp.refused_rollups:
            log.error(
                "control plane refused chargeback rollups it cannot store",
                count=resp.refused_rollups,
                batch_id=batch.batch_id,
            )
        if resp.quarantined_increments:
            log.error(
                "control plane quarantined usage records it cannot apply",
                count=resp.quarantined_increments,
                batch_id=batch.batch_id,
            )
        return True

    def _set_aside(self, batch: Batch, reason: str, detail: str) -> None:
        """A batch the control plane will never take: split in pieces that
        fit (too large) or in halves (refused), until one record is left,
        which is quarantined."""
        if batch.records > 1:
            pieces = self.state.split(batch, "s" if reason == "too_large" else "h")
            log.warning(
                "usage batch split",
                batch_id=batch.batch_id,
                reason=reason,
                detail=detail,
                pieces=[p.batch_id for p in pieces],
            )
            return
        self.state.quarantine_batch(batch, reason, detail)
