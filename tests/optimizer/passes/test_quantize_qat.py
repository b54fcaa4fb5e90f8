"""Tests for optimizer/passes/quantize_qat.py: quantization-aware fine-tuning exported as INT8 ONNX, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.optimizer.base import OptimizerError, PassContext, ProgressEvent
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.formats.export import onnx_io_names
from slimserve.optimizer.formats.onnx_graph import int8_facts
from tests.optimizer.conftest import top1


@pytest.mark.slow
def test_qat_trains_and_exports_an_int8_model_within_half_a_point(digits, pt2_model, baseline_accuracy, tmp_path):
    events: list[ProgressEvent] = []
    context = PassContext(workdir=tmp_path / "work", datasets={"train": digits.train}, progress=events.append)
    result = make_pass("quantize-qat", {"epochs": 2}).run(pt2_model, context)
    assert (result.format, result.runtime, result.notes["quantized"]) == ("onnx", "onnxruntime", "int8-qat")
    assert onnx_io_names(result.path) == (("x",), ("logits",))
    facts = int8_facts(result.path)
    assert facts["int8_initializers"] >= 3 and facts["QuantizeLinear"] >= 3
    assert result.path.stat().st_size <= 0.35 * digits.onnx.stat().st_size
    assert top1(result.path, digits.x_test, digits.y_test) >= baseline_accuracy - 0.005
    epochs = [e for e in events if e.epoch is not None]
    assert [e.epoch for e in epochs] == [1, 2] and epochs[-1].fraction == 1.0
    assert all(e.stage == "quantize-qat" and e.loss > 0 and 0 < e.accuracy <= 1 for e in epochs)


@pytest.mark.slow
def test_qat_stops_when_the_job_is_cancelled(digits, pt2_model, tmp_path):
    context = PassContext(workdir=tmp_path / "work", datasets={"train": digits.train}, cancelled=lambda: True)
    with pytest.raises(OptimizerError, match="quantize-qat: the job was cancelled"):
        make_pass("quantize-qat").run(pt2_model, context)


def test_qat_on_onnx_without_train_data_says_what_to_add(onnx_model, tmp_path):
    with pytest.raises(OptimizerError, match=r"quantize-qat fine-tunes the model and needs train data.*--train TRAIN\.npz"):
        make_pass("quantize-qat").run(onnx_model, PassContext(workdir=tmp_path))


def test_qat_without_train_data_or_labels_says_what_to_add(digits, pt2_model, tmp_path):
    with pytest.raises(OptimizerError, match=r"quantize-qat needs train data.*--train TRAIN\.npz"):
        make_pass("quantize-qat").run(pt2_model, PassContext(workdir=tmp_path))
    unlabelled = tmp_path / "train.npz"
    np.savez(unlabelled, x=digits.x_test)
    with pytest.raises(OptimizerError, match=r"train data has no 'labels' array"):
        make_pass("quantize-qat").run(pt2_model, PassContext(workdir=tmp_path, datasets={"train": unlabelled}))


def test_qat_names_labels_beyond_the_model_outputs(digits, pt2_model, tmp_path):
    bad = tmp_path / "train.npz"
    np.savez(bad, x=digits.x_test, labels=digits.y_test + 5)
    with pytest.raises(OptimizerError, match=r"'labels' holds class 14, and the model has 10 outputs"):
        make_pass("quantize-qat").run(pt2_model, PassContext(workdir=tmp_path, datasets={"train": bad}))


@pytest.mark.slow
def test_qat_on_a_bert_style_transformer_quantizes_its_linear_layers_and_agrees_with_fp32(tmp_path):
    """The zoo's BERT layout (separate q / k / v, GELU FFN, attention mask) at hidden 32: torchao QAT on its Linear layers, served by ORT."""
    import onnxruntime as ort
    import torch

    from tests.optimizer.tiny_transformers import bert_pt2

    source, train = bert_pt2(tmp_path / "bert")
    result = make_pass("quantize-qat", {"epochs": 1}).run(source, PassContext(workdir=tmp_path / "work", datasets={"train": train}))
    facts = int8_facts(result.path)
    assert facts["int8_initializers"] >= 2 * 6 and facts["QuantizeLinear"] >= 2 * 3  # every q/k/v/out/FFN weight of both layers
    with np.load(train) as z:
        feed = {"input_ids": z["input_ids"], "attention_mask": z["attention_mask"]}
    int8 = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    fp32 = torch.export.load(source.path).module()(*(torch.from_numpy(v) for v in feed.values())).detach().numpy()
    assert int8.shape == fp32.shape and (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9  # the masked attention survives QDQ


def test_static_int8_is_the_answer_when_qat_is_worse(tmp_path, monkeypatch):
    """QAT never ships worse than the static INT8 of the ranges it started from: the comparison keeps the better, and says so."""
    from slimserve.optimizer.base import Artifact
    from slimserve.optimizer.passes import quantize_qat
    from tests.optimizer.tiny_models import FEATURES, dense_onnx, weights

    w = weights(np.random.default_rng(0), FEATURES, 4)
    trained = Artifact(dense_onnx(tmp_path / "qat.onnx", w, output="logits"), "onnx", notes={"quantized": "int8-qat"})
    static = Artifact(dense_onnx(tmp_path / "ptq.onnx", w, output="logits"), "onnx", notes={"quantized": "int8-ptq"})
    x = np.random.default_rng(1).standard_normal((20, FEATURES)).astype(np.float32)
    train, labels = {"x": x}, np.zeros(20, dtype=np.int64)
    scores = {trained.path: 0.90, static.path: 0.95}
    monkeypatch.setattr(quantize_qat, "onnx_accuracy", lambda path, rows, names, truth: scores[path])
    qat = make_pass("quantize-qat")
    kept = qat._better(trained, static, PassContext(workdir=tmp_path), None, train, labels, ["x"])
    assert kept.path == static.path and kept.notes["quantized"] == "int8-ptq"
    assert kept.notes["qat"] == (
        "QAT was worse than static INT8, which is the answer; on the train data: QAT 90.00%, static INT8 of the calibrated ranges 95.00%"
    )
    scores[trained.path] = 0.95
    kept = qat._better(trained, static, PassContext(workdir=tmp_path), None, train, labels, ["x"])
    assert kept.path == trained.path and kept.notes["qat"].startswith("QAT kept on the train data: QAT 95.00%")
