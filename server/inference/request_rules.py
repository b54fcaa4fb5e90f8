"""The rules of an inference request that do not depend on its transport, in one place: gRPC (server/grpc/converters.py)
and REST (server/http/codec.py) decode into the same `InferRequest` through these, so that both answer a malformed
request with the same error kind and message (tests/server/test_request_parity.py sends each both ways).

Values arrive as plain Python values (a protobuf InferParameter already turned into its bool / int / str). The tensor
rules themselves (shapes, sizes, datatypes, raw bytes; a typed tensor's value count and integer range, `count_error` and
`narrowed`, for gRPC's typed contents and REST's JSON `data` alike) are client/codec.py's, shared the same way; Triton's
rule that a request's `raw_input_contents` and a tensor's typed `contents` never mix lives there
(`decode_request_inputs`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimserve.server.errors import InvalidArgument
from slimserve.server.inference.shared_memory import ShmRef

SHM_KEYS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")


def input_where(name: str) -> str:
    return f"input '{name}'"


def output_where(name: str) -> str:
    return f"requested output '{name}'"


def is_count(value: Any) -> bool:
    """A byte count or offset: an integer >= 0 (a bool is no integer)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shm_ref(where: str, params: Mapping[str, Any]) -> ShmRef | None:
    """A tensor's place in a registered region (Triton's shared_memory_* parameters), or None when it travels in the request."""
    if "shared_memory_region" not in params:
        return None
    region, size, offset = params["shared_memory_region"], params.get("shared_memory_byte_size"), params.get("shared_memory_offset", 0)
    if not isinstance(region, str) or not is_count(size) or not is_count(offset):
        raise InvalidArgument(
            f"{where}: shared memory needs 'shared_memory_region' (a string), 'shared_memory_byte_size' and "
            f"'shared_memory_offset' (byte counts), got {region!r}, {size!r}, {offset!r}"
        )
    return ShmRef(region, offset, size)


def class_count(where: str, value: Any) -> int:
    """Triton's classification parameter of a requested output (class_count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{where}: 'classification' (class_count) must be an integer, got {value!r}")
    return value


def output_choice(where: str, count: int | None, ref: ShmRef | None, binary: bool = False) -> None:
    """Triton's rule: a region holds the raw tensor, neither top-K strings (classification) nor a binary part."""
    if ref is not None and (count is not None or binary):
        raise InvalidArgument(f"{where}: 'shared_memory_region' cannot go with 'classification' or 'binary_data': true")


def check_parameters(where: str, params: Mapping[str, Any]) -> None:
    """Request and tensor parameters are strings, numbers or booleans (what InferParameter can carry)."""
    for key, value in params.items():
        if not isinstance(value, str | int | float | bool):
            raise InvalidArgument(f"{where}: parameter '{key}' must be a string, number or boolean, got {type(value).__name__}")
