"""Tests for optimizer/search.py and the auto pass (optimizer/passes/auto.py), through optimizer.pipeline.optimize.

Every candidate is measured and the fastest within the budget kept.
"""

from __future__ import annotations

import pytest

from optimizer.base import Artifact, OptimizerError, PassContext
from optimizer.pipeline import optimize
from optimizer.recipes import Recipe, parse_recipe
from optimizer.registry import make_pass
from optimizer.search import pareto_front


def test_pareto_front_keeps_only_undominated_points():
    points = {"a": (1.0, 0.9), "b": (2.0, 0.95), "c": (2.5, 0.9), "d": (0.5, 0.5)}
    assert pareto_front(points) == {"a", "b", "d"}


def test_auto_is_a_recipe_and_refuses_company_and_missing_evaluation_data(digits, runtime_factory, tmp_path):
    assert parse_recipe("auto").name == "auto"
    source = Artifact(digits.pt2, "pt2", input_names=("x",), output_names=("logits",))
    context = PassContext(workdir=tmp_path, datasets={"train": digits.train, "data": digits.data})
    with pytest.raises(OptimizerError, match="auto searches pipelines of its own and cannot be combined"):
        optimize(source, parse_recipe("auto,graph-ort"), context, runtime_factory, "v")
    no_data = PassContext(workdir=tmp_path, datasets={"train": digits.train})
    with pytest.raises(OptimizerError, match=r"auto holds quality within a budget, measured on evaluation data.*--data EVAL\.npz"):
        optimize(source, parse_recipe("auto"), no_data, runtime_factory, "v")
    with pytest.raises(OptimizerError, match=r"--accuracy-budget holds quality within a budget.*--data EVAL\.npz"):
        optimize(source, parse_recipe("graph-ort"), no_data, runtime_factory, "v", accuracy_budget=1.0)
    with pytest.raises(OptimizerError, match="candidates cannot contain auto itself"):
        make_pass("auto", {"candidates": ["auto"]})


@pytest.mark.slow
def test_auto_keeps_the_fastest_candidate_within_the_budget_and_reports_all(digits, runtime_factory, tmp_path):
    source = Artifact(digits.pt2, "pt2", input_names=("x",), output_names=("logits",))
    context = PassContext(workdir=tmp_path, datasets={"train": digits.train, "data": digits.data, "calibration": digits.calibration})
    auto = make_pass("auto", {"epochs": 1, "candidates": ["graph-ort", "prune-structured,quantize-static"]})
    result = optimize(source, Recipe("auto", (auto,)), context, runtime_factory, "auto", accuracy_budget=2.0)
    rows = {r["variant"]: r for r in result.report}
    assert set(rows) == {"baseline", "auto", "graph-ort", "prune-structured,quantize-static"} - {result.artifact.notes["auto_choice"]}
    chosen = rows["auto"]
    assert chosen["chosen"] and chosen["within_budget"] and chosen["recipe"] == result.artifact.notes["auto_choice"]
    measured = [r for r in rows.values() if r["status"] == "measured"]
    within = [r for r in measured if r["within_budget"]]
    assert chosen["latency_p50_ms"] == min(r["latency_p50_ms"] for r in within)
    assert all(r["accuracy_delta_pt"] >= -2.0 for r in within)
    assert any(r["pareto"] for r in rows.values())
    assert result.evaluation.latency_p50_ms == pytest.approx(chosen["latency_p50_ms"], abs=1e-4)


@pytest.mark.slow
def test_auto_skips_training_candidates_for_onnx_models(digits, runtime_factory, tmp_path):
    source = Artifact(digits.onnx, "onnx", input_names=("x",), output_names=("logits",))
    context = PassContext(workdir=tmp_path, datasets={"train": digits.train, "data": digits.data})
    auto = make_pass("auto", {"candidates": ["prune-structured", "graph-ort"]})
    result = optimize(source, Recipe("auto", (auto,)), context, runtime_factory, "auto")
    rows = {r["variant"]: r for r in result.report}
    assert rows["prune-structured"]["status"] == "skipped: prune-structured trains in torch and needs the model as .pt2"
    assert result.artifact.notes["auto_choice"] == "graph-ort"
