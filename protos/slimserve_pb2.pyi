from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadFile(_message.Message):
    __slots__ = ("role", "filename", "size_bytes", "sha256")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    role: str
    filename: str
    size_bytes: int
    sha256: str
    def __init__(self, role: _Optional[str] = ..., filename: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class RegisterHeader(_message.Message):
    __slots__ = ("name", "files", "description", "config_json", "quality", "evaluator", "sequence_inputs", "attention_mask")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    EVALUATOR_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    name: str
    files: _containers.RepeatedCompositeFieldContainer[UploadFile]
    description: str
    config_json: str
    quality: _containers.RepeatedScalarFieldContainer[str]
    evaluator: str
    sequence_inputs: _containers.RepeatedScalarFieldContainer[str]
    attention_mask: str
    def __init__(self, name: _Optional[str] = ..., files: _Optional[_Iterable[_Union[UploadFile, _Mapping]]] = ..., description: _Optional[str] = ..., config_json: _Optional[str] = ..., quality: _Optional[_Iterable[str]] = ..., evaluator: _Optional[str] = ..., sequence_inputs: _Optional[_Iterable[str]] = ..., attention_mask: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("file_index", "data")
    FILE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file_index: int
    data: bytes
    def __init__(self, file_index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RegisterHeader
    chunk: FileChunk
    def __init__(self, header: _Optional[_Union[RegisterHeader, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class VariantRecord(_message.Message):
    __slots__ = ("name", "recipe", "parent", "runtime", "status", "message", "format", "created_at", "params", "nonzero_params", "size_bytes", "flops", "latency_p50_ms", "latency_p99_ms", "throughput", "accuracy", "accuracy_delta", "evaluation_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    NONZERO_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_DELTA_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    recipe: str
    parent: str
    runtime: str
    status: str
    message: str
    format: str
    created_at: str
    params: int
    nonzero_params: int
    size_bytes: int
    flops: float
    latency_p50_ms: float
    latency_p99_ms: float
    throughput: float
    accuracy: float
    accuracy_delta: float
    evaluation_json: str
    def __init__(self, name: _Optional[str] = ..., recipe: _Optional[str] = ..., parent: _Optional[str] = ..., runtime: _Optional[str] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., format: _Optional[str] = ..., created_at: _Optional[str] = ..., params: _Optional[int] = ..., nonzero_params: _Optional[int] = ..., size_bytes: _Optional[int] = ..., flops: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., throughput: _Optional[float] = ..., accuracy: _Optional[float] = ..., accuracy_delta: _Optional[float] = ..., evaluation_json: _Optional[str] = ...) -> None: ...

class ModelRecord(_message.Message):
    __slots__ = ("name", "format", "description", "created_at", "inputs", "outputs", "variants", "datasets", "default_variant", "traffic")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VARIANT_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: str
    description: str
    created_at: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    variants: _containers.RepeatedCompositeFieldContainer[VariantRecord]
    datasets: _containers.RepeatedScalarFieldContainer[str]
    default_variant: str
    traffic: TrafficPolicy
    def __init__(self, name: _Optional[str] = ..., format: _Optional[str] = ..., description: _Optional[str] = ..., created_at: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., variants: _Optional[_Iterable[_Union[VariantRecord, _Mapping]]] = ..., datasets: _Optional[_Iterable[str]] = ..., default_variant: _Optional[str] = ..., traffic: _Optional[_Union[TrafficPolicy, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelRecord]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelRecord, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteVariantRequest(_message.Message):
    __slots__ = ("model", "variant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class OptimizeRequest(_message.Message):
    __slots__ = ("model", "recipe", "recipe_json", "variant_name", "accuracy_budget", "parent", "keep_over_budget", "quality", "evaluator")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    RECIPE_JSON_FIELD_NUMBER: _ClassVar[int]
    VARIANT_NAME_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    KEEP_OVER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    EVALUATOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    recipe: str
    recipe_json: str
    variant_name: str
    accuracy_budget: float
    parent: str
    keep_over_budget: bool
    quality: _containers.RepeatedScalarFieldContainer[str]
    evaluator: str
    def __init__(self, model: _Optional[str] = ..., recipe: _Optional[str] = ..., recipe_json: _Optional[str] = ..., variant_name: _Optional[str] = ..., accuracy_budget: _Optional[float] = ..., parent: _Optional[str] = ..., keep_over_budget: _Optional[bool] = ..., quality: _Optional[_Iterable[str]] = ..., evaluator: _Optional[str] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("stage", "fraction", "message", "epoch", "loss", "accuracy")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    stage: str
    fraction: float
    message: str
    epoch: int
    loss: float
    accuracy: float
    def __init__(self, stage: _Optional[str] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ..., epoch: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class JobDone(_message.Message):
    __slots__ = ("variant", "report_json")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    variant: VariantRecord
    report_json: str
    def __init__(self, variant: _Optional[_Union[VariantRecord, _Mapping]] = ..., report_json: _Optional[str] = ...) -> None: ...

class OptimizeEvent(_message.Message):
    __slots__ = ("job_id", "progress", "done")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    progress: JobProgress
    done: JobDone
    def __init__(self, job_id: _Optional[str] = ..., progress: _Optional[_Union[JobProgress, _Mapping]] = ..., done: _Optional[_Union[JobDone, _Mapping]] = ...) -> None: ...

class JobRecord(_message.Message):
    __slots__ = ("id", "model", "variant", "recipe", "status", "message", "started_at", "finished_at", "progress", "stage", "submitted_at", "paused_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    variant: str
    recipe: str
    status: str
    message: str
    started_at: str
    finished_at: str
    progress: float
    stage: str
    submitted_at: str
    paused_seconds: float
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., variant: _Optional[str] = ..., recipe: _Optional[str] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., started_at: _Optional[str] = ..., finished_at: _Optional[str] = ..., progress: _Optional[float] = ..., stage: _Optional[str] = ..., submitted_at: _Optional[str] = ..., paused_seconds: _Optional[float] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobRecord]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobRecord, _Mapping]]] = ...) -> None: ...

class ListPassesRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PassSetting(_message.Message):
    __slots__ = ("name", "type", "default_json", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_json: str
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_json: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class PassRecord(_message.Message):
    __slots__ = ("name", "kind", "description", "needs", "settings")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    description: str
    needs: _containers.RepeatedScalarFieldContainer[str]
    settings: _containers.RepeatedCompositeFieldContainer[PassSetting]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., description: _Optional[str] = ..., needs: _Optional[_Iterable[str]] = ..., settings: _Optional[_Iterable[_Union[PassSetting, _Mapping]]] = ...) -> None: ...

class ListPassesResponse(_message.Message):
    __slots__ = ("passes",)
    PASSES_FIELD_NUMBER: _ClassVar[int]
    passes: _containers.RepeatedCompositeFieldContainer[PassRecord]
    def __init__(self, passes: _Optional[_Iterable[_Union[PassRecord, _Mapping]]] = ...) -> None: ...

class TrafficPolicy(_message.Message):
    __slots__ = ("model", "weights", "shadows", "sticky_parameter", "can_rollback")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SHADOWS_FIELD_NUMBER: _ClassVar[int]
    STICKY_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    CAN_ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: _containers.ScalarMap[str, float]
    shadows: _containers.RepeatedScalarFieldContainer[str]
    sticky_parameter: str
    can_rollback: bool
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ..., shadows: _Optional[_Iterable[str]] = ..., sticky_parameter: _Optional[str] = ..., can_rollback: _Optional[bool] = ...) -> None: ...

class SetTrafficRequest(_message.Message):
    __slots__ = ("model", "weights", "shadows", "sticky_parameter")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SHADOWS_FIELD_NUMBER: _ClassVar[int]
    STICKY_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: _containers.ScalarMap[str, float]
    shadows: _containers.RepeatedScalarFieldContainer[str]
    sticky_parameter: str
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ..., shadows: _Optional[_Iterable[str]] = ..., sticky_parameter: _Optional[str] = ...) -> None: ...

class GetTrafficRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("model", "variant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("model", "request_id", "label", "labels", "row")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    label: int
    labels: _containers.RepeatedScalarFieldContainer[int]
    row: int
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., label: _Optional[int] = ..., labels: _Optional[_Iterable[int]] = ..., row: _Optional[int] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("variant", "correct", "rows", "correct_rows")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_ROWS_FIELD_NUMBER: _ClassVar[int]
    variant: str
    correct: bool
    rows: int
    correct_rows: int
    def __init__(self, variant: _Optional[str] = ..., correct: _Optional[bool] = ..., rows: _Optional[int] = ..., correct_rows: _Optional[int] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class VariantComparison(_message.Message):
    __slots__ = ("variant", "weight", "shadow", "requests", "errors", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "mean_batch", "cost_per_1000", "offline_accuracy", "online_accuracy", "online_accuracy_low", "online_accuracy_high", "shadow_agreement", "latency_verdict", "accuracy_verdict", "feedback")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P90_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_FIELD_NUMBER: _ClassVar[int]
    COST_PER_1000_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ONLINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ONLINE_ACCURACY_LOW_FIELD_NUMBER: _ClassVar[int]
    ONLINE_ACCURACY_HIGH_FIELD_NUMBER: _ClassVar[int]
    SHADOW_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_VERDICT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_VERDICT_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    variant: str
    weight: float
    shadow: bool
    requests: int
    errors: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    mean_batch: float
    cost_per_1000: float
    offline_accuracy: float
    online_accuracy: float
    online_accuracy_low: float
    online_accuracy_high: float
    shadow_agreement: float
    latency_verdict: str
    accuracy_verdict: str
    feedback: int
    def __init__(self, variant: _Optional[str] = ..., weight: _Optional[float] = ..., shadow: _Optional[bool] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., latency_p50_ms: _Optional[float] = ..., latency_p90_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., mean_batch: _Optional[float] = ..., cost_per_1000: _Optional[float] = ..., offline_accuracy: _Optional[float] = ..., online_accuracy: _Optional[float] = ..., online_accuracy_low: _Optional[float] = ..., online_accuracy_high: _Optional[float] = ..., shadow_agreement: _Optional[float] = ..., latency_verdict: _Optional[str] = ..., accuracy_verdict: _Optional[str] = ..., feedback: _Optional[int] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("model", "node_type", "price_per_hour", "variants")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODE_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    node_type: str
    price_per_hour: float
    variants: _containers.RepeatedCompositeFieldContainer[VariantComparison]
    def __init__(self, model: _Optional[str] = ..., node_type: _Optional[str] = ..., price_per_hour: _Optional[float] = ..., variants: _Optional[_Iterable[_Union[VariantComparison, _Mapping]]] = ...) -> None: ...

class SloRequest(_message.Message):
    __slots__ = ("model", "p99_ms", "max_drop_pt", "clear")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_DROP_PT_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    model: str
    p99_ms: float
    max_drop_pt: float
    clear: bool
    def __init__(self, model: _Optional[str] = ..., p99_ms: _Optional[float] = ..., max_drop_pt: _Optional[float] = ..., clear: _Optional[bool] = ...) -> None: ...

class SloEvent(_message.Message):
    __slots__ = ("time", "kind", "reason", "weights", "cost_pt")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COST_PT_FIELD_NUMBER: _ClassVar[int]
    time: str
    kind: str
    reason: str
    weights: _containers.ScalarMap[str, float]
    cost_pt: float
    def __init__(self, time: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ..., cost_pt: _Optional[float] = ...) -> None: ...

class SloStatus(_message.Message):
    __slots__ = ("model", "p99_ms", "max_drop_pt", "state", "message", "warnings", "eligible", "weights", "original", "cost_pt", "history", "drops")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class OriginalEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class DropsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_DROP_PT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    COST_PT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    p99_ms: float
    max_drop_pt: float
    state: str
    message: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    eligible: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.ScalarMap[str, float]
    original: _containers.ScalarMap[str, float]
    cost_pt: float
    history: _containers.RepeatedCompositeFieldContainer[SloEvent]
    drops: _containers.ScalarMap[str, float]
    def __init__(self, model: _Optional[str] = ..., p99_ms: _Optional[float] = ..., max_drop_pt: _Optional[float] = ..., state: _Optional[str] = ..., message: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., eligible: _Optional[_Iterable[str]] = ..., weights: _Optional[_Mapping[str, float]] = ..., original: _Optional[_Mapping[str, float]] = ..., cost_pt: _Optional[float] = ..., history: _Optional[_Iterable[_Union[SloEvent, _Mapping]]] = ..., drops: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RolloutStartRequest(_message.Message):
    __slots__ = ("model", "variant", "plan_json", "steps", "min_requests", "max_stage_s", "alpha")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_STAGE_S_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    plan_json: str
    steps: _containers.RepeatedScalarFieldContainer[float]
    min_requests: int
    max_stage_s: float
    alpha: float
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., plan_json: _Optional[str] = ..., steps: _Optional[_Iterable[float]] = ..., min_requests: _Optional[int] = ..., max_stage_s: _Optional[float] = ..., alpha: _Optional[float] = ...) -> None: ...

class RolloutRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RolloutGate(_message.Message):
    __slots__ = ("name", "decision", "statistic", "threshold", "evidence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    decision: str
    statistic: float
    threshold: float
    evidence: str
    def __init__(self, name: _Optional[str] = ..., decision: _Optional[str] = ..., statistic: _Optional[float] = ..., threshold: _Optional[float] = ..., evidence: _Optional[str] = ...) -> None: ...

class RolloutEvent(_message.Message):
    __slots__ = ("time", "kind", "state", "weight", "message", "gate", "statistic", "threshold", "evidence")
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    time: str
    kind: str
    state: str
    weight: float
    message: str
    gate: str
    statistic: float
    threshold: float
    evidence: str
    def __init__(self, time: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., weight: _Optional[float] = ..., message: _Optional[str] = ..., gate: _Optional[str] = ..., statistic: _Optional[float] = ..., threshold: _Optional[float] = ..., evidence: _Optional[str] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("model", "state", "variant", "control", "weight", "requests", "gates", "history", "reason", "source", "started_at", "finished_at", "plan_json", "slo")
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    model: str
    state: str
    variant: str
    control: str
    weight: float
    requests: _containers.ScalarMap[str, int]
    gates: _containers.RepeatedCompositeFieldContainer[RolloutGate]
    history: _containers.RepeatedCompositeFieldContainer[RolloutEvent]
    reason: str
    source: str
    started_at: str
    finished_at: str
    plan_json: str
    slo: SloStatus
    def __init__(self, model: _Optional[str] = ..., state: _Optional[str] = ..., variant: _Optional[str] = ..., control: _Optional[str] = ..., weight: _Optional[float] = ..., requests: _Optional[_Mapping[str, int]] = ..., gates: _Optional[_Iterable[_Union[RolloutGate, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[RolloutEvent, _Mapping]]] = ..., reason: _Optional[str] = ..., source: _Optional[str] = ..., started_at: _Optional[str] = ..., finished_at: _Optional[str] = ..., plan_json: _Optional[str] = ..., slo: _Optional[_Union[SloStatus, _Mapping]] = ...) -> None: ...
