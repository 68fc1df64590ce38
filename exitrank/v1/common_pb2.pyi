from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Interaction(_message.Message):
    __slots__ = ("user_id", "item_id", "rating", "timestamp_ms")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    rating: float
    timestamp_ms: int
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., rating: _Optional[float] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "title", "attributes", "embedding")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    attributes: _containers.ScalarMap[str, str]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class HistoryItem(_message.Message):
    __slots__ = ("item_id", "title", "rating", "timestamp_ms", "embedding")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    rating: float
    timestamp_ms: int
    embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., rating: _Optional[float] = ..., timestamp_ms: _Optional[int] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...
