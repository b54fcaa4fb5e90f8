"""The management use cases (register, delete, traffic, feedback, compare, load / unload, jobs) as plain async methods.

Each takes and returns domain objects and knows nothing of gRPC or protobuf: the servicers decode a
request, make one call here, and encode what it returns (server/grpc/converters.py).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from slimserve.optimizer.base import OptimizerError, ProgressEvent
from slimserve.optimizer.catalog import PassInfo, describe, describe_all
from slimserve.server.errors import AlreadyExists, InvalidArgument, NotFound, SlimServeError, Unavailable
from slimserve.server.inference.dataplane import DataPlane, VersionStatistics
from slimserve.server.inference.model_config import ModelConfigView, parse_load_config
from slimserve.server.inference.shared_memory import RegionStatus, cuda_shared_memory_status, register_cuda_shared_memory
from slimserve.server.management.jobs import JobDone, JobManager, JobRequest
from slimserve.server.store.manifest import ModelInfo
from slimserve.server.store.repository import Repository
from slimserve.server.store.traffic import TrafficPolicy, promote, rollback, set_traffic
from slimserve.server.store.upload import Registrar, UploadHeader, check_header
from slimserve.server.telemetry.log_settings import LogSettings
from slimserve.server.telemetry.statistics import FeedbackResult, compare_rows
from slimserve.server.telemetry.tracing import TraceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    """`slimctl compare`: one row per served variant (see slimserve.server.telemetry.statistics.compare_rows), priced for this node."""

    model: str
    node_type: str
    price_per_hour: float
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class IndexEntry:
    """One variant in the repository index: READY when it serves, else UNAVAILABLE with the reason."""

    model: str
    variant: str
    ready: bool
    reason: str
    version: int  # the variant's integer version (Triton's index lists these)


class Control:
    """The control plane: every change to what is registered, served and routed goes through one of these methods."""

    def __init__(
        self,
        repository: Repository,
        dataplane: DataPlane,
        registrar: Registrar,
        jobs: JobManager,
        node_type: str,
        price_per_hour: float,
        server_name: str = "slimserve",
    ) -> None:
        self.server_name = server_name
        self.repository = repository
        self.dataplane = dataplane
        self.registrar = registrar
        self.jobs = jobs
        self.node_type = node_type
        self.price_per_hour = price_per_hour
        self.logs = LogSettings()
        self.traces = TraceSettings()  # server/app.py replaces it with --trace-* settings
        # Set by server/app.py to the --model-control-mode of a --model-repository (none / poll refuse
        # RepositoryModelLoad / Unload as Triton does); None: no Triton repository, load and unload are allowed.
        self.model_control_mode: str | None = None
        # Set by server/app.py to TritonRepository.unserved: (model, version or 0, why) of what --model-repository could
        # not import, listed UNAVAILABLE in the repository index with the reason.
        self.unserved: Callable[[], list[tuple[str, int, str]]] | None = None
        # Set by server/app.py to the rollout controller's `interrupted` and the SLO's `manual_change`: a manual routing change or a deletion
        # stops a running rollout with its reason (model, reason, variant or None for the whole model).
        self.on_manual_change: Callable[[str, str, str | None], Awaitable[None]] | None = None

    async def _manual(self, model: str, reason: str, variant: str | None = None) -> None:
        if self.on_manual_change is not None:
            await self.on_manual_change(model, reason, variant)

    # ------------------------------------------------------------------ registry

    async def register(self, header: UploadHeader, chunks: AsyncIterator[tuple[int, bytes]]) -> ModelInfo:
        """An upload becomes a model that serves at once; its baseline is measured in the background."""
        check_header(header, self.registrar.max_upload_bytes)
        if header.name in self.repository.names():
            raise AlreadyExists(f"model '{header.name}' is already registered; delete it first or pick another name")
        with self.repository.staging() as staged:
            paths = await self.registrar.receive(header, chunks, staged)
            labels = {f"file:{f.filename}": p.read_bytes() for f, p in zip(header.files, paths) if f.role == "label"}
            info = await self.dataplane.run_blocking(self.registrar.commit, header, paths, staged)
        if header.config_json:
            await self.dataplane.run_blocking(self._store_serving, info, header.config_json, labels)
        await self.dataplane.load_model(info.name)
        self.jobs.evaluate_in_background(info.name)
        return info

    def _store_serving(self, info: ModelInfo, config: str, labels: dict[str, bytes]) -> None:
        """A registration's config and label files, checked against the model just committed, stored with it (applied at
        every load and restart); a refusal removes the model again, so nothing half registered stays."""
        try:
            parse_load_config(
                config,
                info.name,
                info.inputs,
                self.dataplane.loader.runtime_config.device,
                self.dataplane.loader.batching,
                info.outputs,
                dict(labels),
            )
            files = {k: base64.b64encode(v).decode() for k, v in labels.items()}
            self.repository.set_serving(info.name, {"config": config, "files": files, "source": None})
        except BaseException:
            self.repository.delete(info.name)
            raise

    def list_models(self) -> list[ModelInfo]:
        return self.repository.list()

    def get_model(self, name: str) -> ModelInfo:
        return self.repository.get(name)

    async def delete_model(self, name: str) -> None:
        """Unloads (what it served, measured and was told goes with it), then removes it from the repository."""
        self.repository.get(name)  # NotFound before anything changes
        self.repository.check_writable()  # a read-only replica refuses before it unloads anything
        await self._manual(name, "the model was deleted")
        if self.dataplane.is_loaded(name):
            await self.dataplane.unload_model(name)
        self.repository.delete(name)
        self.traces.forget(name)

    async def delete_variant(self, model: str, variant: str) -> ModelInfo:
        """Out of routing and the manifest first (new requests stop going there), then unloaded once its queue drains."""
        await self._manual(model, f"variant '{variant}' was deleted", variant)
        info = await self.dataplane.run_blocking(self.repository.remove_variant, model, variant)
        if self.dataplane.is_loaded(model):
            await self.dataplane.refresh(model)
        return info

    # ------------------------------------------------------------------ traffic

    async def _change_traffic(self, model: str, change: Callable[..., TrafficPolicy]) -> TrafficPolicy:
        """Checked against the variants loaded now, written to the manifest (it survives a restart), then swapped in."""
        ready = self.dataplane.loaded_model(model).ready  # NotFound / Unavailable before anything changes

        def apply(info: ModelInfo) -> None:
            statuses = {name: v.status for name, v in info.variants.items()}
            info.traffic = change(info.traffic, variants_ready=ready, model=model, statuses=statuses)

        info = await self.dataplane.run_blocking(self.repository.update, model, apply)
        await self.dataplane.refresh(model)
        return info.traffic

    async def set_traffic(
        self, model: str, weights: dict[str, float], shadows: list[str], sticky: str | None, *, automatic: bool = False
    ) -> TrafficPolicy:
        """`automatic`: the rollout controller's own change; any other change, once made, stops a running rollout."""
        policy = await self._change_traffic(model, lambda current, **kw: set_traffic(current, weights, shadows, sticky, **kw))
        if not automatic:
            await self._manual(model, "manual traffic change")
        return policy

    def get_traffic(self, model: str) -> TrafficPolicy:
        return self.repository.get(model).traffic

    def ready_variants(self, model: str) -> set[str]:
        return self.dataplane.loaded_model(model).ready

    async def promote(self, model: str, variant: str, *, automatic: bool = False) -> TrafficPolicy:
        policy = await self._change_traffic(model, lambda current, **kw: promote(current, variant, **kw))
        if not automatic:
            await self._manual(model, f"manual promote of '{variant}'")
        return policy

    async def rollback(self, model: str) -> TrafficPolicy:
        policy = await self._change_traffic(model, lambda current, **kw: rollback(current, **kw))
        await self._manual(model, "manual rollback")
        return policy

    # ------------------------------------------------------------------ live results

    async def feedback(
        self, model: str, request_id: str, label: int | None = None, labels: Sequence[int] = (), row: int | None = None
    ) -> FeedbackResult:
        """Ground truth for an answered request (one label, one per row, or a row's): scores it, and refreshes every
        served variant's online accuracy."""
        if not request_id:
            raise InvalidArgument("request_id is empty: send the id of the ModelInferResponse the label is for")
        loaded = self.dataplane.loaded_model(model)
        result = loaded.feedback.feedback(request_id, label, labels, row)
        answered = loaded.variants.get(result.variant)
        if answered is not None:
            for i in range(result.rows):
                answered.recorder.record_feedback(i < result.correct_rows)
        for served in loaded.variants.values():  # shadows are scored by the label too
            accuracy = loaded.feedback.online_accuracy(served.name)
            if accuracy is not None:
                served.recorder.record_online_accuracy(accuracy)
        return result

    async def compare(self, model: str) -> Comparison:
        loaded = self.dataplane.loaded_model(model)
        policy = loaded.info.traffic
        variants = [v for v in loaded.info.variants if v in loaded.ready]
        rows = compare_rows(
            variants,
            weights=policy.weights,
            shadows=policy.shadows,
            stats=loaded.stats(),
            price_per_hour=self.price_per_hour,
            offline_accuracy={v: loaded.info.variants[v].evaluation.get("accuracy") for v in variants},
            feedback=loaded.feedback,
        )
        return Comparison(model, self.node_type, self.price_per_hour, rows)

    # ------------------------------------------------------------------ model repository extension

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = []
        for info in self.repository.list():
            loaded = self.dataplane.models.get(info.name)
            for variant, v in info.variants.items():
                ready = loaded is not None and variant in loaded.variants
                if ready_only and not ready:
                    continue
                unloaded = loaded.unloaded.get(variant) if loaded is not None else None
                reason = v.message if v.status == "failed" else ("" if ready else unloaded.reason if unloaded else "not loaded")
                entries.append(IndexEntry(info.name, variant, ready, reason, v.version))
        if self.unserved is not None and not ready_only:
            entries += [IndexEntry(name, "", False, why, version) for name, version, why in self.unserved()]
        return entries

    async def load_model(self, name: str, config: str | None = None, files: dict[str, bytes] | None = None) -> None:
        """RepositoryModelLoad: every variant afresh, with the serving settings of `config` (Triton's ModelConfig as
        JSON: max_batch_size, dynamic_batching, instance_group) until the next load; checked before anything changes.

        A refusal keeps its kind and says "failed to load '<name>': <why>", as Triton words it (its clients check)."""
        self._check_model_control()
        try:
            await self._load_model(name, config, files)
        except SlimServeError as e:
            raise SlimServeError(f"failed to load '{name}': {e.message}", e.kind) from e

    async def _load_model(self, name: str, config: str | None, files: dict[str, bytes] | None) -> None:
        if files and config is None:
            raise InvalidArgument(
                f"load parameter(s) {', '.join(files)}: loading model files through RepositoryModelLoad is not supported; "
                "upload a model with `slimctl register` (ModelRegistry.Register)"
            )
        override = None
        if config is not None:
            info = self.repository.get(name)
            loaded = self.dataplane.models.get(name)
            device = next(iter(loaded.variants.values())).runtime.device if loaded and loaded.variants else "cpu"
            override = parse_load_config(config, name, info.inputs, device, self.dataplane.loader.batching, info.outputs, files)
        await self.dataplane.load_model(name, override)

    def _check_model_control(self) -> None:
        """Triton's rule (model_repository_manager.cc, LoadUnloadModel): outside `explicit` mode, load and unload are
        UNAVAILABLE with its very words, which its clients match; what to do follows them."""
        mode = self.model_control_mode
        if mode is not None and mode != "explicit":
            raise Unavailable(
                "explicit model load / unload is not allowed if polling is enabled: this server runs with "
                f"--model-control-mode {mode}, where {'the repository directory decides what is loaded' if mode == 'poll' else 'every model of --model-repository loads at start'}; "
                "restart it with --model-control-mode explicit to load and unload models by call"
            )

    def model_config(self, name: str, version: str = "") -> ModelConfigView:
        return self.dataplane.model_config(name, version)

    def statistics(self, name: str = "", version: str = "") -> list[VersionStatistics]:
        return self.dataplane.statistics(name, version)

    async def unload_model(self, name: str) -> None:
        """Triton's rule: unloading a model that is not loaded succeeds (scripts unload defensively); one that is
        not registered at all is NOT_FOUND, so a typo does not pass silently."""
        self._check_model_control()
        if not self.dataplane.is_loaded(name):
            self.repository.get(name)  # NotFound when not registered at all
            return
        await self.dataplane.unload_model(name)

    # ------------------------------------------------------------------ system shared memory and log settings

    def register_shared_memory(self, name: str, key: str, offset: int, byte_size: int) -> RegionStatus:
        return self.dataplane.shared_memory.register(name, key, offset, byte_size)

    def unregister_shared_memory(self, name: str = "") -> None:
        self.dataplane.shared_memory.unregister(name)

    def shared_memory_status(self, name: str = "") -> list[RegionStatus]:
        return self.dataplane.shared_memory.status(name)

    def cuda_shared_memory_status(self, name: str = "") -> list[RegionStatus]:
        return cuda_shared_memory_status(name)

    def register_cuda_shared_memory(self, name: str) -> None:
        register_cuda_shared_memory(name)

    def unregister_cuda_shared_memory(self, name: str = "") -> None:
        """Nothing is ever registered: unregistering succeeds (Triton's rule for an unknown name)."""

    def log_settings(self) -> dict[str, Any]:
        return self.logs.get()

    def update_log_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        return self.logs.update(changes)

    def trace_settings(self, model: str = "") -> dict[str, Any]:
        """Triton's trace settings of the server (model "") or of one model (its own where it set any, else the server's)."""
        if model:
            self.repository.get(model)  # NotFound for a model that is not registered
        return self.traces.get(model)

    def update_trace_settings(self, changes: dict[str, Any], model: str = "") -> dict[str, Any]:
        """Applies and stores the change in the repository (a read-only replica keeps it in memory): the settings
        outlive a restart, the server's and each model's own alike."""
        if model:
            self.repository.get(model)
        settings = self.traces.update(changes, model)
        if not self.repository.read_only:
            self.repository.set_trace_settings(self.traces.stored(model), model)
        return settings

    def restore_trace_settings(self) -> None:
        """At start: the trace settings stored by earlier updates replace those of the command line, logged."""
        server = self.repository.trace_settings()
        models = {name: stored for name in self.repository.names() if (stored := self.repository.trace_settings(name))}
        for line in self.traces.restore(server, models):
            log.warning("stored trace setting skipped: %s", line)
        if server or models:
            log.info(
                "trace settings restored from %s: server %s%s",
                self.repository.root,
                self.traces.get(),
                "".join(f"; model '{m}' {s}" for m, s in models.items()),
            )

    # ------------------------------------------------------------------ optimizer jobs

    async def optimize(self, request: JobRequest) -> AsyncIterator[tuple[str, ProgressEvent | JobDone]]:
        """Starts a job (everything checkable is checked first), then yields (job id, event) until it ends."""
        job = await self.jobs.submit(request)
        async for event in self.jobs.events(job):
            yield job.id, event

    async def list_passes(self, name: str = "") -> list[PassInfo]:
        """The optimizer's passes, or only the pass `name` (NotFound, naming the known ones): kind, needs and settings.
        Describing imports the pass modules (torch among them) the first time, so it runs on the management pool."""
        try:
            return await self.dataplane.run_blocking(lambda: [describe(name)] if name else describe_all())
        except OptimizerError as e:
            raise NotFound(str(e)) from e

    def list_jobs(self, model: str = "") -> list[tuple[str, dict[str, Any]]]:
        """(model, job record) of one model, or of every model when `model` is empty; live jobs with their progress."""
        return self.jobs.list(model)

    async def cancel_job(self, job_id: str) -> tuple[str, dict[str, Any]]:
        """Cancels a queued or running job (its worker ended, its staging removed); (model, its record) once it has ended."""
        self.repository.check_writable()
        return await self.jobs.cancel(job_id)
