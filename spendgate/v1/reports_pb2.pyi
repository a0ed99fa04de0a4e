import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageRollup(_message.Message):
    __slots__ = ("hour", "route", "provider", "model", "user", "workspace", "api_key_hash", "tags", "cost_nanos", "input_tokens", "output_tokens", "request_count", "estimated_count")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOUR_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    API_KEY_HASH_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    hour: int
    route: str
    provider: str
    model: str
    user: str
    workspace: str
    api_key_hash: str
    tags: _containers.ScalarMap[str, str]
    cost_nanos: int
    input_tokens: int
    output_tokens: int
    request_count: int
    estimated_count: int
    def __init__(self, hour: _Optional[int] = ..., route: _Optional[str] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., user: _Optional[str] = ..., workspace: _Optional[str] = ..., api_key_hash: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., cost_nanos: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., request_count: _Optional[int] = ..., estimated_count: _Optional[int] = ...) -> None: ...

class DimensionFilter(_message.Message):
    __slots__ = ("dimension", "value")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    dimension: str
    value: str
    def __init__(self, dimension: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class QuerySpendRequest(_message.Message):
    __slots__ = ("group_by", "tag_key", "start_time", "end_time", "filters", "page_size", "page_token")
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    TAG_KEY_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    group_by: _containers.RepeatedScalarFieldContainer[str]
    tag_key: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    filters: _containers.RepeatedCompositeFieldContainer[DimensionFilter]
    page_size: int
    page_token: str
    def __init__(self, group_by: _Optional[_Iterable[str]] = ..., tag_key: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., filters: _Optional[_Iterable[_Union[DimensionFilter, _Mapping]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SpendGroup(_message.Message):
    __slots__ = ("values", "cost_nanos", "cost_usd", "input_tokens", "output_tokens", "request_count", "estimated_count")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    cost_nanos: int
    cost_usd: str
    input_tokens: int
    output_tokens: int
    request_count: int
    estimated_count: int
    def __init__(self, values: _Optional[_Iterable[str]] = ..., cost_nanos: _Optional[int] = ..., cost_usd: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., request_count: _Optional[int] = ..., estimated_count: _Optional[int] = ...) -> None: ...

class QuerySpendResponse(_message.Message):
    __slots__ = ("columns", "groups", "next_page_token")
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedScalarFieldContainer[str]
    groups: _containers.RepeatedCompositeFieldContainer[SpendGroup]
    next_page_token: str
    def __init__(self, columns: _Optional[_Iterable[str]] = ..., groups: _Optional[_Iterable[_Union[SpendGroup, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
