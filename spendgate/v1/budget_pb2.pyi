import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_GLOBAL: _ClassVar[Scope]
    SCOPE_WORKSPACE: _ClassVar[Scope]
    SCOPE_ENDPOINT: _ClassVar[Scope]
    SCOPE_USER: _ClassVar[Scope]
    SCOPE_API_KEY: _ClassVar[Scope]
    SCOPE_MODEL: _ClassVar[Scope]
    SCOPE_PROVIDER: _ClassVar[Scope]
    SCOPE_TAG: _ClassVar[Scope]
    SCOPE_SERVICE: _ClassVar[Scope]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_ALERT: _ClassVar[Action]
    ACTION_REJECT: _ClassVar[Action]

class Enforcement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENFORCEMENT_UNSPECIFIED: _ClassVar[Enforcement]
    ENFORCEMENT_ENFORCED: _ClassVar[Enforcement]
    ENFORCEMENT_SHADOW: _ClassVar[Enforcement]

class WindowUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WINDOW_UNIT_UNSPECIFIED: _ClassVar[WindowUnit]
    WINDOW_UNIT_MINUTES: _ClassVar[WindowUnit]
    WINDOW_UNIT_HOURS: _ClassVar[WindowUnit]
    WINDOW_UNIT_DAYS: _ClassVar[WindowUnit]
    WINDOW_UNIT_WEEKS: _ClassVar[WindowUnit]
    WINDOW_UNIT_MONTHS: _ClassVar[WindowUnit]

class Weekday(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEEKDAY_UNSPECIFIED: _ClassVar[Weekday]
    WEEKDAY_MONDAY: _ClassVar[Weekday]
    WEEKDAY_TUESDAY: _ClassVar[Weekday]
    WEEKDAY_WEDNESDAY: _ClassVar[Weekday]
    WEEKDAY_THURSDAY: _ClassVar[Weekday]
    WEEKDAY_FRIDAY: _ClassVar[Weekday]
    WEEKDAY_SATURDAY: _ClassVar[Weekday]
    WEEKDAY_SUNDAY: _ClassVar[Weekday]
SCOPE_UNSPECIFIED: Scope
SCOPE_GLOBAL: Scope
SCOPE_WORKSPACE: Scope
SCOPE_ENDPOINT: Scope
SCOPE_USER: Scope
SCOPE_API_KEY: Scope
SCOPE_MODEL: Scope
SCOPE_PROVIDER: Scope
SCOPE_TAG: Scope
SCOPE_SERVICE: Scope
ACTION_UNSPECIFIED: Action
ACTION_ALERT: Action
ACTION_REJECT: Action
ENFORCEMENT_UNSPECIFIED: Enforcement
ENFORCEMENT_ENFORCED: Enforcement
ENFORCEMENT_SHADOW: Enforcement
WINDOW_UNIT_UNSPECIFIED: WindowUnit
WINDOW_UNIT_MINUTES: WindowUnit
WINDOW_UNIT_HOURS: WindowUnit
WINDOW_UNIT_DAYS: WindowUnit
WINDOW_UNIT_WEEKS: WindowUnit
WINDOW_UNIT_MONTHS: WindowUnit
WEEKDAY_UNSPECIFIED: Weekday
WEEKDAY_MONDAY: Weekday
WEEKDAY_TUESDAY: Weekday
WEEKDAY_WEDNESDAY: Weekday
WEEKDAY_THURSDAY: Weekday
WEEKDAY_FRIDAY: Weekday
WEEKDAY_SATURDAY: Weekday
WEEKDAY_SUNDAY: Weekday

class BudgetWindow(_message.Message):
    __slots__ = ("unit", "count", "week_start")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    WEEK_START_FIELD_NUMBER: _ClassVar[int]
    unit: WindowUnit
    count: int
    week_start: Weekday
    def __init__(self, unit: _Optional[_Union[WindowUnit, str]] = ..., count: _Optional[int] = ..., week_start: _Optional[_Union[Weekday, str]] = ...) -> None: ...

class BudgetPolicy(_message.Message):
    __slots__ = ("id", "name", "description", "amount_usd", "window", "timezone", "action", "scope", "target", "alert_thresholds", "enabled", "create_time", "update_time", "created_by", "updated_by", "etag", "apply_marker", "enforcement", "expose_to_clients", "shadow_since", "would_reject_count", "forecast_alert")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_USD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ALERT_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BY_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    APPLY_MARKER_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_FIELD_NUMBER: _ClassVar[int]
    EXPOSE_TO_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SINCE_FIELD_NUMBER: _ClassVar[int]
    WOULD_REJECT_COUNT_FIELD_NUMBER: _ClassVar[int]
    FORECAST_ALERT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    amount_usd: str
    window: BudgetWindow
    timezone: str
    action: Action
    scope: Scope
    target: str
    alert_thresholds: _containers.RepeatedScalarFieldContainer[int]
    enabled: bool
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    created_by: str
    updated_by: str
    etag: str
    apply_marker: str
    enforcement: Enforcement
    expose_to_clients: bool
    shadow_since: _timestamp_pb2.Timestamp
    would_reject_count: int
    forecast_alert: ForecastAlert
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., amount_usd: _Optional[str] = ..., window: _Optional[_Union[BudgetWindow, _Mapping]] = ..., timezone: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., scope: _Optional[_Union[Scope, str]] = ..., target: _Optional[str] = ..., alert_thresholds: _Optional[_Iterable[int]] = ..., enabled: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., updated_by: _Optional[str] = ..., etag: _Optional[str] = ..., apply_marker: _Optional[str] = ..., enforcement: _Optional[_Union[Enforcement, str]] = ..., expose_to_clients: _Optional[bool] = ..., shadow_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., would_reject_count: _Optional[int] = ..., forecast_alert: _Optional[_Union[ForecastAlert, _Mapping]] = ...) -> None: ...

class ForecastAlert(_message.Message):
    __slots__ = ("within", "before_window_end")
    WITHIN_FIELD_NUMBER: _ClassVar[int]
    BEFORE_WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    within: _duration_pb2.Duration
    before_window_end: bool
    def __init__(self, within: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., before_window_end: _Optional[bool] = ...) -> None: ...

class CreateBudgetPolicyRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: BudgetPolicy
    def __init__(self, policy: _Optional[_Union[BudgetPolicy, _Mapping]] = ...) -> None: ...

class GetBudgetPolicyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListBudgetPoliciesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBudgetPoliciesResponse(_message.Message):
    __slots__ = ("policies", "next_page_token")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[BudgetPolicy]
    next_page_token: str
    def __init__(self, policies: _Optional[_Iterable[_Union[BudgetPolicy, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateBudgetPolicyRequest(_message.Message):
    __slots__ = ("policy", "update_mask")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    policy: BudgetPolicy
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, policy: _Optional[_Union[BudgetPolicy, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteBudgetPolicyRequest(_message.Message):
    __slots__ = ("id", "etag")
    ID_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    etag: str
    def __init__(self, id: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class ListSpendRequest(_message.Message):
    __slots__ = ("policy_id", "member", "page_size", "page_token", "top_members")
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOP_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    policy_id: str
    member: str
    page_size: int
    page_token: str
    top_members: int
    def __init__(self, policy_id: _Optional[str] = ..., member: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., top_members: _Optional[int] = ...) -> None: ...

class MemberCounts(_message.Message):
    __slots__ = ("policy_id", "members", "exceeded", "alerting")
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    ALERTING_FIELD_NUMBER: _ClassVar[int]
    policy_id: str
    members: int
    exceeded: int
    alerting: int
    def __init__(self, policy_id: _Optional[str] = ..., members: _Optional[int] = ..., exceeded: _Optional[int] = ..., alerting: _Optional[int] = ...) -> None: ...

class SpendEntry(_message.Message):
    __slots__ = ("policy_id", "policy_name", "scope", "target", "member", "action", "window_start", "window_end", "spent_usd", "limit_usd", "remaining_usd", "exceeded", "request_count", "held_usd", "held_requests", "adjusted_usd", "adjustment_count", "would_reject_count", "forecast_exhaust_time", "forecast_rate_usd_per_hour")
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    SPENT_USD_FIELD_NUMBER: _ClassVar[int]
    LIMIT_USD_FIELD_NUMBER: _ClassVar[int]
    REMAINING_USD_FIELD_NUMBER: _ClassVar[int]
    EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    HELD_USD_FIELD_NUMBER: _ClassVar[int]
    HELD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ADJUSTED_USD_FIELD_NUMBER: _ClassVar[int]
    ADJUSTMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    WOULD_REJECT_COUNT_FIELD_NUMBER: _ClassVar[int]
    FORECAST_EXHAUST_TIME_FIELD_NUMBER: _ClassVar[int]
    FORECAST_RATE_USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    policy_id: str
    policy_name: str
    scope: Scope
    target: str
    member: str
    action: Action
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    spent_usd: str
    limit_usd: str
    remaining_usd: str
    exceeded: bool
    request_count: int
    held_usd: str
    held_requests: int
    adjusted_usd: str
    adjustment_count: int
    would_reject_count: int
    forecast_exhaust_time: _timestamp_pb2.Timestamp
    forecast_rate_usd_per_hour: str
    def __init__(self, policy_id: _Optional[str] = ..., policy_name: _Optional[str] = ..., scope: _Optional[_Union[Scope, str]] = ..., target: _Optional[str] = ..., member: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spent_usd: _Optional[str] = ..., limit_usd: _Optional[str] = ..., remaining_usd: _Optional[str] = ..., exceeded: _Optional[bool] = ..., request_count: _Optional[int] = ..., held_usd: _Optional[str] = ..., held_requests: _Optional[int] = ..., adjusted_usd: _Optional[str] = ..., adjustment_count: _Optional[int] = ..., would_reject_count: _Optional[int] = ..., forecast_exhaust_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., forecast_rate_usd_per_hour: _Optional[str] = ...) -> None: ...

class ListSpendResponse(_message.Message):
    __slots__ = ("entries", "next_page_token", "member_counts")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MEMBER_COUNTS_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[SpendEntry]
    next_page_token: str
    member_counts: _containers.RepeatedCompositeFieldContainer[MemberCounts]
    def __init__(self, entries: _Optional[_Iterable[_Union[SpendEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., member_counts: _Optional[_Iterable[_Union[MemberCounts, _Mapping]]] = ...) -> None: ...

class QuarantinedUsage(_message.Message):
    __slots__ = ("id", "reason", "detail", "data_plane_id", "batch_id", "policy_id", "member", "member_bytes", "member_sha256", "window_start", "cost_usd", "request_count", "quarantine_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    MEMBER_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SHA256_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    detail: str
    data_plane_id: str
    batch_id: str
    policy_id: str
    member: str
    member_bytes: int
    member_sha256: str
    window_start: _timestamp_pb2.Timestamp
    cost_usd: str
    request_count: int
    quarantine_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., data_plane_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., policy_id: _Optional[str] = ..., member: _Optional[str] = ..., member_bytes: _Optional[int] = ..., member_sha256: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cost_usd: _Optional[str] = ..., request_count: _Optional[int] = ..., quarantine_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListQuarantinedUsageRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListQuarantinedUsageResponse(_message.Message):
    __slots__ = ("records", "next_page_token", "total_size")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[QuarantinedUsage]
    next_page_token: str
    total_size: int
    def __init__(self, records: _Optional[_Iterable[_Union[QuarantinedUsage, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class SpendAdjustment(_message.Message):
    __slots__ = ("id", "policy_id", "member", "amount_usd", "reason", "window_start", "window_end", "spent_before_usd", "spent_after_usd", "created_by", "create_time", "policy_name", "request_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_USD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    SPENT_BEFORE_USD_FIELD_NUMBER: _ClassVar[int]
    SPENT_AFTER_USD_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    POLICY_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    policy_id: str
    member: str
    amount_usd: str
    reason: str
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    spent_before_usd: str
    spent_after_usd: str
    created_by: str
    create_time: _timestamp_pb2.Timestamp
    policy_name: str
    request_id: str
    def __init__(self, id: _Optional[str] = ..., policy_id: _Optional[str] = ..., member: _Optional[str] = ..., amount_usd: _Optional[str] = ..., reason: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spent_before_usd: _Optional[str] = ..., spent_after_usd: _Optional[str] = ..., created_by: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policy_name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateSpendAdjustmentRequest(_message.Message):
    __slots__ = ("adjustment", "request_id")
    ADJUSTMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    adjustment: SpendAdjustment
    request_id: str
    def __init__(self, adjustment: _Optional[_Union[SpendAdjustment, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListSpendAdjustmentsRequest(_message.Message):
    __slots__ = ("policy_id", "member", "page_size", "page_token")
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    policy_id: str
    member: str
    page_size: int
    page_token: str
    def __init__(self, policy_id: _Optional[str] = ..., member: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSpendAdjustmentsResponse(_message.Message):
    __slots__ = ("adjustments", "next_page_token")
    ADJUSTMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adjustments: _containers.RepeatedCompositeFieldContainer[SpendAdjustment]
    next_page_token: str
    def __init__(self, adjustments: _Optional[_Iterable[_Union[SpendAdjustment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
