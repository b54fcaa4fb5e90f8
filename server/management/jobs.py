"""Optimization jobs: each in a worker away from the server (a local process, or a Ray task), at most `--max-jobs` at once and
the rest queued, progress streamed, cancellable, and the variant registered atomically only when its worker succeeded."""

from __future__ import annotations

import asyncio
import errno
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimserve.optimizer.base import OptimizerError, ProgressEvent
from slimserve.optimizer.catalog import PASSES
from slimserve.optimizer.evaluation.evaluators import load_evaluator
from slimserve.optimizer.evaluation.quality import parse_declared
from slimserve.optimizer.pipeline import Baseline, preflight
from slimserve.optimizer.recipes import Recipe
from slimserve.server.errors import (
    AlreadyExists,
    ErrorKind,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SlimServeError,
)
from slimserve.server.inference.dataplane import DataPlane
from slimserve.server.management.runners import LocalRunner, RayRunner
from slimserve.server.management.throttle import Throttle
from slimserve.server.management.worker import WorkFailed, WorkLimits, WorkResult, WorkSpec, parse_recipe_of
from slimserve.server.runtimes import RuntimeConfig
from slimserve.server.store.manifest import BASELINE, DATA_ROLES, ModelInfo, VariantInfo, now, validate_name
from slimserve.server.store.repository import Repository
from slimserve.server.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

# A job's states, as its record and `slimctl jobs` show them. `interrupted`: the server stopped while it was queued or ran.
STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
ENDED = ("succeeded", "failed", "cancelled", "interrupted")


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
    state: str = "queued"
    stage: str = ""
    fraction: float = 0.0
    task: asyncio.Task | None = None
    cancel_requested: bool = False
    committing: bool = False  # the variant is being moved in: too late to cancel
    baseline_key: tuple | None = None  # where the parent's measure is cached for later jobs


def job_error(job: Job, e: BaseException) -> SlimServeError:
    """The error a failed job ends with: never INTERNAL. A worker's failure keeps the kind it reported; a refusal says
    why; anything unforeseen names the stage it failed in.

    Nothing is registered by a failed job (the variant is staged, and moved in only at the end), so the model serves on.
    """
    if isinstance(e, WorkFailed):
        return SlimServeError(f"job {job.id} failed: {e.message}", ErrorKind[e.kind])
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
    """Runs jobs through a runner (worker processes by default), `max_jobs` at once; the rest wait their turn."""

    def __init__(
        self,
        repository: Repository,
        dataplane: DataPlane,
        runtime_config: RuntimeConfig,
        runner: LocalRunner | RayRunner | None = None,
        max_jobs: int = 1,
        job_yield: float | None = 1.0,
        job_yield_busy: float = 0.5,
        metrics: Metrics | None = None,
    ) -> None:
        self.repository = repository
        self.dataplane = dataplane
        self.runtime_config = runtime_config
        self.runner = runner if runner is not None else LocalRunner(WorkLimits())
        self.max_jobs = max_jobs
        self._slots = asyncio.Semaphore(max_jobs)
        # The server-side steps of jobs (registration, the baseline's measure after an upload), one at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optimizer")
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task] = set()
        # Each variant's measure on the model's evaluation data (evaluation + outputs), taken once: every job
        # from that variant reuses it. Keyed by the registration time too, so a model registered again under
        # the same name is measured anew.
        self._baselines: dict[tuple[str, str, str, str | None], Baseline] = {}
        # The job yield (--job-yield): local workers on a duty cycle while traffic is heavy; Ray tasks run elsewhere.
        self.throttle: Throttle | None = None
        if isinstance(self.runner, LocalRunner) and job_yield != 1.0:
            self.throttle = Throttle(dataplane.serving_load, lambda: dict(self.runner.pids), job_yield, job_yield_busy)
            self.runner.throttle = self.throttle
        self.metrics = metrics
        if metrics is not None and self.throttle is not None:
            throttle = self.throttle
            metrics.job_run_fraction.labels(node_type=metrics.node_type).set_function(lambda: throttle.run_fraction)

    async def start(self) -> None:
        """Connects the runner (a Ray cluster: refused here, at the server's start, when it cannot be reached)."""
        await self.runner.start()
        if self.throttle is not None:
            loop = asyncio.get_running_loop()
            self.throttle.on_change = lambda job_id, message: loop.call_soon_threadsafe(self._yielded, job_id, message)
            self.throttle.on_paused = self._paused
            self.throttle.start()

    def _yielded(self, job_id: str, message: str) -> None:
        """The job yield paused or resumed a job's worker: its progress stream says so (on the loop's thread)."""
        job = self.jobs.get(job_id)
        if job is None or job.finished:
            return
        task = asyncio.get_running_loop().create_task(self._publish(job, ProgressEvent(job.stage or "running", job.fraction, message)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _paused(self, job_id: str, seconds: float) -> None:
        """A stop of the job yield ended: its seconds go to slimserve_job_paused_seconds_total (any thread)."""
        job = self.jobs.get(job_id)
        if job is not None and self.metrics is not None:
            self.metrics.job_paused.labels(model=job.model, recipe=job.recipe.name, node_type=self.metrics.node_type).inc(seconds)

    def paused_seconds(self, job_id: str) -> float:
        return self.throttle.paused_seconds(job_id) if self.throttle is not None else 0.0

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
            return parse_recipe_of(request.recipe, request.recipe_json)
        except OptimizerError as e:
            raise InvalidArgument(str(e)) from e

    async def submit(self, request: JobRequest) -> Job:
        """Checks everything that can be checked before work starts, then queues the job."""
        info = self.repository.get(request.model)
        self.repository.check_writable()
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
        if self.metrics is not None:  # the series exists (at 0) from the job's start, so that rate() sees its first pause
            self.metrics.job_paused.labels(model=job.model, recipe=recipe.name, node_type=self.metrics.node_type)
        self._record(job, "queued", "")
        waiting = sum(1 for j in self.jobs.values() if j.state == "queued") - 1
        job.events.append(ProgressEvent("queued", 0.0, f"job {job.id} queued" + (f" behind {waiting} other(s)" if waiting else "")))
        job.task = task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def _record(self, job: Job, status: str, message: str) -> None:
        job.state = status

        paused = self.paused_seconds(job.id) if status in ENDED else 0.0
        if status in ENDED and self.throttle is not None:
            self.throttle.paused_s.pop(job.id, None)  # kept in the job's record from now on

        def change(info: ModelInfo) -> None:
            record = info.jobs.setdefault(job.id, {"id": job.id, "variant": job.variant, "recipe": job.recipe.name, "submitted_at": now()})
            record.update(status=status, message=message)
            if status == "running":
                record["started_at"] = now()
            elif status in ENDED:
                record["finished_at"] = now()
                if paused:
                    record["paused_seconds"] = round(paused, 3)

        try:
            self.repository.update(job.model, change)
        except SlimServeError:
            log.warning("job %s: model '%s' is gone; its job record is dropped", job.id, job.model)

    async def _publish(self, job: Job, event: ProgressEvent | JobDone | None = None, error: SlimServeError | None = None) -> None:
        async with job.changed:
            if isinstance(event, ProgressEvent):
                job.stage, job.fraction = event.stage, event.fraction
            if event is not None:
                job.events.append(event)
            if error is not None or isinstance(event, JobDone):
                job.error, job.finished = error, True
            job.changed.notify_all()

    def _spec(self, job: Job, staged: Path) -> WorkSpec:
        info = self.repository.get(job.model)
        parent = info.variants[job.request.parent or BASELINE]
        auto = next((p for p in job.recipe.passes if p.name == "auto"), None)
        metric = getattr(auto.config, "metric", None) or None if auto else None
        quality = tuple(job.request.quality or info.quality)  # the job's quality settings, else the model's
        evaluator = job.request.evaluator or info.evaluator
        if quality or evaluator:  # the baseline is scored by what the job asks: cached apart
            metric = f"{metric}|{sorted(quality)}|{evaluator}"
        job.baseline_key = key = self._baseline_key(info, parent.name, metric)
        return WorkSpec(
            job_id=job.id,
            model=job.model,
            variant=job.variant,
            parent=parent.name,
            recipe=job.request.recipe,
            recipe_json=job.request.recipe_json,
            accuracy_budget=job.request.accuracy_budget,
            keep_over_budget=job.request.keep_over_budget,
            source=self.repository.variant_path(info, parent.name),
            format=parent.format,
            runtime=parent.runtime,
            input_names=tuple(s.name for s in info.inputs),
            output_names=tuple(s.name for s in info.outputs),
            datasets=self._datasets(job.model),
            staged=staged,
            baseline=self._baselines.get(key),
            device=self.runtime_config.device,
            quality=quality,
            evaluator=evaluator,
            passes=dict(PASSES),
        )

    async def _run(self, job: Job) -> None:
        loop = asyncio.get_running_loop()

        def progress(event: ProgressEvent) -> None:  # on the loop's thread
            task = loop.create_task(self._publish(job, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            async with self._slots:
                if job.cancel_requested:
                    raise asyncio.CancelledError
                self._record(job, "running", "")
                await self._publish(job, ProgressEvent("running", 0.0, f"started on {self.runner.describe()}"))
                with self.repository.staging() as staged:
                    spec = self._spec(job, staged)
                    result = await self.runner.run(spec, progress)
                    job.committing = True
                    done = await loop.run_in_executor(self.executor, self._commit, job, spec, result)
            await self.dataplane.refresh(job.model)
            self._record(job, "succeeded", "")
            await self._publish(job, done)
            log.info("job %s: variant '%s' of '%s' is ready", job.id, job.variant, job.model)
        except asyncio.CancelledError:
            if job.cancel_requested:
                state, message = "cancelled", f"job {job.id} was cancelled; its worker was ended and nothing was registered"
            else:
                state, message = "interrupted", f"job {job.id} was interrupted: the server stopped while it was {job.state}"
            self._record(job, state, message)
            await self._publish(job, error=FailedPrecondition(message))
        except Exception as e:
            error = job_error(job, e)
            self._record(job, "failed", error.message)
            await self._publish(job, error=error)

    def _commit(self, job: Job, spec: WorkSpec, result: WorkResult) -> JobDone:
        """The server's part once the worker succeeded: the atomic move of the staged variant into the repository."""
        if result.baseline is not None and job.baseline_key is not None:
            self._keep_baseline(job.baseline_key, result.baseline)
        variant = VariantInfo(
            name=job.variant,
            recipe=result.recipe,
            parent=spec.parent,
            runtime=result.runtime,
            format=result.format,
            file=result.file,
            size_bytes=result.size_bytes,
            evaluation=result.evaluation,
        )
        self.repository.add_variant(job.model, result.variant_dir, variant)

        def keep_parent_evaluation(i: ModelInfo) -> None:
            if spec.parent in i.variants:
                i.variants[spec.parent].evaluation = result.baseline_evaluation

        self.repository.update(job.model, keep_parent_evaluation)
        return JobDone(variant, result.report)

    # ------------------------------------------------------------------ job control

    def _live(self, job: Job, record: dict[str, Any]) -> dict[str, Any]:
        out = dict(record)
        if not job.finished:
            out.update(status=job.state, stage=job.stage, progress=job.fraction, paused_seconds=round(self.paused_seconds(job.id), 3))
            paused = self.throttle.paused_jobs.get(job.id) if self.throttle is not None else None
            if paused:
                out["message"] = paused
        elif job.state == "succeeded":
            out["progress"] = 1.0
        return out

    def list(self, model: str = "") -> list[tuple[str, dict[str, Any]]]:
        """(model, job record) of one model, or of every model when `model` is empty; running jobs with their progress."""
        infos = [self.repository.get(model)] if model else self.repository.list()
        out = []
        for info in infos:
            for record in info.jobs.values():
                job = self.jobs.get(record["id"])
                out.append((info.name, self._live(job, record) if job is not None and job.model == info.name else dict(record)))
        return out

    def _ended_record(self, job_id: str) -> tuple[str, dict[str, Any]] | None:
        for info in self.repository.list():
            if job_id in info.jobs:
                return info.name, info.jobs[job_id]
        return None

    async def cancel(self, job_id: str) -> tuple[str, dict[str, Any]]:
        """Cancels a queued or running job: its worker is ended and its staging removed before this returns."""
        job = self.jobs.get(job_id)
        if job is None:
            found = self._ended_record(job_id)
            if found is None:
                raise NotFound(f"no job '{job_id}' on this server; list the jobs with `slimctl jobs`")
            model, record = found
            raise FailedPrecondition(f"job {job_id} ({model}: {record.get('variant')}) has already ended: {record.get('status')}")
        if job.finished or job.state in ENDED:
            raise FailedPrecondition(f"job {job_id} ({job.model}: {job.variant}) has already ended: {job.state}")
        if job.committing:
            raise FailedPrecondition(
                f"job {job_id} has finished its work and is registering variant '{job.variant}'; it can no longer be "
                f"cancelled: delete the variant once it is ready (slimctl delete {job.model} --variant {job.variant})"
            )
        job.cancel_requested = True
        if job.task is not None:
            job.task.cancel()
            await asyncio.wait({job.task})
        found = self._ended_record(job_id)
        return found if found is not None else (job.model, {"id": job.id, "variant": job.variant, "status": job.state})

    def evaluate_in_background(self, model: str, variant: str = BASELINE) -> None:
        """Measures a variant in a worker, like a job (a slot of `--max-jobs`, niced, thread-capped: it no longer competes
        with traffic inside the server), and stores the evaluation with it; later jobs from it reuse the measure."""

        async def run() -> None:
            loop = asyncio.get_running_loop()
            try:
                async with self._slots:
                    info = self.repository.get(model)
                    v = info.variants[variant]
                    data = self.repository.dataset_path(model, "data")
                    with self.repository.staging() as staged:
                        spec = WorkSpec(
                            job_id=f"measure-{uuid.uuid4().hex[:8]}",
                            model=model,
                            variant=variant,
                            parent=variant,
                            recipe="",
                            recipe_json="",
                            accuracy_budget=None,
                            keep_over_budget=False,
                            source=self.repository.variant_path(info, variant),
                            format=v.format,
                            runtime=v.runtime,
                            input_names=tuple(s.name for s in info.inputs),
                            output_names=tuple(s.name for s in info.outputs),
                            datasets={"data": data} if data is not None else {},
                            staged=staged,
                            device=self.runtime_config.device,
                            measure_only=True,
                        )
                        result = await self.runner.run(spec, lambda event: None)
                self._keep_baseline(self._baseline_key(info, variant), result.baseline)

                def store(i: ModelInfo) -> None:
                    if variant in i.variants and not i.variants[variant].evaluation:
                        i.variants[variant].evaluation = result.evaluation

                await loop.run_in_executor(self.executor, self.repository.update, model, store)
                await self.dataplane.refresh(model)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the model may have been deleted meanwhile; nothing to keep
                log.warning("evaluation of '%s' variant '%s' failed: %s", model, variant, e)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        """Ends every worker; their jobs are recorded `interrupted` and nothing of them is registered."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:  # let cancelled tasks unwind so none is destroyed while pending
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.throttle is not None:
            self.throttle.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        await self.runner.close()
