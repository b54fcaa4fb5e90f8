"""The side files an ONNX model names (its weights' `external_data` locations), read without onnx.

torch.onnx.export writes the weights beside the model (`model.onnx.data`) by default; `slimctl register` uploads
those files with it. The SDK installs without onnx, so this reads the few protobuf fields it needs off the wire:
ModelProto.graph (7) → GraphProto.initializer (5) and node (1) → NodeProto.attribute (5) → AttributeProto.t (5),
g (6), tensors (10), graphs (11); TensorProto.external_data (13) → StringStringEntryProto key (1), value (2).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class NotOnnx(ValueError):
    """The bytes do not parse as protobuf: the server names the problem when it checks the upload."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise NotOnnx("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise NotOnnx("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview | None]]:
    """(field number, bytes of a length-delimited field or None) for each field of one message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(buf, pos)
            yield number, None
        elif wire == _I64:
            pos += 8
            yield number, None
        elif wire == _I32:
            pos += 4
            yield number, None
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise NotOnnx("truncated field")
            yield number, buf[pos : pos + length]
            pos += length
        else:
            raise NotOnnx(f"wire type {wire}")


def _tensor_location(tensor: memoryview) -> str | None:
    for number, entry in _fields(tensor):
        if number == 13 and entry is not None:  # external_data
            kv = {n: bytes(v).decode() for n, v in _fields(entry) if v is not None}
            if kv.get(1) == "location":
                return kv.get(2, "")
    return None


def _graph_locations(graph: memoryview) -> Iterator[str]:
    for number, value in _fields(graph):
        if value is None:
            continue
        if number == 5:  # initializer
            location = _tensor_location(value)
            if location is not None:
                yield location
        elif number == 1:  # node
            for n, attribute in _fields(value):
                if n == 5 and attribute is not None:
                    yield from _attribute_locations(attribute)


def _attribute_locations(attribute: memoryview) -> Iterator[str]:
    for number, value in _fields(attribute):
        if value is None:
            continue
        if number in (5, 10):  # t, tensors
            location = _tensor_location(value)
            if location is not None:
                yield location
        elif number in (6, 11):  # g, graphs
            yield from _graph_locations(value)


def side_files(model: Path) -> list[str]:
    """The side files (relative to the model's folder) an ONNX model keeps weights in, in first-use order; [] for none."""
    data = memoryview(model.read_bytes())
    found: list[str] = []
    try:
        for number, value in _fields(data):
            if number == 7 and value is not None:  # graph
                found.extend(_graph_locations(value))
    except NotOnnx:
        return []  # not ONNX at all: the server's check says so in its own words
    return list(dict.fromkeys(found))


def side_file_path(model: Path, location: str) -> Path:
    """Where a side file lies: relative to the model's folder, never outside it."""
    pure = PurePosixPath(location)
    if not location or pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"'{model.name}' names its weights file '{location}', outside the model's folder; re-export the model")
    return model.parent / pure
