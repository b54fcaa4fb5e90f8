"""Tests for optimizer/counting/model_file.py, counting_onnx.py and counting_torch.py: one counting rule for both formats."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from slimserve.optimizer.counting.model_file import count_params
from slimserve.optimizer.counting.onnx_counts import onnx_flops, onnx_params
from slimserve.optimizer.formats.pt2io import load_exported_program

DIGITS_LINEAR = "classifier.1.weight"  # [64, 1024]


def test_zeroed_weights_lower_the_nonzero_count_in_both_formats(digits, tmp_path):
    half = 64 * 1024 // 2
    model = onnx.load(str(digits.onnx))
    weight = next(t for t in model.graph.initializer if t.name == DIGITS_LINEAR)
    values = numpy_helper.to_array(weight).copy()
    values.reshape(-1)[:half] = 0
    weight.CopyFrom(numpy_helper.from_array(values, DIGITS_LINEAR))
    onnx.save(model, str(tmp_path / "sparse.onnx"))

    program = load_exported_program(digits.pt2)
    with torch.no_grad():
        program.state_dict[DIGITS_LINEAR].reshape(-1)[:half] = 0
    torch.export.save(program, str(tmp_path / "sparse.pt2"))

    dense, _ = count_params(digits.onnx, "onnx")
    for path, fmt in (tmp_path / "sparse.onnx", "onnx"), (tmp_path / "sparse.pt2", "pt2"):
        params, nonzero = count_params(path, fmt)
        assert params == dense
        assert nonzero == dense - half


def _qdq_model(weight: np.ndarray, zero_point: int) -> onnx.ModelProto:
    """y = x @ DequantizeLinear(W_uint8, per-column scale, zp), then a Reshape by an INT64 shape constant."""
    k, n = weight.shape
    scale = np.full(n, 0.1, dtype=np.float32)  # per channel: more than one element, still not a parameter
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y0"]),
        helper.make_node("Reshape", ["y0", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        initializer=[
            numpy_helper.from_array(weight, "w_q"),
            numpy_helper.from_array(scale, "w_scale"),
            numpy_helper.from_array(np.full(n, zero_point, dtype=np.uint8), "w_zp"),
            numpy_helper.from_array(np.array([-1, n], dtype=np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def test_quantized_weights_count_once_and_their_zero_point_is_their_zero():
    rng = np.random.default_rng(0)
    weight = rng.integers(0, 256, (16, 4)).astype(np.uint8)
    weight[:5] = 128
    params, nonzero = onnx_params(_qdq_model(weight, zero_point=128))
    assert params == 16 * 4  # neither the per-channel scales nor zero points nor the shape constant
    assert nonzero == int(np.count_nonzero(weight != 128))
    assert onnx_flops(_qdq_model(weight, 128), {"x": np.zeros((1, 16), np.float32)}) == 2 * 16 * 4


def test_lstm_flops_count_every_layer_and_time_step(tmp_path):
    from slimserve.optimizer.counting.model_file import count_flops
    from tests.optimizer import tiny_models as tiny

    lstm = tiny.build(tiny.LstmClassifier(), *tiny.tokens(), tmp_path, "lstm")
    gates, hidden = 4, 32
    recurrent = tiny.TOKENS * 2 * gates * hidden * ((16 + hidden) + (hidden + hidden))  # 2 layers, input and hidden matmuls per step
    assert count_flops(lstm.pt2.path, "pt2", lstm.sample) == recurrent + 2 * hidden * 4  # + the classifier; was 256 (classifier only)
    assert count_flops(lstm.onnx.path, "onnx", lstm.sample) == recurrent + 2 * hidden * 4  # the ONNX LSTM nodes, per step too


def test_transformer_pt2_flops_include_attention_and_match_onnx(tmp_path):
    from slimserve.optimizer.counting.model_file import count_flops
    from tests.optimizer import tiny_models as tiny

    encoder = tiny.build(tiny.EncoderClassifier(), *tiny.tokens(classes=3), tmp_path, "enc")
    pt2 = count_flops(encoder.pt2.path, "pt2", encoder.sample)
    attention = 2 * 2 * tiny.TOKENS * tiny.TOKENS * 32  # per layer: Q @ K^T and P @ V over 4 heads of 8
    assert pt2 == count_flops(encoder.onnx.path, "onnx", encoder.sample)
    assert pt2 > 2 * attention
