from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetSecretsStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SecretsStatus(_message.Message):
    __slots__ = ("current_key_id", "key_ids", "stored")
    CURRENT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    current_key_id: str
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    stored: _containers.RepeatedCompositeFieldContainer[StoredSecrets]
    def __init__(self, current_key_id: _Optional[str] = ..., key_ids: _Optional[_Iterable[str]] = ..., stored: _Optional[_Iterable[_Union[StoredSecrets, _Mapping]]] = ...) -> None: ...

class StoredSecrets(_message.Message):
    __slots__ = ("key_id", "count", "configured")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    count: int
    configured: bool
    def __init__(self, key_id: _Optional[str] = ..., count: _Optional[int] = ..., configured: _Optional[bool] = ...) -> None: ...

class RotateSecretsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateSecretsResponse(_message.Message):
    __slots__ = ("current_key_id", "rotated", "unchanged", "unreadable")
    CURRENT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ROTATED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_FIELD_NUMBER: _ClassVar[int]
    current_key_id: str
    rotated: int
    unchanged: int
    unreadable: _containers.RepeatedCompositeFieldContainer[UnreadableSecret]
    def __init__(self, current_key_id: _Optional[str] = ..., rotated: _Optional[int] = ..., unchanged: _Optional[int] = ..., unreadable: _Optional[_Iterable[_Union[UnreadableSecret, _Mapping]]] = ...) -> None: ...

class UnreadableSecret(_message.Message):
    __slots__ = ("webhook_id", "field", "reason")
    WEBHOOK_ID_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    webhook_id: str
    field: str
    reason: str
    def __init__(self, webhook_id: _Optional[str] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
