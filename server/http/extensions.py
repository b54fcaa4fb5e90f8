"""Triton's extensions over REST: ModelConfig and ModelStatistics as Triton's JSON, system shared memory and log settings.

The JSON twins of what server/grpc/triton_converters.py builds for gRPC: ModelConfig and ModelStatistics are built by the
same converters and written as Triton's REST port writes protobuf (proto field names, numbers as numbers).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from slimserve.protos import inference_pb2 as pb
from slimserve.server.grpc import triton_converters as converters_triton
from slimserve.server.http.codec import field_of, json_object
from slimserve.server.inference.dataplane import VersionStatistics
from slimserve.server.inference.model_config import ModelConfigView
from slimserve.server.inference.shared_memory import RegionStatus


def _json_ints(value: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    """protobuf's JSON writes 64-bit integers as strings; Triton's REST answers (and its clients) have numbers."""
    for field in descriptor.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            if entry.message_type is not None:
                for v in item.values():
                    _json_ints(v, entry.message_type)
        elif field.message_type is not None:
            for v in item if field.is_repeated else [item]:
                _json_ints(v, field.message_type)
        elif field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
            value[field.name] = [int(v) for v in item] if field.is_repeated else int(item)
    return value


def _proto_json(message: Message) -> dict[str, Any]:
    """A message as Triton's REST port writes it: proto field names, fields at their defaults included, numbers as numbers."""
    as_dict = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _json_ints(as_dict, message.DESCRIPTOR)


def model_config(view: ModelConfigView) -> dict[str, Any]:
    """The ModelConfig itself (not wrapped in a response), built by the same converter as gRPC's."""
    return _proto_json(converters_triton.model_config(view).config)


# Triton writes every duration of InferStatistics, zeros included (perf_analyzer reads cache_hit / cache_miss too).
_DURATIONS = tuple(f.name for f in pb.InferStatistics.DESCRIPTOR.fields)


def statistics(rows: list[VersionStatistics]) -> dict[str, Any]:
    answer = _proto_json(converters_triton.model_statistics(rows))
    for entry in answer.get("model_stats", []):
        durations = entry.setdefault("inference_stats", {})
        for name in _DURATIONS:
            durations.setdefault(name, {"count": 0, "ns": 0})
    return answer


def shared_memory_status(regions: list[RegionStatus]) -> list[dict[str, Any]]:
    """Triton's REST form: a list of regions (gRPC's is a map by name)."""
    return [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in regions]


def register_request(body: bytes) -> tuple[str, int, int]:
    """`{"key", "offset", "byte_size"}` of a system shared-memory registration."""
    request, where = json_object(body, "register request"), "the register request"
    key, offset, size = (
        field_of(request, "key", str, where),
        field_of(request, "offset", int, where, 0),
        field_of(request, "byte_size", int, where),
    )
    return key, offset, size


def log_settings_request(body: bytes) -> dict[str, Any]:
    """The settings to change, as plain values (server/telemetry/log_settings.py checks names and types)."""
    return json_object(body, "log settings request")
