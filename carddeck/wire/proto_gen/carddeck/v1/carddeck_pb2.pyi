from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_FLOAT32: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Matrix(_message.Message):
    __slots__ = ("rows", "cols", "data")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    data: bytes
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("images", "policy", "per_sample", "abstain_above_risk")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_ABOVE_RISK_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    policy: str
    per_sample: bool
    abstain_above_risk: float
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., policy: _Optional[str] = ..., per_sample: bool = ..., abstain_above_risk: _Optional[float] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("policy", "per_sample", "card_names", "weights", "domains", "distances", "selected", "cards_per_image")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    CARD_NAMES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    CARDS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    policy: str
    per_sample: bool
    card_names: _containers.RepeatedScalarFieldContainer[str]
    weights: Matrix
    domains: _containers.RepeatedScalarFieldContainer[str]
    distances: Matrix
    selected: _containers.RepeatedScalarFieldContainer[str]
    cards_per_image: float
    def __init__(self, policy: _Optional[str] = ..., per_sample: bool = ..., card_names: _Optional[_Iterable[str]] = ..., weights: _Optional[_Union[Matrix, _Mapping]] = ..., domains: _Optional[_Iterable[str]] = ..., distances: _Optional[_Union[Matrix, _Mapping]] = ..., selected: _Optional[_Iterable[str]] = ..., cards_per_image: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("probabilities", "labels", "label_names", "routing", "deck_version", "class_names", "verdict", "adapted")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    DECK_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_FIELD_NUMBER: _ClassVar[int]
    probabilities: Matrix
    labels: _containers.RepeatedScalarFieldContainer[int]
    label_names: _containers.RepeatedScalarFieldContainer[str]
    routing: Routing
    deck_version: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    verdict: Verdict
    adapted: bool
    def __init__(self, probabilities: _Optional[_Union[Matrix, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., label_names: _Optional[_Iterable[str]] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ..., deck_version: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., adapted: bool = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("shift_state", "scope", "expected_accuracy", "expected_accuracy_kind", "out_of_scope", "in_scope", "risk", "abstained", "covered_by")
    SHIFT_STATE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_KIND_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_SCOPE_FIELD_NUMBER: _ClassVar[int]
    IN_SCOPE_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    ABSTAINED_FIELD_NUMBER: _ClassVar[int]
    COVERED_BY_FIELD_NUMBER: _ClassVar[int]
    shift_state: str
    scope: str
    expected_accuracy: float
    expected_accuracy_kind: str
    out_of_scope: _containers.RepeatedScalarFieldContainer[float]
    in_scope: _containers.RepeatedScalarFieldContainer[bool]
    risk: _containers.RepeatedScalarFieldContainer[float]
    abstained: _containers.RepeatedScalarFieldContainer[bool]
    covered_by: str
    def __init__(self, shift_state: _Optional[str] = ..., scope: _Optional[str] = ..., expected_accuracy: _Optional[float] = ..., expected_accuracy_kind: _Optional[str] = ..., out_of_scope: _Optional[_Iterable[float]] = ..., in_scope: _Optional[_Iterable[bool]] = ..., risk: _Optional[_Iterable[float]] = ..., abstained: _Optional[_Iterable[bool]] = ..., covered_by: _Optional[str] = ...) -> None: ...

class PredictStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: PredictRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[PredictRequest, _Mapping]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PredictStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: PredictResponse
    error: StreamError
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[PredictResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("images", "policy", "per_sample")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    policy: str
    per_sample: bool
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., policy: _Optional[str] = ..., per_sample: bool = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("routing", "deck_version")
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    DECK_VERSION_FIELD_NUMBER: _ClassVar[int]
    routing: Routing
    deck_version: int
    def __init__(self, routing: _Optional[_Union[Routing, _Mapping]] = ..., deck_version: _Optional[int] = ...) -> None: ...

class Card(_message.Message):
    __slots__ = ("name", "version", "domain", "architecture", "compression_method", "sparsity", "weight_bits", "signature", "meta_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_METHOD_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BITS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    domain: str
    architecture: str
    compression_method: str
    sparsity: float
    weight_bits: int
    signature: _containers.RepeatedScalarFieldContainer[float]
    meta_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., domain: _Optional[str] = ..., architecture: _Optional[str] = ..., compression_method: _Optional[str] = ..., sparsity: _Optional[float] = ..., weight_bits: _Optional[int] = ..., signature: _Optional[_Iterable[float]] = ..., meta_json: _Optional[str] = ...) -> None: ...

class ListCardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCardsResponse(_message.Message):
    __slots__ = ("cards", "deck_version", "default_policy", "class_names", "default_policy_note")
    CARDS_FIELD_NUMBER: _ClassVar[int]
    DECK_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_NOTE_FIELD_NUMBER: _ClassVar[int]
    cards: _containers.RepeatedCompositeFieldContainer[Card]
    deck_version: int
    default_policy: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    default_policy_note: str
    def __init__(self, cards: _Optional[_Iterable[_Union[Card, _Mapping]]] = ..., deck_version: _Optional[int] = ..., default_policy: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., default_policy_note: _Optional[str] = ...) -> None: ...

class GetCardRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class AddCardChunk(_message.Message):
    __slots__ = ("data", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class AddCardResponse(_message.Message):
    __slots__ = ("card", "deck_version", "already_present")
    CARD_FIELD_NUMBER: _ClassVar[int]
    DECK_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    card: Card
    deck_version: int
    already_present: bool
    def __init__(self, card: _Optional[_Union[Card, _Mapping]] = ..., deck_version: _Optional[int] = ..., already_present: bool = ...) -> None: ...

class RemoveCardRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RemoveCardResponse(_message.Message):
    __slots__ = ("deck_version", "default_policy", "default_policy_note")
    DECK_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_NOTE_FIELD_NUMBER: _ClassVar[int]
    deck_version: int
    default_policy: str
    default_policy_note: str
    def __init__(self, deck_version: _Optional[int] = ..., default_policy: _Optional[str] = ..., default_policy_note: _Optional[str] = ...) -> None: ...
