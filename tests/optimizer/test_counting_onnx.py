"""Tests for optimizer/counting/onnx_counts.py on ORT's quantized graphs: weights counted once, scales never, as in FP32."""

from __future__ import annotations

import onnx
import pytest
from onnxruntime.quantization import quantize_dynamic

from slimserve.optimizer.counting.onnx_counts import onnx_params
from tests.optimizer.onnx_builders import attention_model, depthwise_model


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_int8_counts_the_same_parameters_as_fp32(tmp_path, per_channel):
    # Dynamic INT8 multiplies each weight's scale (one per output channel when per_channel) by the input's run-time
    # scale in a Mul: those scales are not parameters, or the INT8 model would hold more parameters than its FP32 source.
    source = attention_model(tmp_path / "attention.onnx")
    target = tmp_path / "attention-int8.onnx"
    quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], per_channel=per_channel)
    quantized = onnx.load(str(target))
    scales = [t for t in quantized.graph.initializer if t.name.endswith("_scale")]
    assert len(scales) == 7 and any(t.dims for t in scales) == per_channel
    assert onnx_params(quantized)[0] == onnx_params(onnx.load(str(source)))[0] == 32 * 32 * 4 + 2 * 32 * 64 + 32 * 4


def test_dynamic_int8_convolutions_count_the_same_parameters_as_fp32(tmp_path):
    source = depthwise_model(tmp_path / "dw.onnx")
    target = tmp_path / "dw-int8.onnx"
    quantize_dynamic(str(source), str(target), op_types_to_quantize=["Conv", "Gemm", "MatMul"], per_channel=True)
    assert onnx_params(onnx.load(str(target)))[0] == onnx_params(onnx.load(str(source)))[0]
