"""Builds and runs the control plane's grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control_plane import keyring
from control_plane.api.auth import ADMIN, DATA_PLANE, READ, AuthInterceptor, RequestIdInterceptor
from control_plane.api.budgets import BudgetServicer
from control_plane.api.dataplane import DataPlaneServicer
from control_plane.api.pricing import PricingServicer
from control_plane.api.reports import ReportServicer
from control_plane.api.secrets import SecretsServicer
from control_plane.api.webhooks import WebhookServicer
from control_plane.config import Settings
from control_plane.errors import Unavailable
from control_plane.hub import StateHub
from control_plane.metrics import ControlPlaneCollector, registry_for
from control_plane.pricing import PricingAdmin
from control_plane.replicas import LISTEN_TASK, PUBLISH_TASK, ReplicaSync
from control_plane.secrets_admin import SecretsAdmin, check_stored_secrets
from control_plane.service import Clock, ControlPlane, utc_now
from control_plane.store.db import create_db_engine, migrate
from control_plane.webhooks.dispatcher import DELIVERY_TASK, DISPATCHER_TASK, Dispatcher
from control_plane.webhooks.sender import Sender
from control_plane.webhooks.service import WebhookAdmin
from control_plane.webhooks.ssrf import Resolver, UrlPolicy, system_resolver
from spendgate import keepalive
from spendgate.health_board import HealthBoard
from spendgate.metrics import MetricsServer, start_metrics
from spendgate.supervise import Supervisor
from spendgate.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    dataplane_pb2,
    dataplane_pb2_grpc,
    pricing_pb2,
    pricing_pb2_grpc,
    reports_pb2,
    reports_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)

log = structlog.get_logger("spendgate.control_plane")
SERVICE_NAMES = (
    budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name,
    dataplane_pb2.DESCRIPTOR.services_by_name["DataPlaneService"].full_name,
    webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    pricing_pb2.DESCRIPTOR.services_by_name["PricingService"].full_name,
    secrets_pb2.DESCRIPTOR.services_by_name["SecretsService"].full_name,
    reports_pb2.DESCRIPTOR.services_by_name["ReportService"].full_name,
)
HEALTH_INTERVAL_S = 5.0
MAINTENANCE_INTERVAL_S = 3600.0
# "" and every API service follow the database. The background work has
# health services of its own: NOT_SERVING while its supervised task is
# broken (failed, not yet recovered), never taking the API out of rotation.
DATABASE_SERVICES = ("", *SERVICE_NAMES)
WEBHOOKS_HEALTH = "spendgate.Webhooks"
REPLICATION_HEALTH = "spendgate.Replication"
MAINTENANCE_HEALTH = "spendgate.Maintenance"
WATCH_DATABASE_TASK = "watch-database"
MAINTENANCE_TASK = "maintenance"
HEALTH_PUBLISHER_TASK = "health"
TASK_HEALTH: dict[str, tuple[str, ...]] = {
    WATCH_DATABASE_TASK: DATABASE_SERVICES,
    MAINTENANCE_TASK: (MAINTENANCE_HEALTH,),
    DISPATCHER_TASK: (WEBHOOKS_HEALTH,),
    DELIVERY_TASK: (WEBHOOKS_HEALTH,),
    LISTEN_TASK: (REPLICATION_HEALTH,),
    PUBLISH_TASK: (REPLICATION_HEALTH,),
}


class ControlPlaneServer:
    """The control plane process: database, services, health. ``start`` then ``stop``."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = utc_now,
        resolver: Resolver = system_resolver,
    ) -> None:
        """``resolver`` resolves webhook hosts (tests replace DNS with it)."""
        self.settings = settings
        # Read once here: a missing, short or malformed key stops start-up.
        self.keyring = keyring.load(settings.secrets_key_file, settings.secrets_key)
        url = settings.database_url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_db_engine(url)
        self.cp = ControlPlane(
            self.engine,
            StateHub(),
            clock=clock,
            default_week_start=settings.week_start_index,
            hold_ttl_s=settings.hold_ttl_s,
            forecast_horizon_s=settings.forecast_horizon_s,
        )
        self.pricing = PricingAdmin(self.cp)
        self.supervisor = Supervisor(log, on_change=self._on_task_change)
        # Several replicas may share PostgreSQL: tell each other of changes.
        self.replicas: ReplicaSync | None = None
        if self.engine.dialect.name == "postgresql":
            self.replicas = ReplicaSync(self.cp, self.pricing, self.supervisor)
            self.cp.on_change = self.replicas.notify
        self.auth = AuthInterceptor(
            {
                ADMIN: settings.admin_token,
                READ: settings.read_token,
                DATA_PLANE: settings.data_plane_token,
            }
        )
        self.health = health.aio.HealthServicer()
        self.board = HealthBoard(
            self.health,
            (
                *DATABASE_SERVICES,
                WEBHOOKS_HEALTH,
                MAINTENANCE_HEALTH,
                *((REPLICATION_HEALTH,) if self.replicas is not None else ()),
            ),
        )
        self.server = grpc.aio.server(
            interceptors=[RequestIdInterceptor(), self.auth],
            # Data planes ping their idle state streams: accept it (no GOAWAY).
            options=keepalive.server_options(),
        )
        budget_pb2_grpc.add_BudgetServiceServicer_to_server(
            BudgetServicer(self.cp, self.auth), self.server
        )
        dataplane_pb2_grpc.add_DataPlaneServiceServicer_to_server(
            DataPlaneServicer(self.cp, self.pricing), self.server
        )
        pricing_pb2_grpc.add_PricingServiceServicer_to_server(
            PricingServicer(self.pricing, self.auth), self.server
        )
        reports_pb2_grpc.add_ReportServiceServicer_to_server(ReportServicer(self.cp), self.server)
        url_policy = UrlPolicy.from_settings(settings)
        self.sender = Sender(
            url_policy,
            connect_timeout_s=settings.webhook_connect_timeout_s,
            read_timeout_s=settings.webhook_read_timeout_s,
            resolver=resolver,
        )
        webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(
            WebhookServicer(
                WebhookAdmin(self.cp, url_policy, self.sender, self.keyring), self.auth
            ),
            self.server,
        )
        secrets_pb2_grpc.add_SecretsServiceServicer_to_server(
            SecretsServicer(SecretsAdmin(self.cp, self.keyring)), self.server
        )
        self.dispatcher = Dispatcher(
            self.cp,
            self.sender,
            settings,
            clock=clock,
            keyring=self.keyring,
            supervisor=self.supervisor,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self._bind(settings)
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics: MetricsServer | None = None
        if settings.metrics_listen:
            collector = ControlPlaneCollector(
                self.cp.metrics,
                run=self.cp.run,
                clock=self.cp.clock,
                data_planes=lambda: self.cp.hub.subscriber_count,
                task_failures=lambda: self.supervisor.failures,
            )
            self.metrics = MetricsServer(
                registry_for(collector), settings.metrics_listen, before_scrape=collector.refresh
            )

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port (None when metrics_listen is "")."""
        return self.metrics.port if self.metrics is not None else None

    def _bind(self, settings: Settings) -> int:
        if settings.tls_cert_file:
            creds = grpc.ssl_server_credentials(
                [
                    (
                        Path(settings.tls_key_file).read_bytes(),
                        Path(settings.tls_cert_file).read_bytes(),
                    )
                ]
            )
            return self.server.add_secure_port(settings.listen, creds)
        return self.server.add_insecure_port(settings.listen)

    async def start(self) -> None:
        await asyncio.to_thread(migrate, self.engine, self.keyring)
        await check_stored_secrets(self.cp, self.keyring)
        if self.metrics is not None:
            await start_metrics(self.metrics, self.settings.metrics_listen)
        if self.replicas is not None:
            await self.replicas.start()
        await self.server.start()
        await self._set_health(True)
        await self.board.publish()
        spawn = self.supervisor.spawn
        self._tasks = [
            spawn(HEALTH_PUBLISHER_TASK, self.board.run, doing="publishing health statuses"),
            spawn(
                WATCH_DATABASE_TASK,
                self._supervised_watch_database,
                doing="checking that the database answers",
                settle_s=HEALTH_INTERVAL_S + 1.0,
            ),
            spawn(
                MAINTENANCE_TASK,
                self._maintenance,
                doing=(
                    "forgetting old usage batch ids, spend of old windows, expired holds, "
                    "old usage rollups and old webhook deliveries"
                ),
                settle_s=5.0,
            ),
            spawn(
                DISPATCHER_TASK,
                self.dispatcher.run,
                doing="claiming due webhook deliveries and starting their sends",
            ),
        ]
        log.info(
            "control plane listening",
            address=self.settings.listen,
            port=self.port,
            database=self.engine.url.render_as_string(hide_password=True),
            metrics_port=self.metrics_port,
            # Not secret; tells whether replicas encrypt with the same key.
            secrets_key_id=self.keyring.current_id if self.keyring is not None else None,
        )

    async def _set_health(self, serving: bool) -> None:
        self.board.report("database unreachable", not serving, DATABASE_SERVICES)

    def _on_task_change(self, task: str, broken: bool) -> None:
        self.board.report(f"task {task} failed", broken, TASK_HEALTH.get(task, ()))

    async def _supervised_watch_database(self) -> None:
        try:
            await self._watch_database()
        except Exception:
            # The restarted loop assumes the database answers and reports only
            # changes: align the board with that. Its broken task keeps health
            # NOT_SERVING until it has checked again.
            await self._set_health(True)
            raise

    async def _watch_database(self) -> None:
        """Health follows the database: NOT_SERVING while it is unreachable."""
        serving = True
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self.cp.ping()
                ok = True
            except Unavailable:
                ok = False
            if ok != serving:
                serving = ok
                await self._set_health(ok)
                log.warning("health changed", serving=ok)

    async def _maintenance(self) -> None:
        retention = timedelta(hours=self.settings.batch_retention_hours)
        spend_retention = timedelta(days=self.settings.spend_retention_days)
        while True:
            # A database outage is logged by the service; try next round.
            with contextlib.suppress(Unavailable):
                await self.cp.forget_old_batches(retention)
            with contextlib.suppress(Unavailable):
                await self.cp.forget_old_spend(spend_retention)
            with contextlib.suppress(Unavailable):
                await self.cp.forget_expired_holds()
            with contextlib.suppress(Unavailable):
                await self.cp.forget_old_rollups(
                    timedelta(days=self.settings.report_retention_days)
                )
            with contextlib.suppress(Unavailable):
                await self.cp.forget_old_deliveries(
                    timedelta(hours=self.settings.webhook_retention_hours)
                )
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)

    async def stop(self, grace: float = 5.0) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
        await self.dispatcher.stop(grace)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.replicas is not None:
            await self.replicas.stop()
        await self.supervisor.stop()
        await self.sender.aclose()
        self.cp.close()
        log.info("control plane stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()
