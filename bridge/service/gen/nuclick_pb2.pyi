from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tile(_message.Message):
    __slots__ = ("encoding", "data", "width", "height", "origin_x", "origin_y", "downsample", "pixel_size_um")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_UNSPECIFIED: _ClassVar[Tile.Encoding]
        RAW_RGB8: _ClassVar[Tile.Encoding]
        PNG: _ClassVar[Tile.Encoding]
        JPEG: _ClassVar[Tile.Encoding]
    ENCODING_UNSPECIFIED: Tile.Encoding
    RAW_RGB8: Tile.Encoding
    PNG: Tile.Encoding
    JPEG: Tile.Encoding
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_X_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_Y_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_UM_FIELD_NUMBER: _ClassVar[int]
    encoding: Tile.Encoding
    data: bytes
    width: int
    height: int
    origin_x: float
    origin_y: float
    downsample: float
    pixel_size_um: float
    def __init__(self, encoding: _Optional[_Union[Tile.Encoding, str]] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., origin_x: _Optional[float] = ..., origin_y: _Optional[float] = ..., downsample: _Optional[float] = ..., pixel_size_um: _Optional[float] = ...) -> None: ...

class Click(_message.Message):
    __slots__ = ("x", "y", "id", "class_name", "context_only")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ONLY_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    id: str
    class_name: str
    context_only: bool
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., id: _Optional[str] = ..., class_name: _Optional[str] = ..., context_only: _Optional[bool] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("tile", "clicks", "request_id", "simplify_tolerance", "model_name")
    TILE_FIELD_NUMBER: _ClassVar[int]
    CLICKS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SIMPLIFY_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    tile: Tile
    clicks: _containers.RepeatedCompositeFieldContainer[Click]
    request_id: str
    simplify_tolerance: float
    model_name: str
    def __init__(self, tile: _Optional[_Union[Tile, _Mapping]] = ..., clicks: _Optional[_Iterable[_Union[Click, _Mapping]]] = ..., request_id: _Optional[str] = ..., simplify_tolerance: _Optional[float] = ..., model_name: _Optional[str] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Ring(_message.Message):
    __slots__ = ("points",)
    POINTS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("exterior", "holes")
    EXTERIOR_FIELD_NUMBER: _ClassVar[int]
    HOLES_FIELD_NUMBER: _ClassVar[int]
    exterior: Ring
    holes: _containers.RepeatedCompositeFieldContainer[Ring]
    def __init__(self, exterior: _Optional[_Union[Ring, _Mapping]] = ..., holes: _Optional[_Iterable[_Union[Ring, _Mapping]]] = ...) -> None: ...

class NucleusResult(_message.Message):
    __slots__ = ("click_id", "class_name", "found", "polygon", "area_px", "score", "reason")
    CLICK_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    POLYGON_FIELD_NUMBER: _ClassVar[int]
    AREA_PX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    click_id: str
    class_name: str
    found: bool
    polygon: Polygon
    area_px: float
    score: float
    reason: str
    def __init__(self, click_id: _Optional[str] = ..., class_name: _Optional[str] = ..., found: _Optional[bool] = ..., polygon: _Optional[_Union[Polygon, _Mapping]] = ..., area_px: _Optional[float] = ..., score: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("request_id", "results", "resample_factor", "model", "error", "model_name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    RESAMPLE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[NucleusResult]
    resample_factor: float
    model: str
    error: Error
    model_name: str
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[NucleusResult, _Mapping]]] = ..., resample_factor: _Optional[float] = ..., model: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., model_name: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "version", "sha256", "width", "patch_size", "sigma", "threshold", "pixel_size_um", "arch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_UM_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    sha256: str
    width: float
    patch_size: int
    sigma: float
    threshold: float
    pixel_size_um: float
    arch: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., width: _Optional[float] = ..., patch_size: _Optional[int] = ..., sigma: _Optional[float] = ..., threshold: _Optional[float] = ..., pixel_size_um: _Optional[float] = ..., arch: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_tile_side", "max_clicks_per_request", "max_concurrent_streams", "max_batch", "batch_wait_ms", "stream_window", "auth_required")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TILE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_CLICKS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    STREAM_WINDOW_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_tile_side: int
    max_clicks_per_request: int
    max_concurrent_streams: int
    max_batch: int
    batch_wait_ms: float
    stream_window: int
    auth_required: bool
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_tile_side: _Optional[int] = ..., max_clicks_per_request: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ..., max_batch: _Optional[int] = ..., batch_wait_ms: _Optional[float] = ..., stream_window: _Optional[int] = ..., auth_required: _Optional[bool] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("name", "model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: Model
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "device", "device_name", "limits", "server_version", "models")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    model: Model
    device: str
    device_name: str
    limits: Limits
    server_version: str
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., device: _Optional[str] = ..., device_name: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ...) -> None: ...
