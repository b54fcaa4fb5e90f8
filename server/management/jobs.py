"""Optimization jobs: one background job per request, progress streamed, the variant registered atomically."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import shutil
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext, ProgressEvent
from slimserve.optimizer.evaluation.evaluators import load_evaluator
from slimserve.optimizer.evaluation.quality import parse_declared
from slimserve.optimizer.formats.onnx_files import copy_model
from slimserve.optimizer.pipeline import Baseline, OptimizeResult, layout_aware, optimize, preflight
from slimserve.optimizer.recipes import Recipe, parse_recipe, recipe_from_dict
from slimserve.server.errors import AlreadyExists, ErrorKind, FailedPrecondition, InvalidArgument, ResourceExhausted, SlimServeError
from slimserve.server.inference.dataplane import DataPlane
from slimserve.server.runtimes import RuntimeConfig, create_runtime
from slimserve.server.store.manifest import BASELINE, DATA_ROLES, ModelInfo, VariantInfo, now, validate_name
from slimserve.server.store.repository import Repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobRequest:
    model: str
    recipe: str = ""
    recipe_json: str = ""
    variant_name: str = ""
    accuracy_budget: float | None = None
    parent: str = BASELINE
    keep_over_budget: bool = False  # register the best a budget search reached even when it misses the budget
    quality: tuple[str, ...] = ()  # "OUTPUT=METRIC" per output (slimserve.optimizer.evaluation.quality.parse_declared)
    evaluator: str = ""  # an installed evaluator's name (slimserve.optimizer.evaluation.evaluators), held to the budget too


@dataclass(frozen=True)
class JobDone:
    variant: VariantInfo
    report: list[dict]


@dataclass
class Job:
    id: str
    model: str
    variant: str
    recipe: Recipe
    request: JobRequest
    events: list[ProgressEvent | JobDone] = field(default_factory=list)
    error: SlimServeError | None = None
    finished: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    cancel: threading.Event = field(default_factory=threading.Event)


def recipe_record(recipe: str, result: OptimizeResult) -> str:
    """What the variant's record says it is: `auto` names the pipeline it chose, a budget search the settings it kept and its cost."""
    if "auto_choice" in result.artifact.notes:
        return f"auto: {result.artifact.notes['auto_choice']}"
    searched = [s for s in result.searches if s.probes]
    if not searched and result.within_budget is not False:
        return recipe
    parts = [s.summary() for s in searched]
    if result.within_budget is False:
        parts.append("over budget, kept on request")
    return f"{recipe} ({'; '.join(parts)})"


def job_error(job: Job, e: Exception) -> SlimServeError:
    """The error a failed job ends with: never INTERNAL. A refusal says why; anything unforeseen names the stage it failed in.

    Nothing is registered by a failed job (the variant is staged, and moved in only at the end), so the model serves on.
    """
    if isinstance(e, OptimizerError):
        return FailedPrecondition(f"job {job.id} failed: {e}")
    if isinstance(e, SlimServeError) and e.kind != ErrorKind.INTERNAL:
        return e
    log.error("job %s failed", job.id, exc_info=e)
    stage = next((ev.stage for ev in reversed(job.events) if isinstance(ev, ProgressEvent)), "start")
    text = " ".join(str(e).split())[:400] or "no message"
    what = f"job {job.id} ({job.recipe.name} on '{job.model}') failed at stage '{stage}': {type(e).__name__}: {text}"
    after = "; nothing was registered and the model serves as before"
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOSPC):
        return ResourceExhausted(f"{what}{after}: free memory or disk space on the server, or optimize a smaller model")
    return FailedPrecondition(f"{what}{after}. Try another recipe; the server log has the traceback for a bug report")


class JobManager:
    """Runs jobs one at a time on a thread of their own, so that training never blocks inference calls."""

    def __init__(self, repository: Repository, dataplane: DataPlane, runtime_config: RuntimeConfig) -> None:
        self.repository = repository
        self.dataplane = dataplane
        self.runtime_config = runtime_config
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optimizer")
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task] = set()
        # Each variant's measure on the model's evaluation data (evaluation + outputs), taken once: every job
        # from that variant reuses it. Keyed by the registration time too, so a model registered again under
        # the same name is measured anew.
        self._baselines: dict[tuple[str, str, str, str | None], Baseline] = {}

    def _datasets(self, model: str) -> dict[str, Path]:
        return {role: p for role in DATA_ROLES if (p := self.repository.dataset_path(model, role)) is not None}

    def _baseline_key(self, info: ModelInfo, variant: str, metric: str | None = None) -> tuple[str, str, str, str | None]:
        return (info.name, info.created_at, variant, metric)

    def _keep_baseline(self, key: tuple[str, str, str, str | None], baseline: Baseline) -> None:
        names = set(self.repository.names())
        for stale in [k for k in self._baselines if k[0] not in names]:  # deleted models
            del self._baselines[stale]
        self._baselines[key] = baseline

    def _recipe(self, request: JobRequest) -> Recipe:
        try:
            if request.recipe_json:
                try:
                    data = json.loads(request.recipe_json)
                except json.JSONDecodeError as e:
                    raise OptimizerError(f"recipe file is not valid JSON: {e}") from e
                return recipe_from_dict(data, "recipe file")
            return parse_recipe(request.recipe)
        except OptimizerError as e:
            raise InvalidArgument(str(e)) from e

    async def submit(self, request: JobRequest) -> Job:
        """Checks everything that can be checked before work starts, then starts the job."""
        info = self.repository.get(request.model)
        recipe = self._recipe(request)
        parent = request.parent or BASELINE
        if parent not in info.variants:
            raise InvalidArgument(f"model '{request.model}' has no variant '{parent}' to start from (variants: {', '.join(info.variants)})")
        if info.variants[parent].status != "ready":
            raise FailedPrecondition(f"variant '{parent}' of '{request.model}' is {info.variants[parent].status}, not ready")
        variant = validate_name(request.variant_name or recipe.name, "variant name")
        running = [j for j in self.jobs.values() if j.model == request.model and j.variant == variant and not j.finished]
        if variant in info.variants or running:
            raise AlreadyExists(f"model '{request.model}' already has a variant '{variant}'; pass --name to choose another")
        if request.accuracy_budget is not None and request.accuracy_budget < 0:
            raise InvalidArgument(f"--accuracy-budget must be >= 0 points, got {request.accuracy_budget}")
        try:  # data the recipe needs and the model lacks: refused now, not after the baseline's measurement
            preflight(recipe, self._datasets(request.model), request.accuracy_budget)
        except OptimizerError as e:
            raise FailedPrecondition(str(e)) from e
        try:  # a --quality naming no output, an evaluator this node does not have: refused now, nothing started
            parse_declared(request.quality or info.quality, [s.name for s in info.outputs])
            if request.evaluator or info.evaluator:
                load_evaluator(request.evaluator or info.evaluator)
        except OptimizerError as e:
            raise InvalidArgument(str(e)) from e
        job = Job(uuid.uuid4().hex[:12], request.model, variant, recipe, request)
        self.jobs[job.id] = job
        self._record(job, "running", "")
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def _record(self, job: Job, status: str, message: str) -> None:
        def change(info: ModelInfo) -> None:
            record = info.jobs.setdefault(job.id, {"id": job.id, "variant": job.variant, "recipe": job.recipe.name, "started_at": now()})
            record.update(status=status, message=message)
            if status != "running":
                record["finished_at"] = now()

        try:
            self.repository.update(job.model, change)
        except SlimServeError:
            log.warning("job %s: model '%s' is gone; its job record is dropped", job.id, job.model)

    async def _publish(self, job: Job, event: ProgressEvent | JobDone | None = None, error: SlimServeError | None = None) -> None:
        async with job.changed:
            if event is not None:
                job.events.append(event)
            if error is not None or isinstance(event, JobDone):
                job.error, job.finished = error, True
            job.changed.notify_all()

    async def _run(self, job: Job) -> None:
        loop = asyncio.get_running_loop()

        def progress(event: ProgressEvent) -> None:
            asyncio.run_coroutine_threadsafe(self._publish(job, event), loop)

        try:
            done = await loop.run_in_executor(self.executor, self._work, job, progress)
            await self.dataplane.refresh(job.model)
            self._record(job, "succeeded", "")
            await self._publish(job, done)
            log.info("job %s: variant '%s' of '%s' is ready", job.id, job.variant, job.model)
        except Exception as e:
            error = job_error(job, e)
            self._record(job, "failed", error.message)
            await self._publish(job, error=error)

    def _work(self, job: Job, progress) -> JobDone:
        """The blocking part: passes, evaluation, and the atomic move into the repository."""

        info = self.repository.get(job.model)
        parent = info.variants[job.request.parent or BASELINE]
        source = Artifact(
            path=self.repository.variant_path(info, parent.name),
            format=parent.format,
            runtime=parent.runtime,
            input_names=tuple(s.name for s in info.inputs),
            output_names=tuple(s.name for s in info.outputs),
        )
        datasets = self._datasets(job.model)
        auto = next((p for p in job.recipe.passes if p.name == "auto"), None)
        metric = getattr(auto.config, "metric", None) or None if auto else None
        # The job's quality settings, else the model's from its registration.
        declared = parse_declared(job.request.quality or info.quality, [s.name for s in info.outputs])
        evaluator_name = job.request.evaluator or info.evaluator
        evaluator = load_evaluator(evaluator_name) if evaluator_name else None
        if declared or evaluator:  # the baseline is scored by what the job asks: cached apart
            metric = f"{metric}|{sorted(declared.items())}|{evaluator_name}"
        key = self._baseline_key(info, parent.name, metric)

        with self.repository.staging() as staged:
            context = PassContext(workdir=staged / "work", datasets=datasets, progress=progress, cancelled=job.cancel.is_set)
            result = optimize(
                source,
                job.recipe,
                context,
                self._factory,
                job.variant,
                job.request.accuracy_budget,
                baseline=self._baselines.get(key),
                register_over_budget=job.request.keep_over_budget,
                declared=declared,
                evaluator=evaluator,
            )
            self._keep_baseline(key, Baseline(result.baseline, result.baseline_outputs))
            variant_dir = staged / "variant"
            variant_dir.mkdir()
            target = variant_dir / f"model.{result.artifact.format}"
            if result.artifact.format == "onnx":  # external data (a variant of 2 GiB or more) under the names the model gives
                copy_model(result.artifact.path, target)
            else:
                shutil.copyfile(result.artifact.path, target)
                # Side files a runtime reads next to the model (e.g. <stem>.compile.json) keep their suffix.
                for side in result.artifact.path.parent.glob(f"{result.artifact.path.stem}.*"):
                    if side != result.artifact.path and side.is_file():
                        shutil.copyfile(side, variant_dir / f"model{side.name[len(result.artifact.path.stem) :]}")
            variant = VariantInfo(
                name=job.variant,
                recipe=recipe_record(job.recipe.name, result),
                parent=parent.name,
                runtime=result.artifact.runtime,
                format=result.artifact.format,
                file=target.name,
                size_bytes=target.stat().st_size,
                evaluation=result.evaluation.to_dict(),
            )
            self.repository.add_variant(job.model, variant_dir, variant)

        def keep_parent_evaluation(i: ModelInfo) -> None:
            if parent.name in i.variants:
                i.variants[parent.name].evaluation = result.baseline.to_dict()

        self.repository.update(job.model, keep_parent_evaluation)
        return JobDone(variant, result.report)

    def evaluate_in_background(self, model: str, variant: str = BASELINE) -> None:
        """Measures a variant on the job thread (after any queued job) and stores the evaluation with it."""

        def work() -> None:
            from slimserve.optimizer.evaluation.measure import evaluate

            info = self.repository.get(model)
            v = info.variants[variant]
            source = Artifact(path=self.repository.variant_path(info, variant), format=v.format, runtime=v.runtime)
            data_path = self.repository.dataset_path(model, "data")
            data = PassContext(workdir=Path("."), datasets={"data": data_path}).dataset("data", "evaluation") if data_path else None
            factory, data = layout_aware(source, self._factory, data)  # a state on axis 1, a scalar input: as optimize measures
            evaluation, outputs = evaluate(source, factory, data)
            self._keep_baseline(self._baseline_key(info, variant), Baseline(evaluation, outputs))

            def store(i: ModelInfo) -> None:
                if variant in i.variants and not i.variants[variant].evaluation:
                    i.variants[variant].evaluation = evaluation.to_dict()

            self.repository.update(model, store)

        async def run() -> None:
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, work)
                await self.dataplane.refresh(model)
            except Exception as e:  # the model may have been deleted meanwhile; nothing to keep
                log.warning("evaluation of '%s' variant '%s' failed: %s", model, variant, e)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _factory(self, path: Path, runtime: str):
        r = create_runtime(runtime, path, self.runtime_config)
        r.load()
        return r

    async def events(self, job: Job) -> AsyncIterator[ProgressEvent | JobDone]:
        """Every event of the job from the start, then new ones as they come; raises the job's error."""
        sent = 0
        while True:
            async with job.changed:
                await job.changed.wait_for(lambda: len(job.events) > sent or job.finished)  # noqa: B023  called within this iteration
                pending, finished, error = job.events[sent:], job.finished, job.error
            for event in pending:
                yield event
            sent += len(pending)
            if finished and sent == len(job.events):
                if error is not None:
                    raise error
                return

    async def stop(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:  # let cancelled tasks unwind so none is destroyed while pending
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
