"""Tests for optimizer/passes/quantize_dynamic.py: INT8 weights of MatMul / Gemm, convolutions only when asked, CNNs refused."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext, ProgressEvent
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.formats.export import onnx_io_names
from slimserve.optimizer.formats.onnx_graph import int8_facts
from tests.optimizer.conftest import top1
from tests.optimizer.onnx_builders import conv_only_model, depthwise_model


def _context(tmp_path) -> PassContext:
    return PassContext(workdir=tmp_path / "work")


def test_dynamic_is_a_smaller_int8_model_as_accurate_as_fp32(digits, onnx_model, baseline_accuracy, tmp_path):
    result = make_pass("quantize-dynamic").run(onnx_model, _context(tmp_path))
    assert (result.format, result.runtime, result.notes["quantized"]) == ("onnx", "onnxruntime", "int8-dynamic")
    assert result.path.stat().st_size <= 0.5 * digits.onnx.stat().st_size  # its two Linear layers: 0.44 of the bytes
    facts = int8_facts(result.path)
    assert facts["int8_initializers"] >= 2 and facts["MatMulInteger"] == 2
    assert onnx_io_names(result.path) == (("x",), ("logits",))
    assert top1(result.path, digits.x_test, digits.y_test) >= baseline_accuracy - 0.01
    assert result.notes["int8_kernels"]


def test_dynamic_leaves_convolutions_fp32_unless_asked(digits, onnx_model, tmp_path):
    # ConvInteger quantizes its input at every call: 7-10 ms where the FP32 convolutions took 0.4-0.9 ms.
    result = make_pass("quantize-dynamic").run(onnx_model, _context(tmp_path / "default"))
    assert "ConvInteger" not in int8_facts(result.path) and "Conv" not in result.notes["op_types"].split(",")
    forced = make_pass("quantize-dynamic", {"op_types": ["Conv", "Gemm"]}).run(onnx_model, _context(tmp_path / "forced"))
    assert int8_facts(forced.path)["ConvInteger"] == 2 and int8_facts(forced.path)["MatMulInteger"] == 2
    assert forced.path.stat().st_size <= 0.35 * digits.onnx.stat().st_size


def test_dynamic_says_when_convolutions_hold_most_weights(tmp_path):
    model = depthwise_model(tmp_path / "dw.onnx")
    events: list[ProgressEvent] = []
    source = Artifact(model, "onnx", input_names=("x",), output_names=("logits",))
    make_pass("quantize-dynamic").run(source, PassContext(workdir=tmp_path / "work", progress=events.append))
    assert any(re.search(r"1,568 of 1,888 weights are in Conv layers, which stay FP32.*use quantize-static", e.message) for e in events)


def test_dynamic_refuses_a_model_with_only_convolutions(tmp_path):
    source = Artifact(conv_only_model(tmp_path / "cnn.onnx"), "onnx", input_names=("x",), output_names=("y",))
    with pytest.raises(
        OptimizerError,
        match=r"quantize-dynamic found no .*MatMul.* with constant weights to quantize: "
        r"this model's weights are all in Conv layers \(2,736 weights\).*use quantize-static, or set op_types \['Conv'\]",
    ):
        make_pass("quantize-dynamic").run(source, _context(tmp_path))
    forced = make_pass("quantize-dynamic", {"op_types": ["Conv"]}).run(source, _context(tmp_path))
    assert int8_facts(forced.path)["ConvInteger"] == 2


def test_dynamic_refuses_a_cnn_whose_head_is_all_it_would_quantize(tmp_path):
    # Pointwise convolutions 32 -> 256 -> 32 around a 320-weight Gemm head: 2.3% of the weights, a variant that is the FP32 model.
    model = onnx.load(str(depthwise_model(tmp_path / "dw.onnx")))
    weights = {t.name: t for t in model.graph.initializer}
    weights["pw2"].CopyFrom(numpy_helper.from_array(np.zeros((32, 32, 12, 12), np.float32), "pw2"))
    onnx.save(model, str(tmp_path / "wide.onnx"))
    source = Artifact(tmp_path / "wide.onnx", "onnx", input_names=("x",), output_names=("logits",))
    with pytest.raises(OptimizerError, match=r"quantize-dynamic would quantize only 320 of 148,\d+ weights: the rest are in Conv layers"):
        make_pass("quantize-dynamic", {"preprocess": False}).run(source, _context(tmp_path))


def test_dynamic_quantizes_only_the_op_types_asked_for(digits, pt2_model, tmp_path):
    result = make_pass("quantize-dynamic", {"op_types": ["Gemm"]}).run(pt2_model, _context(tmp_path))
    facts = int8_facts(result.path)
    assert facts.get("MatMulInteger") == 2 and "ConvInteger" not in facts
    assert onnx_io_names(result.path) == (("x",), ("logits",))


def test_keep_fp32_keeps_the_matmuls_int8_hurts_most_in_fp32(tmp_path):
    """An input column far larger than the others (its weights as much smaller, so the answer is not dominated by it) leaves
    the rest few uint8 levels: the MatMul reading it ranks first and stays FP32."""
    import onnx

    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass
    from slimserve.optimizer.compress.int8_sensitivity import rank, with_node_names
    from tests.optimizer.tiny_models import FEATURES, dense_onnx, save_npz, weights

    g = np.random.default_rng(0)
    w = weights(g, FEATURES, 64, 32)
    w[0][0, :] /= 1000.0
    path = with_node_names(dense_onnx(tmp_path / "dense.onnx", w), tmp_path / "named.onnx")
    x = g.standard_normal((16, FEATURES)).astype(np.float32)
    x[:, 0] *= 1000.0
    ranked = rank(path, {"x": x})
    first = onnx.load(str(path)).graph.node[0].name  # MatMul, Relu, MatMul
    assert len(ranked) == 2 and ranked[0].node == first and ranked[0].worst > 3 * ranked[1].worst > 0
    context = PassContext(workdir=tmp_path / "work", datasets={"calibration": save_npz(tmp_path / "cal.npz", x=x)})
    out = make_pass("quantize-dynamic", {"keep_fp32": 1, "preprocess": False}).run(Artifact(path, "onnx"), context)
    assert out.notes["kept_fp32"] == first
    ops = [n.op_type for n in onnx.load(str(out.path)).graph.node]
    assert ops.count("MatMul") == 1 and ops.count("MatMulInteger") == 1
    with pytest.raises(OptimizerError, match="keep_fp32 1 ranks the MatMuls on data, and the model has none"):
        make_pass("quantize-dynamic", {"keep_fp32": 1}).run(Artifact(path, "onnx"), PassContext(workdir=tmp_path / "w2"))
