"""Protobuf <-> domain mapping for every servicer; the only module of the server that builds messages."""

from __future__ import annotations

import json
from typing import Any

from client import codec
from protos import inference_pb2 as pb
from protos import slimserve_pb2 as spb
from server.dataplane import InferResult
from server.registry import UploadFile, UploadHeader
from server.repository import ModelInfo, VariantInfo
from server.routing import TrafficPolicy
from server.runtimes import TensorSpec

# Evaluation fields copied into VariantRecord; the rest travel in evaluation_json.
EVALUATION_FIELDS = (
    "params",
    "nonzero_params",
    "flops",
    "latency_p50_ms",
    "latency_p99_ms",
    "throughput",
    "accuracy",
    "accuracy_delta",
)
PLATFORM_OF_RUNTIME = {
    "onnxruntime": "onnxruntime_onnx",
    "torch": "pytorch_torchexport",
    "torch-compile": "pytorch_torchexport_compiled",
    "xla": "pytorch_torchexport_xla",
}


def tensor_spec(spec: TensorSpec) -> spb.TensorSpec:
    return spb.TensorSpec(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def variant_record(v: VariantInfo) -> spb.VariantRecord:
    record = spb.VariantRecord(
        name=v.name,
        recipe=v.recipe,
        parent=v.parent,
        runtime=v.runtime,
        status=v.status,
        message=v.message,
        format=v.format,
        created_at=v.created_at,
        size_bytes=v.size_bytes,
        evaluation_json=json.dumps(v.evaluation, sort_keys=True),
    )
    for name in EVALUATION_FIELDS:
        value = v.evaluation.get(name)
        if value is not None:
            setattr(record, name, value)
    return record


def model_record(info: ModelInfo) -> spb.ModelRecord:
    return spb.ModelRecord(
        name=info.name,
        format=info.format,
        description=info.description,
        created_at=info.created_at,
        inputs=[tensor_spec(s) for s in info.inputs],
        outputs=[tensor_spec(s) for s in info.outputs],
        variants=[variant_record(v) for v in info.variants.values()],
        datasets=info.datasets,
        default_variant=info.default_variant,
        traffic=traffic_policy(info.name, info.traffic),
    )


def traffic_policy(model: str, policy: TrafficPolicy) -> spb.TrafficPolicy:
    return spb.TrafficPolicy(
        model=model,
        weights=policy.weights,
        shadows=list(policy.shadows),
        sticky_parameter=policy.sticky_parameter or "",
        can_rollback=policy.can_rollback,
    )


def upload_header(header: spb.RegisterHeader) -> UploadHeader:
    return UploadHeader(
        name=header.name,
        files=tuple(UploadFile(f.role, f.filename, f.size_bytes, f.sha256) for f in header.files),
        description=header.description,
    )


def wants_raw_output(request: pb.ModelInferRequest) -> bool:
    """Raw output when the request came raw (as Triton's clients send), unless a parameter says otherwise."""
    flag = request.parameters.get("binary_data_output")
    if flag is not None:
        value = codec.parameter_value(flag)
        if isinstance(value, bool):
            return value
    for output in request.outputs:
        value = codec.parameter_value(output.parameters["binary_data"]) if "binary_data" in output.parameters else None
        if isinstance(value, bool):
            return value
    return len(request.raw_input_contents) > 0


def infer_response(request: pb.ModelInferRequest, result: InferResult) -> pb.ModelInferResponse:
    # The id a client gave, or the one the server made up: feedback refers to the request by it.
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.variant, id=result.request_id)
    datatypes = {name: result.specs[name].datatype for name in result.outputs}
    # The protocol wants raw for all outputs or for none; FP16 has no typed field, so it forces raw.
    raw = wants_raw_output(request) or any(d not in codec.CONTENTS_FIELD for d in datatypes.values())
    for name, array in result.outputs.items():
        codec.fill_output(response, name, array, raw=raw, datatype=datatypes[name])
    return response


def tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def model_metadata(name: str, versions: list[str], runtime_name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Any:
    return pb.ModelMetadataResponse(
        name=name,
        versions=versions,
        platform=PLATFORM_OF_RUNTIME.get(runtime_name, runtime_name),
        inputs=[tensor_metadata(s) for s in inputs],
        outputs=[tensor_metadata(s) for s in outputs],
    )


def optimize_event(job_id: str, event: Any) -> spb.OptimizeEvent:
    from server.jobs import JobDone

    if isinstance(event, JobDone):
        done = spb.JobDone(variant=variant_record(event.variant), report_json=json.dumps(event.report))
        return spb.OptimizeEvent(job_id=job_id, done=done)
    progress = spb.JobProgress(stage=event.stage, fraction=event.fraction, message=event.message)
    for name in ("epoch", "loss", "accuracy"):
        value = getattr(event, name)
        if value is not None:
            setattr(progress, name, value)
    return spb.OptimizeEvent(job_id=job_id, progress=progress)


def job_record(model: str, job: dict[str, Any]) -> spb.JobRecord:
    return spb.JobRecord(
        id=job["id"], model=model, variant=job["variant"], recipe=job["recipe"], status=job["status"],
        message=job.get("message", ""), started_at=job.get("started_at", ""), finished_at=job.get("finished_at", ""),
    )


def compare_response(model: str, node_type: str, price_per_hour: float, rows: list[dict[str, Any]]) -> spb.CompareResponse:
    """Rows of server.stats.compare_rows as a CompareResponse; a None (no data yet) leaves the field unset."""
    response = spb.CompareResponse(model=model, node_type=node_type, price_per_hour=price_per_hour)
    for row in rows:
        row = dict(row)
        ci = row.pop("online_accuracy_ci", None)
        if ci is not None:
            row["online_accuracy_low"], row["online_accuracy_high"] = ci
        row["latency_verdict"] = row.get("latency_verdict") or ""
        row["accuracy_verdict"] = row.get("accuracy_verdict") or ""
        response.variants.add(**{k: v for k, v in row.items() if v is not None})
    return response
