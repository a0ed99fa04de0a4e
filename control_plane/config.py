"""Control plane settings (see spendgate.settings for sources and precedence)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    tls_cert_file: str = ""
    tls_key_file: str = ""
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
        if self.batch_retention_hours < 1:
            raise ConfigError("batch_retention_hours must be at least 1")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")

    @property
    def week_start_index(self) -> int:
        return WEEKDAYS.index(self.week_start.lower())


def load_settings(
    env: Mapping[str, str] | None = None, file: str | None = None, **overrides: Any
) -> Settings:
    return settings.load(Settings, section="control_plane", env=env, file=file, overrides=overrides)
