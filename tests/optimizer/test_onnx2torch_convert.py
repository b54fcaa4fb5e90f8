"""Tests for optimizer/formats/onnx2torch.py: ONNX models train like .pt2 ones, or are refused up front naming the reason."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest

from slimserve.optimizer.base import OptimizerError, PassContext
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.counting.model_file import count_params
from tests.optimizer import tiny_models as tiny
from tests.optimizer.conftest import ort_session


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> tiny.TinyModel:
    return tiny.build(tiny.SmallCnn(), *tiny.images(), tmp_path_factory.mktemp("cnn"), "cnn")


def test_an_onnx_cnn_is_channel_pruned_and_comes_back_as_onnx(cnn, tmp_path):
    context = PassContext(workdir=tmp_path, datasets={"train": cnn.train})
    result = make_pass("prune-structured", {"finetune": {"epochs": 1}}).run(cnn.onnx, context)
    assert result.format == "onnx" and result.runtime == "onnxruntime"
    assert count_params(result.path, "onnx")[0] < 0.7 * count_params(cnn.onnx.path, "onnx")[0]
    session = ort_session(result.path)
    assert [i.name for i in session.get_inputs()] == ["x"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert session.run(None, {"x": np.load(cnn.train)["x"][:5]})[0].shape == (5, 10)


@pytest.mark.slow
def test_an_onnx_cnn_trains_with_qat(cnn, tmp_path):
    result = make_pass("quantize-qat", {"epochs": 1}).run(cnn.onnx, PassContext(workdir=tmp_path, datasets={"train": cnn.train}))
    assert result.notes["quantized"] == "int8-qat"
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(result.path)).graph.node}


def test_an_operator_without_converter_is_named_within_a_second(tmp_path):
    lstm = tiny.build(tiny.LstmClassifier(), *tiny.tokens(), tmp_path, "lstm")
    start = time.perf_counter()
    with pytest.raises(
        OptimizerError,
        match=r"prune-weight: lstm\.onnx uses ONNX operators that onnx2torch cannot convert to torch: LSTM \(no converter\).*nothing was trained",
    ):
        make_pass("prune-weight").run(lstm.onnx, PassContext(workdir=tmp_path / "w", datasets={"train": lstm.train}))
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "w").exists()


def test_a_model_whose_conversion_gives_other_outputs_is_refused(cnn, tmp_path, monkeypatch):
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    def shifted(original):
        def convert(node, graph):
            result = original(node, graph)
            result.torch_module.bias.data += 1.0  # a converter bug: every conv's bias off by one
            return result

        return convert

    for key, original in list(_CONVERTER_REGISTRY.items()):
        if key.operation_type == "Conv":
            monkeypatch.setitem(_CONVERTER_REGISTRY, key, shifted(original))
    with pytest.raises(
        OptimizerError, match=r"onnx2torch's conversion of cnn\.onnx differs from onnxruntime on output 0 .*nothing was trained"
    ):
        make_pass("prune-weight").run(cnn.onnx, PassContext(workdir=tmp_path, datasets={"train": cnn.train}))


def test_a_transformer_onnx_that_computes_shapes_is_refused_before_training(tmp_path):
    encoder = tiny.build(tiny.EncoderClassifier(), *tiny.tokens(classes=3), tmp_path, "enc")
    events = []
    context = PassContext(workdir=tmp_path / "w", datasets={"train": encoder.train}, progress=events.append)
    with pytest.raises(
        OptimizerError,
        match=r"enc\.onnx converts to torch, but the converted model cannot be traced back with a dynamic batch.*Register the model's \.pt2",
    ):
        make_pass("distill-soft").run(encoder.onnx, context)
    assert not [e for e in events if e.epoch is not None]
