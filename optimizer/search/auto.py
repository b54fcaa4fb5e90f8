"""The `auto` search: tries a few pipelines (prune, distill, quantize, graph), keeps the fastest within the budget.

Every candidate is measured by slimserve.optimizer.evaluation.measure.evaluate on its serving runtime, like any
variant; quality is held to the budget by the metric slimserve.optimizer.evaluation.quality chose (accuracy with labels,
else agreement with the baseline's outputs). Speed is judged against the model's best FP32 runtime
(slimserve.optimizer.evaluation.reference: for a .pt2, its ONNX export in ONNX Runtime too): a candidate is kept only if it
beats that reference by the noise margin, timed in turns with it. The report lists every candidate
(a Pareto table: latency at batch 1 against quality lost), the number of evaluations and the time.
The search is bounded: a handful of candidates, shared prefixes run once, training with few epochs. A
ratio-controlled pass in a candidate (prune-structured, prune-weight, prune-gradual, a derived distillation
student) searches its knob within what is left of the budget (slimserve.optimizer.search.budget), at most `search_evaluations`
probes each and `search_seconds` for all of them together; once those seconds are spent, such a pass runs at its
default setting, so auto takes at most the fixed candidates' time plus search_seconds plus one probe per pass.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimserve.optimizer.base import (
    Artifact,
    OptimizerError,
    Pass,
    PassContext,
    ProgressEvent,
    RuntimeFactory,
)
from slimserve.optimizer.catalog import make_pass, pass_class
from slimserve.optimizer.compress.ortquant import cpu_isa, int8_kernels
from slimserve.optimizer.data import has_labels
from slimserve.optimizer.evaluation.measure import Evaluation, Outputs, evaluate
from slimserve.optimizer.evaluation.quality import describe
from slimserve.optimizer.evaluation.reference import EXPORT, Reference, dynamic_int8_unfit, measure_reference, timed_against
from slimserve.optimizer.evaluation.timing import beats
from slimserve.optimizer.passes.auto import AutoConfig
from slimserve.optimizer.passes.dynamic_seq import any_length_first
from slimserve.optimizer.report import report_rows
from slimserve.optimizer.search.budget import BudgetOptions, Judge, SearchResult, budget_columns, run_within_budget

# Passes that start by converting their input to ONNX: in a search of a .pt2 they start from the one export.
_ONNX_PASSES = frozenset({"graph-ort", "quantize-static", "quantize-dynamic"})
# Candidates within the budget timed in turns against the reference, fastest first, until one beats it.
_CONFIRMATIONS = 3

# What a candidate lacks when a pass needs a dataset role the model was registered without.
_MISSING_DATA = {
    "train": "needs train data (slimctl register NAME MODEL --train TRAIN.npz)",
    "calibration": "needs calibration data (--calibration CALIBRATION.npz)",
}


@dataclass
class Candidate:
    recipe: str
    artifact: Artifact | None = None
    evaluation: Evaluation | None = None
    status: str = "measured"  # measured | skipped: ... | failed: ...
    vs_reference: float | None = None  # reference p50 / candidate p50, timed in turns with the reference
    searches: list[SearchResult] = field(default_factory=list)  # its ratio-controlled passes' budget searches
    before_last: Artifact | None = None  # what its last pass started from (a row-floor repair runs that pass again)


@dataclass
class BudgetSearches:
    """Runs the ratio-controlled passes of the candidates through the budget search, sharing one time limit among them."""

    judge: Judge
    budget: float
    max_evaluations: int
    max_seconds: float
    spent: float = 0.0
    results: dict[tuple[str, ...], SearchResult] = field(default_factory=dict)  # by the candidate prefix that ends in the pass

    def run(self, p: Pass, artifact: Artifact, context: PassContext, done: tuple[str, ...], fresh: bool) -> Artifact:
        """`p` on `artifact`: searched within what is left of the budget after the passes before it, or at its default setting."""
        knob = getattr(p, "budget_knob", None)
        if knob is None or not knob.applies(p.config):
            return p.run(artifact, context)
        left = self.max_seconds - self.spent
        if left <= 0:
            context.progress(
                ProgressEvent(
                    stage="auto",
                    fraction=0.0,
                    message=f"{p.name}: the budget searches' {self.max_seconds:g} s are spent; "
                    f"{knob.field} stays {getattr(p.config, knob.field):g}",
                )
            )
            return p.run(artifact, context)
        before = 0.0 if fresh else (self.judge.artifact(artifact).drop or 0.0)  # what the passes before it lost
        options = BudgetOptions(max_evaluations=self.max_evaluations, max_seconds=left, extra_epochs=0)
        sub = dataclasses.replace(context, workdir=context.workdir / f"search-{len(self.results) + 1}")
        start = time.monotonic()
        try:
            out, result = run_within_budget(p, options, artifact, sub, self.judge, max(0.0, self.budget - before))
        finally:
            self.spent += time.monotonic() - start
        self.results[done] = result
        return out


def _names(recipe: str) -> list[str]:
    return [n.strip() for n in recipe.split(",") if n.strip()]


def _passes(recipe: str, epochs: int) -> list[Pass]:
    """The candidate's passes; a training pass trains for `epochs` (its finetune.epochs, or its own epochs)."""
    passes = []
    for name in _names(recipe):
        cls = pass_class(name)
        config: dict[str, Any] = {}
        if cls is not None and cls.trains:
            fields = {f.name for f in dataclasses.fields(cls.config_cls)}
            config = {"finetune": {"epochs": epochs}} if "finetune" in fields else {"epochs": epochs}
        passes.append(make_pass(name, config, "auto candidate"))
    return passes


def _skip_reason(recipe: str, source: Artifact, datasets: dict[str, Any]) -> str | None:
    """Why the candidate cannot run on this model (`datasets`: the roles the search has), or None."""
    classes = [(n, pass_class(n)) for n in _names(recipe)]
    trains = [n for n, cls in classes if cls is not None and cls.trains]
    if trains and "train" not in datasets:
        return f"skipped: fine-tunes, {_MISSING_DATA['train']}"  # no pass named: the reason reads the same for every trainer
    needs_labels = [n for n, cls in classes if cls is not None and cls.trains and not cls.label_free]
    if needs_labels and not has_labels(datasets["train"]):
        return f"skipped: {needs_labels[0]} fine-tunes on the train data's 'labels', and it has none"
    for name, cls in classes:
        for role in () if cls is None else cls.needs:
            if role not in datasets:
                return f"skipped: {name} {_MISSING_DATA.get(role, f'needs {role} data (--{role} {role.upper()}.npz)')}"
    return None


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names not dominated in (latency: lower is better, accuracy: higher is better)."""
    front = set()
    for name, (lat, acc) in points.items():
        dominated = any(
            (lat2 <= lat and acc2 >= acc) and (lat2 < lat or acc2 > acc) for other, (lat2, acc2) in points.items() if other != name
        )
        if not dominated:
            front.add(name)
    return front


def _run_candidates(
    candidates: list[Candidate],
    source: Artifact,
    start_onnx: Artifact | None,
    config: AutoConfig,
    context: PassContext,
    work: PassContext,
    measure: Any,
    datasets: dict[str, Any],
    searches: BudgetSearches,
) -> None:
    """Runs and measures each candidate (shared prefixes once); failures and skips are recorded, not raised."""
    dynamic_unfit = dynamic_int8_unfit(start_onnx.path) if start_onnx is not None else None
    cache: dict[tuple[str, ...], Artifact] = {}
    n = len(candidates)
    for i, candidate in enumerate(candidates):
        recipe = candidate.recipe
        if context.cancelled():
            raise OptimizerError("the job was cancelled")
        reason = _skip_reason(recipe, source, datasets)
        if reason is None and dynamic_unfit is not None and "quantize-dynamic" in _names(recipe):
            reason = f"skipped: quantize-dynamic would not pay: {dynamic_unfit}"
        if reason is not None:
            candidate.status = reason
            context.progress(ProgressEvent(stage="auto", fraction=i / n, message=f"{recipe}: {reason}"))
            continue
        context.progress(ProgressEvent(stage="auto", fraction=i / n, message=f"candidate {i + 1}/{n}: {recipe}"))
        try:
            passes = _passes(recipe, config.epochs)
            # ONNX passes start from the export the reference measured, instead of exporting the .pt2 again.
            onnx_first = start_onnx is not None and passes[0].name in _ONNX_PASSES
            artifact, done = (start_onnx if onnx_first else source), (("<onnx>",) if onnx_first else ())
            for p in passes:
                fresh = artifact is source or artifact is start_onnx  # lossless so far: the whole budget is left
                candidate.before_last = artifact
                done = (*done, p.name)
                if done not in cache:
                    cache[done] = searches.run(p, artifact, work, done, fresh)
                artifact = cache[done]
                if done in searches.results:
                    candidate.searches.append(searches.results[done])
            candidate.artifact = artifact
            candidate.evaluation = measure(artifact)
        except Exception as e:
            if context.cancelled():
                raise
            if not isinstance(e, OptimizerError):  # a failure outside the passes (e.g. measuring the candidate)
                e = OptimizerError(f"{type(e).__name__}: {' '.join(str(e).split())[:400]}")
            candidate.status = f"failed: {e}"
            context.progress(ProgressEvent(stage="auto", fraction=(i + 1) / n, message=f"{recipe} failed: {e}"))
            continue
        e = candidate.evaluation
        context.progress(
            ProgressEvent(
                stage="auto",
                fraction=(i + 1) / n,
                message=f"{recipe}: p50 {e.latency_p50_ms:.3f} ms, {describe(e.quality_metric, e.quality)} ({_drop(e)})",
            )
        )


def _any_length(start_onnx: Artifact | None, work: PassContext, context: PassContext) -> tuple[Artifact | None, str]:
    """A text model exported at a fixed sequence length goes through graph-dynamic-seq before the ONNX candidates, so
    that the variant kept runs each request at its real length (server/batching/sequence.py); refused, they start from
    the export as it is, and the summary says why."""
    if start_onnx is None:
        return None, ""
    return any_length_first(start_onnx, work, context, "auto")


def floor_problem(e: Evaluation | None, floor: float) -> str:
    """Why a candidate's worst evaluation row is below the row floor ('' when it is not, or no floor applies)."""
    if floor <= 0 or e is None or e.quality_metric != "cosine" or e.quality_min is None or e.quality_min >= floor - 1e-12:
        return ""
    return f"its worst row keeps cosine {e.quality_min:.4f} (< the row floor {floor:g})"


def _repair_rows(
    candidates: list[Candidate], config: AutoConfig, budget: float, context: PassContext, work: PassContext, measure: Any
) -> None:
    """A quantize-dynamic candidate within the budget but under the row floor: quantized again with its keep_fp32_steps most
    INT8-sensitive nodes in FP32, one step after the other, until one holds the floor; each try is a candidate of its own."""
    for c in list(candidates):
        e = c.evaluation
        last = _names(c.recipe)[-1] if _names(c.recipe) else ""
        if last != "quantize-dynamic" or c.before_last is None or e is None or e.quality_drop is None or e.quality_drop > budget + 1e-9:
            continue
        problem = floor_problem(e, config.row_floor)
        if not problem:
            continue
        c.status = f"measured; {problem}"
        for keep in config.keep_fp32_steps:
            if context.cancelled():
                raise OptimizerError("the job was cancelled")
            tried = Candidate(f"{c.recipe}(keep_fp32={keep})", before_last=c.before_last)
            candidates.append(tried)
            context.progress(ProgressEvent(stage="auto", fraction=1.0, message=f"{c.recipe}: {problem}; trying keep_fp32={keep}"))
            try:
                tried.artifact = make_pass("quantize-dynamic", {"keep_fp32": keep}, "auto row floor").run(c.before_last, work)
                tried.evaluation = measure(tried.artifact)
            except OptimizerError as error:
                tried.status = f"failed: {error}"
                break
            te = tried.evaluation
            context.progress(
                ProgressEvent(
                    stage="auto",
                    fraction=1.0,
                    message=f"{tried.recipe}: p50 {te.latency_p50_ms:.3f} ms, {describe(te.quality_metric, te.quality)}, "
                    f"worst row {te.quality_min if te.quality_min is not None else float('nan'):.4f}",
                )
            )
            problem = floor_problem(te, config.row_floor)
            if not problem:
                break
            tried.status = f"measured; {problem}"


def _timed_lengths(candidates: list[Candidate]) -> str:
    return next((c.evaluation.timed_lengths for c in candidates if c.evaluation is not None and c.evaluation.timed_lengths), "")


def _drop(e: Evaluation) -> str:
    return "quality not measured" if e.quality_drop is None else f"{e.quality_drop:.2f} points lost"


def auto_search(
    source: Artifact,
    config: AutoConfig,
    context: PassContext,
    runtime_factory: RuntimeFactory,
    data: dict[str, np.ndarray],
    baseline: Evaluation,
    baseline_outputs: Outputs | None,
    accuracy_budget: float,
    variant_name: str,
    serving_batch: int = 32,
    evaluator: Any = None,
) -> tuple[Artifact, Evaluation, list[dict[str, Any]]]:
    """Measures every candidate; returns the fastest within the budget that beats the best FP32 runtime, and the report rows.

    Raises OptimizerError when no candidate is within the budget and faster than the reference (and the
    FP32 ONNX Runtime export of a .pt2 is not faster than the .pt2 itself): the message says what each reached.
    """
    if baseline.quality_metric is None:
        raise OptimizerError("auto holds quality within a budget and needs evaluation data: register the model with --data EVAL.npz")
    started = time.perf_counter()
    datasets = dict(context.datasets)
    if "calibration" not in datasets and "train" in datasets:
        datasets["calibration"] = datasets["train"]  # the train inputs calibrate as well as any
    work = dataclasses.replace(context, datasets=datasets)
    evaluations = 0

    def measure(artifact: Artifact) -> Evaluation:
        nonlocal evaluations
        evaluations += 1
        e, _ = evaluate(
            artifact,
            runtime_factory,
            data,
            baseline=baseline,
            baseline_outputs=baseline_outputs,
            serving_batch=serving_batch,
            evaluator=evaluator,
        )
        return e

    context.progress(ProgressEvent(stage="auto", fraction=0.0, message="measuring the best FP32 runtime"))
    reference = measure_reference(source, baseline, baseline_outputs, work, runtime_factory, data, serving_batch, evaluator)
    evaluations += reference.export is not None
    candidates = [Candidate(recipe) for recipe in config.candidates]
    start_onnx = source if source.format == "onnx" else (reference.export[0] if reference.export else None)
    start_onnx, any_length = _any_length(start_onnx, work, context)
    judge = Judge(runtime_factory, data, baseline, baseline_outputs, source.input_names, serving_batch, evaluator=evaluator)
    searches = BudgetSearches(judge, accuracy_budget, config.search_evaluations, config.search_seconds)
    _run_candidates(candidates, source, start_onnx, config, context, work, measure, datasets, searches)
    _repair_rows(candidates, config, accuracy_budget, context, work, measure)
    evaluations += judge.evaluations

    def within_budget(e: Evaluation | None) -> bool:
        within = e is not None and e.quality_drop is not None and e.quality_drop <= accuracy_budget + 1e-9
        return within and not floor_problem(e, config.row_floor)

    measured = [c for c in candidates if c.evaluation is not None]
    within = sorted((c for c in measured if within_budget(c.evaluation)), key=lambda c: c.evaluation.latency_p50_ms)  # type: ignore[union-attr]
    # Only a candidate that beats the reference in interleaved timing is kept; the fastest few are tried, in order.
    chosen, timings = None, 0
    for c in within[:_CONFIRMATIONS]:
        assert c.artifact is not None
        ms, ref_ms = timed_against(c.artifact, reference.artifact, runtime_factory, data)
        timings += 1
        c.vs_reference = ref_ms / ms
        if beats(ms, ref_ms, config.noise_margin):
            chosen = c
            break
        c.status = f"measured; not faster than {reference.describe()} in turns: {ref_ms / ms:.2f}x"
    fallback = None
    if chosen is None and reference.name == EXPORT and within_budget(reference.evaluation):
        ms, base_ms = timed_against(reference.artifact, source, runtime_factory, data)
        timings += 1
        if beats(ms, base_ms, config.noise_margin):
            fallback = Candidate(EXPORT, reference.artifact, reference.evaluation, status="measured", vs_reference=1.0)
    seconds = time.perf_counter() - started
    summary = {
        "reference": reference.name,
        "reference_runtime": reference.artifact.runtime,
        "reference_p50_ms": round(reference.p50_ms, 4),
        "search_evaluations": evaluations,
        "search_timings": timings,
        "search_seconds": round(seconds, 1),
        "budget_search_total_s": round(searches.spent, 1),
        **({"row_floor": config.row_floor} if config.row_floor > 0 and baseline.quality_metric == "cosine" else {}),
        **({"dynamic_sequence": any_length} if any_length else {}),
        # A text model's candidates were timed at the eval rows' real lengths, as the server runs them (measure.served_calls).
        **({"timed_lengths": timed} if (timed := _timed_lengths(candidates)) else {}),
        # The node every candidate was timed on: a search on another CPU (no VNNI, AMX) may keep another variant.
        "node_cpu": cpu_isa(),
        "node_int8_kernels": int8_kernels(),
    }
    if chosen is None and fallback is None:
        tried = _distinct_outcomes(candidates, accuracy_budget)
        raise OptimizerError(
            f"auto: no candidate is faster than {reference.describe()} within the budget of {accuracy_budget:g} points of "
            f"{baseline.quality_metric} ({tried}); {_count(evaluations, 'evaluation')} in {seconds:.0f} s; nothing was registered"
        )
    keep = chosen or fallback
    assert keep is not None and keep.artifact is not None and keep.evaluation is not None
    shown = candidates + ([keep] if keep is fallback else [])
    if reference.export is not None and keep is not fallback:
        shown.append(
            Candidate(EXPORT, reference.export[0], reference.export[1], status="reference" if reference.name == EXPORT else "measured")
        )
    rows = _rows(baseline, shown, keep, variant_name, within_budget, reference, summary)
    artifact = keep.artifact.derive(keep.artifact.path, runtime=keep.artifact.runtime, auto_choice=keep.recipe)
    why = "no candidate beat it, and it beats the .pt2 in torch" if keep is fallback else f"the fastest of {len(within)} within the budget"
    context.progress(
        ProgressEvent(
            stage="auto", fraction=1.0, message=f"kept {keep.recipe}: {why} ({_count(evaluations, 'evaluation')}, {seconds:.0f} s)"
        )
    )
    return artifact, keep.evaluation, rows


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _distinct_outcomes(candidates: list[Candidate], budget: float) -> str:
    """Each distinct outcome once, after the candidates it applies to ('distill-soft / prune-structured: skipped: ... needs train data').

    Candidates are joined by ' / ', since a candidate's pipeline has commas of its own.
    """
    by_reason: dict[str, list[str]] = {}
    for c in candidates:
        outcome = _outcome(c, budget)
        by_reason.setdefault(outcome, []).append(c.recipe)
    return "; ".join(f"{' / '.join(recipes)}: {reason}" for reason, recipes in by_reason.items())


def _outcome(c: Candidate, budget: float) -> str:
    e = c.evaluation
    if e is None:
        return c.status
    if e.quality_drop is None or e.quality_drop > budget + 1e-9:
        return f"{_drop(e)} ({describe(e.quality_metric, e.quality)})"
    if "row floor" in c.status:
        return c.status.removeprefix("measured; ")
    if c.vs_reference is not None:
        return f"within budget, {c.vs_reference:.2f}x the reference in turns"
    return f"within budget, p50 {e.latency_p50_ms:.3f} ms"


def _rows(
    baseline: Evaluation,
    shown: list[Candidate],
    keep: Candidate,
    variant_name: str,
    within_budget: Any,
    reference: Reference,
    summary: dict[str, Any],
) -> list[dict[str, Any]]:
    measured = [c for c in shown if c.evaluation is not None]
    points = {"baseline": (baseline.latency_p50_ms or 0.0, -(baseline.quality_drop or 0.0))}
    points.update({c.recipe: (c.evaluation.latency_p50_ms or 0.0, -(c.evaluation.quality_drop or 0.0)) for c in measured})  # type: ignore[union-attr]
    front = pareto_front(points)
    evaluations = {"baseline": baseline}
    names: dict[str, Candidate] = {}
    for c in shown:
        name = variant_name if c is keep else c.recipe
        names[name] = c
        evaluations[name] = c.evaluation or Evaluation()
    rows = report_rows(evaluations, reference=(reference.name, reference.evaluation))
    for row in rows:
        c = names.get(row["variant"])
        if c is None:
            row.update(recipe="", status="baseline", within_budget=True, pareto="baseline" in front, chosen=False, **summary)
            continue
        ok = within_budget(c.evaluation)
        row.update(recipe=c.recipe, status=c.status, within_budget=ok if c.evaluation else None, pareto=c.recipe in front, chosen=c is keep)
        row.update(budget_columns(c.searches))
        if c.artifact is not None and "objective" in c.artifact.notes:
            row["objective"] = c.artifact.notes["objective"]  # what its training minimized: on the labels, or label-free
        if c.vs_reference is not None:
            row["reference_speedup_x"] = round(c.vs_reference, 3)  # timed in turns with the reference: the number that decided
    return rows
