"""What one optimizer job runs, away from the server: in a local worker process or as a task on a Ray cluster.

`run_work` is the whole job as a blocking function of plain data (a `WorkSpec`): the passes, the evaluation, and
the variant's files written into the staging directory the server gave it. It registers nothing: the server moves
the staged variant in only when the worker has succeeded (`management/jobs.py`).

`python -m slimserve.server.management.worker FD` is the local worker process (`management/runners.LocalRunner`):
it reads its `WorkSpec` (pickled) on stdin, lowers its own priority, caps its threads before torch or ORT start
any, and sends `("progress", ProgressEvent)` then `("done", WorkResult)` or `("failed", kind, message)` on the
pipe FD. A worker that dies without a word (out of memory, a signal, a crash in native code) is reported by the
runner from its exit status.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Thread pools of the numeric libraries, capped in a worker before any of them is imported.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class WorkLimits:
    """What a worker may take of the node: threads for torch and ORT, its niceness, its resident memory (0: no cap)."""

    threads: int = 1
    nice: int = 19
    memory_mb: int = 0


@dataclass(frozen=True)
class WorkSpec:
    """A job as plain data: everything a worker needs, with the paths it reads and the directory it writes."""

    job_id: str
    model: str
    variant: str
    parent: str
    recipe: str
    recipe_json: str
    accuracy_budget: float | None
    keep_over_budget: bool
    source: Path  # the parent variant's model file (side files beside it)
    format: str
    runtime: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    datasets: dict[str, Path]
    staged: Path  # the job's private staging directory: work/ for scratch, variant/ for the result
    baseline: Any = None  # slimserve.optimizer.pipeline.Baseline measured by an earlier job, or None
    limits: WorkLimits = field(default_factory=WorkLimits)
    device: str = "auto"
    quality: tuple[str, ...] = ()  # "OUTPUT=METRIC": the job's, else the model's from its registration
    evaluator: str = ""  # an evaluator installed on this node (checked by the server before the job starts)
    # The server's pass catalog (name -> "module:Class"): passes a deployment adds to the table run in the worker too.
    passes: dict[str, str] = field(default_factory=dict)
    # Only measure `source` on the evaluation data (a registered model's baseline): no recipe, nothing written; the
    # result's `evaluation` and `baseline` are its measure.
    measure_only: bool = False


@dataclass(frozen=True)
class WorkResult:
    """What comes back from a worker that succeeded: the staged variant directory and what its record says."""

    variant_dir: Path
    file: str
    format: str
    runtime: str
    recipe: str  # the record's recipe (auto's choice, a budget search's settings)
    size_bytes: int
    evaluation: dict[str, Any]
    baseline_evaluation: dict[str, Any]
    report: list[dict]
    baseline: Any = None  # the parent's Baseline, to reuse in later jobs


class WorkFailed(Exception):
    """A job that failed in its worker: `kind` is an ErrorKind's name, `message` says what and what to do."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message)  # both in args: the exception pickles (a Ray task's failure travels back)
        self.kind, self.message = kind, message

    def __str__(self) -> str:
        return self.message


def parse_recipe_of(recipe: str, recipe_json: str):
    """The job's Recipe from a name list or a recipe file's JSON; an OptimizerError says what is wrong."""
    import json

    from slimserve.optimizer.base import OptimizerError
    from slimserve.optimizer.recipes import parse_recipe, recipe_from_dict

    if recipe_json:
        try:
            data = json.loads(recipe_json)
        except json.JSONDecodeError as e:
            raise OptimizerError(f"recipe file is not valid JSON: {e}") from e
        return recipe_from_dict(data, "recipe file")
    return parse_recipe(recipe)


def recipe_record(recipe: str, result) -> str:
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


def cap_threads(threads: int, torch_too: bool = True) -> None:
    """Caps torch's intra- and inter-op pools (and, through the environment, OpenMP's and BLAS's) at `threads`.
    `torch_too=False`: the environment only, torch not imported (measuring an ONNX file needs none: a second saved)."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    if not torch_too:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or parallel work already started in this process
        pass


def cap_ort_threads(threads: int) -> None:
    """Every ONNX Runtime session this worker opens without a thread count (ORT's quantization calibrates on its own
    sessions) gets `threads` intra- and inter-op threads that do not spin while idle: the cores stay the server's."""
    import onnxruntime as ort

    opened = ort.InferenceSession.__init__
    if getattr(opened, "capped_at", None) == threads:
        return

    def capped(self, path_or_bytes, sess_options=None, *args, **kwargs):
        options = sess_options if sess_options is not None else ort.SessionOptions()
        if options.intra_op_num_threads == 0:
            options.intra_op_num_threads = threads
        if options.inter_op_num_threads == 0:
            options.inter_op_num_threads = threads
        try:
            spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
        except Exception:  # ORT raises for an entry never set
            spinning = ""
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opened(self, path_or_bytes, options, *args, **kwargs)

    capped.capped_at = threads  # type: ignore[attr-defined]
    ort.InferenceSession.__init__ = capped  # type: ignore[method-assign]


def measure_work(spec: WorkSpec) -> WorkResult:
    """A `measure_only` spec: `source` measured on the evaluation data as a job measures its parent. Blocking."""
    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.evaluation.measure import evaluate
    from slimserve.optimizer.pipeline import Baseline, layout_aware
    from slimserve.server.runtimes import RuntimeConfig, create_runtime

    config = RuntimeConfig(intra_op_threads=0, threads_per_call=spec.limits.threads, device=spec.device)

    def factory(path: Path, runtime: str):
        r = create_runtime(runtime, path, config)
        r.load()
        return r

    source = Artifact(
        path=spec.source, format=spec.format, runtime=spec.runtime, input_names=spec.input_names, output_names=spec.output_names
    )
    data_path = spec.datasets.get("data")
    data = PassContext(workdir=spec.staged / "work", datasets={"data": data_path}).dataset("data", "evaluation") if data_path else None
    factory, data = layout_aware(source, factory, data)  # a state on axis 1, a scalar input: as optimize measures
    evaluation, outputs = evaluate(source, factory, data)
    variant_dir = spec.staged / "variant"
    variant_dir.mkdir()
    return WorkResult(
        variant_dir=variant_dir,
        file="",
        format=spec.format,
        runtime=spec.runtime,
        recipe="",
        size_bytes=0,
        evaluation=evaluation.to_dict(),
        baseline_evaluation=evaluation.to_dict(),
        report=[],
        baseline=Baseline(evaluation, outputs),
    )


def run_work(spec: WorkSpec, progress: Callable[[Any], None], cancelled: Callable[[], bool] = lambda: False) -> WorkResult:
    """Runs the job: passes, evaluation, and the variant's files in `spec.staged / "variant"`. Blocking."""
    if spec.measure_only:
        return measure_work(spec)
    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.evaluation.evaluators import load_evaluator
    from slimserve.optimizer.evaluation.quality import parse_declared
    from slimserve.optimizer.formats.onnx_files import copy_model
    from slimserve.optimizer.pipeline import Baseline, optimize
    from slimserve.server.runtimes import RuntimeConfig, create_runtime

    # ORT sessions get the intra-op threads that will serve the file (kept beside it, `<file>.threads.json`, else
    # measured and kept there): a speed-up is timed at the serving thread count, and the variant takes the choice along.
    config = RuntimeConfig(intra_op_threads=0, threads_per_call=spec.limits.threads, device=spec.device)

    def factory(path: Path, runtime: str):
        r = create_runtime(runtime, path, config)
        r.load()
        return r

    from slimserve.optimizer.catalog import PASSES

    PASSES.update(spec.passes)
    recipe = parse_recipe_of(spec.recipe, spec.recipe_json)
    source = Artifact(
        path=spec.source, format=spec.format, runtime=spec.runtime, input_names=spec.input_names, output_names=spec.output_names
    )
    context = PassContext(workdir=spec.staged / "work", datasets=dict(spec.datasets), progress=progress, cancelled=cancelled)
    result = optimize(
        source,
        recipe,
        context,
        factory,
        spec.variant,
        spec.accuracy_budget,
        baseline=spec.baseline,
        register_over_budget=spec.keep_over_budget,
        declared=parse_declared(list(spec.quality), list(spec.output_names)),
        evaluator=load_evaluator(spec.evaluator) if spec.evaluator else None,
    )
    variant_dir = spec.staged / "variant"
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
    shutil.rmtree(spec.staged / "work", ignore_errors=True)
    return WorkResult(
        variant_dir=variant_dir,
        file=target.name,
        format=result.artifact.format,
        runtime=result.artifact.runtime,
        recipe=recipe_record(recipe.name, result),
        size_bytes=target.stat().st_size,
        evaluation=result.evaluation.to_dict(),
        baseline_evaluation=result.baseline.to_dict(),
        report=result.report,
        baseline=Baseline(result.baseline, result.baseline_outputs),
    )


def failure_of(e: BaseException, limits: WorkLimits) -> WorkFailed:
    """A worker's exception as the failure the job reports: a pass's refusal is the caller's to fix, the rest is the job's."""
    from slimserve.optimizer.base import OptimizerError

    if isinstance(e, WorkFailed):
        return e
    if isinstance(e, OptimizerError):
        return WorkFailed("FAILED_PRECONDITION", str(e))
    if isinstance(e, MemoryError):
        cap = f"the job memory cap (--job-memory-mb {limits.memory_mb})" if limits.memory_mb else "the node's memory"
        return WorkFailed("RESOURCE_EXHAUSTED", f"the worker ran out of memory under {cap}; raise --job-memory-mb or use a smaller recipe")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return WorkFailed("RESOURCE_EXHAUSTED", f"the disk is full: {e}; free disk space on the server, or optimize a smaller model")
    kind = getattr(getattr(e, "kind", None), "name", None)
    if kind is not None and kind != "INTERNAL":  # a SlimServeError raised inside the work (a runtime's refusal)
        return WorkFailed(kind, str(e))
    # Never INTERNAL: anything unforeseen is a failed precondition that names the error (the worker logs the traceback).
    text = " ".join(str(e).split())[:400] or "no message"
    return WorkFailed(
        "FAILED_PRECONDITION",
        f"{type(e).__name__}: {text}; nothing was registered and the model serves as before. Try another recipe; "
        "the server log has the traceback for a bug report",
    )


def lower_priority(nice: int) -> None:
    """Below the server: `nice` added to the worker's niceness (serving threads keep their cores). At 19, the most, the
    worker also takes Linux's SCHED_IDLE class (below every nice level, allowed without privileges): a serving thread
    that wakes preempts it at once, where a nice +19 task may first finish its slice, so the worker runs only in the
    cores' idle moments. Linux keeps both per thread: every thread there is gets them, and the threads started later
    inherit them from the main thread."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        with contextlib.suppress(OSError):  # a thread that has ended
            if nice > 0:
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
            if nice >= 19 and hasattr(os, "SCHED_IDLE"):  # a kernel or a sandbox without it: nice alone
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when the server that started it dies, so no orphan job goes on burning cores."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    import pickle
    from multiprocessing.connection import Connection

    from slimserve.optimizer.evaluation.resumes import count_resumes
    from slimserve.optimizer.quiet import quiet_third_party

    die_with_parent()
    count_resumes()  # before any thread starts: a call timed across a stop of the job yield is timed again
    # A process group of its own in the server's session (runners.py): in a terminal it is a background group, which a
    # write to the terminal would stop (SIGTTOU) where the terminal has `stty tostop`; its log lines go on instead.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    quiet_third_party()  # the worker's stderr is the server's: the same filters as the server's own log
    conn = Connection(int(argv[0]), readable=False)
    spec: WorkSpec = pickle.load(sys.stdin.buffer)
    lower_priority(spec.limits.nice)
    try:
        cap_threads(spec.limits.threads, torch_too=not (spec.measure_only and spec.format == "onnx"))
        cap_ort_threads(spec.limits.threads)
        result = run_work(spec, lambda event: conn.send(("progress", event)))
    except BaseException as e:
        from slimserve.optimizer.base import OptimizerError

        if not isinstance(e, OptimizerError | KeyboardInterrupt):  # unforeseen: its traceback in the server's log
            traceback.print_exc(file=sys.stderr)
        failed = failure_of(e, spec.limits)
        conn.send(("failed", failed.kind, failed.message))
        return 1
    conn.send(("done", result))
    return 0


if __name__ == "__main__":
    # Through the module's own name, so that what it pickles names slimserve.server.management.worker, not __main__.
    from slimserve.server.management import worker

    sys.exit(worker.main(sys.argv[1:]))
