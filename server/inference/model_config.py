"""Triton's model configuration of a served variant (ModelConfig), and the serving settings a RepositoryModelLoad
`config` parameter may override (Model Analyzer sweeps max_batch_size, dynamic_batching and instance_group this way;
image clients need an input's `format` and an output's `label_filename`, sent as a `file:` parameter).

Plain domain objects: server/grpc/triton_converters.py turns a `ModelConfigView` into Triton's ModelConfig message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.errors import InvalidArgument
from slimserve.server.runtimes import TensorSpec, platform_of
from slimserve.server.store.manifest import VariantInfo

# Triton's `backend` of each runtime (its `platform` comes from server.runtimes.RUNTIMES).
BACKENDS = {"onnxruntime": "onnxruntime", "torch": "pytorch", "torch-compile": "pytorch", "xla": "pytorch"}
IMAGE_FORMATS = ("FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW")  # Triton's ModelInput.Format
_FLOATS = ("FP16", "FP32", "FP64", "BF16")


def image_format(spec: TensorSpec, batched: bool) -> str:
    """The documented default of an input's `format`: a floating-point input of 3 dimensions (after the batch one)
    whose channels (1 or 3) lead is FORMAT_NCHW, one whose channels close it is FORMAT_NHWC; anything else, or both
    at once (3x?x3), is FORMAT_NONE. A load `config` declares it where the shape does not say."""
    dims = spec.shape[1:] if batched else spec.shape
    if spec.datatype not in _FLOATS or len(dims) != 3:
        return "FORMAT_NONE"
    first, last = dims[0] in (1, 3), dims[2] in (1, 3)
    if first and not last:
        return "FORMAT_NCHW"
    if last and not first:
        return "FORMAT_NHWC"
    return "FORMAT_NONE"


@dataclass(frozen=True)
class ServingOverride:
    """What a load's `config` changed for every variant of a model, until the next load (None: unchanged)."""

    max_batch_size: int | None = None  # 0: no batching
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int | None = None
    instance_count: int | None = None  # calls of a variant at once
    input_formats: Mapping[str, str] = field(default_factory=dict)  # input -> Triton's FORMAT_* where declared
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # output -> class labels (classification)
    label_files: Mapping[str, str] = field(default_factory=dict)  # output -> its label_filename, as ModelConfig says it
    intra_op_threads: int | None = None  # parameters["intra_op_thread_count"]: ORT's intra-op threads of every variant

    def apply(self, config: BatchingConfig, calls: int) -> tuple[BatchingConfig, int]:
        """The batcher's config and calls at once with this override applied."""
        changes: dict[str, Any] = {}
        if self.max_batch_size == 0:
            changes["enabled"] = False
        elif self.max_batch_size is not None:
            changes["max_batch_size"] = self.max_batch_size
        if self.preferred_batch_sizes is not None:
            changes["preferred_batch_sizes"] = self.preferred_batch_sizes
        if self.max_queue_delay_us is not None:
            changes["max_queue_delay_ms"] = self.max_queue_delay_us / 1000.0
        return (replace(config, **changes) if changes else config), (self.instance_count or calls)


@dataclass(frozen=True)
class ModelConfigView:
    """Triton's ModelConfig of one served variant: dims exclude the batch dimension when max_batch_size > 0."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batching: BatchingConfig | None  # dynamic_batching; None when the variant does not batch
    instance_count: int
    instance_kind: str  # CPU | GPU
    default_model_filename: str
    version: int
    variant: str
    formats: Mapping[str, str] = field(default_factory=dict)  # input -> FORMAT_*
    label_files: Mapping[str, str] = field(default_factory=dict)  # output -> label_filename
    parameters: Mapping[str, str] = field(default_factory=dict)  # the runtime's settings, e.g. intra_op_thread_count


def batchable(inputs: list[TensorSpec]) -> bool:
    """Every input has a free leading (batch) dimension."""
    return bool(inputs) and all(s.shape and s.shape[0] == -1 for s in inputs)


def config_view(
    model: str,
    variant: VariantInfo,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    batching: BatchingConfig,
    calls: int,
    device: str,
    override: ServingOverride | None = None,
    parameters: Mapping[str, str] | None = None,
) -> ModelConfigView:
    """The ModelConfig of a variant; input formats from the shape (`image_format`) unless the load `config` declared them;
    `parameters`: the loaded runtime's own (`Runtime.config_parameters`), none for a variant out of memory."""
    batched = batchable(inputs)
    declared = override.input_formats if override is not None else {}
    max_batch = batching.max_batch_size if batched else 0

    def dims(specs: list[TensorSpec]) -> list[TensorSpec]:
        return [TensorSpec(s.name, s.datatype, s.shape[1:] if batched and s.shape else s.shape) for s in specs]

    return ModelConfigView(
        name=model,
        platform=platform_of(variant.runtime),
        backend=BACKENDS.get(variant.runtime, variant.runtime),
        max_batch_size=max_batch,
        inputs=dims(inputs),
        outputs=dims(outputs),
        batching=batching if batched and batching.enabled else None,
        instance_count=calls,
        instance_kind="GPU" if "cuda" in device.lower() or "tensorrt" in device.lower() else "CPU",
        default_model_filename=variant.file,
        version=variant.version,
        variant=variant.name,
        formats={s.name: declared.get(s.name) or image_format(s, batched) for s in inputs},
        label_files=dict(override.label_files) if override is not None else {},
        parameters=dict(parameters or {}),
    )


# Keys of a load `config` (Triton's JSON form of ModelConfig: snake_case or protobuf's lowerCamelCase).
_SAME_AS_SERVED = {"name", "platform", "backend", "default_model_filename", "version_policy"}
_CAMEL = {
    "maxBatchSize": "max_batch_size",
    "dynamicBatching": "dynamic_batching",
    "instanceGroup": "instance_group",
    "preferredBatchSize": "preferred_batch_size",
    "maxQueueDelayMicroseconds": "max_queue_delay_microseconds",
    "defaultModelFilename": "default_model_filename",
    "versionPolicy": "version_policy",
    "dataType": "data_type",
    "labelFilename": "label_filename",
    "stringValue": "string_value",
}
# ModelConfig `parameters` a load config may carry: the one it applies, and those slimserve writes itself (read back
# from get_model_config: accepted when they say what is served).
INTRA_OP = "intra_op_thread_count"
_OWN_PARAMETERS = ("slimserve_variant", "slimserve_version")


# Fields whose zero means something (no batching, no delay); any other field at its default (false, 0, "", [], {}) says
# nothing, as Triton's JSON of a ModelConfig writes every field: a config fetched over REST loads back unchanged.
_MEANINGFUL_ZERO = {"max_batch_size", "max_queue_delay_microseconds", "count"}
_MAPS = {"priority_queue_policy", "cc_model_filenames", "metric_tags", "parameters"}  # an empty message, unlike these, is set


def _snake(d: dict[str, Any]) -> dict[str, Any]:
    return {
        _CAMEL.get(k, k): v
        for k, v in d.items()
        if _CAMEL.get(k, k) in _MEANINGFUL_ZERO
        or not (v is None or v is False or v == "" or v == [] or (v == {} and k in _MAPS) or (type(v) is int and v == 0))
    }


def _int(value: Any, what: str, low: int) -> int:
    """An integer field (int64 arrives as a JSON string in protobuf's JSON form)."""
    if isinstance(value, bool) or not isinstance(value, int | str) or (isinstance(value, str) and not value.isdigit()):
        raise InvalidArgument(f"load config: {what} must be an integer >= {low}, got {value!r}")
    if int(value) < low:
        raise InvalidArgument(f"load config: {what} must be >= {low}, got {value}")
    return int(value)


def parse_load_config(
    text: str,
    model: str,
    inputs: list[TensorSpec],
    device: str,
    batching: BatchingConfig,
    outputs: list[TensorSpec] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> ServingOverride:
    """A RepositoryModelLoad `config` checked against the model; anything slimserve cannot apply is INVALID_ARGUMENT.
    `files` are the load's `file:<name>` parameters: only label files that an output's `label_filename` names."""
    try:
        config = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"load config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise InvalidArgument("load config must be a JSON object of ModelConfig fields")
    config = _snake(config)
    applicable = {"max_batch_size", "dynamic_batching", "instance_group", "input", "output", "parameters"}
    unknown = sorted(set(config) - applicable - _SAME_AS_SERVED)
    if unknown:
        raise InvalidArgument(
            f"load config: field(s) {', '.join(unknown)} are not supported; slimserve applies "
            f"{', '.join(sorted(applicable))} (and accepts name, platform, backend as served)"
        )
    if "name" in config and config["name"] != model:
        raise InvalidArgument(f"load config: name '{config['name']}' is not the model loaded ('{model}')")
    max_batch = preferred = delay = count = None
    if "max_batch_size" in config:
        max_batch = _int(config["max_batch_size"], "max_batch_size", 0)
        if max_batch > 0 and not batchable(inputs):
            raise InvalidArgument(f"load config: max_batch_size {max_batch}: model '{model}' has inputs without a free batch dimension")
    if "dynamic_batching" in config:
        dynamic = config["dynamic_batching"]
        if not isinstance(dynamic, dict):
            raise InvalidArgument("load config: dynamic_batching must be an object")
        dynamic = _snake(dynamic)
        extra = sorted(set(dynamic) - {"preferred_batch_size", "max_queue_delay_microseconds"})
        if extra:
            raise InvalidArgument(
                f"load config: dynamic_batching field(s) {', '.join(extra)} are not supported "
                "(supported: preferred_batch_size, max_queue_delay_microseconds)"
            )
        sizes = dynamic.get("preferred_batch_size", [])
        if not isinstance(sizes, list):
            raise InvalidArgument("load config: dynamic_batching.preferred_batch_size must be a list of integers")
        preferred = tuple(_int(s, "preferred_batch_size", 1) for s in sizes)
        if "max_queue_delay_microseconds" in dynamic:
            delay = _int(dynamic["max_queue_delay_microseconds"], "max_queue_delay_microseconds", 0)
    if "instance_group" in config:
        count = _instance_count(config["instance_group"], device)
    batched = batchable(inputs)  # as config_view says dims: without the batch dimension when the inputs have one
    formats = _input_formats(config.get("input", []), inputs, batched)
    labels, label_files = _output_labels(config.get("output", []), outputs or [], dict(files or {}), batched)
    threads = _parameters(config.get("parameters", {}))
    override = ServingOverride(max_batch, preferred, delay, count, formats, labels, label_files, threads)
    override.apply(batching, 1)  # BatchingConfig checks the result (preferred sizes within the limit) before anything changes
    return override


def _parameters(value: Any) -> int | None:
    """ModelConfig `parameters` ({key: {"string_value": ...}}): intra_op_thread_count is applied (0: measured at load, as
    --intra-op-threads 0); slimserve's own (variant, version) are what get_model_config wrote and change nothing."""
    if not isinstance(value, dict):
        raise InvalidArgument("load config: parameters must be an object of {name: {string_value}}")
    threads = None
    for key, entry in value.items():
        text = _snake(entry).get("string_value") if isinstance(entry, dict) else entry
        if not isinstance(text, str):
            raise InvalidArgument(f'load config: parameter {key!r} must be {{"string_value": "..."}}, got {entry!r}')
        if key == INTRA_OP:
            threads = _int(text, f"parameters.{INTRA_OP}", 0)
        elif key not in _OWN_PARAMETERS:
            raise InvalidArgument(f"load config: parameter {key!r} is not supported (supported: {INTRA_OP})")
    return threads


def _instance_count(groups: Any, device: str) -> int:
    if not isinstance(groups, list) or not groups:
        raise InvalidArgument("load config: instance_group must be a non-empty list of {count, kind}")
    total = 0
    for group in groups:
        if not isinstance(group, dict):
            raise InvalidArgument("load config: each instance_group entry must be an object")
        group = _snake(group)
        extra = sorted(set(group) - {"count", "kind", "name"})
        if extra:
            raise InvalidArgument(f"load config: instance_group field(s) {', '.join(extra)} are not supported (supported: count, kind)")
        kind = group.get("kind", "KIND_AUTO")
        served = "KIND_GPU" if "cuda" in device.lower() else "KIND_CPU"
        if kind not in ("KIND_AUTO", served):
            raise InvalidArgument(f"load config: instance_group kind {kind!r}: this model runs as {served}")
        total += _int(group.get("count", 1), "instance_group count", 1)
    return total


def _entries(value: Any, what: str, specs: list[TensorSpec], allowed: set[str], batched: bool) -> list[tuple[dict[str, Any], TensorSpec]]:
    """`input` / `output` entries of a load config, each naming one of the model's tensors; served facts must match."""
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise InvalidArgument(f"load config: {what} must be a list of objects with a 'name'")
    by_name = {s.name: s for s in specs}
    found = []
    for entry in map(_snake, value):
        spec = by_name.get(entry.get("name", ""))
        if spec is None:
            raise InvalidArgument(f"load config: {what} {entry.get('name')!r} is not one of the model's: {', '.join(by_name)}")
        extra = sorted(set(entry) - allowed - {"name", "data_type", "dims"})
        if extra:
            raise InvalidArgument(f"load config: {what} '{spec.name}' field(s) {', '.join(extra)} are not supported")
        served = "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}"
        if entry.get("data_type", served) != served:
            raise InvalidArgument(f"load config: {what} '{spec.name}' is {served} in the model file, not {entry['data_type']}")
        dims = list(spec.shape[1:] if batched else spec.shape)
        if "dims" in entry and _dims(entry["dims"], f"{what} '{spec.name}' dims") != dims:
            raise InvalidArgument(f"load config: {what} '{spec.name}' has dims {dims} in the model file, not {entry['dims']}")
        found.append((entry, spec))
    return found


def _dims(value: Any, what: str) -> list[int]:
    """A dims list (int64 may arrive as JSON strings)."""
    ok = isinstance(value, list) and all(
        (isinstance(d, int) and not isinstance(d, bool)) or (isinstance(d, str) and d.lstrip("-").isdigit()) for d in value
    )
    if not ok:
        raise InvalidArgument(f"load config: {what} must be a list of integers, got {value!r}")
    return [int(d) for d in value]


def _input_formats(value: Any, inputs: list[TensorSpec], batched: bool) -> dict[str, str]:
    formats = {}
    for entry, spec in _entries(value, "input", inputs, {"format"}, batched):
        if "format" not in entry:
            continue
        fmt = entry["format"]
        if fmt not in IMAGE_FORMATS:
            raise InvalidArgument(f"load config: input '{spec.name}' format {fmt!r} is not one of {', '.join(IMAGE_FORMATS)}")
        dims = spec.shape[1:] if batched else spec.shape
        if fmt != "FORMAT_NONE" and len(dims) != 3:
            raise InvalidArgument(f"load config: input '{spec.name}' {fmt} needs 3 dimensions (C, H, W), it has {list(dims)}")
        formats[spec.name] = fmt
    return formats


def _output_labels(
    value: Any, outputs: list[TensorSpec], files: dict[str, bytes], batched: bool
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """Each output's labels: one per line of the `file:<label_filename>` parameter, as Triton reads a label file."""
    labels, label_files = {}, {}
    for entry, spec in _entries(value, "output", outputs, {"label_filename"}, batched):
        name = entry.get("label_filename")
        if not name:
            continue
        content = files.pop(f"file:{name}", None)
        if content is None:
            raise InvalidArgument(f"load config: output '{spec.name}' label_filename '{name}' needs its content as parameter 'file:{name}'")
        try:
            labels[spec.name] = tuple(line.strip() for line in content.decode().splitlines())
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"load config: label file '{name}' is not UTF-8 text: {e}") from None
        label_files[spec.name] = name
    if files:
        raise InvalidArgument(
            f"load parameter(s) {', '.join(sorted(files))}: loading model files through RepositoryModelLoad is not supported "
            "(only label files an output's label_filename names); upload a model with `slimctl register` (ModelRegistry.Register)"
        )
    return labels, label_files
