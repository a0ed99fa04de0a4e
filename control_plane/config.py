"""Control plane settings (see spendgate.settings for sources and precedence)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from control_plane import keyring
from spendgate import settings
from spendgate.settings import ConfigError

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
__all__ = ["ConfigError", "Settings", "load_settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    database_url: str = "sqlite:///.spendgate/spendgate.db"
    admin_token: str = ""
    read_token: str = ""
    data_plane_token: str = ""
    # First day of WEEKS windows when a policy does not say.
    week_start: str = "monday"
    # How long applied usage batch ids are kept to recognise retries.
    batch_retention_hours: int = 168
    # A data plane's holds (reservations) on windows lapse this long after its
    # last report: what a data plane that died held is released then.
    hold_ttl_s: int = 30
    # Exhaustion forecasts (docs/forecasts.md): the time constant of the
    # decayed spend rate, in seconds (at most a quarter of a window's length
    # is used). 60 to 604800.
    forecast_horizon_s: float = 3600.0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Keys that encrypt stored secrets (control_plane/keyring.py): a file with
    # one base64 key per line, or the keys themselves (comma-separated); the
    # first is current. Read at start; a bad key stops start-up.
    secrets_key_file: str = ""
    secrets_key: str = field(default="", repr=False)
    # ---- webhooks (see control_plane/webhooks/) ----
    # Timeouts of one delivery attempt, in seconds.
    webhook_connect_timeout_s: float = 5.0
    webhook_read_timeout_s: float = 10.0
    # Retry n waits min(base * 2**(n-1), max) seconds, times a random factor
    # in [1 - jitter, 1 + jitter]; a longer Retry-After from the receiver wins.
    webhook_backoff_base_s: float = 10.0
    webhook_backoff_max_s: float = 3600.0
    webhook_backoff_jitter: float = 0.5
    # A delivery is given up (state failed) after this many attempts, or when
    # its next attempt would come later than this long after the event.
    webhook_max_attempts: int = 15
    webhook_max_age_hours: float = 48.0
    # How often the dispatcher looks for due deliveries (it is also woken at
    # once when this control plane records new ones).
    webhook_poll_interval_s: float = 1.0
    # Deliveries sent at the same time by one control plane.
    webhook_max_in_flight: int = 32
    # Finished deliveries, their attempts and old events are kept this long.
    webhook_retention_hours: int = 720
    # SSRF guard: webhook URLs must be https and resolve to public addresses
    # unless these allow more. Hosts: comma-separated names or IP literals
    # whose addresses are not checked; ranges: comma-separated CIDRs.
    webhook_allow_http: bool = False
    webhook_allow_hosts: str = ""
    webhook_allow_private_ranges: str = ""
    # "host:port" of the HTTP server for Prometheus (GET /metrics); "" = none.
    metrics_listen: str = "127.0.0.1:9464"
    log_json: bool = True
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
