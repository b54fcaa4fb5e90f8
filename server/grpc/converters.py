"""Protobuf <-> domain mapping for every servicer; with converters_triton.py (Triton's extensions), the only modules that build messages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Any

from slimserve.client import codec
from slimserve.optimizer.catalog import PassInfo
from slimserve.protos import inference_pb2 as pb
from slimserve.protos import slimserve_pb2 as spb
from slimserve.server.errors import InvalidArgument
from slimserve.server.inference import request_rules as rules
from slimserve.server.inference.dataplane import InferRequest, InferResult, ModelMetadata
from slimserve.server.inference.shared_memory import ShmInput
from slimserve.server.management.control import Comparison
from slimserve.server.management.jobs import JobDone, JobRequest
from slimserve.server.rollout.plan import RolloutPlan, plan_from_json
from slimserve.server.rollout.state import RolloutState
from slimserve.server.runtimes import TensorSpec, platform_of
from slimserve.server.store.manifest import ModelInfo, VariantInfo
from slimserve.server.store.traffic import TrafficPolicy
from slimserve.server.store.upload import UploadFile, UploadHeader
from slimserve.server.telemetry.statistics import FeedbackResult

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


def server_live(live: bool) -> pb.ServerLiveResponse:
    return pb.ServerLiveResponse(live=live)


def server_ready(ready: bool) -> pb.ServerReadyResponse:
    return pb.ServerReadyResponse(ready=ready)


def model_ready(ready: bool) -> pb.ModelReadyResponse:
    return pb.ModelReadyResponse(ready=ready)


def server_metadata(name: str, version: str, extensions: list[str]) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)


def model_deleted() -> spb.DeleteModelResponse:
    return spb.DeleteModelResponse()


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


def model_list(infos: list[ModelInfo]) -> spb.ListModelsResponse:
    return spb.ListModelsResponse(models=[model_record(i) for i in infos])


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
        quality=tuple(header.quality),
        evaluator=header.evaluator,
        config_json=header.config_json,
        sequence=(
            {"inputs": list(header.sequence_inputs), "mask": header.attention_mask or "attention_mask"} if header.sequence_inputs else None
        ),
    )


async def upload(messages: AsyncIterator[spb.RegisterRequest]) -> tuple[UploadHeader, AsyncIterator[tuple[int, bytes]]]:
    """A Register stream as its header and its (file index, bytes) chunks, read as the receiver asks for them."""
    first = await anext(aiter(messages), None)
    if first is None or first.WhichOneof("payload") != "header":
        raise InvalidArgument("a Register stream starts with a RegisterHeader message")

    async def chunks() -> AsyncIterator[tuple[int, bytes]]:
        async for message in messages:
            if message.WhichOneof("payload") != "chunk":
                raise InvalidArgument("only FileChunk messages may follow the RegisterHeader")
            yield message.chunk.file_index, message.chunk.data

    return upload_header(first.header), chunks()


def job_request(request: spb.OptimizeRequest) -> JobRequest:
    return JobRequest(
        model=request.model,
        recipe=request.recipe,
        recipe_json=request.recipe_json,
        variant_name=request.variant_name,
        accuracy_budget=request.accuracy_budget if request.HasField("accuracy_budget") else None,
        parent=request.parent,
        keep_over_budget=request.keep_over_budget,
        quality=tuple(request.quality),
        evaluator=request.evaluator,
    )


def _plain(parameters: Any) -> dict[str, Any]:
    """A tensor's InferParameter map as plain values (request_rules checks them as REST's JSON ones)."""
    return {k: codec.parameter_value(v) for k, v in parameters.items()}


def infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """The request as the data plane takes it: parameters as plain values, tensors decoded once it is routed.

    Per-tensor parameters (shared memory, classification) are looked at only where a tensor has any:
    each protobuf field read costs a fraction of a microsecond, and most requests carry none."""
    inputs = request.inputs
    shm_inputs = None
    for tensor in inputs:
        if tensor.parameters:
            ref = rules.shm_ref(rules.input_where(tensor.name), _plain(tensor.parameters))
            if ref is not None:
                shm_inputs = shm_inputs or {}
                shm_inputs[tensor.name] = ShmInput(ref, tensor.datatype, tuple(tensor.shape))
    decode = partial(codec.decode_request_inputs, request)
    if shm_inputs:  # the others alone, with their raw entries (a shared-memory input has none)
        rest = pb.ModelInferRequest(
            model_name=request.model_name,
            inputs=[t for t in inputs if t.name not in shm_inputs],
            raw_input_contents=request.raw_input_contents,
        )
        decode = partial(codec.decode_request_inputs, rest)
    outputs = request.outputs
    names = classification = shm_outputs = None
    if outputs:
        names = [o.name for o in outputs]
        for output in outputs:
            if not output.parameters:
                continue
            params, where = _plain(output.parameters), rules.output_where(output.name)
            count = params.get("classification")
            if count is not None:
                classification = classification or {}
                classification[output.name] = rules.class_count(where, count)
            ref = rules.shm_ref(where, params)
            rules.output_choice(where, count, ref)
            if ref is not None:
                shm_outputs = shm_outputs or {}
                shm_outputs[output.name] = ref
    parameters = request.parameters
    return InferRequest(
        request.model_name,
        request.model_version,
        request.id,
        decode,
        names,
        {k: codec.parameter_value(v) for k, v in parameters.items()} if parameters else None,
        classification,
        shm_inputs,
        shm_outputs,
    )


def infer_response(result: InferResult) -> pb.ModelInferResponse:
    # The id a client gave, or the one the server made up: feedback refers to the request by it.
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.variant, id=result.request_id)
    # Every output in raw_output_contents, whatever the request used, as Triton answers: its C++ client indexes
    # raw_output_contents unconditionally and tritonclient's as_numpy decodes numeric outputs only from raw.
    in_shared_memory = result.in_shared_memory
    specs = result.specs
    for name, array in result.outputs.items():
        if in_shared_memory and name in in_shared_memory:  # written to the region: described, with an empty raw entry to keep the order
            response.outputs.add(name=name, datatype=specs[name].datatype, shape=list(array.shape))
            response.raw_output_contents.append(b"")
            continue
        codec.fill_output(response, name, array, raw=True, datatype=specs[name].datatype)
    return response


def tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def model_metadata(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=platform_of(meta.runtime),
        inputs=[tensor_metadata(s) for s in meta.inputs],
        outputs=[tensor_metadata(s) for s in meta.outputs],
    )


def optimize_event(job_id: str, event: Any) -> spb.OptimizeEvent:
    if isinstance(event, JobDone):
        done = spb.JobDone(variant=variant_record(event.variant), report_json=json.dumps(event.report))
        return spb.OptimizeEvent(job_id=job_id, done=done)
    progress = spb.JobProgress(stage=event.stage, fraction=event.fraction, message=event.message)
    for name in ("epoch", "loss", "accuracy"):
        value = getattr(event, name)
        if value is not None:
            setattr(progress, name, value)
    return spb.OptimizeEvent(job_id=job_id, progress=progress)


def feedback_response(result: FeedbackResult) -> spb.FeedbackResponse:
    return spb.FeedbackResponse(variant=result.variant, correct=result.correct, rows=result.rows, correct_rows=result.correct_rows)


def job_record(model: str, job: dict[str, Any]) -> spb.JobRecord:
    return spb.JobRecord(
        id=job["id"],
        model=model,
        variant=job["variant"],
        recipe=job["recipe"],
        status=job["status"],
        message=job.get("message", ""),
        started_at=job.get("started_at", ""),
        finished_at=job.get("finished_at", ""),
        progress=job.get("progress", 1.0 if job["status"] == "succeeded" else 0.0),
        stage=job.get("stage", ""),
        submitted_at=job.get("submitted_at", ""),
        paused_seconds=job.get("paused_seconds", 0.0),
    )


def job_list(jobs: list[tuple[str, dict[str, Any]]]) -> spb.ListJobsResponse:
    return spb.ListJobsResponse(jobs=[job_record(model, job) for model, job in jobs])


def pass_list(passes: list[PassInfo]) -> spb.ListPassesResponse:
    return spb.ListPassesResponse(
        passes=[
            spb.PassRecord(
                name=p.name,
                kind=p.kind,
                description=p.description,
                needs=list(p.needs),
                settings=[spb.PassSetting(name=s.name, type=s.type, default_json=s.default, description=s.description) for s in p.settings],
            )
            for p in passes
        ]
    )


def compare_response(comparison: Comparison) -> spb.CompareResponse:
    """Rows of slimserve.server.telemetry.statistics.compare_rows as a CompareResponse; a None (no data yet) leaves the field unset."""
    response = spb.CompareResponse(model=comparison.model, node_type=comparison.node_type, price_per_hour=comparison.price_per_hour)
    for row in comparison.rows:
        row = dict(row)
        ci = row.pop("online_accuracy_ci", None)
        if ci is not None:
            row["online_accuracy_low"], row["online_accuracy_high"] = ci
        row["latency_verdict"] = row.get("latency_verdict") or ""
        row["accuracy_verdict"] = row.get("accuracy_verdict") or ""
        response.variants.add(**{k: v for k, v in row.items() if v is not None})
    return response


def stream_answer(response: pb.ModelInferResponse) -> pb.ModelStreamInferResponse:
    """A stream's answer: one response per request, so each is its request's final one (Triton's
    `triton_final_response`, which clients of decoupled-style streams read until true)."""
    response.parameters["triton_final_response"].bool_param = True
    return pb.ModelStreamInferResponse(infer_response=response)


def stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A failed request of a stream: its error, and the request's model, version and id so the client can match it."""
    failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    failed.parameters["triton_final_response"].bool_param = True
    return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)


# ---------------------------------------------------------------------- rollout


def rollout_plan(request: spb.RolloutStartRequest) -> RolloutPlan:
    """The plan file's JSON with the request's overrides (steps, min_requests, max_stage_s, alpha) applied and checked."""
    plan = plan_from_json(request.plan_json)
    overrides: dict[str, Any] = {}
    if request.steps:
        overrides["steps"] = tuple(request.steps)
    for name in ("min_requests", "max_stage_s", "alpha"):
        if request.HasField(name):
            overrides[name] = getattr(request, name)
    return replace(plan, **overrides) if overrides else plan


def slo_status(s) -> spb.SloStatus:
    """A model's latency objective (server/rollout/slo_controller.SloState) as the SetSlo / GetSlo answer."""
    out = spb.SloStatus(
        model=s.model,
        p99_ms=s.p99_ms,
        max_drop_pt=s.max_drop_pt,
        state=s.state,
        message=s.message,
        warnings=list(s.warnings),
        eligible=list(s.eligible),
        weights=dict(s.weights),
        original=dict(s.original),
        cost_pt=s.cost_pt,
        drops=dict(s.drops),
    )
    for e in s.history:
        out.history.add(time=e["time"], kind=e["kind"], reason=e["reason"], weights=e["weights"], cost_pt=e["cost_pt"])
    return out


def rollout_status(r: RolloutState, slo=None) -> spb.RolloutStatus:
    """`slo`: the model's latency objective (SloState), if one is set: its shifts travel with the rollout's status."""
    record = r.record()
    out = spb.RolloutStatus(
        model=r.model,
        state=r.state,
        variant=r.variant,
        control=r.control,
        weight=r.weight,
        requests=record["requests"],
        reason=r.reason,
        source=r.source,
        started_at=record["started_at"],
        finished_at=record["finished_at"] or "",
        plan_json=json.dumps(record["plan"], sort_keys=True),
    )
    for g in r.gates:
        out.gates.add(
            name=g.name,
            decision=g.decision,
            threshold=g.threshold,
            evidence=g.evidence,
            **({"statistic": g.statistic} if g.statistic is not None else {}),
        )
    for e in record["history"]:
        optional = {k: e[k] for k in ("statistic", "threshold") if e[k] is not None}
        out.history.add(
            time=e["time"],
            kind=e["kind"],
            state=e["state"],
            weight=e["weight"],
            message=e["message"],
            gate=e["gate"],
            evidence=e["evidence"],
            **optional,
        )
    if slo is not None:
        out.slo.CopyFrom(slo_status(slo))
    return out
