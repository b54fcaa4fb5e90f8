"""Tests for optimizer/passes/quantize_dynamic.py: INT8 weights, only the op types asked for."""

from __future__ import annotations

from optimizer.base import PassContext
from optimizer.export import onnx_io_names
from optimizer.onnx_graph import int8_facts
from optimizer.registry import make_pass
from tests.optimizer.conftest import top1


def _context(tmp_path) -> PassContext:
    return PassContext(workdir=tmp_path / "work")


def test_dynamic_is_a_smaller_int8_model_as_accurate_as_fp32(digits, onnx_model, baseline_accuracy, tmp_path):
    result = make_pass("quantize-dynamic").run(onnx_model, _context(tmp_path))
    assert (result.format, result.runtime, result.notes["quantized"]) == ("onnx", "onnxruntime", "int8-dynamic")
    assert result.path.stat().st_size <= 0.35 * digits.onnx.stat().st_size
    facts = int8_facts(result.path)
    assert facts["int8_initializers"] >= 3 and facts["MatMulInteger"] == 2 and facts["ConvInteger"] == 2
    assert onnx_io_names(result.path) == (("x",), ("logits",))
    assert top1(result.path, digits.x_test, digits.y_test) >= baseline_accuracy - 0.01


def test_dynamic_quantizes_only_the_op_types_asked_for(digits, pt2_model, tmp_path):
    result = make_pass("quantize-dynamic", {"op_types": ["Gemm"]}).run(pt2_model, _context(tmp_path))
    facts = int8_facts(result.path)
    assert facts.get("MatMulInteger") == 2 and "ConvInteger" not in facts
    assert onnx_io_names(result.path) == (("x",), ("logits",))
