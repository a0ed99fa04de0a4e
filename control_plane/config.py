"""Control plane settings (see spendgate.settings for sources and precedence)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from control_plane import keyring
from spendgate import settings
from spendgate.settings import ConfigError

# About a hundred years: past any window a policy can have, within datetime's range.
MAX_SPEND_RETENTION_DAYS = 36_500
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
__all__ = ["ConfigError", "Settings", "load_settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    # gRPC address: admin API, DataPlaneService, health, reflection.
    listen: str = "127.0.0.1:50051"
    # The database: SQLite, or `postgresql://user@host/db` (needed for more than one replica).
    database_url: str = "sqlite:///.spendgate/spendgate.db"
    # Bearer token allowed every method. Required; `spendgate up` generates it.
    admin_token: str = ""
    # Bearer token allowed `Get*` / `List*` / `Query*` only (`spendgate status`, `spend`, `report`,
    # dashboards).
    read_token: str = ""
    # Bearer token ext_proc presents (DataPlaneService only).
    data_plane_token: str = ""
    # First day of WEEKS windows when a policy does not say.
    week_start: str = "monday"
    # How long applied usage batch ids are kept to recognise retries.
    batch_retention_hours: int = 168
    # Spend rows of windows that ended longer ago than this are deleted (by the hourly
    # maintenance, in bounded chunks; 1 to 36500): the database stops growing by members x
    # windows. The current windows of every policy are never touched.
    spend_retention_days: int = 400
    # Chargeback rollups (ReportService) of hours older than this are deleted (1 to 36500).
    report_retention_days: int = 400
    # A data plane's holds (reservations) lapse this long after its last report, so a dead data
    # plane's are released (15 to 3600; live data planes refresh theirs every 5 s).
    hold_ttl_s: int = 30
    # Exhaustion forecasts (docs/forecasts.md): the time constant of the
    # decayed spend rate, in seconds (at most a quarter of a window's length
    # is used). 60 to 604800.
    forecast_horizon_s: float = 3600.0
    # PEM certificate: serve TLS (with `tls_key_file`).
    tls_cert_file: str = ""
    # PEM private key of `tls_cert_file`.
    tls_key_file: str = ""
    # File of keys that encrypt stored webhook URLs, secrets and routing keys: base64 of 32
    # bytes, one per line, the first encrypts, all decrypt (see docs/operations/secrets.md).
    # Empty: `spendgate up` makes `.spendgate/secrets.key`.
    secrets_key_file: str = ""
    # The same keys given directly, comma-separated (not together with `secrets_key_file`).
    secrets_key: str = field(default="", repr=False)
    # ---- webhooks (see control_plane/webhooks/) ----
    # Connect timeout of one delivery attempt.
    webhook_connect_timeout_s: float = 5.0
    # Read (and write) timeout of one delivery attempt.
    webhook_read_timeout_s: float = 10.0
    # Retry n waits `min(base·2^(n-1), max)` less a random part; a longer `Retry-After` wins.
    webhook_backoff_base_s: float = 10.0
    # The longest wait between attempts.
    webhook_backoff_max_s: float = 3600.0
    # The random part: up to this fraction of the wait (0 to 1).
    webhook_backoff_jitter: float = 0.5
    # After this many attempts the delivery is `failed` (still listed, logged).
    webhook_max_attempts: int = 15
    # A delivery not done this long after its event is `failed`.
    webhook_max_age_hours: float = 48.0
    # How often due deliveries are looked for (new ones wake the dispatcher at once).
    webhook_poll_interval_s: float = 1.0
    # Deliveries sent at the same time by one control plane.
    webhook_max_in_flight: int = 32
    # Finished deliveries, their attempts and old events are kept this long.
    webhook_retention_hours: int = 720
    # SSRF guard: allow plain `http://` webhook URLs.
    webhook_allow_http: bool = False
    # Host names or IPs (comma-separated) whose addresses are not checked.
    webhook_allow_hosts: str = ""
    # CIDRs (comma-separated) webhooks may call besides public addresses.
    webhook_allow_private_ranges: str = ""
    # HTTP address serving Prometheus `GET /metrics`; `""` disables it.
    metrics_listen: str = "127.0.0.1:9464"
    # JSON lines on stderr (production); `false`: console lines (`spendgate up` sets
    # `SPENDGATE_LOG_JSON=false`).
    log_json: bool = True
    # `debug`, `info`, `warning` or `error`.
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.admin_token:
            raise ConfigError("admin_token is required (SPENDGATE_ADMIN_TOKEN)")
        tokens = [t for t in (self.admin_token, self.read_token, self.data_plane_token) if t]
        if len(set(tokens)) != len(tokens):
            raise ConfigError("admin_token, read_token and data_plane_token must differ")
        if any(len(t) < 16 for t in tokens):
            raise ConfigError("admin_token, read_token, data_plane_token: at least 16 characters")
        if self.week_start.lower() not in WEEKDAYS:
            raise ConfigError(f"week_start must be one of {', '.join(WEEKDAYS)}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file must be set together")
        if self.secrets_key_file and self.secrets_key:
            raise ConfigError("set secrets_key_file or secrets_key, not both")
        if self.secrets_key:
            keyring.parse_keys(self.secrets_key.split(","), "secrets_key", file=False)
        if self.batch_retention_hours < 1:
            raise ConfigError("batch_retention_hours must be at least 1")
        if not 1 <= self.spend_retention_days <= MAX_SPEND_RETENTION_DAYS:
            raise ConfigError(
                f"spend_retention_days must be between 1 and {MAX_SPEND_RETENTION_DAYS}"
            )
        if not 1 <= self.report_retention_days <= 36_500:
            raise ConfigError("report_retention_days must be between 1 and 36500")
        if not 15 <= self.hold_ttl_s <= 3600:
            raise ConfigError(
                "hold_ttl_s must be between 15 and 3600 (data planes refresh holds every 5 s)"
            )
        if not 60 <= self.forecast_horizon_s <= 7 * 86400:
            raise ConfigError("forecast_horizon_s must be between 60 and 604800 (7 days)")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")
        settings.check_listen("metrics_listen", self.metrics_listen, allow_empty=True)
        self._check_webhooks()

    def _check_webhooks(self) -> None:
        for name in (
            "webhook_connect_timeout_s",
            "webhook_read_timeout_s",
            "webhook_backoff_base_s",
            "webhook_backoff_max_s",
            "webhook_max_age_hours",
            "webhook_poll_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be greater than 0")
        if self.webhook_backoff_max_s < self.webhook_backoff_base_s:
            raise ConfigError("webhook_backoff_max_s must be at least webhook_backoff_base_s")
        if not 0 <= self.webhook_backoff_jitter <= 1:
            raise ConfigError("webhook_backoff_jitter must be between 0 and 1")
        for name in ("webhook_max_attempts", "webhook_max_in_flight", "webhook_retention_hours"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for cidr in _items(self.webhook_allow_private_ranges):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(
                    f"webhook_allow_private_ranges: {cidr!r} is not a CIDR like 10.0.0.0/8"
                ) from None

    @property
    def webhook_allowed_hosts(self) -> frozenset[str]:
        return frozenset(h.lower().strip("[]") for h in _items(self.webhook_allow_hosts))

    @property
    def webhook_allowed_networks(
        self,
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(
            ipaddress.ip_network(c, strict=False) for c in _items(self.webhook_allow_private_ranges)
        )

    @property
    def week_start_index(self) -> int:
        return WEEKDAYS.index(self.week_start.lower())


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def load_settings(
    env: Mapping[str, str] | None = None, file: str | None = None, **overrides: Any
) -> Settings:
    return settings.load(Settings, section="control_plane", env=env, file=file, overrides=overrides)
