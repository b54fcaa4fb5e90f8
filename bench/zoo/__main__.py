"""`python -m bench.zoo`: every recipe on every zoo architecture, as .pt2 and as .onnx, through `slimserve optimize`.

    python -m bench.zoo [--models resnet18,bert4] [--recipes graph-ort,auto] [--formats onnx]
                        [--timeout 300] [--accuracy-budget 1.0] [--json rows.json] [--table table.txt]

Models are trained briefly (or loaded with their real weights) into --models-dir and reused from there; each
run is a `python -m slimserve.server.cli optimize` subprocess with --timeout seconds, so nothing hangs. Prints one line
per run and the matrix at the end: outcome (created / refused: reason / failed: reason / timeout), seconds,
size, FLOPs and p50 ratios (p50 against the optimizer's own baseline, as reported, and against the model's FP32
ONNX file in ORT at batch 1, measured here), and the accuracy change in points (or the agreement with FP32).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bench.zoo.build import SPECS
from bench.zoo.run import FORMATS, RECIPES, render, run_matrix


def _choice(value: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(SPECS), help="comma-separated: " + ", ".join(SPECS))
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--formats", default=",".join(FORMATS), help="pt2, onnx or both")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per optimize run before it is killed")
    parser.add_argument("--accuracy-budget", type=float, default=None, help="passed to every run (points)")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "slimserve-zoo" / "models")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the runs write (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here (updated after every run)")
    parser.add_argument("--table", type=Path, default=None, help="write the printed table here as text")
    args = parser.parse_args(argv)
    models = _choice(args.models, list(SPECS), "model")
    recipes = _choice(args.recipes, RECIPES, "recipe")
    formats = _choice(args.formats, FORMATS, "format")

    console = Console(width=max(Console().width, 200))  # the matrix has 11 columns and long reasons
    rows: list[dict] = []

    def save(row: dict) -> None:
        rows.append(row)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        result = run_matrix(
            models,
            formats,
            recipes,
            args.models_dir,
            work,
            args.timeout,
            args.accuracy_budget,
            log=lambda line: console.print(line, markup=False, highlight=False),
            on_row=save,
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    table = render(result)
    console.print(table)
    console.print(f"{len(result)} runs in {time.perf_counter() - start:.0f} s")
    if args.table:
        with args.table.open("w") as f:
            Console(file=f, width=260, no_color=True).print(table)


if __name__ == "__main__":
    main()
