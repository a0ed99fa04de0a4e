"""ext_proc settings (see spendgate.settings for sources and precedence)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ext_proc.admission import identity
from spendgate import settings
from spendgate.domain.pricing import NANOS_PER_USD
from spendgate.settings import ConfigError

__all__ = ["ConfigError", "Settings", "load_settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:50052"
    # The control plane's DataPlaneService address; several replicas as
    # "host1:port,host2:port" (the next is tried when one goes away).
    control_plane: str = "127.0.0.1:50051"
    data_plane_token: str = ""
    control_plane_tls: bool = False
    control_plane_ca_file: str = ""
    # Identifies this data plane in the control plane's records.
    data_plane_id: str = ""
    # Who is the caller (ext_proc/admission/identity.py, README "Who is the caller?").
    # Identity headers (removed before the provider, always) count only from
    # trusted_header_sources: comma-separated CIDRs matched against the
    # direct peer's address and/or mTLS peer principals (spiffe://...).
    # "" (the default) = identity headers are ignored from everyone.
    trusted_header_sources: str = ""
    user_header: str = "x-spendgate-user"
    workspace_header: str = "x-spendgate-workspace"
    tags_header: str = "x-spendgate-tags"
    service_header: str = "x-spendgate-service"
    # JWT claims verified by Envoy's jwt_authn (payload_in_metadata), found
    # in dynamic metadata namespace / key; "" claim = that field not from JWTs.
    jwt_metadata_namespace: str = "envoy.filters.http.jwt_authn"
    jwt_payload_key: str = "jwt_payload"
    user_claim: str = ""
    workspace_claim: str = ""
    service_claim: str = ""
    # Claims that become tags: "team,env" or "team=org_team" (tag key=claim).
    tags_claims: str = ""
    # The mTLS peer's SPIFFE id (connection.uri_san_peer_certificate) names
    # the SERVICE when nothing above does.
    service_from_peer: bool = True
    # A request naming no member for a REJECT "*" policy of scope USER,
    # WORKSPACE, SERVICE or TAG: reject (403) | anonymous (charged to the
    # member "anonymous").
    missing_identity: str = "reject"
    # How often unsent usage is sent to the control plane.
    flush_interval_ms: int = 100
    # What to charge for a model with no price: default | free | reject
    # (see ext_proc/metering/pricing.py).
    unpriced_models: str = "default"
    # A request on a provider route of no metered API shape (images, audio,
    # batches, ...): count (admission-checked like any request, counted in a
    # metric and logged once per path) | reject (403 in the provider's error
    # shape, naming the path).
    unmetered_requests: str = "count"
    # Reservations: an admitted request holds its estimated cost (input from
    # the request size; output the reservation_percentile of what the model
    # produced on the route recently, reservation_output_tokens until a few
    # answers were seen, never above the request's max_tokens) against its
    # REJECT windows until it ends, bounding concurrent overshoot
    # (ext_proc/admission/estimate.py).
    reservations: bool = True
    reservation_output_tokens: int = 4096
    reservation_percentile: int = 95
    # Across data planes: a request whose REJECT window has room for fewer
    # than this many more requests of its estimated size is admitted by the
    # control plane (one round trip, against every data plane's holds)
    # instead of locally. 0 keeps every decision local.
    arbiter_headroom_requests: int = 100
    # How long a request waits for that answer; without one in time it is
    # decided again on the local view (and counted).
    arbiter_timeout_ms: int = 500
    # USD per million tokens, for unpriced_models = default (or reject, when
    # the model only appears in the response).
    default_input_price: str = "15"
    default_output_price: str = "75"
    # Write-ahead journal of unsent usage (ext_proc/sync/journal.py): a crash or
    # kill -9 loses at most flush_interval_ms of usage, and usage the control
    # plane could not take is re-sent on the next start. "{port}" becomes the
    # listen port; relative paths are relative to the working directory.
    # "" disables the journal (unsent usage then lives only in memory).
    journal_dir: str = ".spendgate/ext_proc-{port}"
    # A request arriving before the first policy snapshot waits this long for
    # it (below Envoy's 1 s message_timeout). With a saved snapshot in
    # journal_dir (ext_proc/sync/snapshot.py) nothing waits: it is enforced at once.
    startup_wait_ms: int = 500
    # A response costing more than this (USD) is charged and reported as a
    # usage.anomaly event: no real answer costs that much.
    max_cost_per_response_usd: str = "1000"
    # Largest usage message sent to the control plane (gRPC's default limit
    # is 4 MiB); batches are split to fit, and a record larger alone is
    # quarantined (ext_proc/sync/quarantine.py).
    usage_message_max_bytes: int = 1024 * 1024
    # "host:port" of the HTTP server for Prometheus (GET /metrics); "" = none.
    metrics_listen: str = "127.0.0.1:9465"
    log_json: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.data_plane_token:
            raise ConfigError("data_plane_token is required (SPENDGATE_DATA_PLANE_TOKEN)")
        if not [a for a in self.control_plane.split(",") if a.strip()]:
            raise ConfigError("control_plane needs at least one host:port")
        if not 10 <= self.flush_interval_ms <= 60_000:
            raise ConfigError("flush_interval_ms must be between 10 and 60000")
        for name in ("user_header", "workspace_header", "tags_header", "service_header"):
            if getattr(self, name) != getattr(self, name).lower():
                raise ConfigError(f"{name} must be lower-case (Envoy lower-cases headers)")
        if self.missing_identity not in ("reject", "anonymous"):
            raise ConfigError("missing_identity must be reject or anonymous")
        try:
            identity.check_settings(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0 <= self.startup_wait_ms <= 900:
            raise ConfigError(
                "startup_wait_ms must be between 0 and 900 (below Envoy's message_timeout)"
            )
        if self.reservation_output_tokens < 0:
            raise ConfigError("reservation_output_tokens must be >= 0")
        if not 50 <= self.reservation_percentile <= 100:
            raise ConfigError("reservation_percentile must be between 50 and 100")
        if self.arbiter_headroom_requests < 0:
            raise ConfigError("arbiter_headroom_requests must be >= 0")
        if not 10 <= self.arbiter_timeout_ms <= 900:
            raise ConfigError(
                "arbiter_timeout_ms must be between 10 and 900 (below Envoy's message_timeout)"
            )
        if self.unpriced_models not in ("default", "free", "reject"):
            raise ConfigError("unpriced_models must be default, free or reject")
        if self.unmetered_requests not in ("count", "reject"):
            raise ConfigError(
                f"unmetered_requests must be count or reject, not {self.unmetered_requests!r}"
            )
        for name in ("default_input_price", "default_output_price"):
            try:
                if Decimal(getattr(self, name)) < 0:
                    raise ValueError
            except (InvalidOperation, ValueError):
                raise ConfigError(
                    f"{name} must be a non-negative decimal (USD per million "
                    f"tokens), not {getattr(self, name)!r}"
                ) from None
        try:
            max_cost = Decimal(self.max_cost_per_response_usd)
            if not max_cost.is_finite() or max_cost <= 0:
                raise ValueError
        except (InvalidOperation, ValueError):
            raise ConfigError(
                "max_cost_per_response_usd must be a positive decimal (USD), "
                f"not {self.max_cost_per_response_usd!r}"
            ) from None
        if not 64 * 1024 <= self.usage_message_max_bytes <= 4 * 1024 * 1024 - 64 * 1024:
            raise ConfigError(
                "usage_message_max_bytes must be between 65536 and 4128768 "
                "(below gRPC's default 4 MiB limit)"
            )
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")
        settings.check_listen("metrics_listen", self.metrics_listen, allow_empty=True)

    @property
    def max_cost_per_response_nanos(self) -> int:
        return int(Decimal(self.max_cost_per_response_usd) * NANOS_PER_USD)

    def journal_path(self, port: int) -> str:
        """The journal directory for the bound listen port ("" = no journal)."""
        return self.journal_dir.replace("{port}", str(port))

    @property
    def identity(self) -> str:
        return self.data_plane_id or f"{socket.gethostname()}-{os.getpid()}"


def load_settings(
    env: Mapping[str, str] | None = None, file: str | None = None, **overrides: Any
) -> Settings:
    return settings.load(Settings, section="ext_proc", env=env, file=file, overrides=overrides)
