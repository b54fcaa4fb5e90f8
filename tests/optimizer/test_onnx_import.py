"""The import step for foreign graphs, the .npz convention for any input layout, and pass failures as refusals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimserve.optimizer.base import Artifact, OptimizerError, Pass, PassContext
from slimserve.optimizer.data import SampleMajorPredictor, batch_axis, model_arrays, model_layout, samples_first
from slimserve.optimizer.formats.onnx_import import fold_constant_nodes, import_onnx, opset_of


def _mlp(path: Path, opset: int = 11, constant_nodes: bool = True) -> Path:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w")
    nodes = [helper.make_node("Constant", [], ["w"], value=w)] if constant_nodes else []
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [] if constant_nodes else [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def test_import_folds_constant_weights_and_upgrades_the_opset(tmp_path):
    context = PassContext(workdir=tmp_path / "work")
    source = Artifact(_mlp(tmp_path / "m.onnx"), "onnx")
    imported = import_onnx(source, context, "quantize-static", min_opset=13)
    model = onnx.load(str(imported.path))
    assert opset_of(model) == 13 and [t.name for t in model.graph.initializer] == ["w"]
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    assert import_onnx(imported, context, "quantize-static", min_opset=13) is imported  # imported once


def test_fold_leaves_a_constant_that_is_a_graph_output(tmp_path):
    model = onnx.load(str(_mlp(tmp_path / "m.onnx")))
    model.graph.output.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]))
    assert fold_constant_nodes(model) == 0


def test_a_graph_the_checker_rejects_is_refused_with_the_checkers_reason(tmp_path):
    path = _mlp(tmp_path / "bad.onnx", constant_nodes=False)
    model = onnx.load(str(path))
    model.graph.node[0].input[1] = "nowhere"  # reads a tensor nothing defines
    onnx.save(model, str(path))
    with pytest.raises(OptimizerError, match=r"graph-ort: bad.onnx is not a valid ONNX graph by onnx's checker \(.*nowhere"):
        import_onnx(Artifact(path, "onnx"), PassContext(workdir=tmp_path), "graph-ort")


def test_batch_axis_of_each_layout():
    assert batch_axis(("N", 3, 224, 224)) == 0
    assert batch_axis((2, "N", 128)) == 1  # a state batched on axis 1
    assert batch_axis((1, 3, 16, 16)) == 0  # a batch fixed to 1
    assert batch_axis((2, 1, 128)) == 1  # a fixed-batch state
    assert batch_axis(()) is None  # a scalar: one value per model


def test_samples_first_and_back_for_a_state_and_a_scalar():
    shapes = {"x": ("N", 4), "state": (2, "N", 8), "sr": ()}
    data = {"x": np.zeros((5, 4)), "state": np.arange(80.0).reshape(2, 5, 8), "sr": np.array(16000), "labels": np.arange(5)}
    rows = samples_first(data, shapes)
    assert rows["state"].shape == (5, 2, 8) and rows["sr"].shape == (5,) and rows["labels"].shape == (5,)
    back = model_layout({k: v[1:3] for k, v in rows.items() if k != "labels"}, shapes)
    assert back["state"].shape == (2, 2, 8) and np.array_equal(back["state"], data["state"][:, 1:3])
    assert back["sr"].shape == () and int(back["sr"]) == 16000


def test_what_does_not_fit_is_refused_with_the_array_its_shape_and_the_expected_one():
    shapes = {"x": ("N", 4), "sr": ()}
    with pytest.raises(OptimizerError, match=r"array 'sr' has shape \[5\]; input 'sr' takes one value per model of shape \[\]"):
        samples_first({"x": np.zeros((5, 4)), "sr": np.full(5, 16000)}, shapes)
    with pytest.raises(OptimizerError, match=r"5, and 3 in 'state' of shape \[2, 3, 8\] \(its samples are on axis 1: \[2, 'N', 8\]\)"):
        samples_first({"x": np.zeros((5, 4)), "state": np.zeros((2, 3, 8))}, {"x": ("N", 4), "state": (2, "N", 8)})
    specs = {"x": (np.dtype(np.float32), ("N", 4)), "state": (np.dtype(np.float32), (2, "N", 8))}
    arrays = model_arrays({"x": np.zeros((5, 4)), "state": np.zeros((2, 5, 8))}, specs, "calibration", "quantize-static")
    assert arrays["state"].shape == (5, 2, 8)


def test_the_sample_major_predictor_feeds_the_models_layout():
    @dataclass
    class Spec:
        name: str
        datatype: str
        shape: tuple

    class Inner:
        def __init__(self) -> None:
            self.inputs = [Spec("state", "FP32", (2, -1, 8)), Spec("sr", "INT64", ())]
            self.outputs = [Spec("state_out", "FP32", (2, -1, 8))]

        def predict(self, inputs, outputs=None):
            assert inputs["state"].shape == (2, 3, 8) and inputs["sr"].shape == ()
            return {"state_out": inputs["state"] + 1}

    p = SampleMajorPredictor(Inner())
    assert [s.shape for s in p.inputs] == [(-1, 2, 8), (-1,)]
    out = p.predict({"state": np.zeros((3, 2, 8), np.float32), "sr": np.full(3, 16000)})
    assert out["state_out"].shape == (3, 2, 8)


def test_a_failure_inside_a_pass_is_a_refusal_that_names_the_pass(tmp_path):
    class Exploding(Pass):
        name = "exploding"

        def run(self, artifact, context):
            raise IndexError("too many indices for array: array is 0-dimensional")

    with pytest.raises(OptimizerError, match=r"exploding failed on m.onnx: IndexError: too many indices .*nothing was registered"):
        Exploding().run(Artifact(tmp_path / "m.onnx", "onnx"), PassContext(workdir=tmp_path))


def test_quantize_static_falls_back_per_tensor_where_the_opset_cannot_be_raised_and_says_so(tmp_path, monkeypatch):
    from slimserve.optimizer.formats import onnx_import
    from slimserve.optimizer.passes.quantize_static import QuantizeStaticPass

    def refuse(model, target):
        raise OptimizerError(f"onnx's version converter cannot bring opset 11 to {target}: no adapter")

    monkeypatch.setattr(onnx_import, "upgrade_opset", refuse)
    messages = []
    context = PassContext(workdir=tmp_path / "work", progress=lambda e: messages.append(e.message))
    imported, per_channel = QuantizeStaticPass()._import(Artifact(_mlp(tmp_path / "m.onnx"), "onnx"), context, True)
    assert per_channel is False and opset_of(onnx.load(str(imported.path))) == 11
    assert any("quantizing per tensor at the model's opset (per_channel needs opset 13)" in m for m in messages)
