"""JSON and binary-tensor bodies <-> domain objects for the REST edge; the REST counterpart of server/grpc/converters.py.

The Open Inference Protocol's REST form with Triton's binary tensor extension: a JSON header, then (when the
`Inference-Header-Content-Length` header says where the JSON ends) the raw tensors, in input order, each
`binary_data_size` bytes long. Answers carry an output in binary when its request asked for it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from slimserve.client import codec
from slimserve.client.codec import TensorCodecError
from slimserve.server.errors import InvalidArgument
from slimserve.server.inference import request_rules as rules
from slimserve.server.inference.dataplane import InferRequest, InferResult, ModelMetadata
from slimserve.server.inference.shared_memory import ShmInput, ShmRef
from slimserve.server.management.control import IndexEntry
from slimserve.server.runtimes import TensorSpec, platform_of

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


def parse_json(body: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"the {what} is not valid JSON: {e}") from None


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """A body that must be a JSON object; an empty body is the empty object (Triton's clients send none)."""
    if not body.strip():
        return {}
    value = parse_json(body, what)
    if not isinstance(value, dict):
        raise InvalidArgument(f"the {what} must be a JSON object, got {type(value).__name__}")
    return value


def field_of(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """`obj[key]`, checked to be a `kind` (a bool is no int); absent, the default, or an error without one."""
    value = obj.get(key, default)
    if value is ...:
        raise InvalidArgument(f"{where}: '{key}' is missing")
    if value is not default and (not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind))):
        names = " or ".join(k.__name__ for k in _tuple(kind))
        raise InvalidArgument(f"{where}: '{key}' must be {names}, got {type(value).__name__}")
    return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _parameters(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = field_of(obj, "parameters", dict, where, {})
    rules.check_parameters(where, params)
    return params


# ------------------------------------------------------------------ inference requests


def decode_json_data(data: Any, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """A tensor's JSON `data` (flat or nested, row-major) to an array, with its values checked against the datatype."""
    dtype = codec.numpy_dtype(datatype, name)
    count = codec.element_count(shape, name)
    try:
        values = np.asarray(data) if datatype != "BYTES" else np.asarray(data, dtype=object)
    except (ValueError, OverflowError) as e:  # ragged nesting, integers past 64 bits
        raise TensorCodecError(f"tensor '{name}': 'data' is not a regular array of values: {e}") from None
    if values.size != count:
        raise codec.count_error(count, values.size, shape, name, "'data'")
    if count == 0:
        return np.empty(shape, dtype=dtype)
    if datatype == "BYTES":
        flat = values.reshape(-1)
        if not all(isinstance(v, str) for v in flat):
            raise TensorCodecError(f"tensor '{name}': BYTES 'data' must hold strings; send other bytes with binary_data")
        out = np.empty(count, dtype=object)
        out[:] = [v.encode("utf-8") for v in flat]
        return out.reshape(shape)
    kinds = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}.get(datatype, "iu")
    if values.dtype.kind not in kinds:
        want = {"b": "booleans", "iu": "integers"}.get(kinds, "numbers")
        raise TensorCodecError(f"tensor '{name}': {datatype} 'data' must hold {want}, got {values.dtype.kind!r}-kind values")
    if kinds == "iu":
        return codec.narrowed(values, datatype, dtype, shape, name, "'data'")
    return values.astype(dtype).reshape(shape)


@dataclass(frozen=True)
class _Input:
    name: str
    datatype: str
    shape: list[int]
    data: Any = None  # JSON values, or
    raw: memoryview | None = None  # its bytes of the binary part

    def decode(self) -> np.ndarray:
        if self.raw is not None:
            return codec.decode_raw(self.raw, self.datatype, self.shape, self.name)
        return decode_json_data(self.data, self.datatype, self.shape, self.name)


def _decode_inputs(inputs: list[_Input]) -> dict[str, np.ndarray]:
    return {i.name: i.decode() for i in inputs}


_is_count = rules.is_count


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary part of an inference body."""
    if header_length is None:
        return json_object(body, "inference request"), memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidArgument(f"{HEADER_LENGTH} must be a byte count, got {header_length!r}") from None
    if not 0 <= length <= len(body):
        raise InvalidArgument(f"{HEADER_LENGTH} is {length} but the body holds {len(body)} bytes")
    return json_object(body[:length], "inference request header"), memoryview(body)[length:]


@dataclass(frozen=True)
class OutputForm:
    """How the answer carries each output: binary for those asked for with `binary_data` (or all, `binary_data_output`)."""

    binary: frozenset[str]
    all_binary: bool

    def is_binary(self, name: str) -> bool:
        return self.all_binary or name in self.binary


def infer_request(model: str, version: str, body: bytes, header_length: str | None) -> tuple[InferRequest, OutputForm]:
    """The request as the data plane takes it; its framing is checked now, its tensors once it is routed."""
    request, binary = split_body(body, header_length)
    inputs, offset = [], 0
    raw_inputs = field_of(request, "inputs", list, "the inference request")
    shm_inputs: dict[str, ShmInput] = {}
    seen: set[str] = set()
    for index, item in enumerate(raw_inputs):
        where = f"input {index}"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{where} must be a JSON object")
        name = field_of(item, "name", str, where)
        if not name:  # the codec's rules for gRPC's inputs
            raise codec.unnamed_input(index)
        if name in seen:
            raise codec.repeated_input(name)
        seen.add(name)
        where = rules.input_where(name)
        shape = field_of(item, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"{where}: 'shape' must be a list of integers, got {shape}")
        datatype = field_of(item, "datatype", str, where)
        params = _parameters(item, where)
        size, ref = params.get("binary_data_size"), rules.shm_ref(where, params)
        # Triton's rule: a tensor's values come one way only (JSON, binary part or shared memory).
        given = [
            w for w, on in (("'data'", "data" in item), ("'binary_data_size'", size is not None), ("'shared_memory_region'", ref)) if on
        ]
        if not given:
            raise InvalidArgument(f"{where} has neither 'data' nor a 'binary_data_size' or 'shared_memory_region' parameter")
        if len(given) > 1:
            raise InvalidArgument(f"{where} sets {' and '.join(given)}: send its values one way only")
        if ref is not None:
            shm_inputs[name] = ShmInput(ref, datatype, tuple(shape))
            continue
        if size is None:
            inputs.append(_Input(name, datatype, shape, data=item["data"]))
            continue
        if not _is_count(size):
            raise InvalidArgument(f"{where}: 'binary_data_size' must be a byte count, got {size!r}")
        if offset + size > len(binary):
            raise InvalidArgument(
                f"{where}: binary_data_size {size} at offset {offset} runs past the {len(binary)} bytes after the JSON header"
            )
        inputs.append(_Input(name, datatype, shape, raw=binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise InvalidArgument(f"the inputs' binary_data_size add up to {offset} bytes but {len(binary)} follow the JSON header")
    outputs, binary_outputs = [], set()
    classification: dict[str, int] = {}
    shm_outputs: dict[str, ShmRef] = {}
    for index, item in enumerate(field_of(request, "outputs", list, "the inference request", [])):
        if not isinstance(item, dict):
            raise InvalidArgument(f"requested output {index} must be a JSON object")
        name = field_of(item, "name", str, f"requested output {index}")
        where = rules.output_where(name)
        outputs.append(name)
        params = _parameters(item, where)
        count, ref = params.get("classification"), rules.shm_ref(where, params)
        if count is not None:
            classification[name] = rules.class_count(where, count)
        rules.output_choice(where, count, ref, params.get("binary_data") is True)
        if ref is not None:
            shm_outputs[name] = ref
        elif params.get("binary_data") is True:
            binary_outputs.add(name)
    parameters = _parameters(request, "the inference request")
    request_id = field_of(request, "id", str, "the inference request", "")
    infer = InferRequest(
        model=model,
        version=version,
        id=request_id,
        decode_inputs=partial(_decode_inputs, inputs),
        outputs=outputs or None,
        parameters=parameters or None,
        classification=classification or None,
        shm_inputs=shm_inputs or None,
        shm_outputs=shm_outputs or None,
    )
    return infer, OutputForm(frozenset(binary_outputs), parameters.get("binary_data_output") is True)


# ------------------------------------------------------------------ answers


def _json_data(name: str, array: np.ndarray, datatype: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype != "BYTES":
        return flat.tolist()
    try:
        return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in flat]
    except UnicodeDecodeError:
        raise InvalidArgument(f"output '{name}' holds bytes that are not UTF-8; ask for it with binary_data") from None


def infer_response(result: InferResult, form: OutputForm) -> tuple[bytes, dict[str, str]]:
    """The answer's body and headers: JSON alone, or a JSON header followed by the binary outputs."""
    outputs, parts = [], []
    for name, array in result.outputs.items():
        datatype = result.specs[name].datatype
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in result.in_shared_memory:  # written to its region: described, without data (as Triton answers)
            outputs.append(entry)
            continue
        if form.is_binary(name):
            raw = codec.encode_raw(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = _json_data(name, array, datatype)
        outputs.append(entry)
    answer = {"model_name": result.model, "model_version": result.variant, "id": result.request_id, "outputs": outputs}
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not parts:
        return header, {"Content-Type": JSON_TYPE}
    return b"".join((header, *parts)), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}


# ------------------------------------------------------------------ metadata and the repository


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def model_metadata(meta: ModelMetadata) -> dict[str, Any]:
    return {
        "name": meta.name,
        "versions": meta.versions,
        "platform": platform_of(meta.runtime),
        "inputs": [tensor_metadata(s) for s in meta.inputs],
        "outputs": [tensor_metadata(s) for s in meta.outputs],
    }


def repository_index(entries: list[IndexEntry]) -> list[dict[str, Any]]:
    """Each variant by its integer version, as Triton lists versions (and as RepositoryIndex over gRPC does)."""
    return [
        {
            "name": e.model,
            "version": str(e.version) if e.version else "",
            "state": "READY" if e.ready else "UNAVAILABLE",
            "reason": e.reason,
        }
        for e in entries
    ]


def index_request(body: bytes) -> bool:
    """`{"ready": true}` lists only what serves."""
    ready = field_of(json_object(body, "repository index request"), "ready", bool, "the repository index request", False)
    return ready


def unload_request(body: bytes) -> dict[str, Any]:
    """The parameters of an unload request (checked, as plain values; `unload_dependents` has no dependents to act on)."""
    return _parameters(json_object(body, "repository request"), "the repository request")


def load_request(body: bytes) -> tuple[str | None, dict[str, bytes]]:
    """A load's `config` (Triton's ModelConfig as JSON text) and its `file:` parameters (base64 in JSON), as
    server/converters_triton.load_parameters reads them over gRPC; any other parameter is refused."""
    config, files = None, {}
    for key, value in _parameters(json_object(body, "repository request"), "the repository request").items():
        if key == "config":
            if not isinstance(value, str):
                raise InvalidArgument(
                    f"load parameter 'config' must be a string (the model configuration as JSON), got {type(value).__name__}"
                )
            config = value
        elif key.startswith("file:"):
            try:
                files[key] = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
            except ValueError:
                raise InvalidArgument(f"load parameter {key!r} must be the file's content in base64") from None
        else:
            raise InvalidArgument(f"load parameter {key!r} is not supported (supported: config)")
    return config, files
