"""The zoo's CI subset: a residual CNN, a transformer and an LSTM through quick recipes of `slimserve optimize`, each a
created variant or a precise refusal, never a traceback, an internal error or a timeout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

from bench.zoo.build import build
from bench.zoo.data import mnist_5k_path
from bench.zoo.run import ROOT, fp32_ort_p50_ms, optimize

# One epoch on 512 rows: what is checked is the outcome, not the accuracy (bench.zoo runs the real defaults).
QUICK_PRUNE = {"name": "prune-weight", "passes": [{"pass": "prune-weight", "config": {"finetune": {"epochs": 1, "max_samples": 512}}}]}
RUNS = [("onnx", "graph-ort"), ("onnx", "quantize-dynamic"), ("pt2", "prune-weight"), ("onnx", "prune-weight")]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    try:
        mnist_5k_path()
    except ImportError as e:
        pytest.skip(str(e))
    return tmp_path_factory.mktemp("zoo-models")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["resnet18", "bert4", "lstm"])
def test_quick_recipes_create_a_variant_or_refuse_precisely(name: str, models: Path, tmp_path: Path) -> None:
    folder = build(name, models, log=lambda _: None, quick=True)
    assert {p.name for p in folder.iterdir()} >= {"model.pt2", "model.onnx", "eval.npz", "train.npz", "calibration.npz"}
    assert not list(folder.glob("*.data")), "the ONNX weights must be inside model.onnx"
    assert fp32_ort_p50_ms(folder / "model.onnx", folder / "eval.npz", seconds=0.2) > 0
    recipe_file = tmp_path / "prune-weight.json"
    recipe_file.write_text(json.dumps(QUICK_PRUNE))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for fmt, recipe in RUNS:
        spec = str(recipe_file) if recipe == "prune-weight" else recipe
        row = optimize(folder, fmt, spec, tmp_path / fmt / recipe, timeout_s=400, budget=None, env=env)
        where = f"{name} {fmt} {recipe}: {row}"
        assert row["outcome"] in ("created", "refused"), where
        assert "Traceback" not in row.get("stderr_tail", ""), where
        assert "internal error" not in row.get("reason", "").lower(), where
        if row["outcome"] == "refused":
            # precise: names the recipe or the format, and says what to do instead or why
            assert len(row["reason"]) > 30 and (recipe in row["reason"] or fmt.upper() in row["reason"]), where
        else:
            assert list((tmp_path / fmt / recipe).glob("model.*")), where
            assert row["p50_ms"] and row["p50_ms"] > 0, where
            assert row["size_x"] and row["size_x"] > 0, where
            assert row["agreement"] is not None and 0.0 <= row["agreement"] <= 1.0, where
