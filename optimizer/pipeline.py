"""One optimization: run a recipe on a model, evaluate the result against the baseline, build the report.

Used by the server's jobs and by the offline `slimserve optimize`, so both measure the same way. The
budget holds the quality slimserve.optimizer.evaluation.quality chose (accuracy with labels, else agreement with the
baseline's outputs); a caller that keeps the baseline's measure passes it in, so it is taken once. Under a
budget (the job's, or a pass's own `max_drop`) each lossy pass runs through slimserve.optimizer.search.budget: ratio-controlled
passes search their most aggressive setting within it, training passes fine-tune on while over it; a variant
that cannot meet it is refused with the best it reached, or kept and marked when the caller asks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from slimserve.optimizer.base import (
    Artifact,
    OptimizerError,
    PassContext,
    Predictor,
    ProgressEvent,
    RuntimeFactory,
)
from slimserve.optimizer.catalog import pass_classes
from slimserve.optimizer.data import SampleMajorPredictor, has_labels, needs_layout, samples_first
from slimserve.optimizer.evaluation.evaluators import Evaluator
from slimserve.optimizer.evaluation.measure import Evaluation, Outputs, evaluate, record_speedup, timed_speedup
from slimserve.optimizer.evaluation.quality import METRICS, describe
from slimserve.optimizer.evaluation.timing import TimingOptions
from slimserve.optimizer.formats.export import onnx_input_types
from slimserve.optimizer.formats.onnx_files import single_file
from slimserve.optimizer.passes.auto import AutoConfig
from slimserve.optimizer.passes.dynamic_seq import any_length_first
from slimserve.optimizer.recipes import Recipe, run_recipe
from slimserve.optimizer.report import report_rows
from slimserve.optimizer.search.auto import auto_search
from slimserve.optimizer.search.budget import Judge, SearchResult, budget_columns, run_within_budget

# Points of the quality metric a variant may lose when the caller sets no --accuracy-budget: every output, and the
# evaluator where one is set, is held to it on the evaluation data (or, without data, on synthesized inputs).
DEFAULT_BUDGET = 1.0


@dataclass(frozen=True)
class Baseline:
    """The source model's evaluation and its outputs on the evaluation data: what every variant is measured against."""

    evaluation: Evaluation
    outputs: Outputs | None


@dataclass(frozen=True)
class OptimizeResult:
    artifact: Artifact
    evaluation: Evaluation
    baseline: Evaluation
    report: list[dict]
    baseline_outputs: Outputs | None = field(default=None, compare=False)  # to cache with `baseline` for the next job
    searches: tuple[SearchResult, ...] = ()  # the passes held to a budget: setting kept, evaluations, seconds
    within_budget: bool | None = None  # None: no budget applied; False only when the caller asked to keep it over budget


def evaluation_data(context: PassContext) -> dict[str, np.ndarray] | None:
    return context.dataset("data", needed_by="evaluation") if "data" in context.datasets else None


def layout_aware(
    source: Artifact, runtime_factory: RuntimeFactory, data: dict[str, np.ndarray] | None
) -> tuple[RuntimeFactory, dict[str, np.ndarray] | None]:
    """The factory and evaluation data evaluation uses, sample-major where an input is not batched on axis 0 (slimserve.optimizer.data).

    A model with a state batched on axis 1, or a scalar input, is measured like any other: evaluation sees samples
    on axis 0 and its runtimes get each batch in the model's own layout.
    """
    if source.format != "onnx":
        return runtime_factory, data  # torch.export programs are batched on axis 0 by slimserve's exporter
    shapes = {name: shape for name, (_, shape) in onnx_input_types(source.path).items()}
    if not needs_layout(shapes):
        return runtime_factory, data

    def factory(path: Path, runtime: str) -> Predictor:
        return SampleMajorPredictor(runtime_factory(path, runtime))

    return factory, None if data is None else samples_first(data, shapes)


def measure_baseline(
    source: Artifact,
    context: PassContext,
    runtime_factory: RuntimeFactory,
    serving_batch: int = 32,
    metric: str | None = None,
    declared: dict[str, str] | None = None,
    evaluator: Evaluator | None = None,
    timing: TimingOptions | None = None,
) -> Baseline:
    """Measures the source model on its runtime, on the context's evaluation data (synthesized inputs without it)."""
    factory, data = layout_aware(source, runtime_factory, evaluation_data(context))
    evaluation, outputs = evaluate(
        source, factory, data, serving_batch=serving_batch, metric=metric, declared=declared, evaluator=evaluator, timing=timing
    )
    return Baseline(evaluation, outputs)


def preflight(recipe: Recipe, datasets: Mapping[str, Path], accuracy_budget: float | None = None) -> None:
    """Refuses, in a moment and before any measurement, a recipe that needs data the model was registered without.

    Reads only the names of the arrays in each .npz: training passes need train data with 'labels', a pass's
    `needs` its roles, a budget (or auto) evaluation data.
    """
    auto = any(p.name == "auto" for p in recipe.passes)
    if auto and len(recipe.passes) > 1:
        raise OptimizerError("auto searches pipelines of its own and cannot be combined with other passes; use --recipe auto alone")
    max_drop = any(recipe.budget(i).max_drop is not None for i in range(len(recipe.passes)))
    if (accuracy_budget is not None or auto or max_drop) and "data" not in datasets:
        what = "auto" if auto else "--accuracy-budget" if accuracy_budget is not None else "a pass's max_drop"
        raise OptimizerError(
            f"{what} holds quality within a budget, measured on evaluation data (against its 'labels', or without them against "
            "the baseline's own outputs): register the model with --data EVAL.npz"
        )
    for p in recipe.passes:
        if p.trains:
            if "train" not in datasets:
                raise OptimizerError(
                    f"{p.name} fine-tunes the model and needs train data; the model was registered without it: "
                    "register it again with slimctl register NAME MODEL --train TRAIN.npz (one array per model input, plus 'labels')"
                )
            if not p.label_free and not has_labels(datasets["train"]):
                raise OptimizerError(
                    f"{p.name}: the train data has no 'labels' array; add the class index of each sample as 'labels' to TRAIN.npz "
                    f"(without labels, {', '.join(sorted(n for n, c in pass_classes().items() if c.label_free))} train toward the model's own outputs)"
                )
        for role in p.needs:
            if role not in datasets:
                raise OptimizerError(f"{p.name} needs {role} data, and the model was registered without it (--{role} {role.upper()}.npz)")


def optimize(
    source: Artifact,
    recipe: Recipe,
    context: PassContext,
    runtime_factory: RuntimeFactory,
    variant_name: str,
    accuracy_budget: float | None = None,
    serving_batch: int = 32,
    baseline: Baseline | None = None,
    metric: str | None = None,
    register_over_budget: bool = False,
    declared: dict[str, str] | None = None,
    evaluator: Evaluator | None = None,
) -> OptimizeResult:
    """Runs `recipe` on `source`, then measures source and result the same way on their runtimes.

    accuracy_budget: points of the quality metric the variant may lose (accuracy points with labels), on every output
    and on the evaluator; None: DEFAULT_BUDGET for the final measure (a budget search runs only when one is given).
    declared: {output: metric} (`--quality OUTPUT=METRIC`); the others are chosen from each output's shape, datatype, name.
    evaluator: a task metric in points (slimserve.optimizer.evaluation.evaluators), held to the budget like the outputs.
    baseline: the source's measure from an earlier job on the same data, so it is not taken again.
    metric: the quality metric (slimserve.optimizer.evaluation.quality.METRICS); None: chosen from the labels and the output.
    register_over_budget: return a variant that misses its budget (marked within_budget False) instead of refusing it.
    """
    if metric is not None and metric not in METRICS:
        raise OptimizerError(f"quality metric must be one of {', '.join(METRICS)}, got {metric!r}")
    preflight(recipe, context.datasets, accuracy_budget)
    if source.format == "onnx":  # weights in side files (torch.onnx.export's default): one file for every pass, under 2 GiB
        source = replace(source, path=single_file(source.path, context.workdir / "source"))
    runtime_factory, data = layout_aware(source, runtime_factory, evaluation_data(context))
    auto = [p.config for p in recipe.passes if isinstance(p.config, AutoConfig)]
    if auto:
        metric = metric or auto[0].metric or None

    def stage(name: str, fraction: float, message: str) -> None:
        context.progress(ProgressEvent(stage=name, fraction=fraction, message=message))

    if baseline is None:
        stage("evaluate", 0.0, "measuring the baseline")
        evaluation, outputs = evaluate(
            source,
            runtime_factory,
            data,
            serving_batch=serving_batch,
            metric=metric,
            declared=declared,
            evaluator=evaluator,
            timing=recipe.timing,
        )
        baseline = Baseline(evaluation, outputs)
    base, base_outputs = baseline.evaluation, baseline.outputs
    if auto:
        config = auto[0]
        budget = config.accuracy_budget if accuracy_budget is None else accuracy_budget
        artifact, evaluation, rows = auto_search(
            source,
            config,
            context,
            runtime_factory,
            data,
            base,
            base_outputs,
            budget,
            variant_name,
            serving_batch,
            evaluator=evaluator,
        )
        return OptimizeResult(artifact, evaluation, base, rows, base_outputs)
    budgeted = accuracy_budget is not None or any(recipe.budget(i).max_drop is not None for i in range(len(recipe.passes)))
    judge = None
    start = graph_start(recipe, source, context)
    if not budgeted:
        artifact, searches = run_recipe(recipe, start, context), []
    else:
        judge = Judge(runtime_factory, data or {}, base, base_outputs, source.input_names, serving_batch, evaluator=evaluator)
        artifact, searches = run_recipe_within_budget(recipe, start, context, judge, accuracy_budget, variant_name, register_over_budget)
    stage("evaluate", 0.95, f"measuring {variant_name}")
    try:
        evaluation, _ = evaluate(
            artifact,
            runtime_factory,
            data,
            baseline=base,
            baseline_outputs=base_outputs,
            serving_batch=serving_batch,
            metric=metric,
            evaluator=evaluator,
            timing=recipe.timing,
            outputs=judge.last[1] if judge is not None and judge.last is not None and judge.last[0] == artifact.path else None,
        )
    except OptimizerError:
        raise
    except Exception as e:  # the variant's file does not load or run on its runtime: a refusal, never INTERNAL
        raise OptimizerError(
            f"{variant_name}: the variant {recipe.name} wrote ({artifact.path.name}) does not run on {artifact.runtime}: "
            f"{type(e).__name__}: {' '.join(str(e).split())[:400]}; nothing was registered. Try another recipe"
        ) from e
    if artifact.path != source.path:  # the speed-up, timed in turns against the source in this job on their serving runtimes
        stage("evaluate", 0.98, f"timing {variant_name} against the baseline in turns")
        record_speedup(evaluation, timed_speedup(artifact, source, runtime_factory, data, recipe.timing))
    within = None if not budgeted else all(s.within for s in searches)
    # The default budget holds on evaluation data only: on synthesized inputs a quantized model's drop says little.
    # A pass's own max_drop loosens the default for the job; a job budget is the caller's word.
    default = max([DEFAULT_BUDGET] + [s.budget for s in searches])
    gate = accuracy_budget if accuracy_budget is not None else default if data is not None else None
    gated = gate is not None and evaluation.quality_drop is not None
    if gated:
        within = (within is not False) and evaluation.quality_drop <= gate + 1e-9  # type: ignore[operator]
    over = gated and evaluation.quality_drop > gate + 1e-9  # type: ignore[operator]
    if over and not register_over_budget:
        raise OptimizerError(over_budget(variant_name, evaluation, base, gate, searches, default=accuracy_budget is None and not searches))  # type: ignore[arg-type]
    extra = {variant_name: {**budget_columns(searches), "within_budget": within}}
    if gate is not None and (gated or budgeted):
        extra[variant_name]["budget_pt"] = min([gate] + [s.budget for s in searches])
    report = report_rows({"baseline": base, variant_name: evaluation}, extra=extra)
    if "objective" in artifact.notes:  # what the training passes minimized (optimizer.objectives: label-free or on the labels)
        report[-1]["objective"] = artifact.notes["objective"]
    if start is not source and "dynamic_sequence" in artifact.notes:  # served (and timed) at each request's real length
        report[-1]["dynamic_sequence"] = f"any length: {artifact.notes['dynamic_sequence']}"
    if "qat" in artifact.notes:  # quantize-qat against the static INT8 of the ranges it started from (kept when QAT is worse)
        report[-1]["qat"] = artifact.notes["qat"]
    return OptimizeResult(artifact, evaluation, base, report, base_outputs, tuple(searches), within)


# Graph passes whose ONNX output would keep a text export's fixed sequence length: the server's load-time rewrite (the
# same file served padding-free, server/runtimes/onnx.py) checks outputs exactly, and a quantized graph's answers move
# with its padding (dynamic INT8 scales each activation by its range, padded positions included), so an INT8 variant
# of a fixed-length export was served and timed at full length: MiniLM's at 128 tokens, 3x slower than its FP32 parent
# served at the sentences' real length. These passes start from the graph made any length, as `auto` does.
ANY_LENGTH_FIRST = frozenset({"quantize-dynamic", "quantize-static", "graph-ort"})


def graph_start(recipe: Recipe, source: Artifact, context: PassContext) -> Artifact:
    """The source the recipe starts from: a fixed-length text export made to take any length (graph-dynamic-seq, checked
    exactly) when the first pass is one of ANY_LENGTH_FIRST; the export as it is when the rewrite refuses (said in the
    progress), or when there is nothing to rewrite."""
    if not recipe.passes or recipe.passes[0].name not in ANY_LENGTH_FIRST:
        return source
    return any_length_first(source, context, context, "graph-dynamic-seq")[0]


def run_recipe_within_budget(
    recipe: Recipe,
    source: Artifact,
    context: PassContext,
    judge: Judge,
    accuracy_budget: float | None,
    variant_name: str,
    register_over_budget: bool,
) -> tuple[Artifact, list[SearchResult]]:
    """Runs the passes in order, each lossy one held to its budget (its max_drop, else the job's): searched, fine-tuned while over.

    A pass that cannot meet its budget stops the recipe with the best it reached, unless register_over_budget.
    """
    artifact, searches, n = source, [], len(recipe.passes)
    for i, p in enumerate(recipe.passes):
        if context.cancelled():
            raise OptimizerError("the job was cancelled")
        context.progress(ProgressEvent(stage=p.name, fraction=i / n, message=f"pass {i + 1}/{n}: {p.name}"))
        options = recipe.budget(i)
        budget = accuracy_budget if options.max_drop is None else options.max_drop
        if budget is None or not (p.trains or getattr(p, "budget_knob", None) is not None):
            artifact = p.run(artifact, context)  # lossless or post-training: the final measure holds it to the budget
            continue
        artifact, search = run_within_budget(p, options, artifact, context, judge, budget)
        searches.append(search)
        if not search.within and not register_over_budget:
            raise OptimizerError(search.refusal(variant_name))
    context.progress(ProgressEvent(stage="passes", fraction=1.0, message="passes done"))
    return artifact, searches


def over_budget(
    variant_name: str,
    evaluation: Evaluation,
    baseline: Evaluation,
    budget: float,
    searches: Sequence[SearchResult] = (),
    default: bool = False,
) -> str:
    """The refusal of a variant over the budget: the best it reached, on which output, by which metric, against what
    (and the searches that led there)."""
    reached = describe(evaluation.quality_metric, evaluation.quality)
    output = evaluation.quality_output or ""
    base = (baseline.qualities or {}).get(output, {})
    base_value = base.get("value") if base else baseline.quality
    against = describe(evaluation.quality_metric, base_value) if base_value is not None else "the baseline's outputs"
    worst = f", worst sample {evaluation.quality_min:.4f}" if evaluation.quality_min is not None else ""
    where = "" if not output else (f" on {output.split(':', 1)[1]}" if output.startswith("evaluator:") else f" on output '{output}'")
    which = f"the default budget of {budget:g}" if default else f"the budget of {budget:g}"
    return (
        f"{variant_name} loses {evaluation.quality_drop:.2f} points of {evaluation.quality_metric}{where} ({reached}{worst}, against "
        f"{against}), over {which}"
        + "".join(f" ({s.summary()})" for s in searches)
        + "; nothing was registered (raise --accuracy-budget, keep it marked with --keep-over-budget, or pick a gentler recipe)"
    )
