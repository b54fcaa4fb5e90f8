"""Every recipe on foreign-style models (issue 20): does the optimizer create a variant, refuse precisely, or fail (INTERNAL)?

    python -m bench.bench_foreign [--models prelu,opset11] [--recipes graph-ort,quantize-static] [--epochs 1] [--json OUT]

The models are built here (bench/foreign_models.py): weights in Constant nodes, opset 11, PReLU, a scalar input,
a state batched on axis 1, a batch fixed to 1, a YOLO-style detector head, an `If` subgraph. Each recipe runs
offline through slimserve.optimizer.pipeline.optimize, as `slimserve optimize` does, with the model's eval data
(--data) and train data (--train, also used to calibrate), training passes for --epochs epochs. A cell reads

    created            a variant was written and measured
    refused: REASON    an OptimizerError: the precise refusal a user gets (FAILED_PRECONDITION from the server)
    INTERNAL: ERROR    any other exception: a bug (the server answers such a job with its own refusal, never INTERNAL,
                       but the matrix counts them so that they get fixed)

Prints the matrix, the INTERNAL count and how many created variants hold the default 1-point budget on every output
(the points each output lost, from the report); exits 1 when any cell is INTERNAL or a created variant is over budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.foreign_models import BUILDERS, Foreign

# graph-compile / graph-xla compile a .pt2 for torch; on an ONNX model they are refused (nothing to compile).
RECIPES = (
    "graph-ort",
    "quantize-dynamic",
    "quantize-static",
    "prune-weight",
    "prune-gradual",
    "prune-structured",
    "distill-soft",
    "distill-feature",
    "quantize-qat",
    "graph-compile",
    "graph-xla",
    "auto",
)


def _factory():
    from slimserve.server.runtimes import RuntimeConfig, create_runtime

    config = RuntimeConfig(device="cpu")

    def factory(path: Path, runtime: str):
        r = create_runtime(runtime, path, config)
        r.load()
        return r

    return factory


def _recipe(name: str, epochs: int):
    from slimserve.optimizer.catalog import pass_class
    from slimserve.optimizer.recipes import recipe_from_dict

    cls = pass_class(name)
    config: dict[str, Any] = {}
    if name == "auto":
        config = {"epochs": epochs, "search_evaluations": 2, "search_seconds": 20.0}
    elif cls is not None and cls.trains:
        fields = {f.name for f in dataclasses.fields(cls.config_cls)}
        config = {"finetune": {"epochs": epochs}} if "finetune" in fields else {"epochs": epochs}
    return recipe_from_dict({"name": name, "passes": [{"pass": name, "config": config}]}, name)


def run_cell(model: Foreign, recipe: str, epochs: int, workdir: Path) -> dict[str, Any]:
    """One recipe on one model: {'outcome': created | refused | INTERNAL, 'detail': ..., 'seconds': ...}."""
    from slimserve.optimizer.base import Artifact, OptimizerError, PassContext
    from slimserve.optimizer.pipeline import DEFAULT_BUDGET, optimize

    factory = _factory()
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    try:
        probe = factory(model.onnx, "onnxruntime")
        source = Artifact(
            model.onnx, "onnx", input_names=tuple(s.name for s in probe.inputs), output_names=tuple(s.name for s in probe.outputs)
        )
        datasets = {"data": model.data, "train": model.train, "calibration": model.train}
        context = PassContext(workdir=workdir, datasets=datasets)
        result = optimize(source, _recipe(recipe, epochs), context, factory, recipe)
        e = result.evaluation
        detail = f"drop {e.quality_drop:.2f} pt" if e.quality_drop is not None else "quality not measured"
        if "auto_choice" in result.artifact.notes:
            detail = f"{result.artifact.notes['auto_choice']}, {detail}"
        outcome = "created"
        # The target: every created variant within the default budget (no --accuracy-budget: 1 point) on every output
        # and on the evaluator; checked here from the report's per-output drops, not from the pipeline's own gate.
        drops = {n: round(q["drop"], 3) for n, q in (e.qualities or {}).items() if q.get("drop") is not None}
        within = all(d <= DEFAULT_BUDGET + 1e-9 for d in drops.values()) if drops else None
        extra = {"drops": drops, "within_budget": within, "threads": e.threads, "speedup_x": e.speedup_x}
    except OptimizerError as err:
        outcome, detail = "refused", str(err)
    except Exception as err:
        outcome, detail = "INTERNAL", f"{type(err).__name__}: {err}"
        traceback.print_exc(file=sys.stderr)
    return {
        "model": model.name,
        "recipe": recipe,
        "outcome": outcome,
        "detail": detail,
        "seconds": round(time.perf_counter() - started, 1),
        **extra,
    }


def run_matrix(models: list[str], recipes: list[str], epochs: int, directory: Path, log=print) -> list[dict[str, Any]]:
    cells = []
    for name in models:
        model = BUILDERS[name](directory)
        for recipe in recipes:
            cell = run_cell(model, recipe, epochs, directory / f"work-{name}-{recipe}")
            cells.append(cell)
            log(f"{name:14s} {recipe:18s} {cell['outcome']:9s} {cell['seconds']:6.1f}s  {cell['detail'][:160]}")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BUILDERS))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the cells as JSON here")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in BUILDERS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)} (models: {', '.join(BUILDERS)})")
    with tempfile.TemporaryDirectory() as tmp:
        cells = run_matrix(models, [r for r in args.recipes.split(",") if r], args.epochs, Path(tmp))
    recipes = list(dict.fromkeys(c["recipe"] for c in cells))
    print()
    print("model".ljust(14) + "".join(r[:16].ljust(17) for r in recipes))
    for name in models:
        row = {c["recipe"]: c["outcome"] for c in cells if c["model"] == name}
        print(name.ljust(14) + "".join(row.get(r, "").ljust(17) for r in recipes))
    internal = [c for c in cells if c["outcome"] == "INTERNAL"]
    counts = {k: sum(c["outcome"] == k for c in cells) for k in ("created", "refused", "INTERNAL")}
    print(f"\n{counts['created']} created, {counts['refused']} refused, {counts['INTERNAL']} INTERNAL of {len(cells)} cells")
    created = [c for c in cells if c["outcome"] == "created"]
    over = [c for c in created if c.get("within_budget") is False]
    unmeasured = [c for c in created if c.get("within_budget") is None]
    budget_refusals = sum(c["outcome"] == "refused" and "budget" in c["detail"] for c in cells)
    print(
        f"created: {len(created) - len(over) - len(unmeasured)} within the 1-point budget on every output, {len(over)} over, "
        f"{len(unmeasured)} with no quality measured; {budget_refusals} refused for the budget"
    )
    for c in over + unmeasured:
        print(f"  {c['model']} {c['recipe']}: drops {c.get('drops')}")
    if args.json:
        args.json.write_text(json.dumps(cells, indent=2))
    sys.exit(1 if internal or over else 0)


if __name__ == "__main__":
    main()
