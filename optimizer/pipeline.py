"""One optimization: run a recipe on a model, evaluate the result against the baseline, build the report.

Used by the server's jobs and by the offline `slimserve optimize`, so both measure the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from optimizer.base import (
    Artifact,
    OptimizerError,
    PassContext,
    ProgressEvent,
    RuntimeFactory,
)
from optimizer.evaluation import Evaluation, evaluate
from optimizer.recipes import Recipe, run_recipe
from optimizer.report import report_rows
from optimizer.search import auto_search


@dataclass(frozen=True)
class OptimizeResult:
    artifact: Artifact
    evaluation: Evaluation
    baseline: Evaluation
    report: list[dict]


def optimize(
    source: Artifact,
    recipe: Recipe,
    context: PassContext,
    runtime_factory: RuntimeFactory,
    variant_name: str,
    accuracy_budget: float | None = None,
    serving_batch: int = 32,
) -> OptimizeResult:
    """Runs `recipe` on `source`, then measures source and result the same way on their runtimes."""
    data = context.dataset("data", needed_by="evaluation") if "data" in context.datasets else None
    if accuracy_budget is not None and (data is None or "labels" not in data):
        raise OptimizerError("--accuracy-budget needs labelled evaluation data: register the model with --data EVAL.npz holding 'labels'")

    def stage(name: str, fraction: float, message: str) -> None:
        context.progress(ProgressEvent(stage=name, fraction=fraction, message=message))

    auto = [p for p in recipe.passes if p.name == "auto"]
    if auto and len(recipe.passes) > 1:
        raise OptimizerError("auto searches pipelines of its own and cannot be combined with other passes; use --recipe auto alone")
    if auto and (data is None or "labels" not in data):
        raise OptimizerError("auto keeps accuracy within a budget and needs labelled evaluation data: register the model with --data EVAL.npz holding 'labels'")

    stage("evaluate", 0.0, "measuring the baseline")
    baseline, baseline_outputs = evaluate(source, runtime_factory, data, serving_batch=serving_batch)
    if auto:
        config = auto[0].config
        budget = config.accuracy_budget if accuracy_budget is None else accuracy_budget  # type: ignore[attr-defined]
        artifact, evaluation, rows = auto_search(
            source, config, context, runtime_factory, data, baseline, baseline_outputs, budget, variant_name, serving_batch  # type: ignore[arg-type]
        )
        return OptimizeResult(artifact, evaluation, baseline, rows)
    artifact = run_recipe(recipe, source, context)
    stage("evaluate", 0.95, f"measuring {variant_name}")
    evaluation, _ = evaluate(
        artifact, runtime_factory, data, baseline=baseline, baseline_outputs=baseline_outputs, serving_batch=serving_batch
    )
    if accuracy_budget is not None and evaluation.accuracy_delta is not None and -evaluation.accuracy_delta > accuracy_budget:
        raise OptimizerError(
            f"{variant_name} loses {-evaluation.accuracy_delta:.2f} accuracy points, over the budget of "
            f"{accuracy_budget:g}; nothing was registered (raise --accuracy-budget or pick a gentler recipe)"
        )
    report = report_rows({"baseline": baseline, variant_name: evaluation})
    return OptimizeResult(artifact, evaluation, baseline, report)
