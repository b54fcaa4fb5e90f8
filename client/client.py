"""A typed Python client for slimserve: registry calls, chunked uploads, inference with numpy arrays."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from slimserve.client import codec
from slimserve.client.onnx_files import side_file_path, side_files
from slimserve.client.records import comparison_dict, job_dict, model_dict, pass_dict, rollout_dict, slo_dict, traffic_dict, variant_dict
from slimserve.client.transport import (
    CHUNK_BYTES,
    SlimServeClientError,
    channel_credentials,
    load_model_config,
    load_recipe_file,
    sha256_of,
    with_default_port,
)
from slimserve.protos import inference_pb2 as pb
from slimserve.protos import inference_pb2_grpc as pb_grpc
from slimserve.protos import slimserve_pb2 as spb
from slimserve.protos import slimserve_pb2_grpc as spb_grpc

DEFAULT_SERVER = "127.0.0.1:8001"
Progress = Callable[[int, int], None]  # (bytes sent, bytes in all)


@dataclass(frozen=True)
class InferAnswer:
    variant: str
    outputs: dict[str, np.ndarray]
    request_id: str


@dataclass(frozen=True)
class RowsAnswer:
    """The answers to one array set sent in several requests: outputs joined along the batch dimension."""

    outputs: dict[str, np.ndarray]
    variants: list[str]  # per request, in order (routed traffic may answer from several variants)
    request_ids: list[str]


# Bytes of input per request when a file is sent in parts: well under gRPC's default 4 MiB and our 64 MiB limits,
# and small enough that the server batches the parts with other traffic.
ROWS_REQUEST_BYTES = 4 * 1024 * 1024


def split_rows(inputs: dict[str, np.ndarray], max_request_bytes: int, fixed_batch: int | None = None) -> list[slice]:
    """Row ranges that send `inputs` in requests of at most `max_request_bytes` (at least one row each).

    `fixed_batch`: the model's batch dimension when it is not free: every request then carries exactly that many rows.
    """
    counts = {name: (a.shape[0] if a.ndim else 1) for name, a in inputs.items()}
    if len(set(counts.values())) > 1:
        raise ValueError("inputs hold different numbers of rows: " + ", ".join(f"'{n}' {c}" for n, c in counts.items()))
    rows = next(iter(counts.values()), 0)
    if fixed_batch is not None:
        if fixed_batch <= 0 or rows % fixed_batch:
            raise ValueError(f"the model takes batches of exactly {fixed_batch} rows; the inputs hold {rows}")
        step = fixed_batch
    else:
        row_bytes = sum(a.nbytes // max(1, a.shape[0]) if a.ndim else a.nbytes for a in inputs.values())
        step = max(1, max_request_bytes // max(1, row_bytes))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)] or [slice(0, 0)]


class SlimServeClient:
    """Blocking client. Errors raise SlimServeClientError with the server's code and message."""

    def __init__(
        self,
        server: str | None = None,
        token: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        """TLS when any `tls_*` is given (or SLIMSERVE_TLS_CA / _CERT / _KEY is set): `tls_ca` is the CA that
        signed the server's certificate (the system's roots when None); `tls_cert` + `tls_key` are this
        client's certificate and key for servers that require mutual TLS."""
        self.server = with_default_port(server or os.environ.get("SLIMSERVE_SERVER") or DEFAULT_SERVER)
        token = token if token is not None else os.environ.get("SLIMSERVE_TOKEN")
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        credentials = channel_credentials(
            tls_ca if tls_ca is not None else os.environ.get("SLIMSERVE_TLS_CA"),
            tls_cert if tls_cert is not None else os.environ.get("SLIMSERVE_TLS_CERT"),
            tls_key if tls_key is not None else os.environ.get("SLIMSERVE_TLS_KEY"),
        )
        self.tls = credentials is not None
        if credentials is None:
            self.channel = grpc.insecure_channel(self.server, options=options)
        else:
            self.channel = grpc.secure_channel(self.server, credentials, options=options)
        self.inference = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.registry = spb_grpc.ModelRegistryStub(self.channel)
        self.optimizer = spb_grpc.OptimizerStub(self.channel)
        self.traffic_stub = spb_grpc.TrafficStub(self.channel)
        self.feedback_stub = spb_grpc.FeedbackStub(self.channel)
        self.experiments = spb_grpc.ExperimentsStub(self.channel)
        self.rollout_stub = spb_grpc.RolloutStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SlimServeClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = 60.0) -> Any:
        try:
            return method(request, metadata=self._auth, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()
            details = (e.details() or "").lower()
            if code == grpc.StatusCode.UNAVAILABLE and ("ssl" in details or "handshake" in details or "tls" in details):
                hint = "pass --tls-ca (the CA of the server's certificate) and, for mutual TLS, --tls-cert/--tls-key"
                raise SlimServeClientError("UNAVAILABLE", f"TLS with {self.server} failed: {hint} ({e.details()})") from None
            if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details:
                raise SlimServeClientError(
                    "UNAVAILABLE", f"no slimserve answers at {self.server}: is it running? ({e.details()})"
                ) from None
            raise SlimServeClientError(code.name if code else "UNKNOWN", e.details() or "") from None

    # ------------------------------------------------------------------ registry

    def register(
        self,
        name: str,
        model_file: str | Path,
        data: str | Path | None = None,
        train: str | Path | None = None,
        calibration: str | Path | None = None,
        description: str = "",
        progress: Progress | None = None,
        timeout: float | None = 600.0,
        config: str | Path | None = None,
        labels: dict[str, str | Path] | None = None,
        quality: list[str] | tuple[str, ...] = (),
        evaluator: str = "",
        sequence_inputs: tuple[str, ...] | list[str] = (),
        attention_mask: str = "",
    ) -> dict[str, Any]:
        """Uploads a model (ONNX or .pt2) and its optional .npz files in chunks; returns the model record.

        `config` (Triton's config.pbtxt or its JSON form) and `labels` (output -> label file) are stored with the model and
        applied at every load and restart, as a Triton repository's config is. `quality` ("OUTPUT=METRIC") and `evaluator`
        are kept with the model for every optimization job that sets none. `sequence_inputs` / `attention_mask` declare a
        text model's token inputs (served padding-free); by default the server detects input_ids / attention_mask /
        token_type_ids by name."""
        files = [("model", Path(model_file))]
        files += [(role, Path(p)) for role, p in (("data", data), ("train", train), ("calibration", calibration)) if p is not None]
        label_paths = {k: Path(v) for k, v in (labels or {}).items()}
        model_config = load_model_config(Path(config) if config is not None else None, label_paths)
        files += [("label", p) for p in dict.fromkeys(label_paths.values())]
        labelled = [o for o in (model_config or {}).get("output", []) if o.get("label_filename") and o["name"] not in label_paths]
        for output in labelled:  # a config's own label_filename: the file beside the config
            path = Path(config).parent / output["label_filename"]
            if not path.is_file():
                raise SlimServeClientError(
                    "INVALID_ARGUMENT", f"output '{output['name']}' label_filename '{output['label_filename']}': {path} does not exist"
                )
            files.append(("label", path))
        for role, path in files:
            if not path.is_file():
                raise SlimServeClientError("INVALID_ARGUMENT", f"{role} file '{path}' does not exist")
        names = {path: path.name for _, path in files}
        if files[0][1].suffix.lower() == ".onnx":  # weights in side files (torch.onnx.export's default) travel with the model
            for location in side_files(files[0][1]):
                try:
                    side = side_file_path(files[0][1], location)
                except ValueError as e:
                    raise SlimServeClientError("INVALID_ARGUMENT", str(e)) from None
                if not side.is_file():
                    raise SlimServeClientError(
                        "INVALID_ARGUMENT",
                        f"'{files[0][1].name}' keeps its weights in '{location}', which is not beside it ({side}): "
                        "put the side file torch.onnx.export wrote next to the model, or re-export with external_data=False",
                    )
                files.append(("external", side))
                names[side] = location
        header = spb.RegisterHeader(
            name=name,
            description=description,
            quality=list(quality),
            evaluator=evaluator,
            config_json=json.dumps(model_config) if model_config is not None else "",
            sequence_inputs=list(sequence_inputs),
            attention_mask=attention_mask,
            files=[spb.UploadFile(role=r, filename=names[p], size_bytes=p.stat().st_size, sha256=sha256_of(p)) for r, p in files],
        )
        total = sum(p.stat().st_size for _, p in files)

        def messages() -> Iterator[spb.RegisterRequest]:
            yield spb.RegisterRequest(header=header)
            sent = 0
            for index, (_, path) in enumerate(files):
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                        yield spb.RegisterRequest(chunk=spb.FileChunk(file_index=index, data=block))
                        sent += len(block)
                        if progress:
                            progress(sent, total)

        return model_dict(self._call(self.registry.Register, messages(), timeout=timeout))

    def models(self) -> list[dict[str, Any]]:
        return [model_dict(m) for m in self._call(self.registry.ListModels, spb.ListModelsRequest()).models]

    def model(self, name: str) -> dict[str, Any]:
        return model_dict(self._call(self.registry.GetModel, spb.GetModelRequest(name=name)))

    def delete(self, name: str) -> None:
        self._call(self.registry.DeleteModel, spb.DeleteModelRequest(name=name))

    def delete_variant(self, name: str, variant: str) -> dict[str, Any]:
        return model_dict(self._call(self.registry.DeleteVariant, spb.DeleteVariantRequest(model=name, variant=variant)))

    # ------------------------------------------------------------------ traffic and experiments

    def traffic(
        self, name: str, weights: dict[str, float] | None = None, shadows: list[str] | None = None, sticky: str | None = None
    ) -> dict[str, Any]:
        """Sets the routing when `weights` are given; returns it either way."""
        if weights is None:
            return traffic_dict(self._call(self.traffic_stub.GetTraffic, spb.GetTrafficRequest(model=name)))
        request = spb.SetTrafficRequest(model=name, weights=weights, shadows=shadows or [], sticky_parameter=sticky or "")
        return traffic_dict(self._call(self.traffic_stub.SetTraffic, request))

    def promote(self, name: str, variant: str) -> dict[str, Any]:
        return traffic_dict(self._call(self.traffic_stub.Promote, spb.PromoteRequest(model=name, variant=variant)))

    def rollback(self, name: str) -> dict[str, Any]:
        return traffic_dict(self._call(self.traffic_stub.Rollback, spb.RollbackRequest(model=name)))

    def feedback(self, name: str, request_id: str, label: int | list[int], row: int | None = None) -> dict[str, Any]:
        """The true class of an earlier request: an int (a one-row request, or with `row` that row of a multi-row
        one), or a list of one per row. Returns the variant that answered, `correct` (every row right), rows, correct_rows."""
        request = spb.FeedbackRequest(model=name, request_id=request_id)
        if row is not None:
            request.row = row
        if isinstance(label, (list, tuple)) and len(label) != 1:
            request.labels.extend(int(v) for v in label)
        else:
            request.label = int(label[0] if isinstance(label, (list, tuple)) else label)
        response = self._call(self.feedback_stub.SendFeedback, request)
        return {"variant": response.variant, "correct": response.correct, "rows": response.rows, "correct_rows": response.correct_rows}

    def compare(self, name: str) -> dict[str, Any]:
        response = self._call(self.experiments.Compare, spb.CompareRequest(model=name))
        return {
            "model": response.model,
            "node_type": response.node_type,
            "price_per_hour": response.price_per_hour,
            "variants": [comparison_dict(c) for c in response.variants],
        }

    # ------------------------------------------------------------------ rollout

    def rollout_start(
        self,
        name: str,
        variant: str,
        plan: str | Path | None = None,
        steps: list[float] | None = None,
        min_requests: int | None = None,
        max_stage_s: float | None = None,
        alpha: float | None = None,
    ) -> dict[str, Any]:
        """Starts a rollout; `plan` is a JSON or YAML plan file (the server checks it); the rest override it."""
        request = spb.RolloutStartRequest(model=name, variant=variant, steps=steps or [])
        if plan is not None:
            path = Path(plan)
            if not path.is_file():
                raise SlimServeClientError("INVALID_ARGUMENT", f"plan file '{plan}' does not exist")
            try:
                request.plan_json = json.dumps(load_recipe_file(path))
            except SlimServeClientError as e:
                raise SlimServeClientError(e.code, e.message.replace("recipe file", "plan file", 1)) from None
        for field, value in (("min_requests", min_requests), ("max_stage_s", max_stage_s), ("alpha", alpha)):
            if value is not None:
                setattr(request, field, value)
        return rollout_dict(self._call(self.rollout_stub.Start, request))

    def rollout_status(self, name: str) -> dict[str, Any]:
        return rollout_dict(self._call(self.rollout_stub.Status, spb.RolloutRequest(model=name)))

    def rollout_abort(self, name: str) -> dict[str, Any]:
        return rollout_dict(self._call(self.rollout_stub.Abort, spb.RolloutRequest(model=name)))

    def rollout_watch(self, name: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The rollout now, then at every look and change, until it ends."""
        try:
            for status in self.rollout_stub.Watch(spb.RolloutRequest(model=name), metadata=self._auth, timeout=timeout):
                yield rollout_dict(status)
        except grpc.RpcError as e:
            raise SlimServeClientError(e.code().name if e.code() else "UNKNOWN", e.details() or "") from None

    def slo_set(self, name: str, p99_ms: float, max_drop_pt: float = 1.0) -> dict[str, Any]:
        """Sets the model's latency objective (the server checks it: see `slimctl slo`)."""
        return slo_dict(self._call(self.rollout_stub.SetSlo, spb.SloRequest(model=name, p99_ms=p99_ms, max_drop_pt=max_drop_pt)))

    def slo_clear(self, name: str) -> dict[str, Any]:
        return slo_dict(self._call(self.rollout_stub.SetSlo, spb.SloRequest(model=name, clear=True)))

    def slo_status(self, name: str) -> dict[str, Any]:
        return slo_dict(self._call(self.rollout_stub.GetSlo, spb.RolloutRequest(model=name)))

    def slo_watch(self, name: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The latency objective now, then at each of its events (shift, wait, step aside), until it is removed."""
        try:
            for status in self.rollout_stub.WatchSlo(spb.RolloutRequest(model=name), metadata=self._auth, timeout=timeout):
                yield slo_dict(status)
        except grpc.RpcError as e:
            raise SlimServeClientError(e.code().name if e.code() else "UNKNOWN", e.details() or "") from None

    # ------------------------------------------------------------------ optimizer

    def optimize(
        self,
        name: str,
        recipe: str,
        variant_name: str = "",
        accuracy_budget: float | None = None,
        parent: str = "",
        on_progress: Callable[[spb.JobProgress], None] | None = None,
        timeout: float | None = 3600.0,
        keep_over_budget: bool = False,
        quality: list[str] | tuple[str, ...] = (),
        evaluator: str = "",
        on_job: Callable[[str], None] | None = None,
        detach: bool = False,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Runs an optimization job to its end; returns (new variant record, report rows).

        `recipe` is preset/pass names joined by commas, or the path of a JSON or YAML recipe file.
        `quality`: "OUTPUT=METRIC" per output; `evaluator`: the name of an evaluator installed on the server.
        `on_job` gets the job's id as soon as the server has queued it (to cancel it with `cancel_job`).
        `detach`: return as soon as the job is queued, with ({"job_id": id}, []); the job goes on in the server.
        """
        request = spb.OptimizeRequest(
            model=name,
            variant_name=variant_name,
            parent=parent,
            keep_over_budget=keep_over_budget,
            quality=list(quality),
            evaluator=evaluator,
        )
        path = Path(recipe)
        if path.suffix.lower() in (".json", ".yaml", ".yml"):
            if not path.is_file():
                raise SlimServeClientError("INVALID_ARGUMENT", f"recipe file '{recipe}' does not exist")
            request.recipe_json = json.dumps(load_recipe_file(path))
        else:
            request.recipe = recipe
        if accuracy_budget is not None:
            request.accuracy_budget = accuracy_budget
        job_id = ""
        try:
            for event in self.optimizer.Optimize(request, metadata=self._auth, timeout=timeout):
                if not job_id:
                    job_id = event.job_id
                    if on_job:
                        on_job(job_id)
                    if detach:
                        return {"job_id": job_id}, []
                if event.HasField("progress") and on_progress:
                    on_progress(event.progress)
                elif event.HasField("done"):
                    return variant_dict(event.done.variant), json.loads(event.done.report_json)
        except grpc.RpcError as e:
            raise SlimServeClientError(e.code().name if e.code() else "UNKNOWN", e.details() or "") from None
        raise SlimServeClientError("UNKNOWN", "the job's stream ended without a result")

    def jobs(self, name: str = "") -> list[dict[str, Any]]:
        """The jobs of one model (every model when `name` is empty): id, model, variant, recipe, status, progress, times."""
        response = self._call(self.optimizer.ListJobs, spb.ListJobsRequest(model=name))
        return [job_dict(j) for j in response.jobs]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancels a queued or running job; returns its record once its worker has ended (status cancelled)."""
        return job_dict(self._call(self.optimizer.CancelJob, spb.CancelJobRequest(id=job_id)))

    def passes(self, name: str = "") -> list[dict[str, Any]]:
        """The optimizer's passes (records.pass_dict), or only the pass `name` (NOT_FOUND names the known ones)."""
        return [pass_dict(p) for p in self._call(self.optimizer.ListPasses, spb.ListPassesRequest(name=name)).passes]

    # ------------------------------------------------------------------ inference

    def server_live(self) -> bool:
        return self._call(self.inference.ServerLive, pb.ServerLiveRequest()).live

    def server_ready(self) -> bool:
        return self._call(self.inference.ServerReady, pb.ServerReadyRequest()).ready

    def model_ready(self, name: str, variant: str = "") -> bool:
        return self._call(self.inference.ModelReady, pb.ModelReadyRequest(name=name, version=variant)).ready

    def metadata(self, name: str, variant: str = "") -> pb.ModelMetadataResponse:
        return self._call(self.inference.ModelMetadata, pb.ModelMetadataRequest(name=name, version=variant))

    def infer(
        self,
        name: str,
        inputs: dict[str, np.ndarray],
        variant: str = "",
        outputs: list[str] | None = None,
        raw: bool = True,
        parameters: dict[str, Any] | None = None,
        timeout: float | None = 60.0,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Runs a model on named arrays; returns (variant that answered, outputs by name)."""
        answer = self.infer_full(name, inputs, variant, outputs, raw, parameters, timeout)
        return answer.variant, answer.outputs

    def infer_full(
        self,
        name: str,
        inputs: dict[str, np.ndarray],
        variant: str = "",
        outputs: list[str] | None = None,
        raw: bool = True,
        parameters: dict[str, Any] | None = None,
        timeout: float | None = 60.0,
        request_id: str = "",
    ) -> InferAnswer:
        """`infer`, also returning the request id (the given one or the server's) that `feedback` refers to."""
        request = pb.ModelInferRequest(model_name=name, model_version=variant, id=request_id)
        for key, value in (parameters or {}).items():
            codec.set_parameter(request.parameters[key], value)
        for input_name, array in inputs.items():
            codec.fill_input(request, input_name, np.asarray(array), raw=raw)
        for output in outputs or []:
            request.outputs.add(name=output)
        response = self._call(self.inference.ModelInfer, request, timeout=timeout)
        return InferAnswer(response.model_version, codec.decode_response_outputs(response), response.id)

    def infer_rows(
        self,
        name: str,
        inputs: dict[str, np.ndarray],
        variant: str = "",
        max_request_bytes: int = ROWS_REQUEST_BYTES,
        fixed_batch: int | None = None,
        progress: Progress | None = None,
    ) -> RowsAnswer:
        """Runs a model on arrays of any size: sends the rows in requests that fit a message, joins the outputs.

        `progress(rows done, rows in all)` is called after each request.
        """
        parts = split_rows(inputs, max_request_bytes, fixed_batch)
        total = parts[-1].stop
        outputs: dict[str, list[np.ndarray]] = {}
        variants, ids = [], []
        for part in parts:
            answer = self.infer_full(name, {k: v[part] for k, v in inputs.items()}, variant=variant)
            for key, value in answer.outputs.items():
                outputs.setdefault(key, []).append(value)
            variants.append(answer.variant)
            ids.append(answer.request_id)
            if progress is not None:
                progress(part.stop, total)
        joined = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in outputs.items()}
        return RowsAnswer(joined, variants, ids)
