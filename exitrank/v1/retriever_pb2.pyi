from exitrank.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestSummary(_message.Message):
    __slots__ = ("accepted", "rejected", "errors")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class NearestUsersRequest(_message.Message):
    __slots__ = ("user_id", "k")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("user_id", "score")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    score: float
    def __init__(self, user_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class NearestUsersResponse(_message.Message):
    __slots__ = ("neighbors", "embedding_version")
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    embedding_version: str
    def __init__(self, neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ..., embedding_version: _Optional[str] = ...) -> None: ...

class ContextRequest(_message.Message):
    __slots__ = ("user_id", "k", "max_history", "with_embeddings", "embedding_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_HISTORY_FIELD_NUMBER: _ClassVar[int]
    WITH_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    max_history: int
    with_embeddings: bool
    embedding_version: str
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., max_history: _Optional[int] = ..., with_embeddings: _Optional[bool] = ..., embedding_version: _Optional[str] = ...) -> None: ...

class NeighborContext(_message.Message):
    __slots__ = ("user_id", "score", "history")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    score: float
    history: _containers.RepeatedCompositeFieldContainer[_common_pb2.HistoryItem]
    def __init__(self, user_id: _Optional[str] = ..., score: _Optional[float] = ..., history: _Optional[_Iterable[_Union[_common_pb2.HistoryItem, _Mapping]]] = ...) -> None: ...

class UserContext(_message.Message):
    __slots__ = ("user_id", "history", "neighbors", "embedding_version", "user_embedding", "vectors_version", "catalog_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    VECTORS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history: _containers.RepeatedCompositeFieldContainer[_common_pb2.HistoryItem]
    neighbors: _containers.RepeatedCompositeFieldContainer[NeighborContext]
    embedding_version: str
    user_embedding: _containers.RepeatedScalarFieldContainer[float]
    vectors_version: str
    catalog_version: int
    def __init__(self, user_id: _Optional[str] = ..., history: _Optional[_Iterable[_Union[_common_pb2.HistoryItem, _Mapping]]] = ..., neighbors: _Optional[_Iterable[_Union[NeighborContext, _Mapping]]] = ..., embedding_version: _Optional[str] = ..., user_embedding: _Optional[_Iterable[float]] = ..., vectors_version: _Optional[str] = ..., catalog_version: _Optional[int] = ...) -> None: ...

class GetItemsRequest(_message.Message):
    __slots__ = ("item_ids", "with_embeddings", "embedding_version")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    WITH_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    with_embeddings: bool
    embedding_version: str
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., with_embeddings: _Optional[bool] = ..., embedding_version: _Optional[str] = ...) -> None: ...

class GetItemsResponse(_message.Message):
    __slots__ = ("items", "missing_item_ids", "vectors_version", "catalog_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MISSING_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.Item]
    missing_item_ids: _containers.RepeatedScalarFieldContainer[str]
    vectors_version: str
    catalog_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.Item, _Mapping]]] = ..., missing_item_ids: _Optional[_Iterable[str]] = ..., vectors_version: _Optional[str] = ..., catalog_version: _Optional[int] = ...) -> None: ...
