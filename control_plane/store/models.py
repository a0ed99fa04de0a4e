"""SQLAlchemy 2.0 models: the control plane's durable state.

Money is integer nano-dollars (BigInteger) and window bounds are integer Unix
seconds, so SQLite and PostgreSQL store exactly the same values and spend can
be added with plain SQL arithmetic (``spent = spent + x``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class PolicyRow(Base):
    __tablename__ = "budget_policies"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    window_unit: Mapped[str] = mapped_column(String(16))
    window_count: Mapped[int] = mapped_column(Integer)
    week_start: Mapped[int] = mapped_column(Integer)  # 0=Monday .. 6=Sunday
    timezone: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(512))
    alert_thresholds: Mapped[str] = mapped_column(String(200), default="")  # "50,80,100"
    enabled: Mapped[bool] = mapped_column(Boolean)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200))
    updated_by: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    # Set by `spendgate apply` on what it creates (migration 0015); "" for
    # objects made otherwise. See docs/policies-as-code.md.
    apply_marker: Mapped[str] = mapped_column(String(200), default="", server_default=text("''"))
    # ENFORCED | SHADOW (REJECT only); when the policy last became SHADOW.
    enforcement: Mapped[str] = mapped_column(
        String(16), default="ENFORCED", server_default="ENFORCED"
    )
    shadow_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expose_to_clients: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    # forecast_alert (migration 0018): seconds (0 = no such rule), and
    # whether exhaustion before the window's end warns.
    forecast_within_s: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    forecast_before_end: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )


class WindowSpendRow(Base):
    """Spend of one policy member in one window, summed over all data planes."""

    __tablename__ = "window_spend"

    policy_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    member: Mapped[str] = mapped_column(String(512), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    window_end: Mapped[int] = mapped_column(BigInteger)
    spent_nanos: Mapped[int] = mapped_column(BigInteger)
    request_count: Mapped[int] = mapped_column(BigInteger)
    estimated_count: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Spend adjustments (SpendAdjustmentRow) made in this window: their net,
    # already in spent_nanos, and how many (the order data planes tell a
    # lowered total from a stale one by: WindowSpend.adjustment_seq).
    adjusted_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    adjustment_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Requests a SHADOW policy would have refused in this window.
    would_reject_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The recent spend rate (spendgate.domain.forecast.Rate, migration 0018),
    # updated by the same upsert that adds spend: the decayed sum of the
    # costs reported (the first report's included, and kept apart in
    # rate_first_nanos), its instant, the first and latest report with spend
    # (Unix ms) and how many reports had spend (0: none yet).
    rate_nanos: Mapped[float] = mapped_column(Float(precision=53), default=0, server_default="0")
    rate_first_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    rate_at_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    rate_since_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    rate_last_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    rate_samples: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    __table_args__ = (
        Index("ix_window_spend_window_end", "window_end"),
        # A wildcard policy's top spenders and member counts (`spendgate status`).
        Index("ix_window_spend_top", "policy_id", "window_start", "spent_nanos"),
    )


class WindowHoldRow(Base):
    """What one data plane holds against one window (see ReserveRequest):
    admitted requests' estimates plus its usage not yet applied. Replaced by
    each newer report (``seq``); ignored and pruned after ``expires_at``."""

    __tablename__ = "window_holds"

    policy_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    member: Mapped[str] = mapped_column(String(512), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data_plane_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    held_nanos: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)  # Unix seconds
    # Running requests whose estimates held_nanos includes (migration 0009).
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class AppliedBatchRow(Base):
    """Idempotency ids of usage batches already applied."""

    __tablename__ = "applied_batches"

    batch_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    data_plane_id: Mapped[str] = mapped_column(String(200))
    applied_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class WebhookRow(Base):
    """A receiver of budget events. ``url``, ``secret`` and ``routing_key``
    are stored encrypted (control_plane/keyring.py, context
    ``webhooks.<column>:<id>``) and decrypted only to send; no API returns
    them. ``url_masked`` is the URL as the API shows it (credential-like
    parts masked), so reading a webhook never needs a key."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    url: Mapped[str] = mapped_column(Text)
    # A server default: a replica of an earlier release (during an upgrade)
    # inserts rows without it.
    url_masked: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    format: Mapped[str] = mapped_column(String(16))  # generic | slack | pagerduty
    events: Mapped[str] = mapped_column(String(200))  # "budget_policy.exceeded,..."
    secret: Mapped[str] = mapped_column(Text, default="")
    routing_key: Mapped[str] = mapped_column(Text, default="")
    severity: Mapped[str] = mapped_column(String(16))  # critical | error | warning | info
    resolve_on_reset: Mapped[bool] = mapped_column(Boolean)
    enabled: Mapped[bool] = mapped_column(Boolean)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200))
    updated_by: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    # Set by `spendgate apply` on what it creates (migration 0015); "" for
    # objects made otherwise. See docs/policies-as-code.md.
    apply_marker: Mapped[str] = mapped_column(String(200), default="", server_default=text("''"))


class WebhookEventRow(Base):
    """A budget event, recorded in the transaction that saw the crossing.

    The unique key makes creation idempotent: whichever transaction inserts
    it first creates the deliveries; every later one finds it and does nothing.
    ``threshold`` is 0 for events that have none (so the key has no NULLs).
    """

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    policy_id: Mapped[str] = mapped_column(String(40))
    member: Mapped[str] = mapped_column(String(512))
    window_start: Mapped[int] = mapped_column(BigInteger)
    threshold: Mapped[int] = mapped_column(Integer)
    window_end: Mapped[int] = mapped_column(BigInteger, index=True)
    data: Mapped[str] = mapped_column(Text)  # JSON: the payload's "data"
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint(
            "policy_id",
            "member",
            "window_start",
            "kind",
            "threshold",
            name="uq_webhook_events_key",
        ),
    )


class DeliveryRow(Base):
    """One event to one webhook: the outbox row the dispatcher works through.

    A claimed row has ``next_attempt_at`` pushed to the end of its lease and a
    fresh ``claim_token``; if the sender dies, the lease runs out and the row
    is due again (at-least-once).
    """

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(String(40))
    event_id: Mapped[str] = mapped_column(String(40), index=True)
    state: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claim_token: Mapped[str] = mapped_column(String(32), default="")
    last_status_code: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_webhook_event"),
    )


class DeliveryAttemptRow(Base):
    """One HTTP attempt of a delivery."""

    __tablename__ = "webhook_delivery_attempts"

    delivery_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_time: Mapped[datetime] = mapped_column(UTCDateTime)
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text)
    response_excerpt: Mapped[str] = mapped_column(Text)


class PriceOverrideRow(Base):
    """An operator's price for a model (USD per million tokens, decimal text),
    for every provider/route or only one ("" = any)."""

    __tablename__ = "price_overrides"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(200))
    input: Mapped[str] = mapped_column(String(40))
    output: Mapped[str] = mapped_column(String(40))
    cached_input: Mapped[str] = mapped_column(String(40))
    cache_write: Mapped[str] = mapped_column(String(40))
    cache_write_1h: Mapped[str] = mapped_column(String(40))
    note: Mapped[str] = mapped_column(String(500))
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_by: Mapped[str] = mapped_column(String(200))
    # Set by `spendgate apply` on what it creates (migration 0015); "" for
    # objects made otherwise. See docs/policies-as-code.md.
    apply_marker: Mapped[str] = mapped_column(String(200), default="", server_default=text("''"))

    __table_args__ = (UniqueConstraint("model", "provider", "route"),)


class QuarantinedUsageRow(Base):
    """A usage record that could not be encoded, sent (data plane) or applied
    (control plane): kept with its reason instead of blocking the records
    behind it. Its cost is in no window."""

    __tablename__ = "quarantined_usage"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "qu_" + ulid
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)
    data_plane_id: Mapped[str] = mapped_column(String(200))
    batch_id: Mapped[str] = mapped_column(String(80))
    policy_id: Mapped[str] = mapped_column(String(64))
    member: Mapped[str] = mapped_column(String(256))  # truncated; see member_sha256
    member_bytes: Mapped[int] = mapped_column(BigInteger)
    member_sha256: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[int] = mapped_column(BigInteger)
    cost_nanos: Mapped[int] = mapped_column(BigInteger)
    request_count: Mapped[int] = mapped_column(BigInteger)
    quarantine_time: Mapped[datetime] = mapped_column(UTCDateTime)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class SpendAdjustmentRow(Base):
    """An administrator's correction of one window's spend (signed), applied
    in the transaction that wrote it. Never changed or deleted: the audit
    trail outlives the window and the policy."""

    __tablename__ = "spend_adjustments"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "sa_" + ulid
    policy_id: Mapped[str] = mapped_column(String(40))
    policy_name: Mapped[str] = mapped_column(String(200))
    member: Mapped[str] = mapped_column(String(512))
    window_start: Mapped[int] = mapped_column(BigInteger)
    window_end: Mapped[int] = mapped_column(BigInteger)
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    spent_before_nanos: Mapped[int] = mapped_column(BigInteger)
    spent_after_nanos: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(500))
    created_by: Mapped[str] = mapped_column(String(200))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    # The client's idempotency key (CreateSpendAdjustmentRequest.request_id).
    request_id: Mapped[str | None] = mapped_column(String(80), nullable=True, unique=True)

    __table_args__ = (Index("ix_spend_adjustments_policy_member", "policy_id", "member", "id"),)


class ServerKeyRow(Base):
    """A key the control plane replicas of one database share, created by the
    first that needs it (e.g. ``page_token``: signs page tokens)."""

    __tablename__ = "server_keys"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(128))  # hex
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)


class UsageRollupRow(Base):
    """Chargeback rollups: what the responses of one UTC hour with the same
    dimensions cost (control_plane/reports.py). ``tag_set`` names the
    request's tags (rows of ``rollup_tags``; "" for none); ``key_hash``
    identifies the dimensions and the tag set (a short unique key however
    long the values are)."""

    __tablename__ = "usage_rollups"

    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(32), primary_key=True)
    route: Mapped[str] = mapped_column(String(512))
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(512))
    user_name: Mapped[str] = mapped_column(String(512))
    workspace: Mapped[str] = mapped_column(String(512))
    api_key_hash: Mapped[str] = mapped_column(String(128))
    tag_set: Mapped[str] = mapped_column(String(32))
    cost_nanos: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    request_count: Mapped[int] = mapped_column(BigInteger)
    estimated_count: Mapped[int] = mapped_column(BigInteger)


class RollupTagRow(Base):
    """The tags of a tag set (``UsageRollupRow.tag_set``): one row per tag.
    Written once per set, never changed."""

    __tablename__ = "rollup_tags"

    tag_set: Mapped[str] = mapped_column(String(32), primary_key=True)
    tag_key: Mapped[str] = mapped_column(String(512), primary_key=True)
    tag_value: Mapped[str] = mapped_column(String(512))
