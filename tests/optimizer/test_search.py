"""Tests for optimizer/search/auto.py and the auto pass (optimizer/passes/auto.py), through slimserve.optimizer.pipeline.optimize.

Every candidate is measured and the fastest within the budget kept, if it beats the model's best FP32 runtime.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from slimserve.optimizer.base import Artifact, OptimizerError, Pass, PassContext
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.evaluation.measure import Evaluation
from slimserve.optimizer.pipeline import optimize
from slimserve.optimizer.recipes import Recipe, parse_recipe
from slimserve.optimizer.search.auto import pareto_front
from tests.optimizer.tiny_models import (
    FEATURES,
    add_pass,
    conv_onnx,
    dense_onnx,
    mlp_pt2,
    onnx_artifact,
    register_file_pass,
    save_npz,
    weights,
)


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
    tried = {"baseline", "auto", "graph-ort", "prune-structured,quantize-static", "fp32-onnxruntime"}
    assert set(rows) == tried - {result.artifact.notes["auto_choice"]}  # the chosen one is named 'auto'
    chosen = rows["auto"]
    assert chosen["chosen"] and chosen["within_budget"] and chosen["recipe"] == result.artifact.notes["auto_choice"]
    probes = sum(r.get("budget_evaluations") or 0 for r in rows.values())  # prune-structured's budget search
    assert 2 <= probes <= 4 and rows["baseline"]["metric"] == "accuracy"
    assert rows["baseline"]["search_evaluations"] == 3 + probes  # the export, 2 candidates and the search's probes
    within = [r for r in rows.values() if r["status"].startswith("measured") and r["within_budget"]]
    assert all(r["accuracy_delta_pt"] >= -2.0 for r in within)
    # Faster candidates within the budget were passed over only because they did not beat the reference in turns.
    faster = [r for r in within if r["latency_p50_ms"] < chosen["latency_p50_ms"] and r is not chosen]
    assert all(r["status"].startswith("measured; not faster than FP32") for r in faster)
    assert chosen["recipe"] == "fp32-onnxruntime" or chosen["reference_speedup_x"] >= 1 / 0.95
    assert any(r["pareto"] for r in rows.values())
    assert result.evaluation.latency_p50_ms == pytest.approx(chosen["latency_p50_ms"], abs=1e-4)


def test_auto_skips_training_candidates_that_need_labels_when_the_train_data_has_none(tmp_path, runtime_factory, monkeypatch):
    w = weights(np.random.default_rng(0), 16, 384)
    register_file_pass(monkeypatch, "test-lean", dense_onnx(tmp_path / "lean.onnx", w))
    data = save_npz(tmp_path / "eval.npz", x=np.random.default_rng(2).standard_normal((32, FEATURES)).astype(np.float32))
    context = PassContext(workdir=tmp_path / "work", datasets={"train": data, "data": data})
    source = onnx_artifact(dense_onnx(tmp_path / "slow.onnx", w, slow=2))
    result = optimize(source, _auto("prune-weight", "test-lean"), context, runtime_factory, "auto")
    rows = {r["variant"]: r for r in result.report}
    assert rows["prune-weight"]["status"] == "skipped: prune-weight fine-tunes on the train data's 'labels', and it has none"
    assert result.artifact.notes["auto_choice"] == "test-lean"


def test_label_free_training_candidates_are_not_skipped_without_labels(tmp_path):
    """Students and structured pruning train toward the model's own outputs (slimserve.optimizer.finetune.objectives), so auto tries them."""
    from slimserve.optimizer.passes.auto import DEFAULT_CANDIDATES
    from slimserve.optimizer.search.auto import _skip_reason

    unlabelled = save_npz(tmp_path / "train.npz", x=np.zeros((4, FEATURES), np.float32))
    source = onnx_artifact(dense_onnx(tmp_path / "m.onnx", weights(np.random.default_rng(0), 16, 384)))
    datasets = {"train": unlabelled, "data": unlabelled, "calibration": unlabelled}
    assert {"distill-soft", "distill-soft,quantize-dynamic", "prune-structured"} <= set(DEFAULT_CANDIDATES)
    for recipe in (
        "distill-soft",
        "distill-feature",
        "distill-soft,quantize-dynamic",
        "prune-structured",
        "prune-structured,quantize-static",
    ):
        assert _skip_reason(recipe, source, datasets) is None, recipe
    assert (
        _skip_reason("prune-weight", source, datasets) == "skipped: prune-weight fine-tunes on the train data's 'labels', and it has none"
    )
    assert _skip_reason("quantize-qat", source, datasets) is not None


# --------------------------------------------------------------------------------------------
# without labels, against the best FP32 runtime (tiny ONNX models; test-only passes swap in prepared files)


@pytest.fixture
def embedder(tmp_path):
    """A [N, 16] -> [N, 384] embedding model without labels, a copy 2 MatMuls slower, and the evaluation data."""
    w = weights(np.random.default_rng(0), 16, 64, 384)
    fast, slow = dense_onnx(tmp_path / "fast.onnx", w), dense_onnx(tmp_path / "slow.onnx", w, slow=2)
    lossy = dense_onnx(tmp_path / "lossy.onnx", [w[0], w[1] + 0.3 * np.random.default_rng(1).standard_normal(w[1].shape)])
    data = save_npz(tmp_path / "eval.npz", x=np.random.default_rng(2).standard_normal((64, FEATURES)).astype(np.float32))
    return fast, slow, lossy, PassContext(workdir=tmp_path / "work", datasets={"data": data})


def _auto(*candidates: str, **config) -> Recipe:
    return Recipe("auto", (make_pass("auto", {"candidates": list(candidates), **config}),))


def test_auto_on_embeddings_holds_cosine_and_keeps_a_candidate_faster_than_the_reference(embedder, runtime_factory, monkeypatch):
    fast, slow, lossy, context = embedder
    register_file_pass(monkeypatch, "test-lean", fast)
    register_file_pass(monkeypatch, "test-lossy", lossy)
    result = optimize(onnx_artifact(slow), _auto("test-lossy", "test-lean"), context, runtime_factory, "auto", accuracy_budget=1.0)
    assert result.artifact.notes["auto_choice"] == "test-lean" and result.artifact.path == fast
    rows = {r["variant"]: r for r in result.report}
    assert {r["metric"] for r in rows.values()} == {"cosine"}
    assert rows["auto"]["quality"] == pytest.approx(1.0, abs=1e-5) and rows["auto"]["reference_speedup_x"] >= 1.05
    assert rows["test-lossy"]["within_budget"] is False and rows["test-lossy"]["quality_drop_pt"] > 1.0
    assert rows["baseline"]["reference"] == "baseline" and rows["baseline"]["search_evaluations"] == 2
    assert rows["baseline"]["search_timings"] == 1 and rows["baseline"]["search_seconds"] >= 0
    assert result.evaluation.agreement == result.evaluation.quality  # cosine, not argmax agreement


def test_auto_never_keeps_a_variant_slower_than_the_reference(embedder, runtime_factory, monkeypatch):
    fast, slow, _, context = embedder
    register_file_pass(monkeypatch, "test-slow", slow)
    with pytest.raises(OptimizerError) as info:
        optimize(onnx_artifact(fast), _auto("test-slow"), context, runtime_factory, "auto", accuracy_budget=1.0)
    message = str(info.value)
    assert message.startswith("auto: no candidate is faster than FP32 onnxruntime (")
    assert "within the budget of 1 points of cosine" in message and "test-slow: within budget" in message
    assert "nothing was registered" in message and "1 evaluation in" in message  # the candidate; the baseline is its own reference


def test_auto_skips_dynamic_int8_on_convolutions(tmp_path, runtime_factory):
    data = save_npz(tmp_path / "eval.npz", x=np.random.default_rng(2).standard_normal((16, FEATURES)).astype(np.float32))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": data})
    with pytest.raises(OptimizerError, match=r"quantize-dynamic: skipped: quantize-dynamic would not pay: .* 1 Conv"):
        optimize(onnx_artifact(conv_onnx(tmp_path / "conv.onnx")), _auto("quantize-dynamic"), context, runtime_factory, "auto")


@pytest.mark.slow
def test_auto_on_a_pt2_falls_back_to_its_fp32_export_when_no_candidate_beats_it(tmp_path, runtime_factory, monkeypatch):
    source = Artifact(mlp_pt2(tmp_path / "mlp.pt2", out=384), "pt2", input_names=("x",), output_names=("embedding",))
    data = save_npz(tmp_path / "eval.npz", x=np.random.default_rng(2).standard_normal((64, FEATURES)).astype(np.float32))
    register_file_pass(monkeypatch, "test-slow", dense_onnx(tmp_path / "slow.onnx", weights(np.random.default_rng(0), 16, 384), slow=4))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": data})
    result = optimize(source, _auto("test-slow"), context, runtime_factory, "auto")  # ORT runs a tiny MLP far faster than eager
    assert result.artifact.notes["auto_choice"] == "fp32-onnxruntime" and result.artifact.runtime == "onnxruntime"
    rows = {r["variant"]: r for r in result.report}
    assert rows["auto"]["recipe"] == "fp32-onnxruntime" and rows["auto"]["speedup_x"] > 1.0
    assert rows["test-slow"]["within_budget"] is False  # another model's answers: far from the baseline's


@pytest.mark.slow
def test_auto_on_a_label_free_transformer_measures_students_and_pruning_trained_toward_its_outputs(tmp_path, runtime_factory):
    from tests.optimizer.tiny_transformers import embedding_pt2

    model, train, data = embedding_pt2(tmp_path / "embedder", layers=4)
    context = PassContext(workdir=tmp_path / "work", datasets={"train": train, "data": data})
    candidates = ("distill-soft", "distill-soft,quantize-dynamic", "prune-structured")
    try:
        rows = {r["recipe"]: r for r in optimize(model, _auto(*candidates, epochs=2), context, runtime_factory, "auto", 50.0).report}
    except OptimizerError as e:  # none beat the FP32 reference by the margin on this machine: the refusal names what each reached
        assert all(f"{c}: within budget" in str(e) for c in candidates), str(e)
        return
    for recipe in candidates:
        assert rows[recipe]["status"].startswith("measured") and rows[recipe]["metric"] == "cosine", rows[recipe]
        assert rows[recipe]["objective"].startswith("label-free: 1 - cosine + relative MSE to the ")


# --------------------------------------------------------------------------------------------
# ratio-controlled candidates search their knob within the budget (optimizer.budget)


@pytest.fixture
def noisy_auto(tmp_path, monkeypatch):
    """A classifier 2 MatMuls slower than it needs to be, its labels, and test-noise: the lean model with noise of `ratio` (default 0.5)."""
    from tests.optimizer.test_budget import NoisePass, W, X

    add_pass(monkeypatch, NoisePass, "test-noise")
    NoisePass.runs = []
    labels = (np.maximum(X @ W[0], 0) @ W[1]).argmax(1)
    context = PassContext(workdir=tmp_path / "work", datasets={"data": save_npz(tmp_path / "eval.npz", x=X, labels=labels)})
    return onnx_artifact(dense_onnx(tmp_path / "slow.onnx", W, output="logits", slow=2), "logits"), context, NoisePass


def test_auto_searches_a_ratio_controlled_candidate_within_the_budget(noisy_auto, runtime_factory):
    source, context, noise = noisy_auto
    with pytest.raises(OptimizerError, match=r"test-noise: \d+\.\d\d points lost"):  # its default ratio 0.5 is over 2 points
        optimize(source, _auto("test-noise", search_seconds=0), context, runtime_factory, "auto", accuracy_budget=2.0)
    assert noise.runs == [0.5]
    noise.runs = []
    result = optimize(source, _auto("test-noise", search_evaluations=5), context, runtime_factory, "auto", accuracy_budget=2.0)
    assert noise.runs[:2] == [1.0, 0.0] and len(noise.runs) == 5  # both ends, then three bisections
    row = {r["variant"]: r for r in result.report}["auto"]
    assert row["recipe"] == "test-noise" and row["within_budget"] and row["accuracy_delta_pt"] >= -2.0
    setting = float(row["budget_setting"].removeprefix("test-noise ratio="))
    assert 0 < setting < 0.5 and row["budget_evaluations"] == 5 and row["budget_probes"].count(" pt)") == 5
    baseline = result.report[0]
    assert baseline["search_evaluations"] == 1 + 5 and 0 <= baseline["budget_search_total_s"] <= baseline["search_seconds"]


def test_auto_budget_searches_share_one_time_limit(noisy_auto, runtime_factory, monkeypatch):
    source, context, noise = noisy_auto
    run = noise.run

    def slow(self, artifact, context):
        time.sleep(0.3)
        return run(self, artifact, context)

    monkeypatch.setattr(noise, "run", slow)
    events = []
    context.progress = events.append
    recipe = _auto("test-noise", "graph-ort,test-noise", search_seconds=0.2)
    with pytest.raises(OptimizerError):  # the first probe (0.3 s) spends the 0.2 s: no second probe, no second search
        optimize(source, recipe, context, runtime_factory, "auto", accuracy_budget=2.0)
    assert noise.runs == [1.0, 0.5]  # the first candidate's aggressive end, then the second candidate at its default
    assert any(e.message == "test-noise: the budget searches' 0.2 s are spent; ratio stays 0.5" for e in events)


def _exploding(monkeypatch) -> None:
    class Exploding(Pass):
        name = "test-exploding"

        def run(self, artifact: Artifact, context: PassContext) -> Artifact:
            raise IndexError("too many indices for array: array is 0-dimensional")

    add_pass(monkeypatch, Exploding)


def test_auto_records_a_candidate_that_fails_as_a_row_and_goes_on(embedder, runtime_factory, monkeypatch):
    fast, slow, _, context = embedder
    register_file_pass(monkeypatch, "test-lean", fast)
    _exploding(monkeypatch)
    result = optimize(onnx_artifact(slow), _auto("test-exploding", "test-lean"), context, runtime_factory, "auto", accuracy_budget=1.0)
    rows = {r["variant"]: r for r in result.report}
    assert result.artifact.notes["auto_choice"] == "test-lean"
    assert rows["test-exploding"]["status"].startswith("failed: test-exploding failed on slow.onnx: IndexError: too many indices")


def test_auto_refusal_says_each_distinct_reason_once(embedder, runtime_factory, monkeypatch):
    _, slow, _, context = embedder
    _exploding(monkeypatch)
    with pytest.raises(OptimizerError) as info:
        optimize(onnx_artifact(slow), _auto("distill-soft", "prune-structured", "test-exploding"), context, runtime_factory, "auto")
    message = str(info.value)
    assert message.count("needs train data") == 1
    assert "distill-soft / prune-structured: skipped: fine-tunes, needs train data" in message
    assert "test-exploding: failed: test-exploding failed on slow.onnx: IndexError" in message


def test_auto_makes_a_fixed_length_text_export_take_any_length_before_its_onnx_candidates(tmp_path):
    from slimserve.optimizer.passes.dynamic_seq import fixed_sequence
    from slimserve.optimizer.search.auto import _any_length
    from tests.token_models import token_model, token_rows

    context = PassContext(workdir=tmp_path / "work", datasets={"data": save_npz(tmp_path / "eval.npz", **token_rows([4, 30], 32))})
    made, said = _any_length(Artifact(token_model(tmp_path / "fixed.onnx", seq=32), "onnx"), context, context)
    assert fixed_sequence(made.path) is None and said.startswith("any length: input_ids,attention_mask (was 32")
    reads = Artifact(token_model(tmp_path / "reads.onnx", seq=32, reads_padding=True), "onnx")
    kept, said = _any_length(reads, context, context)
    assert kept is reads and said.startswith("kept fixed: graph-dynamic-seq: output 'pooled' differs by")
    dynamic = Artifact(token_model(tmp_path / "dynamic.onnx"), "onnx")
    assert _any_length(dynamic, context, context) == (dynamic, "")


def test_auto_holds_a_row_floor_and_retries_dynamic_int8_with_its_most_sensitive_nodes_fp32(embedder, runtime_factory):
    """The mean cosine is within the budget, the worst row is under the floor: quantize-dynamic is tried again with
    keep_fp32 steps, each a row of its own; none reaches a floor of 1.0, and the refusal says so for each."""
    fast, _, _, context = embedder
    with pytest.raises(OptimizerError) as info:
        optimize(onnx_artifact(fast), _auto("quantize-dynamic", row_floor=1.0, keep_fp32_steps=[1]), context, runtime_factory, "auto", 1.0)
    message = str(info.value)
    assert re.search(r"quantize-dynamic: its worst row keeps cosine 0\.9\d+ \(< the row floor 1\)", message), message
    assert re.search(r"quantize-dynamic\(keep_fp32=1\): its worst row keeps cosine [01]\.\d+", message), message
    from slimserve.optimizer.search.auto import floor_problem

    assert floor_problem(Evaluation(quality_metric="cosine", quality_min=0.97), 0.985).startswith("its worst row keeps cosine 0.9700")
    assert floor_problem(Evaluation(quality_metric="cosine", quality_min=0.99), 0.985) == ""
    assert floor_problem(Evaluation(quality_metric="accuracy", quality_min=0.5), 0.985) == ""  # embeddings only
    with pytest.raises(OptimizerError, match="row_floor must be a cosine in"):
        make_pass("auto", {"row_floor": 1.5})
