"""ext_proc settings (see spendgate.settings for sources and precedence)."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ext_proc.admission import identity
from spendgate import settings
from spendgate.domain.pricing import NANOS_PER_USD
from spendgate.process import MAX_WORKERS
from spendgate.settings import ConfigError

__all__ = ["MAX_WORKERS", "ConfigError", "Settings", "load_settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    # gRPC address Envoy's ext_proc filter calls.
    listen: str = "127.0.0.1:50052"
    # Control plane address, or several replicas `host1:port,host2:port` (when the state stream
    # to one breaks, the next is used).
    control_plane: str = "127.0.0.1:50051"
    # The control plane's `data_plane_token`. Required.
    data_plane_token: str = ""
    # Connect to the control plane with TLS.
    control_plane_tls: bool = False
    # PEM CA bundle for that TLS (empty: the system's roots).
    control_plane_ca_file: str = ""
    # This data plane's name in the control plane's records. Empty: `<hostname>-<pid>`.
    data_plane_id: str = ""
    # Where identity headers count from: CIDRs of the direct peer (`10.0.0.0/8,127.0.0.1/32`)
    # and/or mTLS peer principals (`spiffe://corp/ns/infra/sa/gateway`), comma-separated;
    # `spendgate up --demo` sets `127.0.0.1/32,::1/128` (see docs/concepts/identity.md). Empty:
    # identity headers ignored.
    trusted_header_sources: str = ""
    # Request header naming the end user (USER policies), from a trusted source only; always
    # removed before the provider.
    user_header: str = "x-spendgate-user"
    # Request header naming the workspace (WORKSPACE policies), likewise.
    workspace_header: str = "x-spendgate-workspace"
    # Request header with `key=value,…` tags (TAG policies, at most 32), likewise.
    tags_header: str = "x-spendgate-tags"
    # Request header naming the calling service (SERVICE policies), likewise.
    service_header: str = "x-spendgate-service"
    # Dynamic metadata namespace of verified JWT payloads (forwarded by the ext_proc filter's
    # `metadata_options`).
    jwt_metadata_namespace: str = "envoy.filters.http.jwt_authn"
    # jwt_authn's `payload_in_metadata` key.
    jwt_payload_key: str = "jwt_payload"
    # JWT claim naming the user, e.g. `sub` (empty: users not from JWTs).
    user_claim: str = ""
    # JWT claim naming the workspace.
    workspace_claim: str = ""
    # JWT claim naming the calling service.
    service_claim: str = ""
    # JWT claims that become tags: `team,env` (tag = claim name) or `env=deploy_env` (tag `env`
    # from claim `deploy_env`).
    tags_claims: str = ""
    # The mTLS peer's SPIFFE id (`connection.uri_san_peer_certificate`) names the SERVICE when
    # no claim or trusted header does.
    service_from_peer: bool = True
    # A request naming no member for a REJECT `*` policy of scope USER, WORKSPACE, SERVICE or
    # TAG: `reject` (403 naming the policy) or `anonymous` (charged to the member `anonymous`).
    missing_identity: str = "reject"
    # How often usage is journalled and sent to the control plane (10 to 60000).
    flush_interval_ms: int = 100
    # Model with no price: `default` (charge the default price, logged once per model), `free`
    # (charge $0, counted and logged), `reject` (403 before the provider).
    unpriced_models: str = "default"
    # A request of no metered API shape (images, audio, batches, files, …; see
    # docs/concepts/metered-apis.md): `count` (admission-checked like any request, so a spent
    # REJECT budget refuses it; counted in `spendgate_ext_proc_requests_unmetered_total` and
    # logged once per path) or `reject` (403 in the provider's error shape, naming the path).
    unmetered_requests: str = "count"
    # Where responses are metered (docs/concepts/request-flow.md). `observe`: streams by Envoy's
    # second ext_proc filter in `observability_mode` (envoy/envoy.yaml), which sends every chunk
    # without waiting for an answer, so no chunk of a stream is held for metering; JSON answers
    # (one chunk or two) on the admission filter's stream, which costs less than a second
    # stream. `inline`: everything on the admission filter's stream, each chunk held until
    # ext_proc answers it (for an Envoy config with one ext_proc filter only).
    response_metering: str = "observe"
    # `observe`: how long an admitted request's hold waits for its metering stream before it is
    # released (it arrives within milliseconds; with `--workers` another worker may take it, and
    # says so; 1 to 600).
    handoff_timeout_s: int = 10
    # Hold each admitted request's estimated cost against its REJECT windows until it ends.
    reservations: bool = True
    # Output tokens a reservation assumes for a model and route until 5 of its answers were seen
    # (never more than the request's `max_tokens` / `max_completion_tokens` /
    # `max_output_tokens`).
    reservation_output_tokens: int = 4096
    # After that, a reservation assumes this percentile of the output tokens of the model's last
    # 100 answers on the route (50 to 100; never more than the request's own limit).
    reservation_percentile: int = 95
    # A request whose REJECT window has room for fewer than this many more requests of its size
    # is admitted by the control plane (against every data plane's holds) instead of locally;
    # `0`: always local.
    arbiter_headroom_requests: int = 100
    # How long such a request waits for the control plane's answer; without one it is decided
    # again on the local view, which counts the holds of the requests admitted meanwhile
    # (10 to 900).
    arbiter_timeout_ms: int = 500
    # `retry-after` of a 429 whose REJECT budget is under its limit but full of running requests'
    # holds (1 to 60 seconds; `x-should-retry: true`, so the openai and anthropic SDKs retry by
    # themselves). A spent budget's 429 says the window's reset (docs/concepts/request-flow.md).
    held_retry_after_s: int = 2
    # USD per million input tokens for `default` (and for `reject` when the model only appears
    # in the response) — deliberately high, so an unknown model is no way around a budget.
    default_input_price: str = "15"
    # USD per million output tokens for `default`.
    default_output_price: str = "75"
    # Write-ahead journal of unsent usage (ext_proc/sync/journal.py), and the last policy
    # snapshot (ext_proc/sync/snapshot.py; `{port}` = listen port, relative paths are relative
    # to the working directory; `""` disables: a crash then loses unsent usage).
    journal_dir: str = ".spendgate/ext_proc-{port}"
    # A request that arrives before the first policy snapshot (none saved in `journal_dir`)
    # waits this long for it (0 to 900, below Envoy's `message_timeout`); with a saved snapshot
    # nothing waits.
    startup_wait_ms: int = 500
    # A response costing more (USD) is charged in full and raises a `usage.anomaly` event (see
    # docs/concepts/anomalies.md).
    max_cost_per_response_usd: str = "1000"
    # Largest usage message sent to the control plane (65536 to 4128768, below gRPC's 4 MiB
    # default): batches are split to fit, a record larger alone is quarantined.
    usage_message_max_bytes: int = 1024 * 1024
    # HTTP address serving Prometheus `GET /metrics`; `""` disables it. With `workers` above 1
    # this is the parent's (worker counts and restarts) and worker `k` serves its own on this
    # port + k (port 0: each an ephemeral port, logged at start).
    metrics_listen: str = "127.0.0.1:9465"
    # Processes serving `listen` (1 to 64): above 1, a parent starts that many workers that each
    # bind the same address (SO_REUSEPORT; the kernel spreads Envoy's connections over them) and
    # are each a data plane of their own: id `<data_plane_id>-w<k>`, journal and snapshot in
    # `journal_dir/w<k>`. A worker that dies is restarted; one that keeps dying stops the parent
    # (docs/operations/workers.md).
    workers: int = 1
    # JSON lines on stderr (production); `false`: console lines (`spendgate up` sets
    # `SPENDGATE_LOG_JSON=false`).
    log_json: bool = True
    # `debug`, `info`, `warning` or `error`.
    log_level: str = "info"

    @property
    def meters_inline(self) -> bool:
        """Whether responses are metered on the admission stream."""
        return self.response_metering == "inline"

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
        if not 1 <= self.held_retry_after_s <= 60:
            raise ConfigError("held_retry_after_s must be between 1 and 60 (seconds)")
        if self.unpriced_models not in ("default", "free", "reject"):
            raise ConfigError("unpriced_models must be default, free or reject")
        if self.unmetered_requests not in ("count", "reject"):
            raise ConfigError(
                f"unmetered_requests must be count or reject, not {self.unmetered_requests!r}"
            )
        if self.response_metering not in ("observe", "inline"):
            raise ConfigError(
                f"response_metering must be observe or inline, not {self.response_metering!r}"
            )
        if not 1 <= self.handoff_timeout_s <= 600:
            raise ConfigError("handoff_timeout_s must be between 1 and 600 (seconds)")
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
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be between 1 and {MAX_WORKERS}, not {self.workers}")
        if self.metrics_listen and self.workers > 1:
            port = settings.parse_host_port(self.metrics_listen)[1]
            if port and port + self.workers > 65535:
                raise ConfigError(
                    f"metrics_listen port {port} + workers {self.workers} is above 65535 "
                    "(worker k serves its metrics on port + k)"
                )

    @property
    def max_cost_per_response_nanos(self) -> int:
        return int(Decimal(self.max_cost_per_response_usd) * NANOS_PER_USD)

    def journal_path(self, port: int) -> str:
        """The journal directory for the bound listen port ("" = no journal)."""
        return self.journal_dir.replace("{port}", str(port))

    @property
    def identity(self) -> str:
        return self.data_plane_id or f"{socket.gethostname()}-{os.getpid()}"

    def for_worker(self, k: int, listen: str, group_id: str) -> Settings:
        """Worker ``k``'s settings (1-based) in a group of ``workers`` serving
        ``listen`` (a bound port, not 0) whose data planes are named after
        ``group_id``: its own id, journal, snapshot and metrics port."""
        if not 1 <= k <= self.workers:
            raise ConfigError(f"worker must be between 1 and {self.workers}, not {k}")
        metrics_listen = self.metrics_listen
        if metrics_listen:
            host, port = settings.parse_host_port(metrics_listen)
            metrics_listen = settings.join_host_port(host, port + k if port else 0)
        return dataclasses.replace(
            self,
            listen=listen,
            data_plane_id=f"{group_id}-w{k}",
            journal_dir=os.path.join(self.journal_dir, f"w{k}") if self.journal_dir else "",
            metrics_listen=metrics_listen,
        )


def load_settings(
    env: Mapping[str, str] | None = None, file: str | None = None, **overrides: Any
) -> Settings:
    return settings.load(Settings, section="ext_proc", env=env, file=file, overrides=overrides)
