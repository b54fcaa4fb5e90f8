"""Protobuf <-> domain mapping of Triton's extensions over gRPC: model configuration, statistics, shared memory,
logging, and the model repository's index and load parameters (server/http/extensions.py writes the same messages as JSON)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, text_format

from slimserve.protos import inference_pb2 as pb
from slimserve.protos import model_config_pb2 as mpb
from slimserve.server.errors import InvalidArgument
from slimserve.server.inference.dataplane import VersionStatistics
from slimserve.server.inference.model_config import ModelConfigView
from slimserve.server.inference.shared_memory import RegionStatus
from slimserve.server.management.control import IndexEntry


def parse_config_pbtxt(text: str, path: str) -> dict[str, Any]:
    """A Triton `config.pbtxt`, parsed with Triton's own ModelConfig message, as its JSON form (field names as in the
    proto, int64 as strings, enums by name, defaults left out: what a RepositoryModelLoad `config` carries).

    A file that does not parse is INVALID_ARGUMENT naming the file, line and column and the field protobuf stopped at."""
    config = mpb.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        line, column = e.GetLine(), e.GetColumn()
        where = f"{path}:{line}:{column}" if line is not None else path
        reason = str(e).split(" : ", 1)[-1]
        raise InvalidArgument(f"{where}: {reason} (Triton's ModelConfig text format)") from None
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def _data_type(datatype: str) -> int:
    return mpb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def model_config(view: ModelConfigView) -> pb.ModelConfigResponse:
    config = mpb.ModelConfig(
        name=view.name,
        platform=view.platform,
        backend=view.backend,
        max_batch_size=view.max_batch_size,
        input=[
            mpb.ModelInput(
                name=s.name,
                data_type=_data_type(s.datatype),
                format=mpb.ModelInput.Format.Value(view.formats.get(s.name, "FORMAT_NONE")),
                dims=list(s.shape),
            )
            for s in view.inputs
        ],
        output=[
            mpb.ModelOutput(
                name=s.name, data_type=_data_type(s.datatype), dims=list(s.shape), label_filename=view.label_files.get(s.name, "")
            )
            for s in view.outputs
        ],
        instance_group=[
            mpb.ModelInstanceGroup(
                name=f"{view.name}_{view.version}",
                kind=mpb.ModelInstanceGroup.Kind.Value(f"KIND_{view.instance_kind}"),
                count=view.instance_count,
            )
        ],
        default_model_filename=view.default_model_filename,
    )
    for key, value in view.parameters.items():
        config.parameters[key].string_value = value
    config.parameters["slimserve_variant"].string_value = view.variant
    config.parameters["slimserve_version"].string_value = str(view.version)
    if view.batching is not None:
        config.dynamic_batching.preferred_batch_size.extend(view.batching.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = round(view.batching.max_queue_delay_ms * 1000)
    return pb.ModelConfigResponse(config=config)


def model_statistics(rows: list[VersionStatistics]) -> pb.ModelStatisticsResponse:
    response = pb.ModelStatisticsResponse()
    for row in rows:
        st = row.stats
        entry = response.model_stats.add(
            name=row.model,
            version=str(row.version),
            last_inference=st.last_inference_ms,
            inference_count=st.samples,
            execution_count=st.batches,
        )
        infer = entry.inference_stats
        infer.success.count, infer.success.ns = st.requests - st.errors, st.success_ns
        infer.fail.count, infer.fail.ns = st.errors, st.fail_ns
        infer.queue.count, infer.queue.ns = st.queued, st.queue_ns
        infer.compute_infer.count, infer.compute_infer.ns = st.queued, st.infer_ns
        # Inputs are decoded and outputs encoded outside the model call, on the request's own path:
        # counted with the requests that computed, no time of their own.
        infer.compute_input.count = infer.compute_output.count = st.queued
        for size in sorted(st.batch_sizes):
            calls, ns = st.batch_sizes[size]
            batch = entry.batch_stats.add(batch_size=size)
            batch.compute_infer.count, batch.compute_infer.ns = calls, ns
            batch.compute_input.count = batch.compute_output.count = calls
    return response


def shared_memory_status(regions: list[RegionStatus]) -> pb.SystemSharedMemoryStatusResponse:
    response = pb.SystemSharedMemoryStatusResponse()
    for r in regions:
        response.regions[r.name].CopyFrom(
            pb.SystemSharedMemoryStatusResponse.RegionStatus(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
        )
    return response


def load_parameters(request: pb.RepositoryModelLoadRequest) -> tuple[str | None, dict[str, bytes]]:
    """A load's `config` (JSON text) and its `file:` parameters by name; any other parameter is refused."""
    config, files = None, {}
    for key, value in request.parameters.items():
        if key == "config":
            if value.WhichOneof("parameter_choice") != "string_param":
                raise InvalidArgument("load parameter 'config' must be a string (the model configuration as JSON)")
            config = value.string_param
        elif key.startswith("file:"):
            files[key] = value.bytes_param
        else:
            raise InvalidArgument(f"load parameter {key!r} is not supported (supported: config)")
    return config, files


def log_settings_values(request: pb.LogSettingsRequest) -> dict[str, Any]:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in request.settings.items() if v.WhichOneof("parameter_choice")}


def log_settings(settings: dict[str, Any]) -> pb.LogSettingsResponse:
    response = pb.LogSettingsResponse()
    for key, value in settings.items():
        slot = response.settings[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.uint32_param = value
        else:
            slot.string_param = str(value)
    return response


def trace_settings_values(request: pb.TraceSettingRequest) -> dict[str, Any]:
    """The settings to change: a setting with no value goes back to the server's (None); server/telemetry/tracing.py checks them."""
    return {
        k: (list(v.value) if k == "trace_level" else (v.value[0] if len(v.value) == 1 else list(v.value)) or None)
        for k, v in request.settings.items()
    }


def trace_settings(settings: dict[str, Any]) -> pb.TraceSettingResponse:
    response = pb.TraceSettingResponse()
    for key, value in settings.items():
        response.settings[key].value.extend(value if isinstance(value, list) else [str(value)])
    return response


def repository_index(entries: list[IndexEntry]) -> pb.RepositoryIndexResponse:
    response = pb.RepositoryIndexResponse()
    for e in entries:
        response.models.add(
            name=e.model, version=str(e.version) if e.version else "", state="READY" if e.ready else "UNAVAILABLE", reason=e.reason
        )
    return response


# The repository and shared-memory calls that succeed answer an empty message of their own type.


def model_loaded() -> pb.RepositoryModelLoadResponse:
    return pb.RepositoryModelLoadResponse()


def model_unloaded() -> pb.RepositoryModelUnloadResponse:
    return pb.RepositoryModelUnloadResponse()


def shared_memory_registered() -> pb.SystemSharedMemoryRegisterResponse:
    return pb.SystemSharedMemoryRegisterResponse()


def shared_memory_unregistered() -> pb.SystemSharedMemoryUnregisterResponse:
    return pb.SystemSharedMemoryUnregisterResponse()


def cuda_shared_memory_status() -> pb.CudaSharedMemoryStatusResponse:
    """No CUDA region is ever registered: the status lists none."""
    return pb.CudaSharedMemoryStatusResponse()


def cuda_shared_memory_registered() -> pb.CudaSharedMemoryRegisterResponse:
    return pb.CudaSharedMemoryRegisterResponse()


def cuda_shared_memory_unregistered() -> pb.CudaSharedMemoryUnregisterResponse:
    return pb.CudaSharedMemoryUnregisterResponse()
