import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from spendgate.v1 import budget_pb2 as _budget_pb2
from spendgate.v1 import pricing_pb2 as _pricing_pb2
from spendgate.v1 import reports_pb2 as _reports_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpendIncrement(_message.Message):
    __slots__ = ("policy_id", "member", "window_start", "cost_nanos", "request_count", "estimated_count", "would_reject_count")
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    WOULD_REJECT_COUNT_FIELD_NUMBER: _ClassVar[int]
    policy_id: str
    member: str
    window_start: _timestamp_pb2.Timestamp
    cost_nanos: int
    request_count: int
    estimated_count: int
    would_reject_count: int
    def __init__(self, policy_id: _Optional[str] = ..., member: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cost_nanos: _Optional[int] = ..., request_count: _Optional[int] = ..., estimated_count: _Optional[int] = ..., would_reject_count: _Optional[int] = ...) -> None: ...

class ReportUsageRequest(_message.Message):
    __slots__ = ("data_plane_id", "batch_id", "increments", "holds", "holds_seq", "unapplied", "anomalies", "quarantined", "rollups")
    DATA_PLANE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    INCREMENTS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_SEQ_FIELD_NUMBER: _ClassVar[int]
    UNAPPLIED_FIELD_NUMBER: _ClassVar[int]
    ANOMALIES_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    ROLLUPS_FIELD_NUMBER: _ClassVar[int]
    data_plane_id: str
    batch_id: str
    increments: _containers.RepeatedCompositeFieldContainer[SpendIncrement]
    holds: _containers.RepeatedCompositeFieldContainer[WindowHold]
    holds_seq: int
    unapplied: _containers.RepeatedCompositeFieldContainer[UnappliedBatch]
    anomalies: _containers.RepeatedCompositeFieldContainer[UsageAnomaly]
    quarantined: _containers.RepeatedCompositeFieldContainer[QuarantinedRecord]
    rollups: _containers.RepeatedCompositeFieldContainer[_reports_pb2.UsageRollup]
    def __init__(self, data_plane_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., increments: _Optional[_Iterable[_Union[SpendIncrement, _Mapping]]] = ..., holds: _Optional[_Iterable[_Union[WindowHold, _Mapping]]] = ..., holds_seq: _Optional[int] = ..., unapplied: _Optional[_Iterable[_Union[UnappliedBatch, _Mapping]]] = ..., anomalies: _Optional[_Iterable[_Union[UsageAnomaly, _Mapping]]] = ..., quarantined: _Optional[_Iterable[_Union[QuarantinedRecord, _Mapping]]] = ..., rollups: _Optional[_Iterable[_Union[_reports_pb2.UsageRollup, _Mapping]]] = ...) -> None: ...

class UsageAnomaly(_message.Message):
    __slots__ = ("id", "reason", "occur_time", "model", "provider", "route", "request_id", "charged_nanos", "reported_cost_usd", "input_tokens", "output_tokens", "max_cost_usd", "policy_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OCCUR_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHARGED_NANOS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_FIELD_NUMBER: _ClassVar[int]
    POLICY_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    occur_time: _timestamp_pb2.Timestamp
    model: str
    provider: str
    route: str
    request_id: str
    charged_nanos: int
    reported_cost_usd: str
    input_tokens: str
    output_tokens: str
    max_cost_usd: str
    policy_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ..., occur_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., provider: _Optional[str] = ..., route: _Optional[str] = ..., request_id: _Optional[str] = ..., charged_nanos: _Optional[int] = ..., reported_cost_usd: _Optional[str] = ..., input_tokens: _Optional[str] = ..., output_tokens: _Optional[str] = ..., max_cost_usd: _Optional[str] = ..., policy_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class QuarantinedRecord(_message.Message):
    __slots__ = ("reason", "detail", "policy_id", "member", "member_bytes", "member_sha256", "window_start", "cost_nanos", "request_count", "batch_id", "quarantine_time", "data_plane_id")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    MEMBER_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SHA256_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_TIME_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_ID_FIELD_NUMBER: _ClassVar[int]
    reason: str
    detail: str
    policy_id: str
    member: str
    member_bytes: int
    member_sha256: str
    window_start: _timestamp_pb2.Timestamp
    cost_nanos: int
    request_count: int
    batch_id: str
    quarantine_time: _timestamp_pb2.Timestamp
    data_plane_id: str
    def __init__(self, reason: _Optional[str] = ..., detail: _Optional[str] = ..., policy_id: _Optional[str] = ..., member: _Optional[str] = ..., member_bytes: _Optional[int] = ..., member_sha256: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cost_nanos: _Optional[int] = ..., request_count: _Optional[int] = ..., batch_id: _Optional[str] = ..., quarantine_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., data_plane_id: _Optional[str] = ...) -> None: ...

class UnappliedBatch(_message.Message):
    __slots__ = ("batch_id", "usage")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    usage: _containers.RepeatedCompositeFieldContainer[WindowHold]
    def __init__(self, batch_id: _Optional[str] = ..., usage: _Optional[_Iterable[_Union[WindowHold, _Mapping]]] = ...) -> None: ...

class WindowHold(_message.Message):
    __slots__ = ("policy_id", "member", "window_start", "held_nanos", "requests")
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    HELD_NANOS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    policy_id: str
    member: str
    window_start: _timestamp_pb2.Timestamp
    held_nanos: int
    requests: int
    def __init__(self, policy_id: _Optional[str] = ..., member: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., held_nanos: _Optional[int] = ..., requests: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("data_plane_id", "holds", "holds_seq", "amount_nanos", "unapplied", "items")
    DATA_PLANE_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_SEQ_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANOS_FIELD_NUMBER: _ClassVar[int]
    UNAPPLIED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    data_plane_id: str
    holds: _containers.RepeatedCompositeFieldContainer[WindowHold]
    holds_seq: int
    amount_nanos: int
    unapplied: _containers.RepeatedCompositeFieldContainer[UnappliedBatch]
    items: _containers.RepeatedCompositeFieldContainer[ReserveItem]
    def __init__(self, data_plane_id: _Optional[str] = ..., holds: _Optional[_Iterable[_Union[WindowHold, _Mapping]]] = ..., holds_seq: _Optional[int] = ..., amount_nanos: _Optional[int] = ..., unapplied: _Optional[_Iterable[_Union[UnappliedBatch, _Mapping]]] = ..., items: _Optional[_Iterable[_Union[ReserveItem, _Mapping]]] = ...) -> None: ...

class ReserveItem(_message.Message):
    __slots__ = ("windows", "amount_nanos")
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANOS_FIELD_NUMBER: _ClassVar[int]
    windows: _containers.RepeatedCompositeFieldContainer[WindowHold]
    amount_nanos: int
    def __init__(self, windows: _Optional[_Iterable[_Union[WindowHold, _Mapping]]] = ..., amount_nanos: _Optional[int] = ...) -> None: ...

class ReserveVerdict(_message.Message):
    __slots__ = ("admitted", "policy_id", "member")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    admitted: bool
    policy_id: str
    member: str
    def __init__(self, admitted: _Optional[bool] = ..., policy_id: _Optional[str] = ..., member: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("admitted", "policy_id", "member", "spend", "verdicts", "applied_batch_ids")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    SPEND_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BATCH_IDS_FIELD_NUMBER: _ClassVar[int]
    admitted: bool
    policy_id: str
    member: str
    spend: _containers.RepeatedCompositeFieldContainer[WindowSpend]
    verdicts: _containers.RepeatedCompositeFieldContainer[ReserveVerdict]
    applied_batch_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, admitted: _Optional[bool] = ..., policy_id: _Optional[str] = ..., member: _Optional[str] = ..., spend: _Optional[_Iterable[_Union[WindowSpend, _Mapping]]] = ..., verdicts: _Optional[_Iterable[_Union[ReserveVerdict, _Mapping]]] = ..., applied_batch_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReportUsageResponse(_message.Message):
    __slots__ = ("duplicate", "spend", "unknown_policy_increments", "quarantined_increments", "refused_rollups", "applied_batch_ids")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SPEND_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_POLICY_INCREMENTS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_INCREMENTS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_ROLLUPS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BATCH_IDS_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    spend: _containers.RepeatedCompositeFieldContainer[WindowSpend]
    unknown_policy_increments: int
    quarantined_increments: int
    refused_rollups: int
    applied_batch_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, duplicate: _Optional[bool] = ..., spend: _Optional[_Iterable[_Union[WindowSpend, _Mapping]]] = ..., unknown_policy_increments: _Optional[int] = ..., quarantined_increments: _Optional[int] = ..., refused_rollups: _Optional[int] = ..., applied_batch_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class WindowSpend(_message.Message):
    __slots__ = ("policy_id", "member", "window_start", "window_end", "spent_nanos", "limit_nanos", "exceeded", "request_count", "holds", "adjustment_seq")
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    SPENT_NANOS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_NANOS_FIELD_NUMBER: _ClassVar[int]
    EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    ADJUSTMENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    policy_id: str
    member: str
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    spent_nanos: int
    limit_nanos: int
    exceeded: bool
    request_count: int
    holds: _containers.RepeatedCompositeFieldContainer[DataPlaneHold]
    adjustment_seq: int
    def __init__(self, policy_id: _Optional[str] = ..., member: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spent_nanos: _Optional[int] = ..., limit_nanos: _Optional[int] = ..., exceeded: _Optional[bool] = ..., request_count: _Optional[int] = ..., holds: _Optional[_Iterable[_Union[DataPlaneHold, _Mapping]]] = ..., adjustment_seq: _Optional[int] = ...) -> None: ...

class DataPlaneHold(_message.Message):
    __slots__ = ("data_plane_id", "held_nanos", "seq", "expire_time", "requests")
    DATA_PLANE_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_NANOS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    data_plane_id: str
    held_nanos: int
    seq: int
    expire_time: _timestamp_pb2.Timestamp
    requests: int
    def __init__(self, data_plane_id: _Optional[str] = ..., held_nanos: _Optional[int] = ..., seq: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requests: _Optional[int] = ...) -> None: ...

class WatchStateRequest(_message.Message):
    __slots__ = ("data_plane_id", "incremental")
    DATA_PLANE_ID_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_FIELD_NUMBER: _ClassVar[int]
    data_plane_id: str
    incremental: bool
    def __init__(self, data_plane_id: _Optional[str] = ..., incremental: _Optional[bool] = ...) -> None: ...

class PolicySnapshot(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[_budget_pb2.BudgetPolicy]
    def __init__(self, policies: _Optional[_Iterable[_Union[_budget_pb2.BudgetPolicy, _Mapping]]] = ...) -> None: ...

class PriceOverrides(_message.Message):
    __slots__ = ("overrides",)
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    overrides: _containers.RepeatedCompositeFieldContainer[_pricing_pb2.PriceOverride]
    def __init__(self, overrides: _Optional[_Iterable[_Union[_pricing_pb2.PriceOverride, _Mapping]]] = ...) -> None: ...

class StateUpdate(_message.Message):
    __slots__ = ("policies", "spend", "full_snapshot", "server_time", "price_overrides", "seq", "resync", "policy_changes", "price_changes", "applied", "applied_batches")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    SPEND_FIELD_NUMBER: _ClassVar[int]
    FULL_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    PRICE_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    POLICY_CHANGES_FIELD_NUMBER: _ClassVar[int]
    PRICE_CHANGES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    policies: PolicySnapshot
    spend: _containers.RepeatedCompositeFieldContainer[WindowSpend]
    full_snapshot: bool
    server_time: _timestamp_pb2.Timestamp
    price_overrides: PriceOverrides
    seq: int
    resync: ResyncPage
    policy_changes: PolicyChanges
    price_changes: PriceOverrideChanges
    applied: AppliedBatch
    applied_batches: _containers.RepeatedCompositeFieldContainer[AppliedBatch]
    def __init__(self, policies: _Optional[_Union[PolicySnapshot, _Mapping]] = ..., spend: _Optional[_Iterable[_Union[WindowSpend, _Mapping]]] = ..., full_snapshot: _Optional[bool] = ..., server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., price_overrides: _Optional[_Union[PriceOverrides, _Mapping]] = ..., seq: _Optional[int] = ..., resync: _Optional[_Union[ResyncPage, _Mapping]] = ..., policy_changes: _Optional[_Union[PolicyChanges, _Mapping]] = ..., price_changes: _Optional[_Union[PriceOverrideChanges, _Mapping]] = ..., applied: _Optional[_Union[AppliedBatch, _Mapping]] = ..., applied_batches: _Optional[_Iterable[_Union[AppliedBatch, _Mapping]]] = ...) -> None: ...

class AppliedBatch(_message.Message):
    __slots__ = ("data_plane_id", "batch_id")
    DATA_PLANE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    data_plane_id: str
    batch_id: str
    def __init__(self, data_plane_id: _Optional[str] = ..., batch_id: _Optional[str] = ...) -> None: ...

class ResyncPage(_message.Message):
    __slots__ = ("page", "last")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    page: int
    last: bool
    def __init__(self, page: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...

class VersionedPolicy(_message.Message):
    __slots__ = ("policy", "version")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    policy: _budget_pb2.BudgetPolicy
    version: int
    def __init__(self, policy: _Optional[_Union[_budget_pb2.BudgetPolicy, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class PolicyChanges(_message.Message):
    __slots__ = ("upserts", "deleted_ids")
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    DELETED_IDS_FIELD_NUMBER: _ClassVar[int]
    upserts: _containers.RepeatedCompositeFieldContainer[VersionedPolicy]
    deleted_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, upserts: _Optional[_Iterable[_Union[VersionedPolicy, _Mapping]]] = ..., deleted_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PriceOverrideChanges(_message.Message):
    __slots__ = ("upserts", "deleted_ids")
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    DELETED_IDS_FIELD_NUMBER: _ClassVar[int]
    upserts: _containers.RepeatedCompositeFieldContainer[_pricing_pb2.PriceOverride]
    deleted_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, upserts: _Optional[_Iterable[_Union[_pricing_pb2.PriceOverride, _Mapping]]] = ..., deleted_ids: _Optional[_Iterable[str]] = ...) -> None: ...
