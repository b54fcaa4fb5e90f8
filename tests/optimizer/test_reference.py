"""Tests for optimizer/evaluation/reference.py: the best FP32 runtime, timing in turns, and when dynamic INT8 may pay."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.optimizer.base import Artifact, PassContext
from slimserve.optimizer.evaluation.measure import evaluate
from slimserve.optimizer.evaluation.reference import EXPORT, dynamic_int8_unfit, measure_reference, timed_against
from slimserve.optimizer.evaluation.timing import beats
from tests.optimizer.tiny_models import FEATURES, conv_onnx, dense_onnx, mlp_pt2, onnx_artifact, weights


def test_dynamic_int8_is_left_to_matmul_models_without_convolutions(tmp_path):
    rng = np.random.default_rng(0)
    assert dynamic_int8_unfit(dense_onnx(tmp_path / "dense.onnx", weights(rng, 16, 64, 8))) is None
    reason = dynamic_int8_unfit(conv_onnx(tmp_path / "conv.onnx"))
    assert reason == "dynamic INT8 is slower than FP32 on convolutions, and the model has 1 Conv"


def test_the_noise_margin_asks_for_a_clear_win():
    assert beats(0.94, 1.0, 0.05) and not beats(0.96, 1.0, 0.05) and not beats(1.1, 1.0, 0.0)


def test_timing_in_turns_tells_a_slower_model_apart(tmp_path, runtime_factory):
    w = weights(np.random.default_rng(0), 16, 32)
    fast, slow = onnx_artifact(dense_onnx(tmp_path / "f.onnx", w)), onnx_artifact(dense_onnx(tmp_path / "s.onnx", w, slow=3))
    data = {"x": np.random.default_rng(1).standard_normal((8, FEATURES)).astype(np.float32)}
    fast_ms, slow_ms = timed_against(fast, slow, runtime_factory, data)
    assert beats(fast_ms, slow_ms, 0.05) and fast_ms > 0


def test_an_onnx_model_in_onnxruntime_is_its_own_reference(tmp_path, runtime_factory):
    source = onnx_artifact(dense_onnx(tmp_path / "m.onnx", weights(np.random.default_rng(0), 16, 32)))
    data = {"x": np.ones((4, FEATURES), np.float32)}
    baseline, outputs = evaluate(source, runtime_factory, data, warmup=2, iterations=20)
    ref = measure_reference(source, baseline, outputs, PassContext(workdir=tmp_path), runtime_factory, data, 32)
    assert ref.name == "baseline" and ref.export is None and ref.evaluation is baseline
    assert ref.describe() == f"FP32 onnxruntime ({baseline.latency_p50_ms:.3f} ms)"


def test_a_pt2_is_measured_against_its_onnx_export_too(tmp_path, runtime_factory):
    source = Artifact(mlp_pt2(tmp_path / "mlp.pt2"), "pt2", input_names=("x",), output_names=("embedding",))
    data = {"x": np.random.default_rng(0).standard_normal((64, FEATURES)).astype(np.float32)}
    baseline, outputs = evaluate(source, runtime_factory, data, warmup=5, iterations=50)
    ref = measure_reference(source, baseline, outputs, PassContext(workdir=tmp_path / "work"), runtime_factory, data, 32)
    assert ref.export is not None
    export, measured = ref.export
    assert export.format == "onnx" and export.runtime == "onnxruntime"
    assert measured.quality_metric == "cosine" and measured.quality == pytest.approx(1.0, abs=1e-5)
    # The reference is the faster of the two FP32 forms, whichever it is on this machine.
    faster = EXPORT if measured.latency_p50_ms < baseline.latency_p50_ms else "baseline"
    assert ref.name == faster and ref.p50_ms == min(measured.latency_p50_ms, baseline.latency_p50_ms)
