"""The ExternalProcessor gRPC service: one bidirectional stream per HTTP request."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2_grpc

from ext_proc import metrics
from ext_proc.config import ConfigError, Settings
from ext_proc.metering.pricing import PriceOverride, PriceTable
from ext_proc.metrics import SyncStatus
from ext_proc.protocol import envoy_codec as codec
from ext_proc.protocol.context import Context
from ext_proc.protocol.handoff import KEY_ENV as HANDOFF_KEY_ENV
from ext_proc.protocol.handoff import Handoffs, metering_stream
from ext_proc.protocol.processor import RequestProcessor
from ext_proc.sync import snapshot
from ext_proc.sync.client import (
    FLUSH_TASK,
    RESERVE_TASK,
    SNAPSHOT_TASK,
    WATCH_TASK,
    ControlPlaneSync,
)
from ext_proc.sync.journal import Journal, JournalError
from ext_proc.sync.quarantine import Quarantine
from ext_proc.sync.state import LocalState
from spendgate.domain.pricing import PriceBook
from spendgate.health_board import HealthBoard
from spendgate.metrics import MetricsServer, start_metrics
from spendgate.supervise import Supervisor
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import price_from_message

log = structlog.get_logger("spendgate.ext_proc")
SYNC_HEALTH_SERVICE = "spendgate.ControlPlaneSync"
# NOT_SERVING while usage is piling up (a batch could not be delivered);
# SERVING once every batch is acknowledged.
USAGE_HEALTH_SERVICE = "spendgate.UsageDelivery"
# The health service each supervised task's failure turns NOT_SERVING until
# it recovers (the health publisher itself has none to report to).
HEALTH_PUBLISHER_TASK = "health"
HANDOFF_TASK = "expire-handoffs"
TASK_HEALTH = {
    FLUSH_TASK: USAGE_HEALTH_SERVICE,
    WATCH_TASK: SYNC_HEALTH_SERVICE,
    SNAPSHOT_TASK: SYNC_HEALTH_SERVICE,
    RESERVE_TASK: SYNC_HEALTH_SERVICE,
}


def utc_now() -> datetime:
    return datetime.now(UTC)


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, ctx: Context, first_snapshot: asyncio.Event, wait_s: float) -> None:
        self.ctx = ctx
        # Until policies are known (from the control plane or the saved
        # snapshot) a request waits up to wait_s for them, once.
        self.ready = False
        self.first_snapshot = first_snapshot
        self.wait_s = wait_s
        self.handoffs = Handoffs(ctx)

    async def _wait_for_policies(self) -> None:
        if not self.first_snapshot.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.first_snapshot.wait(), self.wait_s)
            if not self.first_snapshot.is_set():
                log.warning(
                    "no policy snapshot yet (control plane unreachable, none saved): "
                    "admitting without policies"
                )
        self.ready = True

    async def Process(
        self,
        request_iterator: AsyncIterator[codec.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[codec.ProcessingResponse]:
        if not self.ready:
            await self._wait_for_policies()
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            return
        if metering_stream(first):
            await self._meter(first, requests)
            return
        proc = RequestProcessor(self.ctx)
        self.ctx.stats.streams += 1
        self.ctx.stats.open_streams += 1
        req: codec.ProcessingRequest | None = first
        try:
            while req is not None:
                reply = proc.handle(req)
                if not isinstance(reply, codec.ProcessingResponse):
                    reply = await reply  # the control plane admits this one
                if proc.handoff_due():
                    reply = self.handoffs.park(proc, reply)
                if proc.last:
                    # End the call from this side as soon as Envoy needs nothing
                    # more. Envoy ends a finished stream with a reset, and
                    # grpc.aio leaks the ops of the batch that then fails (about
                    # 100 bytes a request, unbounded). Ending it first avoids
                    # that, and the last body message, which is only ever
                    # continued unchanged, needs no answer at all: a stream
                    # closed cleanly tells Envoy to go on without ext_proc.
                    if reply is not codec.RESPONSE_BODY_CONTINUE:
                        yield reply
                    return
                yield reply
                req = await anext(requests, None)
        finally:
            self.ctx.stats.open_streams -= 1
            proc.close()

    async def _meter(
        self, first: codec.ProcessingRequest, requests: AsyncIterator[codec.ProcessingRequest]
    ) -> None:
        """A metering stream (response_metering: observe): Envoy's observing
        filter sends the response and waits for nothing; nothing is answered.
        It ends when the response is charged, or when Envoy closes it (a
        response cut short, charged for what it cost)."""
        proc = self.handoffs.take(first)
        if proc is None:
            return  # nothing to meter: ending the stream tells Envoy so
        try:
            proc.observe(first)
            if proc.done:
                return
            async for req in requests:
                proc.observe(req)
                if proc.done:
                    return
        finally:
            proc.end()
            self.handoffs.ended(proc)

    async def expire_handoffs(self) -> None:
        """Release, every second, the holds of admitted requests whose
        metering stream did not come here (ext_proc/protocol/handoff.py)."""
        while True:
            self.handoffs.expire()
            await asyncio.sleep(1.0)


class ExtProcServer:
    """ext_proc process: the gRPC server, its state and its sync to the control plane."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utc_now,
        prices: PriceBook | None = None,
    ) -> None:
        self.settings = settings
        # Other data planes' holds expire by the same clock the requests see.
        self.state = LocalState(
            identity=settings.identity,
            max_batch_bytes=settings.usage_message_max_bytes // 2,
            clock=lambda: clock().timestamp(),
        )
        table = PriceTable(
            prices or PriceBook.bundled(),
            unpriced=settings.unpriced_models,
            default_input=Decimal(settings.default_input_price),
            default_output=Decimal(settings.default_output_price),
        )
        self.ctx = Context(settings=settings, state=self.state, prices=table, clock=clock)
        self.supervisor = Supervisor(log, on_change=self._on_task_change)
        self.sync = ControlPlaneSync(settings, self.state, clock, self.supervisor)
        if settings.reservations and settings.arbiter_headroom_requests:
            self.ctx.arbiter = self.sync.reserve
        self.health = health.aio.HealthServicer()
        # "" is always SERVING while ext_proc runs: serving requests never
        # depends on the control plane.
        self.board = HealthBoard(self.health, ("", SYNC_HEALTH_SERVICE, USAGE_HEALTH_SERVICE))
        self.board.report("disconnected", True, (SYNC_HEALTH_SERVICE,))
        options: list[tuple[str, int]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if settings.workers > 1:
            # A worker of a group (ext_proc/workers.py): every worker binds the same port.
            options.append(("grpc.so_reuseport", 1))
        self.server = grpc.aio.server(options=options)
        self.processor = ExternalProcessor(
            self.ctx, self.sync.connected, settings.startup_wait_ms / 1000
        )
        ep_grpc.add_ExternalProcessorServicer_to_server(self.processor, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(settings.listen)
        self.sync.on_connection_change = self._on_sync_change
        self.sync.on_price_overrides = self._on_price_overrides
        self.sync.on_backlog_change = self._on_backlog_change
        self.sync_status = SyncStatus(backlog=self.sync.backlog)
        self.metrics: MetricsServer | None = None
        if settings.metrics_listen:
            registry = metrics.registry_for(
                self.ctx.stats,
                self.state,
                self.sync_status,
                self.sync.stream_stats,
                self.supervisor,
            )
            self.metrics = MetricsServer(registry, settings.metrics_listen)
        journal_dir = settings.journal_path(self.port)
        if journal_dir:
            try:
                self.state.journal = Journal(journal_dir)
                self.state.quarantine = Quarantine(journal_dir)
                # Replay before the first flush: those batches keep their ids.
                self.state.restore(self.state.journal.open())
                self.sync.backlog = bool(self.state.in_flight)
            except (JournalError, OSError) as e:
                raise ConfigError(f"journal_dir {journal_dir!r}: {e}") from e
            self._restore_snapshot(journal_dir, clock())
        else:
            log.warning("usage journal disabled: a crash loses unsent usage")

    def _restore_snapshot(self, directory: str, now: datetime) -> None:
        """Start from the control plane's last word, saved on disk: enforced
        at once, and replaced by the first snapshot that arrives."""
        saved = snapshot.load(directory)
        if saved is None:
            return
        # Saved by this release (increments on an empty state) or an earlier
        # one (whole sets): apply_update reads both.
        self.state.apply_update(saved, now)
        self.state.snapshot_dirty = False
        if self.state.overrides.msgs:
            self._on_price_overrides(self.state.overrides.message())
        self.processor.ready = True
        log.info(
            "started from the saved policy snapshot; resyncing with the control plane",
            policies=len(self.state.index),
            windows=len(self.state.remote),
        )

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port (None when metrics_listen is "")."""
        return self.metrics.port if self.metrics is not None else None

    def _on_backlog_change(self, piling: bool) -> None:
        self.sync_status.set(backlog=piling)
        self.board.report("backlog", piling, (USAGE_HEALTH_SERVICE,))

    def _on_task_change(self, task: str, broken: bool) -> None:
        service = TASK_HEALTH.get(task)
        if service is not None:
            self.board.report(f"task {task} failed", broken, (service,))

    def _on_price_overrides(self, msg: dp.PriceOverrides) -> None:
        overrides = []
        for o in msg.overrides:
            try:
                price = price_from_message(o.model, o.provider, o.price)
            except ValueError as e:
                log.error("ignoring a price override", override_id=o.id, error=str(e))
                continue
            overrides.append(PriceOverride(o.model, price, o.provider.lower(), o.route))
        self.ctx.prices.set_overrides(overrides)
        log.info("price overrides applied", count=len(overrides))

    def _on_sync_change(self, up: bool) -> None:
        self.sync_status.set(connected=up)
        self.board.report("disconnected", not up, (SYNC_HEALTH_SERVICE,))

    async def start(self) -> None:
        handoff_key = os.environ.get(HANDOFF_KEY_ENV, "")
        siblings = not self.settings.meters_inline and self.settings.workers > 1
        if siblings and not handoff_key:
            raise ConfigError(
                f"{HANDOFF_KEY_ENV} is not set: a --worker is started by ext_proc --workers"
            )
        if self.metrics is not None:
            await start_metrics(self.metrics, self.settings.metrics_listen)
        await self.server.start()
        self.board.report("backlog", bool(self.state.in_flight), (USAGE_HEALTH_SERVICE,))
        await self.board.publish()
        self.supervisor.spawn(
            HEALTH_PUBLISHER_TASK, self.board.run, doing="publishing health statuses"
        )
        if not self.settings.meters_inline:
            if siblings:
                await self.processor.handoffs.listen(handoff_key.encode())
            self.supervisor.spawn(
                HANDOFF_TASK,
                self.processor.expire_handoffs,
                doing="releasing the holds of requests metered elsewhere",
            )
        self.sync.start()
        log.info(
            "ext_proc listening",
            address=self.settings.listen,
            port=self.port,
            data_plane_id=self.state.identity,
            control_plane=self.settings.control_plane,
            prices=len(self.ctx.prices),
            metrics_port=self.metrics_port,
        )

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        # Finish in-flight HTTP requests first so their usage is charged, then flush.
        await self.server.stop(grace)
        self.processor.handoffs.close()
        await self.sync.stop()
        await self.supervisor.stop()
        if self.state.journal is not None:
            self.state.journal.close()
        if self.metrics is not None:
            await self.metrics.stop()
        log.info("ext_proc stopped", **self.ctx.stats.as_dict())
