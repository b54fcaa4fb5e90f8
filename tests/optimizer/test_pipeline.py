"""Tests for optimizer/pipeline.py: one recipe measured against the baseline, the budget in every metric, a cached baseline."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.optimizer.base import OptimizerError, PassContext
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.pipeline import measure_baseline, optimize
from slimserve.optimizer.recipes import Recipe
from tests.optimizer.tiny_models import FEATURES, dense_onnx, onnx_artifact, register_file_pass, save_npz, weights

X = np.random.default_rng(2).standard_normal((200, FEATURES)).astype(np.float32)


def _recipe(name: str) -> Recipe:
    return Recipe(name, (make_pass(name),))


@pytest.fixture
def classifier(tmp_path, monkeypatch):
    """A 2-layer MLP classifier (16 -> 32 -> 10, output 'logits'), labels it gets 90% right, and a variant that flips some."""
    w = weights(np.random.default_rng(0), 16, 32, 10)
    source = dense_onnx(tmp_path / "mlp.onnx", w, output="logits")
    predicted = np.maximum(X @ w[0], 0) @ w[1]
    labels = predicted.argmax(1)
    labels[:20] = (labels[:20] + 1) % 10
    worse = [w[0], w[1] + 0.4 * np.random.default_rng(3).standard_normal(w[1].shape)]
    register_file_pass(monkeypatch, "test-worse", dense_onnx(tmp_path / "worse.onnx", worse, output="logits"))
    data = save_npz(tmp_path / "eval.npz", x=X, labels=labels)
    return onnx_artifact(source, "logits"), PassContext(workdir=tmp_path / "work", datasets={"data": data})


def test_labelled_data_keeps_accuracy_points_as_the_budget(classifier, runtime_factory):
    source, context = classifier
    result = optimize(source, _recipe("test-worse"), context, runtime_factory, "v", register_over_budget=True)
    e, b = result.evaluation, result.baseline
    assert b.accuracy == pytest.approx(0.9) and b.quality_metric == e.quality_metric == "accuracy"
    assert e.accuracy_delta == pytest.approx((e.accuracy - b.accuracy) * 100) and e.accuracy_delta < 0
    assert e.quality_drop == -e.accuracy_delta and e.quality == e.accuracy
    assert 0 < e.agreement < 1  # top-1 agreement with the baseline, as before
    row = result.report[1]
    assert row["metric"] == "accuracy" and row["accuracy_delta_pt"] == -row["quality_drop_pt"]
    assert row["within_budget"] is False and row["budget_pt"] == 1.0  # kept over the default budget, marked
    with pytest.raises(OptimizerError) as info:
        optimize(source, _recipe("test-worse"), context, runtime_factory, "v", accuracy_budget=0.5)
    assert str(info.value) == (
        f"v loses {-e.accuracy_delta:.2f} points of accuracy on output 'logits' (accuracy {100 * e.accuracy:.2f}%, against "
        "accuracy 90.00%), over the budget of 0.5; nothing was registered (raise --accuracy-budget, keep it marked with "
        "--keep-over-budget, or pick a gentler recipe)"
    )
    with pytest.raises(OptimizerError, match="over the default budget of 1; nothing was registered"):
        optimize(source, _recipe("test-worse"), context, runtime_factory, "v")


def test_without_labels_the_budget_holds_cosine_and_says_the_best_reached(tmp_path, runtime_factory, monkeypatch):
    w = weights(np.random.default_rng(0), 16, 384)
    noisy = [w[0] + 0.05 * np.random.default_rng(1).standard_normal(w[0].shape)]
    register_file_pass(monkeypatch, "test-noisy", dense_onnx(tmp_path / "noisy.onnx", noisy))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": save_npz(tmp_path / "eval.npz", x=X)})
    source = onnx_artifact(dense_onnx(tmp_path / "m.onnx", w))
    result = optimize(source, _recipe("test-noisy"), context, runtime_factory, "v", accuracy_budget=5.0)
    e = result.evaluation
    assert e.quality_metric == "cosine" and e.accuracy is None and e.accuracy_delta is None
    assert 0.95 < e.quality < 0.9999 and e.quality_min <= e.quality and e.quality_drop == pytest.approx(100 * (1 - e.quality))
    assert result.report[1]["metric"] == "cosine" and result.report[1]["quality_min"] == round(e.quality_min, 4)
    with pytest.raises(
        OptimizerError,
        match=rf"v loses {e.quality_drop:.2f} points of cosine on output 'embedding' \(cosine {e.quality:.4f}, worst sample "
        r"0\.\d{4}, against the baseline's outputs\), over the budget of 0\.01; nothing was registered",
    ):
        optimize(source, _recipe("test-noisy"), context, runtime_factory, "v", accuracy_budget=0.01)


def test_a_single_value_output_is_held_by_relative_error(tmp_path, runtime_factory, monkeypatch):
    w = weights(np.random.default_rng(0), 16, 1)
    register_file_pass(monkeypatch, "test-scaled", dense_onnx(tmp_path / "s.onnx", [w[0] * 1.03], output="price"))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": save_npz(tmp_path / "eval.npz", x=X)})
    source = onnx_artifact(dense_onnx(tmp_path / "m.onnx", w, output="price"), "price")
    e = optimize(source, _recipe("test-scaled"), context, runtime_factory, "v", accuracy_budget=5.0).evaluation
    assert (
        e.quality_metric == "relative-error"
        and e.quality == pytest.approx(0.03, rel=1e-3)
        and e.quality_drop == pytest.approx(3.0, rel=1e-3)
    )
    with pytest.raises(OptimizerError, match=r"loses 3\.00 points of relative-error on output 'price' \(relative error 3\.00%"):
        optimize(source, _recipe("test-scaled"), context, runtime_factory, "v", accuracy_budget=2.0)


def test_a_cached_baseline_is_not_measured_again(classifier, runtime_factory):
    source, context = classifier
    cached = measure_baseline(source, context, runtime_factory)
    loaded = []

    def counting(path, runtime):
        loaded.append(path)
        return runtime_factory(path, runtime)

    result = optimize(source, _recipe("test-worse"), context, counting, "v", baseline=cached, register_over_budget=True)
    # the baseline is not measured again: loaded once only, to time the speed-up in turns with the variant
    assert loaded.count(source.path) == 1 and len(loaded) == 3
    assert result.baseline is cached.evaluation and result.baseline_outputs is cached.outputs
    fresh = optimize(source, _recipe("test-worse"), context, runtime_factory, "v", register_over_budget=True)
    assert result.evaluation.accuracy == fresh.evaluation.accuracy and all(
        np.array_equal(fresh.baseline_outputs[n], o) for n, o in cached.outputs.items()
    )


def test_a_requested_metric_overrides_the_choice_and_is_checked(classifier, runtime_factory):
    source, context = classifier
    result = optimize(source, _recipe("test-worse"), context, runtime_factory, "v", metric="top1-agreement", register_over_budget=True)
    assert result.baseline.quality_metric == result.evaluation.quality_metric == "top1-agreement"
    assert result.evaluation.quality_drop == pytest.approx(100 * (1 - result.evaluation.agreement))
    assert result.evaluation.accuracy_delta < 0  # accuracy is still reported where labels allow it
    with pytest.raises(OptimizerError, match="quality metric must be one of"):
        optimize(source, _recipe("test-worse"), context, runtime_factory, "v", metric="f1")


def _detector(path, scale: float = 1.0):
    """x [N, 16] -> 'boxes' [N, 4] (pixels, x 100) and 'scores' [N, 3]: a two-output model; `scale` moves only the boxes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    wb, ws = (rng.standard_normal((FEATURES, 4)) * 100 * scale).astype(np.float32), rng.standard_normal((FEATURES, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wb"], ["boxes"]), helper.make_node("MatMul", ["x", "ws"], ["scores"])],
        "detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3]),
        ],
        [numpy_helper.from_array(wb, "wb"), numpy_helper.from_array(ws, "ws")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_every_output_is_held_to_the_default_budget_and_the_report_shows_each(tmp_path, runtime_factory, monkeypatch):
    """Labels belong to the scores; boxes that move 5% fail the default budget though the scores agree exactly."""
    from slimserve.optimizer.base import Artifact

    register_file_pass(monkeypatch, "test-boxes", _detector(tmp_path / "moved.onnx", 1.05))
    source = Artifact(_detector(tmp_path / "m.onnx"), "onnx", input_names=("x",), output_names=("boxes", "scores"))
    labels = np.random.default_rng(7).integers(0, 3, len(X))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": save_npz(tmp_path / "eval.npz", x=X, labels=labels)})
    with pytest.raises(OptimizerError, match=r"loses 5\.00 points of relative-error on output 'boxes'.*over the default budget of 1"):
        optimize(source, _recipe("test-boxes"), context, runtime_factory, "v")
    result = optimize(source, _recipe("test-boxes"), context, runtime_factory, "v", register_over_budget=True)
    q = result.evaluation.qualities
    assert q["boxes"]["metric"] == "relative-error" and q["boxes"]["drop"] == pytest.approx(5.0, rel=1e-3)
    assert q["scores"]["metric"] == "accuracy" and q["scores"]["drop"] == 0.0  # labels went to the scores, not the boxes
    assert result.baseline.qualities["boxes"]["metric"] == "relative-error"
    row = result.report[1]
    assert row["quality_output"] == "boxes" and row["within_budget"] is False
    assert [r["output"] for r in row["quality_by_output"]] == ["boxes", "scores"]
    declared = optimize(
        source, _recipe("test-boxes"), context, runtime_factory, "v", register_over_budget=True, declared={"boxes": "cosine"}
    )
    assert declared.evaluation.qualities["boxes"]["metric"] == "cosine" and declared.evaluation.qualities["boxes"]["drop"] < 1e-6


def box_count(outputs, data, reference):
    """A test evaluator: points = 100 x the share of samples whose first box coordinate is above 50."""
    return float(100.0 * np.mean(outputs["boxes"][:, 0] > 50))


def broken(outputs, data, reference):
    raise KeyError("gt_boxes")


def test_an_evaluator_is_held_to_the_budget_and_its_failure_is_a_refusal(tmp_path, runtime_factory, monkeypatch):
    from slimserve.optimizer.base import Artifact
    from slimserve.optimizer.evaluation.evaluators import load_evaluator

    register_file_pass(monkeypatch, "test-boxes", _detector(tmp_path / "moved.onnx", 1.05))
    source = Artifact(_detector(tmp_path / "m.onnx"), "onnx", input_names=("x",), output_names=("boxes", "scores"))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": save_npz(tmp_path / "eval.npz", x=X)})
    evaluator = load_evaluator("tests.optimizer.test_pipeline:box_count")
    result = optimize(source, _recipe("test-boxes"), context, runtime_factory, "v", accuracy_budget=50, evaluator=evaluator)
    q = result.evaluation.qualities["evaluator:tests.optimizer.test_pipeline:box_count"]
    base = result.baseline.qualities["evaluator:tests.optimizer.test_pipeline:box_count"]["value"]
    assert q["metric"] == "evaluator:tests.optimizer.test_pipeline:box_count" and 0 < q["value"] < 100
    assert q["drop"] == pytest.approx(base - q["value"])
    with pytest.raises(
        OptimizerError,
        match=r"evaluator 'tests.optimizer.test_pipeline:broken' \(module tests.optimizer.test_pipeline\) raised KeyError: 'gt_boxes'",
    ):
        optimize(
            source, _recipe("test-boxes"), context, runtime_factory, "v", evaluator=load_evaluator("tests.optimizer.test_pipeline:broken")
        )
