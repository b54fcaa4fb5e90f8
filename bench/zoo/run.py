"""Runs recipes on zoo models through `slimserve optimize` (a subprocess, the offline contract) and tabulates the outcomes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RECIPES = (
    "quantize-dynamic",
    "quantize-static",
    "quantize-qat",
    "prune-weight",
    "prune-structured",
    "prune-gradual",
    "distill-soft",
    "distill-feature",
    "graph-ort",
    "auto",
)
FORMATS = ("pt2", "onnx")


def fp32_ort_p50_ms(onnx_file: Path, eval_npz: Path, seconds: float = 2.0) -> float:
    """The FP32 ONNX file's p50 at batch 1 in ORT, with the session options of slimserve's ONNX runtime
    (server/runtimes/onnx.py: default thread counts, ORT_ENABLE_ALL, sequential, no spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    with np.load(eval_npz) as z:
        feed = {i.name: z[i.name][:1] for i in session.get_inputs()}
    for _ in range(10):
        session.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0)


def _reason(stderr: str) -> tuple[str, str]:
    """(outcome, reason) from a failed run's stderr: a `slimserve optimize:` line is a refusal, a traceback a failure."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    refusal = [line for line in lines if line.startswith("slimserve optimize:")]
    if any(line.startswith("Traceback") for line in lines):
        tail = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), "")
        return "failed", tail[:300]
    if refusal:
        return "refused", refusal[-1].removeprefix("slimserve optimize:").strip()[:300]
    return "failed", (lines[-1] if lines else "no output")[:300]


def report_row(out: Path, recipe: str) -> dict[str, Any]:
    """The variant's measures from DIR/report.json: the row named after the run (an `auto` report also lists every
    candidate, each with `status` and `chosen`; the chosen one's recipe is kept)."""
    report = json.loads((out / "report.json").read_text())
    base = next((r for r in report if r.get("variant") == "baseline"), {})
    named = [r for r in report if r.get("variant") == Path(recipe).stem]
    variant = named[0] if named else ([r for r in report if r.get("variant") != "baseline"] or [{}])[-1]
    chosen = next((r.get("recipe") or r.get("variant") for r in report if r.get("chosen")), None)
    return {
        "variant": variant.get("variant"),
        "chosen": chosen,
        "runtime": variant.get("runtime"),
        "baseline_runtime": base.get("runtime"),
        "baseline_p50_ms": base.get("latency_p50_ms"),
        "p50_ms": variant.get("latency_p50_ms"),
        "size_x": variant.get("size_reduction_x"),
        "flops_x": variant.get("compute_reduction_x"),
        "p50_x_reported": variant.get("speedup_x"),
        "sparsity_pct": variant.get("sparsity_pct"),
        "accuracy_pct": variant.get("accuracy_pct"),
        "accuracy_delta_pt": variant.get("accuracy_delta_pt"),
        "agreement": variant.get("agreement"),
    }


def optimize(folder: Path, fmt: str, recipe: str, out: Path, timeout_s: float, budget: float | None, env: dict[str, str]) -> dict[str, Any]:
    """One `slimserve optimize` run; the row of the matrix it gives (outcome, reason, seconds and the variant's report row)."""
    command = [
        sys.executable,
        "-m",
        "slimserve.server.cli",
        "optimize",
        str(folder / f"model.{fmt}"),
        "--recipe",
        recipe,
        "--data",
        str(folder / "eval.npz"),
        "--train",
        str(folder / "train.npz"),
        "--calibration",
        str(folder / "calibration.npz"),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    if budget is not None:
        command += ["--accuracy-budget", str(budget)]
    start = time.perf_counter()
    # Its own session, so that a timeout ends the optimizer and any worker it started, and nothing else.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"outcome": "timeout", "reason": f"no result after {timeout_s:.0f} s", "seconds": round(time.perf_counter() - start, 1)}
    row: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        row["outcome"], row["reason"] = _reason(stderr)
        row["stderr_tail"] = stderr[-2000:]
        return row
    row.update(outcome="created", reason="", **report_row(out, recipe))
    return row


def run_matrix(
    models: list[str],
    formats: list[str],
    recipes: list[str],
    root: Path,
    work: Path,
    timeout_s: float,
    budget: float | None,
    log: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    from bench.zoo.build import SPECS, Unavailable, build

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    rows: list[dict] = []
    total = len(models) * len(formats) * len(recipes)
    done = 0
    for name in models:
        log(f"[{name}] building / loading ({SPECS[name].note or 'trained here'})")
        try:
            folder = build(name, root, log)
        except Unavailable as e:
            log(f"[{name}] skipped: {e}")
            for fmt in formats:
                rows.append({"model": name, "format": fmt, "recipe": "*", "outcome": "skipped", "reason": str(e)})
            done += len(formats) * len(recipes)
            continue
        meta = json.loads((folder / "meta.json").read_text())
        ort_p50 = fp32_ort_p50_ms(folder / "model.onnx", folder / "eval.npz")
        log(f"[{name}] FP32 ORT p50 at batch 1: {ort_p50:.3f} ms; data: {meta['data']}")
        for fmt in formats:
            for recipe in recipes:
                done += 1
                out = work / name / fmt / recipe
                row = {"model": name, "format": fmt, "recipe": recipe, "fp32_ort_p50_ms": round(ort_p50, 5)}
                row.update(optimize(folder, fmt, recipe, out, timeout_s, budget, env))
                if row.get("p50_ms"):
                    row["p50_x_vs_fp32_ort"] = round(ort_p50 / row["p50_ms"], 3)
                rows.append(row)
                log(f"[{done}/{total}] {name} {fmt} {recipe}: {row['outcome']} in {row['seconds']} s {row.get('reason', '')}")
                if on_row:
                    on_row(row)
    return rows


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def render(rows: list[dict]):
    from rich.table import Table

    table = Table(title="slimserve zoo: every recipe on every architecture")
    for column in (
        "model",
        "fmt",
        "recipe",
        "outcome",
        "s",
        "size x",
        "FLOPs x",
        "p50 ms",
        "p50 x (reported)",
        "p50 x vs FP32 ORT",
        "Δ acc pt / agreement",
    ):
        table.add_column(column, overflow="fold")
    colours = {"created": "green", "refused": "yellow", "failed": "red", "timeout": "red", "skipped": "dim"}
    for r in rows:
        outcome = f"[{colours.get(r['outcome'], 'white')}]{r['outcome']}[/]"
        if r.get("reason"):
            outcome += f": {r['reason']}"
        if r.get("chosen"):
            outcome += f" (chose {r['chosen']})"
        quality = "–"
        if r.get("accuracy_delta_pt") is not None:
            quality = f"{r['accuracy_delta_pt']:+.1f} pt"
            if r.get("agreement") is not None:
                quality += f" / {r['agreement']:.3f}"
        elif r.get("agreement") is not None:
            quality = f"agree {r['agreement']:.3f}"
        p50 = "–" if r.get("p50_ms") is None else f"{r['p50_ms']:.3f}"
        table.add_row(
            r["model"],
            r["format"],
            r["recipe"],
            outcome,
            str(r.get("seconds", "–")),
            _x(r.get("size_x")),
            _x(r.get("flops_x")),
            p50,
            _x(r.get("p50_x_reported")),
            _x(r.get("p50_x_vs_fp32_ort")),
            quality,
        )
    return table
