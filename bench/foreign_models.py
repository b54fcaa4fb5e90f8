"""Foreign-style ONNX models built here with onnx.helper, shaped like the exports other projects ship (issue 20).

Each builder writes a small model plus its eval / train .npz (slimserve's data convention, docs/optimizer/data.md),
with random weights and labels taken from the model's own argmax where it classifies:

- const_weights: an MLP whose weights sit in Constant nodes, not initializers (Paddle, older TF converters);
- opset11: a CNN exported at opset 11 (per-channel DequantizeLinear needs 13);
- prelu: a face-detector-style CNN with PReLU activations (slopes [C, 1, 1]);
- scalar_input: a classifier with a 0-d sample-rate input `sr` (a voice-activity model's);
- state_axis1: a recurrent cell with its state `[2, N, 8]` batched on axis 1, returning the next state;
- fixed_batch1: a CNN whose batch is fixed to 1;
- yolo_head: a detector head `[N, 4 + classes, anchors]` (boxes in pixels, class scores after Sigmoid);
- if_subgraph: a classifier that takes one of two branches of an `If` on a condition computed from its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROWS = 48


@dataclass(frozen=True)
class Foreign:
    name: str
    onnx: Path
    data: Path
    train: Path


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(g: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
    return (g.normal(0, scale / np.sqrt(max(fan_in, 1)), shape)).astype(np.float32)


def _save(graph: onnx.GraphProto, path: Path, opset: int = 13) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="foreign-bench")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _with_labels(path: Path, arrays: dict[str, np.ndarray], rows_axis: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Adds 'labels': the model's own top-1 on the arrays (its first output, classes on axis 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, arrays)[0]
    arrays = dict(arrays)
    arrays["labels"] = out.reshape(out.shape[0], -1).argmax(1).astype(np.int64) if out.ndim == 2 else out.argmax(1).astype(np.int64)
    return arrays


def _write(
    name: str, directory: Path, path: Path, make: Callable[[int], dict[str, np.ndarray]], labels: bool, fixed: bool = False
) -> Foreign:
    out = {}
    for role, seed in (("data", 1), ("train", 2)):
        arrays = make(seed)
        if labels:
            if fixed:  # batch fixed to 1: the model's labels row by row
                key = next(iter(arrays))
                rows = [_with_labels(path, {k: v[i : i + 1] for k, v in arrays.items()})["labels"] for i in range(len(arrays[key]))]
                arrays = {**arrays, "labels": np.concatenate(rows)}
            else:
                arrays = _with_labels(path, arrays)
        target = directory / f"{name}.{role}.npz"
        np.savez(target, **arrays)
        out[role] = target
    return Foreign(name, path, out["data"], out["train"])


def const_weights(directory: Path) -> Foreign:
    g = _rng(0)
    n = helper.make_node
    nodes = [
        n("Constant", [], ["w1"], value=numpy_helper.from_array(_w(g, 16, 32), "w1")),
        n("Constant", [], ["b1"], value=numpy_helper.from_array(np.zeros(32, np.float32), "b1")),
        n("Constant", [], ["w2"], value=numpy_helper.from_array(_w(g, 32, 32), "w2")),
        n("Constant", [], ["w3"], value=numpy_helper.from_array(_w(g, 32, 6), "w3")),
        n("MatMul", ["x", "w1"], ["h1"]),
        n("Add", ["h1", "b1"], ["h2"]),
        n("Relu", ["h2"], ["h3"]),
        n("MatMul", ["h3", "w2"], ["h4"]),
        n("Relu", ["h4"], ["h5"]),
        n("MatMul", ["h5", "w3"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "const_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])],
    )
    path = directory / "const_weights.onnx"
    _save(graph, path)
    return _write("const_weights", directory, path, lambda s: {"x": _rng(s).normal(size=(ROWS, 16)).astype(np.float32)}, labels=True)


def _cnn_nodes(g: np.random.Generator, x: str, act: str, classes: int = 5) -> tuple[list, dict[str, np.ndarray]]:
    n = helper.make_node
    weights = {
        "c1_w": _w(g, 8, 3, 3, 3),
        "c1_b": np.zeros(8, np.float32),
        "c2_w": _w(g, 16, 8, 3, 3),
        "c2_b": np.zeros(16, np.float32),
        "fc_w": _w(g, classes, 16),
        "fc_b": np.zeros(classes, np.float32),
    }
    nodes = [n("Conv", [x, "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1])]
    if act == "prelu":
        weights["p1"] = np.full((8, 1, 1), 0.25, np.float32) + g.uniform(0, 0.1, (8, 1, 1)).astype(np.float32)
        weights["p2"] = np.full((16, 1, 1), 0.25, np.float32) + g.uniform(0, 0.1, (16, 1, 1)).astype(np.float32)
        nodes.append(n("PRelu", ["c1", "p1"], ["a1"]))
    else:
        nodes.append(n("Relu", ["c1"], ["a1"]))
    nodes += [
        n("MaxPool", ["a1"], ["m1"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["m1", "c2_w", "c2_b"], ["c2"], pads=[1, 1, 1, 1]),
        n("PRelu", ["c2", "p2"], ["a2"]) if act == "prelu" else n("Relu", ["c2"], ["a2"]),
        n("GlobalAveragePool", ["a2"], ["gap"]),
        n("Flatten", ["gap"], ["flat"]),
        n("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    return nodes, weights


def _image_model(directory: Path, name: str, act: str, opset: int, batch: int | str) -> Foreign:
    g = _rng(3)
    nodes, weights = _cnn_nodes(g, "image", act)
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    path = directory / f"{name}.onnx"
    _save(graph, path, opset)
    return _write(
        name,
        directory,
        path,
        lambda s: {"image": _rng(s).normal(size=(ROWS, 3, 16, 16)).astype(np.float32)},
        labels=True,
        fixed=batch == 1,
    )


def opset11(directory: Path) -> Foreign:
    return _image_model(directory, "opset11", "relu", 11, "N")


def prelu(directory: Path) -> Foreign:
    return _image_model(directory, "prelu", "prelu", 13, "N")


def fixed_batch1(directory: Path) -> Foreign:
    return _image_model(directory, "fixed_batch1", "relu", 13, 1)


def scalar_input(directory: Path) -> Foreign:
    """x [N, 16] and sr (0-d int64): x is scaled by sr / 16000 before an MLP, as a VAD model's sample-rate input."""
    g = _rng(4)
    n = helper.make_node
    weights = {"w1": _w(g, 16, 32), "w2": _w(g, 32, 2), "rate": np.array(16000.0, np.float32)}
    nodes = [
        n("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        n("Div", ["sr_f", "rate"], ["scale"]),
        n("Mul", ["x", "scale"], ["xs"]),
        n("MatMul", ["xs", "w1"], ["h1"]),
        n("Relu", ["h1"], ["h2"]),
        n("MatMul", ["h2", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scalar_input",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]), helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    path = directory / "scalar_input.onnx"
    _save(graph, path)
    return _write(
        "scalar_input",
        directory,
        path,
        lambda s: {"x": _rng(s).normal(size=(ROWS, 16)).astype(np.float32), "sr": np.array(16000, np.int64)},
        labels=True,
    )


def state_axis1(directory: Path) -> Foreign:
    """x [N, 16], state [2, N, 8] -> prob [N, 2], state_out [2, N, 8]: the state is batched on axis 1."""
    g = _rng(5)
    n = helper.make_node
    weights = {"wx": _w(g, 16, 8), "ws": _w(g, 8, 8), "wo": _w(g, 8, 2), "axes0": np.array([0], np.int64)}
    nodes = [
        n("MatMul", ["x", "wx"], ["xh"]),  # [N, 8]
        n("Unsqueeze", ["xh", "axes0"], ["xh1"]),  # [1, N, 8]
        n("MatMul", ["state", "ws"], ["sh"]),  # [2, N, 8]
        n("Add", ["sh", "xh1"], ["pre"]),
        n("Tanh", ["pre"], ["state_out"]),
        n("ReduceMean", ["state_out"], ["mean"], axes=[0], keepdims=0),  # [N, 8]
        n("MatMul", ["mean", "wo"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "state_axis1",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 8]),
        ],
        [
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "N", 8]),
        ],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    path = directory / "state_axis1.onnx"
    _save(graph, path)

    def make(s: int) -> dict[str, np.ndarray]:
        r = _rng(s)
        return {"x": r.normal(size=(ROWS, 16)).astype(np.float32), "state": r.normal(0, 0.5, size=(2, ROWS, 8)).astype(np.float32)}

    return _write("state_axis1", directory, path, make, labels=True)


def yolo_head(directory: Path, classes: int = 3) -> Foreign:
    """image [N, 3, 16, 16] -> output0 [N, 4 + classes, 16]: boxes (cx, cy, w, h in pixels) and class scores per anchor."""
    g = _rng(6)
    n = helper.make_node
    weights = {
        "c1_w": _w(g, 8, 3, 3, 3),
        "c1_b": np.zeros(8, np.float32),
        "box_w": _w(g, 4, 8, 1, 1),
        "box_b": np.zeros(4, np.float32),
        "cls_w": _w(g, classes, 8, 1, 1),
        "cls_b": np.zeros(classes, np.float32),
        "stride": np.array(16.0, np.float32),
        "shape": np.array([0, 0, -1], np.int64),
    }
    nodes = [
        n("Conv", ["image", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1], strides=[4, 4]),  # [N, 8, 4, 4]
        n("Sigmoid", ["c1"], ["s1"]),
        n("Mul", ["c1", "s1"], ["a1"]),  # SiLU as exported
        n("Conv", ["a1", "box_w", "box_b"], ["box"]),
        n("Sigmoid", ["box"], ["box_s"]),
        n("Mul", ["box_s", "stride"], ["box_px"]),
        n("Conv", ["a1", "cls_w", "cls_b"], ["cls"]),
        n("Sigmoid", ["cls"], ["cls_s"]),
        n("Concat", ["box_px", "cls_s"], ["head"], axis=1),
        n("Reshape", ["head", "shape"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "yolo_head",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 4 + classes, 16])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    path = directory / "yolo_head.onnx"
    _save(graph, path)
    return _write(
        "yolo_head", directory, path, lambda s: {"image": _rng(s).uniform(0, 1, size=(ROWS, 3, 16, 16)).astype(np.float32)}, labels=False
    )


def if_subgraph(directory: Path) -> Foreign:
    """x [N, 16] -> logits [N, 4]: If(sum(x) > -1e30) takes one of two MatMul branches on outer-scope weights."""
    g = _rng(7)
    n = helper.make_node
    weights = {"w1": _w(g, 16, 32), "wa": _w(g, 32, 4), "wb": _w(g, 32, 4), "floor": np.array(-1e30, np.float32)}
    out = helper.make_tensor_value_info("branch", TensorProto.FLOAT, ["N", 4])
    then_graph = helper.make_graph([n("MatMul", ["h", "wa"], ["branch"])], "then", [], [out])
    else_graph = helper.make_graph([n("MatMul", ["h", "wb"], ["branch"])], "else", [], [out])
    nodes = [
        n("MatMul", ["x", "w1"], ["h0"]),
        n("Relu", ["h0"], ["h"]),
        n("ReduceSum", ["x"], ["total"], keepdims=0),
        n("Greater", ["total", "floor"], ["cond"]),  # taken for any finite input: batch and sample agree
        n("If", ["cond"], ["logits"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes,
        "if_subgraph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    path = directory / "if_subgraph.onnx"
    _save(graph, path)
    return _write("if_subgraph", directory, path, lambda s: {"x": _rng(s).normal(size=(ROWS, 16)).astype(np.float32)}, labels=True)


BUILDERS: dict[str, Callable[[Path], Foreign]] = {
    "const_weights": const_weights,
    "opset11": opset11,
    "prelu": prelu,
    "scalar_input": scalar_input,
    "state_axis1": state_axis1,
    "fixed_batch1": fixed_batch1,
    "yolo_head": yolo_head,
    "if_subgraph": if_subgraph,
}
