import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Price(_message.Message):
    __slots__ = ("input", "output", "cached_input", "cache_write", "cache_write_1h")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_1H_FIELD_NUMBER: _ClassVar[int]
    input: str
    output: str
    cached_input: str
    cache_write: str
    cache_write_1h: str
    def __init__(self, input: _Optional[str] = ..., output: _Optional[str] = ..., cached_input: _Optional[str] = ..., cache_write: _Optional[str] = ..., cache_write_1h: _Optional[str] = ...) -> None: ...

class PriceOverride(_message.Message):
    __slots__ = ("id", "model", "provider", "route", "price", "note", "update_time", "updated_by", "apply_marker", "etag")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BY_FIELD_NUMBER: _ClassVar[int]
    APPLY_MARKER_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    provider: str
    route: str
    price: Price
    note: str
    update_time: _timestamp_pb2.Timestamp
    updated_by: str
    apply_marker: str
    etag: str
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., provider: _Optional[str] = ..., route: _Optional[str] = ..., price: _Optional[_Union[Price, _Mapping]] = ..., note: _Optional[str] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_by: _Optional[str] = ..., apply_marker: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class ModelPrice(_message.Message):
    __slots__ = ("provider", "model", "price", "source", "checked", "override_id", "route")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    provider: str
    model: str
    price: Price
    source: str
    checked: str
    override_id: str
    route: str
    def __init__(self, provider: _Optional[str] = ..., model: _Optional[str] = ..., price: _Optional[_Union[Price, _Mapping]] = ..., source: _Optional[str] = ..., checked: _Optional[str] = ..., override_id: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class ListPricesRequest(_message.Message):
    __slots__ = ("provider", "model_contains", "page_size", "page_token")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONTAINS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    provider: str
    model_contains: str
    page_size: int
    page_token: str
    def __init__(self, provider: _Optional[str] = ..., model_contains: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPricesResponse(_message.Message):
    __slots__ = ("prices", "next_page_token")
    PRICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prices: _containers.RepeatedCompositeFieldContainer[ModelPrice]
    next_page_token: str
    def __init__(self, prices: _Optional[_Iterable[_Union[ModelPrice, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListPriceOverridesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPriceOverridesResponse(_message.Message):
    __slots__ = ("overrides",)
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    overrides: _containers.RepeatedCompositeFieldContainer[PriceOverride]
    def __init__(self, overrides: _Optional[_Iterable[_Union[PriceOverride, _Mapping]]] = ...) -> None: ...

class SetPriceOverrideRequest(_message.Message):
    __slots__ = ("override",)
    OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    override: PriceOverride
    def __init__(self, override: _Optional[_Union[PriceOverride, _Mapping]] = ...) -> None: ...

class DeletePriceOverrideRequest(_message.Message):
    __slots__ = ("id", "etag")
    ID_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    etag: str
    def __init__(self, id: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...
