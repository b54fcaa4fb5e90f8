"""Tests for optimizer/evaluation/measure.py: the same model measures the same in ONNX and .pt2, on its serving runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from slimserve.optimizer.base import Artifact, OptimizerError
from slimserve.optimizer.evaluation.measure import Evaluation, agreement, evaluate

# DigitsCNN (width 32) on 8x8 inputs, batch 1: multiply-accumulates of its convolutions and linear layers.
DIGITS_MACS = (32 * 1 * 9 * 8 * 8) + (64 * 32 * 9 * 8 * 8) + (1024 * 64) + (64 * 10)


@pytest.fixture(scope="module")
def measured(digits, digits_data, runtime_factory):
    """The digits CNN measured as ONNX (the baseline) and as .pt2 against it."""
    onnx_eval, onnx_out = evaluate(Artifact(digits.onnx, "onnx"), runtime_factory, digits_data, iterations=100)
    pt2_eval, pt2_out = evaluate(
        Artifact(digits.pt2, "pt2"), runtime_factory, digits_data, baseline=onnx_eval, baseline_outputs=onnx_out, iterations=100
    )
    return onnx_eval, onnx_out, pt2_eval, pt2_out


def test_onnx_and_pt2_of_one_model_measure_the_same(measured):
    onnx_eval, _, pt2_eval, _ = measured
    assert onnx_eval.params == pt2_eval.params > 80_000
    assert onnx_eval.nonzero_params == onnx_eval.params  # a trained model has no exact zeros
    assert pt2_eval.flops == pytest.approx(2 * DIGITS_MACS)  # torch's counter: 2 x MACs
    assert onnx_eval.flops == pytest.approx(pt2_eval.flops, rel=0.01)
    assert (onnx_eval.runtime, pt2_eval.runtime) == ("onnxruntime", "torch")
    assert onnx_eval.device == pt2_eval.device == "cpu"


def test_accuracy_equals_a_direct_onnxruntime_computation(digits, measured):
    onnx_eval, onnx_out, pt2_eval, _ = measured
    logits = ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"]).run(None, {"x": digits.x_test})[0]
    assert onnx_eval.accuracy == float(np.mean(logits.argmax(1) == digits.y_test))
    np.testing.assert_allclose(onnx_out["logits"], logits, atol=1e-5)
    assert pt2_eval.accuracy == pytest.approx(onnx_eval.accuracy, abs=1e-3)
    assert pt2_eval.accuracy_delta == pytest.approx(100 * (pt2_eval.accuracy - onnx_eval.accuracy))
    assert pt2_eval.agreement >= 0.998  # the same weights on two runtimes
    assert onnx_eval.accuracy_delta is None and onnx_eval.agreement is None  # the baseline's own


def test_latency_and_throughput_are_measured(digits, measured):
    for e in measured[0], measured[2]:
        assert 0 < e.latency_p50_ms <= e.latency_p99_ms
        assert 0 < e.latency_p50_ms_batch <= e.latency_p99_ms_batch
        assert e.serving_batch == 32
        # throughput is batch / median time at the serving batch: a short, capped timing's mean is its outliers
        assert e.throughput == pytest.approx(32 / (e.latency_p50_ms_batch / 1000))
    assert measured[0].size_bytes == digits.onnx.stat().st_size
    assert measured[2].size_bytes == digits.pt2.stat().st_size


def test_without_data_inputs_are_synthesized(digits, runtime_factory):
    onnx_eval, onnx_out = evaluate(Artifact(digits.onnx, "onnx"), runtime_factory, None, warmup=2, iterations=20)
    assert onnx_eval.accuracy is None and onnx_eval.accuracy_delta is None
    assert list(onnx_out) == ["logits"] and onnx_out["logits"].shape == (64, 10)
    assert onnx_eval.flops == pytest.approx(2 * DIGITS_MACS, rel=0.01)
    pt2_eval, _ = evaluate(
        Artifact(digits.pt2, "pt2"), runtime_factory, None, baseline=onnx_eval, baseline_outputs=onnx_out, warmup=2, iterations=20
    )
    assert pt2_eval.agreement >= 0.98  # the same synthetic inputs for both
    assert pt2_eval.accuracy is None


def test_data_without_the_models_input_is_refused(digits, runtime_factory):
    data = {"pixels": np.zeros((4, 1, 8, 8), np.float32), "other": np.zeros(4), "labels": np.zeros(4, np.int64)}
    with pytest.raises(OptimizerError, match="no array for input 'x'"):
        evaluate(Artifact(digits.onnx, "onnx"), runtime_factory, data, warmup=1, iterations=1)


def test_agreement_is_top1_for_classifiers_and_cosine_otherwise():
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0]])
    flipped = logits.copy()
    flipped[0] = [0.0, 1.0]
    assert agreement(flipped, logits) == 0.75
    features = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert agreement(features * 3, features) == pytest.approx(1.0)
    assert agreement(np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]), features) == pytest.approx(0.5)


def test_evaluation_dict_round_trip_keeps_the_contract_keys():
    e = Evaluation(params=10, nonzero_params=5, flops=20.0, latency_p50_ms=1.0, latency_p99_ms=2.0, throughput=3.0, accuracy=0.5)
    d = e.to_dict()
    for key in ("params", "nonzero_params", "flops", "latency_p50_ms", "latency_p99_ms", "throughput", "accuracy", "accuracy_delta"):
        assert key in d
    assert Evaluation.from_dict({**d, "added_by_a_later_version": 1}) == e
    assert Evaluation.from_dict({"params": 3}).latency_p50_ms is None


def test_an_unlabelled_embedding_is_scored_by_cosine_not_argmax(tmp_path, runtime_factory):
    from tests.optimizer.tiny_models import FEATURES, dense_onnx, weights

    w = weights(np.random.default_rng(0), FEATURES, 384)
    noisy = [w[0] + 0.03 * np.random.default_rng(1).standard_normal(w[0].shape)]
    data = {"x": np.random.default_rng(2).standard_normal((100, FEATURES)).astype(np.float32)}
    base, out = evaluate(Artifact(dense_onnx(tmp_path / "a.onnx", w), "onnx"), runtime_factory, data, warmup=1, iterations=5)
    variant, noisy_out = evaluate(
        Artifact(dense_onnx(tmp_path / "b.onnx", noisy), "onnx"),
        runtime_factory,
        data,
        baseline=base,
        baseline_outputs=out,
        warmup=1,
        iterations=5,
    )
    assert base.quality_metric == variant.quality_metric == "cosine" and base.quality_drop is None
    assert variant.agreement == variant.quality > 0.99 and variant.quality_min < variant.quality
    (a,), (b,) = noisy_out.values(), out.values()
    assert np.mean(a.argmax(1) == b.argmax(1)) < variant.quality  # what the argmax score said before
