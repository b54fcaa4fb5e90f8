"""The `auto` search: tries a few pipelines (prune, distill, quantize, graph), keeps the fastest within the accuracy budget.

Every candidate is measured by optimizer.evaluation.evaluate on its serving runtime, like any
variant; the report lists them all (a Pareto table: latency at batch 1 against accuracy) and
marks the one kept. The search is bounded: a handful of candidates, shared prefixes run once,
training candidates with few epochs, so that a run on a small model takes minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimizer.base import (
    Artifact,
    OptimizerError,
    Pass,
    PassContext,
    ProgressEvent,
    RuntimeFactory,
)
from optimizer.evaluation import Evaluation, evaluate
from optimizer.passes.auto import AutoConfig
from optimizer.registry import make_pass, pass_class
from optimizer.report import report_rows

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
    if trains and source.format != "pt2":
        return f"skipped: {trains[0]} trains in torch and needs the model as .pt2"
    if trains and "train" not in datasets:
        return f"skipped: {trains[0]} {_MISSING_DATA['train']}"
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


def auto_search(
    source: Artifact,
    config: AutoConfig,
    context: PassContext,
    runtime_factory: RuntimeFactory,
    data: dict[str, np.ndarray],
    baseline: Evaluation,
    baseline_outputs: np.ndarray | None,
    accuracy_budget: float,
    variant_name: str,
    serving_batch: int = 32,
) -> tuple[Artifact, Evaluation, list[dict[str, Any]]]:
    """Runs and measures every candidate; returns the fastest within the budget, its evaluation, and the report rows of all."""
    if baseline.accuracy is None:
        raise OptimizerError("auto needs labelled evaluation data to hold accuracy within the budget: register the model with --data EVAL.npz holding 'labels'")
    datasets = dict(context.datasets)
    if "calibration" not in datasets and "train" in datasets:
        datasets["calibration"] = datasets["train"]  # the train inputs calibrate as well as any
    work = dataclasses.replace(context, datasets=datasets)
    cache: dict[tuple[str, ...], Artifact] = {}
    candidates: list[Candidate] = []
    n = len(config.candidates)
    for i, recipe in enumerate(config.candidates):
        if context.cancelled():
            raise OptimizerError("the job was cancelled")
        candidate = Candidate(recipe)
        candidates.append(candidate)
        reason = _skip_reason(recipe, source, datasets)
        if reason is not None:
            candidate.status = reason
            context.progress(ProgressEvent(stage="auto", fraction=i / n, message=f"{recipe}: {reason}"))
            continue
        context.progress(ProgressEvent(stage="auto", fraction=i / n, message=f"candidate {i + 1}/{n}: {recipe}"))
        try:
            passes = _passes(recipe, config.epochs)
            artifact, done = source, ()
            for p in passes:
                done = (*done, p.name)
                if done not in cache:
                    cache[done] = p.run(artifact, work)
                artifact = cache[done]
            candidate.artifact = artifact
            candidate.evaluation, _ = evaluate(
                artifact, runtime_factory, data, baseline=baseline, baseline_outputs=baseline_outputs, serving_batch=serving_batch
            )
        except OptimizerError as e:
            if context.cancelled():
                raise
            candidate.status = f"failed: {e}"
            context.progress(ProgressEvent(stage="auto", fraction=(i + 1) / n, message=f"{recipe} failed: {e}"))
            continue
        e = candidate.evaluation
        context.progress(ProgressEvent(
            stage="auto", fraction=(i + 1) / n,
            message=f"{recipe}: p50 {e.latency_p50_ms:.3f} ms, accuracy {100 * (e.accuracy or 0):.2f}% ({e.accuracy_delta:+.2f} pt)",
        ))

    measured = [c for c in candidates if c.evaluation is not None]
    within = [c for c in measured if -(c.evaluation.accuracy_delta or 0.0) <= accuracy_budget + 1e-9]  # type: ignore[union-attr]
    chosen = min(within, key=lambda c: c.evaluation.latency_p50_ms) if within else None  # type: ignore[union-attr]
    points = {"baseline": (baseline.latency_p50_ms or 0.0, baseline.accuracy or 0.0)}
    points.update({c.recipe: (c.evaluation.latency_p50_ms or 0.0, c.evaluation.accuracy or 0.0) for c in measured})  # type: ignore[union-attr]
    front = pareto_front(points)

    evaluations = {"baseline": baseline}
    names: dict[str, Candidate] = {}
    for c in candidates:
        name = variant_name if c is chosen else c.recipe
        names[name] = c
        evaluations[name] = c.evaluation or Evaluation()
    rows = report_rows(evaluations)
    for row in rows:
        c = names.get(row["variant"])
        if c is None:
            row.update(recipe="", status="baseline", within_budget=True, pareto="baseline" in front, chosen=False)
            continue
        ok = c in within
        row.update(recipe=c.recipe, status=c.status, within_budget=ok if c.evaluation else None, pareto=c.recipe in front, chosen=c is chosen)
    if chosen is None:
        tried = "; ".join(
            f"{c.recipe}: {c.status if c.evaluation is None else f'{-c.evaluation.accuracy_delta:.2f} points lost'}" for c in candidates
        )
        raise OptimizerError(f"auto: no candidate stays within the accuracy budget of {accuracy_budget:g} points ({tried}); raise --accuracy-budget")
    assert chosen.artifact is not None and chosen.evaluation is not None
    artifact = chosen.artifact.derive(chosen.artifact.path, runtime=chosen.artifact.runtime, auto_choice=chosen.recipe)
    context.progress(ProgressEvent(stage="auto", fraction=1.0, message=f"kept {chosen.recipe}: the fastest of {len(within)} within {accuracy_budget:g} points"))
    return artifact, chosen.evaluation, rows
