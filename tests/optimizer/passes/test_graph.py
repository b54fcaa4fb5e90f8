"""Tests for optimizer/passes/graph.py: graph-ort keeps answers and speed, graph-compile and graph-xla refuse precisely."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.evaluation.measure import evaluate
from slimserve.optimizer.evaluation.timing import time_predict
from slimserve.optimizer.passes.graph import compile_options_path, torch_xla_missing_message
from slimserve.optimizer.recipes import parse_recipe

HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None


@pytest.fixture
def context(tmp_path):
    return PassContext(workdir=tmp_path / "work")


def _run(session_or_path, x):
    session = ort.InferenceSession(str(session_or_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def ort_variant(digits, tmp_path_factory):
    context = PassContext(workdir=tmp_path_factory.mktemp("graph-ort"))
    source = Artifact(digits.onnx, "onnx", input_names=("x",), output_names=("logits",))
    return source, make_pass("graph-ort").run(source, context)


def test_graph_ort_writes_a_valid_onnx_with_the_same_answers(digits, ort_variant):
    source, result = ort_variant
    assert (result.format, result.runtime) == ("onnx", "onnxruntime")
    assert result.path != source.path and result.path.is_file()
    assert result.input_names == ("x",) and result.output_names == ("logits",)
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model)
    assert any(n.domain == "com.microsoft" for n in model.graph.node)  # extended: ORT's fused operators
    np.testing.assert_allclose(_run(result.path, digits.x_test), _run(source.path, digits.x_test), atol=1e-5)


def test_graph_ort_is_not_slower_at_batch_1(ort_variant, runtime_factory):
    source, result = ort_variant
    before, after = runtime_factory(source.path, "onnxruntime"), runtime_factory(result.path, "onnxruntime")
    x = {"x": np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)}
    # Interleaved rounds, best median of each: two noisy cores drift more than the models differ.
    medians = {"before": [], "after": []}
    for _ in range(4):
        medians["before"].append(np.median(time_predict(before, x, 20, 300)))
        medians["after"].append(np.median(time_predict(after, x, 20, 300)))
    assert min(medians["after"]) <= 1.25 * min(medians["before"]) + 20e-6


@pytest.mark.parametrize("level", ["basic", "all"])
def test_every_ort_level_keeps_the_answers(digits, context, level):
    result = make_pass("graph-ort", {"level": level}).run(Artifact(digits.onnx, "onnx"), context)
    assert result.notes["ort_level"] == level
    np.testing.assert_allclose(_run(result.path, digits.x_test[:64]), _run(digits.onnx, digits.x_test[:64]), atol=1e-5)


def test_graph_ort_variant_measures_like_its_source(ort_variant, digits_data, runtime_factory):
    source, result = ort_variant
    base, outputs = evaluate(source, runtime_factory, digits_data, warmup=2, iterations=20)
    variant, _ = evaluate(result, runtime_factory, digits_data, base, outputs, warmup=2, iterations=20)
    assert variant.params == base.params and variant.flops == pytest.approx(base.flops, rel=0.01)
    assert variant.agreement == 1.0 and variant.accuracy_delta == 0.0


def test_graph_ort_refuses_an_unknown_level():
    with pytest.raises(OptimizerError, match="level must be one of basic, extended, all"):
        make_pass("graph-ort", {"level": "max"})


def test_graph_ort_converts_a_pt2_first(digits, context):
    result = make_pass("graph-ort").run(Artifact(digits.pt2, "pt2", input_names=("x",)), context)
    assert result.format == "onnx"
    np.testing.assert_allclose(_run(result.path, digits.x_test[:64]), _run(digits.onnx, digits.x_test[:64]), atol=1e-5)


def test_graph_compile_serves_the_same_pt2_with_its_options(digits, context):
    result = make_pass("graph-compile", {"mode": "max-autotune", "dynamic": False}).run(Artifact(digits.pt2, "pt2"), context)
    assert (result.format, result.runtime) == ("pt2", "torch-compile")
    assert result.path.parent == context.workdir and result.path.read_bytes() == digits.pt2.read_bytes()
    options = json.loads(compile_options_path(result.path).read_text())
    assert options == {"version": 1, "mode": "max-autotune", "dynamic": False}


def test_graph_compile_refuses_onnx(digits, context):
    with pytest.raises(OptimizerError, match=r"graph-compile compiles torch.export archives \(.pt2\), and this model is ONNX"):
        make_pass("graph-compile").run(Artifact(digits.onnx, "onnx"), context)
    with pytest.raises(OptimizerError, match="mode must be one of default, reduce-overhead, max-autotune"):
        make_pass("graph-compile", {"mode": "fast"})


@pytest.mark.slow
def test_graph_compile_variant_evaluates_on_the_compiled_runtime(digits, digits_data, context, runtime_factory):
    source = Artifact(digits.pt2, "pt2")
    base, outputs = evaluate(source, runtime_factory, digits_data, warmup=2, iterations=20)
    result = parse_recipe("graph-compile").passes[0].run(source, context)
    variant, _ = evaluate(result, runtime_factory, digits_data, base, outputs, warmup=5, iterations=50)
    assert variant.runtime == "torch-compile"
    assert variant.agreement == 1.0 and variant.params == base.params and variant.flops == base.flops


@pytest.mark.skipif(HAS_TORCH_XLA, reason="torch_xla is installed here")
def test_graph_xla_says_torch_xla_is_missing(digits, context):
    expected = "graph-xla: torch_xla is not installed on this node; install torch_xla matching torch 2.13 and set PJRT_DEVICE=CPU|CUDA|TPU"
    assert torch_xla_missing_message() == expected
    with pytest.raises(OptimizerError) as info:
        make_pass("graph-xla").run(Artifact(digits.pt2, "pt2"), context)
    assert str(info.value) == expected
    assert not context.workdir.exists() or not any(context.workdir.iterdir())  # no fake result left behind


@pytest.mark.skipif(not HAS_TORCH_XLA, reason="torch_xla is not installed")
def test_graph_xla_serves_the_pt2_on_the_xla_runtime(digits, context):
    result = make_pass("graph-xla", {"pjrt_device": "CPU"}).run(Artifact(digits.pt2, "pt2"), context)
    assert (result.format, result.runtime) == ("pt2", "xla")
