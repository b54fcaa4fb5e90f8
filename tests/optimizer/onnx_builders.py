"""Tiny ONNX graphs built with onnx.helper for the quantization tests: a masked-attention classifier and a depthwise CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEQ, HIDDEN, CLASSES = 16, 32, 4


def _save(nodes, inputs, outputs, weights: dict[str, np.ndarray], path: Path) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def attention_model(path: Path, seed: int = 0) -> Path:
    """x [N, 16, 32], attention_mask [N, 16] -> logits [N, 4]: one attention head, the mask added as (1 - mask) * finfo.min.

    The query and key weights are large, so that attention is peaked as in a trained model and flattening it shows.
    """
    g = np.random.default_rng(seed)
    w = lambda *shape, s=1.0: (g.normal(0, s / np.sqrt(shape[0]), shape)).astype(np.float32)  # noqa: E731
    weights = {
        "wq": w(HIDDEN, HIDDEN, s=4.0),
        "wk": w(HIDDEN, HIDDEN, s=4.0),
        "wv": w(HIDDEN, HIDDEN),
        "wo": w(HIDDEN, HIDDEN),
        "w1": w(HIDDEN, 2 * HIDDEN),
        "w2": w(2 * HIDDEN, HIDDEN),
        "head": w(HIDDEN, CLASSES),
        "one": np.array(1.0, np.float32),
        "fmin": np.array(np.finfo(np.float32).min, np.float32),
        "sqrt_d": np.array(np.sqrt(HIDDEN), np.float32),
        "axes1": np.array([1], np.int64),
    }
    n = helper.make_node
    nodes = [
        n("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        n("Sub", ["one", "mask_f"], ["inverted"]),
        n("Mul", ["inverted", "fmin"], ["bias2d"]),
        n("Unsqueeze", ["bias2d", "axes1"], ["bias"]),  # [N, 1, S]: one row of bias per key
        n("MatMul", ["x", "wq"], ["q"]),
        n("MatMul", ["x", "wk"], ["k"]),
        n("MatMul", ["x", "wv"], ["v"]),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["qk"]),
        n("Div", ["qk", "sqrt_d"], ["scores"]),
        n("Add", ["scores", "bias"], ["masked"]),
        n("Softmax", ["masked"], ["probs"], axis=-1),
        n("MatMul", ["probs", "v"], ["context"]),
        n("MatMul", ["context", "wo"], ["attended"]),
        n("Add", ["x", "attended"], ["h1"]),
        n("MatMul", ["h1", "w1"], ["f1"]),
        n("Relu", ["f1"], ["f1r"]),
        n("MatMul", ["f1r", "w2"], ["f2"]),
        n("Add", ["h1", "f2"], ["h2"]),
        n("ReduceMean", ["h2", "axes1"], ["pooled"], keepdims=0),
        n("MatMul", ["pooled", "head"], ["logits"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", SEQ]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])]
    return _save(nodes, inputs, outputs, weights, path)


def attention_data(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs for attention_model: random embeddings, and masks that pad 4 to 12 of the 16 positions."""
    g = np.random.default_rng(seed)
    lengths = g.integers(4, SEQ - 3, rows)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    return {"x": g.normal(0, 1, (rows, SEQ, HIDDEN)).astype(np.float32), "attention_mask": mask}


def conv_only_model(path: Path, seed: int = 0) -> Path:
    """x [N, 3, 16, 16] -> [N, 16]: two convolutions and a global pool, no MatMul / Gemm."""
    g = np.random.default_rng(seed)
    weights = {"c1": g.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32), "c2": g.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32)}
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "c1"], ["a"], pads=[1, 1, 1, 1]),
        n("Relu", ["a"], ["ar"]),
        n("Conv", ["ar", "c2"], ["b"], pads=[1, 1, 1, 1]),
        n("GlobalAveragePool", ["b"], ["p"]),
        n("Flatten", ["p"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])]
    return _save(nodes, inputs, outputs, weights, path)


def depthwise_model(path: Path, seed: int = 0, spread: float = 1.0) -> Path:
    """x [N, 8, 16, 16] -> [N, 10]: pointwise 8->32, depthwise 3x3 (channel ranges `spread`x apart), pointwise, Gemm head."""
    g = np.random.default_rng(seed)
    dw = g.normal(0, 0.3, (32, 1, 3, 3)).astype(np.float32)
    dw *= np.geomspace(1.0, 1.0 / spread, 32, dtype=np.float32)[:, None, None, None]
    weights = {
        "pw1": g.normal(0, 0.3, (32, 8, 1, 1)).astype(np.float32),
        "dw": dw,
        "pw2": g.normal(0, 0.2, (32, 32, 1, 1)).astype(np.float32),
        "fc": g.normal(0, 0.2, (10, 32)).astype(np.float32),
        "fcb": np.zeros(10, np.float32),
        "zero": np.array(0.0, np.float32),
        "six": np.array(6.0, np.float32),
    }
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "pw1"], ["a"]),
        n("Clip", ["a", "zero", "six"], ["a6"]),
        n("Conv", ["a6", "dw"], ["b"], group=32, pads=[1, 1, 1, 1]),
        n("Clip", ["b", "zero", "six"], ["b6"]),
        n("Conv", ["b6", "pw2"], ["c"]),
        n("GlobalAveragePool", ["c"], ["p"]),
        n("Flatten", ["p"], ["f"]),
        n("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16, 16])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    return _save(nodes, inputs, outputs, weights, path)
