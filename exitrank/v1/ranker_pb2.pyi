from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExitCriterion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXIT_CRITERION_UNSPECIFIED: _ClassVar[ExitCriterion]
    EXIT_CRITERION_PROBABILITY_DELTA: _ClassVar[ExitCriterion]
    EXIT_CRITERION_CONFIDENCE: _ClassVar[ExitCriterion]
EXIT_CRITERION_UNSPECIFIED: ExitCriterion
EXIT_CRITERION_PROBABILITY_DELTA: ExitCriterion
EXIT_CRITERION_CONFIDENCE: ExitCriterion

class ExitPolicy(_message.Message):
    __slots__ = ("threshold", "window", "min_layer", "disabled", "criterion", "confidence")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MIN_LAYER_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    window: int
    min_layer: int
    disabled: bool
    criterion: ExitCriterion
    confidence: float
    def __init__(self, threshold: _Optional[float] = ..., window: _Optional[int] = ..., min_layer: _Optional[int] = ..., disabled: _Optional[bool] = ..., criterion: _Optional[_Union[ExitCriterion, str]] = ..., confidence: _Optional[float] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("user_id", "candidate_item_ids", "num_neighbors", "exit_policy")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    EXIT_POLICY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    num_neighbors: int
    exit_policy: ExitPolicy
    def __init__(self, user_id: _Optional[str] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., num_neighbors: _Optional[int] = ..., exit_policy: _Optional[_Union[ExitPolicy, _Mapping]] = ...) -> None: ...

class ItemScore(_message.Message):
    __slots__ = ("item_id", "ctr", "exit_layer")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CTR_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    ctr: float
    exit_layer: int
    def __init__(self, item_id: _Optional[str] = ..., ctr: _Optional[float] = ..., exit_layer: _Optional[int] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("scores", "model_version", "retrieval_used", "embedding_version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_USED_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[ItemScore]
    model_version: str
    retrieval_used: bool
    embedding_version: str
    def __init__(self, scores: _Optional[_Iterable[_Union[ItemScore, _Mapping]]] = ..., model_version: _Optional[str] = ..., retrieval_used: _Optional[bool] = ..., embedding_version: _Optional[str] = ...) -> None: ...
