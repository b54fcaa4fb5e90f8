"""Tensor codec between numpy arrays and Open Inference Protocol tensors (raw bytes or typed contents)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from math import prod
from typing import Any

import numpy as np

from slimserve.client.datatypes import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE

# Which InferTensorContents field carries each datatype; FP16 has none and must travel raw.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class TensorCodecError(ValueError):
    """A tensor whose datatype, shape and data disagree; the message names the tensor."""


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of a numpy array (str / bytes / object arrays are BYTES)."""
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return NUMPY_TO_DATATYPE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise TensorCodecError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype") from None


def numpy_dtype(datatype: str, name: str = "") -> np.dtype:
    try:
        return DATATYPE_TO_NUMPY[datatype]
    except KeyError:
        where = f"tensor '{name}': " if name else ""
        known = ", ".join(DATATYPE_TO_NUMPY)
        raise TensorCodecError(f"{where}unknown datatype '{datatype}' (known: {known})") from None


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor to its raw form: each element as a 4-byte little-endian length, then the bytes."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(raw: bytes, count: int, name: str = "") -> np.ndarray:
    if count * 4 > len(raw):  # checked before allocating: a forged shape must not size the array
        raise TensorCodecError(
            f"tensor '{name}': {len(raw)} bytes of raw BYTES data cannot hold {count} elements (each takes at least 4 bytes)"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise TensorCodecError(f"tensor '{name}': raw BYTES data ends after {i} of {count} elements")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise TensorCodecError(f"tensor '{name}': BYTES element {i} claims {length} bytes past the end of the data")
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise TensorCodecError(f"tensor '{name}': {len(view) - offset} trailing bytes after {count} BYTES elements")
    return out


MAX_RANK = 64  # numpy's limit on dimensions
MAX_EXTENT = 2**59  # numpy refuses shapes whose non-zero dims multiply past 2**63 bytes, even holding no element


def element_count(shape: Sequence[int], name: str = "") -> int:
    if len(shape) > MAX_RANK:
        raise TensorCodecError(f"tensor '{name}': shape has {len(shape)} dimensions; at most {MAX_RANK} are supported")
    if shape and min(shape) > 0:  # every extent positive, as nearly always: the count is the extent, in C
        count = prod(shape)
        if count <= MAX_EXTENT:
            return count
    count = extent = 1
    for dim in shape:
        if dim < 0:
            raise TensorCodecError(f"tensor '{name}': shape {list(shape)} has a negative dimension")
        count *= dim
        extent *= max(dim, 1)
    if extent > MAX_EXTENT:
        raise TensorCodecError(f"tensor '{name}': shape {list(shape)} is too large for any tensor")
    return count


def decode_raw(raw: bytes, datatype: str, shape: Sequence[int], name: str = "") -> np.ndarray:
    """Raw little-endian bytes to an array, without a copy for numeric types (read-only view)."""
    dtype = DATATYPE_TO_NUMPY.get(datatype)
    if dtype is None:
        dtype = numpy_dtype(datatype, name)  # raises, naming the datatypes there are
    count = element_count(shape, name)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, name).reshape(shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TensorCodecError(f"tensor '{name}': {datatype} {list(shape)} needs {expected} bytes of raw data, got {len(raw)}")
    return np.frombuffer(raw, dtype).reshape(shape)


def unnamed_input(index: int) -> TensorCodecError:
    """An input without a name (gRPC's and REST's rule alike; the caller tests, as with `count_error`)."""
    return TensorCodecError(f"input #{index} has no name")


def repeated_input(name: str) -> TensorCodecError:
    """An input named twice in one request (gRPC's and REST's rule alike)."""
    return TensorCodecError(f"input '{name}' appears twice in the request")


def count_error(count: int, given: int, shape: Sequence[int], name: str, field: str) -> TensorCodecError:
    """A typed tensor's rule, for gRPC's typed contents and REST's JSON `data` alike: as many values as its shape holds
    (the comparison stays with the caller: a call on every request costs more than the rule)."""
    return TensorCodecError(f"tensor '{name}': shape {list(shape)} needs {count} values, got {given} in {field}")


def narrowed(values: np.ndarray, datatype: str, dtype: np.dtype, shape: Sequence[int], name: str, field: str) -> np.ndarray:
    """Typed integer values (read wider: int64) as `datatype`, refused when one does not fit; for gRPC's typed contents
    (INT8 / INT16 / UINT8 / UINT16 travel in int_contents / uint_contents) and REST's JSON `data` (every integer type)."""
    if values.size and values.dtype is not dtype:  # (numpy's builtin dtypes are singletons; when not, the check just runs)
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise TensorCodecError(f"tensor '{name}': a value in {field} is out of range for {datatype}")
    return values.astype(dtype).reshape(shape)


def decode_contents(contents: Any, datatype: str, shape: Sequence[int], name: str = "") -> np.ndarray:
    """Typed InferTensorContents to an array (its count and range rules shared with REST's JSON `data`)."""
    dtype = numpy_dtype(datatype, name)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorCodecError(f"tensor '{name}': {datatype} has no typed contents field; send it in raw_input_contents")
    values = getattr(contents, field)
    count = element_count(shape, name)
    if len(values) != count:
        raise count_error(count, len(values), shape, name, field)
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    if datatype in ("INT8", "INT16", "UINT8", "UINT16"):
        return narrowed(np.asarray(values, dtype=np.int64), datatype, dtype, shape, name, field)
    return np.asarray(values, dtype=dtype).reshape(shape)


def encode_contents(array: np.ndarray, contents: Any, datatype: str, name: str = "") -> None:
    """Fills typed InferTensorContents from an array."""
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorCodecError(f"tensor '{name}': {datatype} cannot travel as typed contents; ask for raw output")
    flat = array.reshape(-1)
    if datatype == "BYTES":
        getattr(contents, field).extend(x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in flat)
    else:
        getattr(contents, field).extend(flat.tolist())


def encode_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(array)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if array.dtype == dtype:  # tobytes writes C order whatever the layout: no contiguous copy first
        return array.tobytes()
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


# ------------------------------------------------------------------ whole messages


def parameter_value(param: Any) -> Any:
    """The Python value of an InferParameter / ModelRepositoryParameter (None if unset)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def set_parameter(param: Any, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def decode_request_inputs(request: Any) -> dict[str, np.ndarray]:
    """A ModelInferRequest's inputs as arrays, from raw_input_contents or typed contents."""
    raw = request.raw_input_contents
    inputs = request.inputs
    has_raw = len(raw) > 0  # read once: each truth test of a protobuf repeated field is a call into it
    if has_raw:  # Triton's rule and message, checked before the entry count as Triton does
        for tensor in inputs:
            if tensor.HasField("contents"):
                raise TensorCodecError(
                    f"contents field must not be specified when using raw_input_contents for '{tensor.name}' "
                    f"for model '{request.model_name}'"
                )
    if has_raw and len(raw) != len(inputs):
        raise TensorCodecError(
            f"request has {len(inputs)} inputs but {len(raw)} raw_input_contents entries; "
            "send one raw entry per input, or use typed contents for all"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        name = tensor.name
        if not name:
            raise unnamed_input(i)
        if name in arrays:
            raise repeated_input(name)
        shape = tensor.shape[:]  # a list; slicing protobuf's repeated field is cheaper than list() of it
        if has_raw:
            arrays[name] = decode_raw(raw[i], tensor.datatype, shape, name)
        else:
            arrays[name] = decode_contents(tensor.contents, tensor.datatype, shape, name)
    return arrays


def decode_response_outputs(response: Any) -> dict[str, np.ndarray]:
    raw = response.raw_output_contents
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if i < len(raw):
            out[tensor.name] = decode_raw(raw[i], tensor.datatype, shape, tensor.name)
        else:
            out[tensor.name] = decode_contents(tensor.contents, tensor.datatype, shape, tensor.name)
    return out


def fill_input(request: Any, name: str, array: np.ndarray, raw: bool = True) -> None:
    """Adds one input tensor to a ModelInferRequest."""
    array = np.asarray(array)
    datatype = datatype_of(array)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    if raw:
        request.raw_input_contents.append(encode_raw(array, datatype))
    else:
        encode_contents(array, tensor.contents, datatype, name)


def fill_output(response: Any, name: str, array: np.ndarray, raw: bool, datatype: str | None = None) -> None:
    """Adds one output tensor to a ModelInferResponse; raw keeps output order aligned with outputs."""
    datatype = datatype or datatype_of(array)
    tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
    if raw:
        response.raw_output_contents.append(encode_raw(array, datatype))
    else:
        encode_contents(array, tensor.contents, datatype, name)
