"""Tiny BERT-like ONNX models over token ids (onnx.helper): the padding-free serving and `graph-dynamic-seq` tests.

input_ids, attention_mask (and token_type_ids) INT64 [batch, seq] -> `hidden` [batch, seq, 16] (one masked attention layer
over word + position embeddings) and `pooled` [batch, 16] (the mean over the mask). `seq` is a symbol, or a number for a
fixed-length export; `reads_padding` pools over every position, so that cutting the padding changes the answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN, VOCAB, MAX_LEN = 16, 128, 256


def token_model(path: Path, seq: int | str = "seq", reads_padding: bool = False, token_types: bool = False, seed: int = 0) -> Path:
    g = np.random.default_rng(seed)
    w = lambda *shape: g.normal(0, 1 / np.sqrt(shape[-1]), shape).astype(np.float32)  # noqa: E731
    weights = {
        "word": w(VOCAB, HIDDEN),
        "position": w(MAX_LEN, HIDDEN),
        "wq": w(HIDDEN, HIDDEN) * 3,
        "wk": w(HIDDEN, HIDDEN) * 3,
        "wv": w(HIDDEN, HIDDEN),
        "one": np.array(1.0, np.float32),
        "big": np.array(-1e4, np.float32),
        "sqrt_d": np.array(np.sqrt(HIDDEN), np.float32),
        "axes1": np.array([1], np.int64),
        "axes2": np.array([2], np.int64),
        "start": np.array(0, np.int64),
        "step": np.array(1, np.int64),
        "index1": np.array([1], np.int64),
    }
    if token_types:
        weights["types"] = w(2, HIDDEN)
    n = helper.make_node
    nodes = [
        n("Shape", ["input_ids"], ["shape"]),
        n("Gather", ["shape", "index1"], ["length1"], axis=0),
        n("Squeeze", ["length1"], ["length"]),
        n("Range", ["start", "length", "step"], ["positions"]),
        n("Gather", ["word", "input_ids"], ["words"]),
        n("Gather", ["position", "positions"], ["places"]),
        n("Add", ["words", "places"], ["x0"]),
    ]
    x = "x0"
    if token_types:
        nodes += [n("Gather", ["types", "token_type_ids"], ["typed"]), n("Add", ["x0", "typed"], ["x1"])]
        x = "x1"
    nodes += [
        n("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        n("Sub", ["one", "mask_f"], ["inverted"]),
        n("Mul", ["inverted", "big"], ["bias2d"]),
        n("Unsqueeze", ["bias2d", "axes1"], ["bias"]),
        n("MatMul", [x, "wq"], ["q"]),
        n("MatMul", [x, "wk"], ["k"]),
        n("MatMul", [x, "wv"], ["v"]),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["qk"]),
        n("Div", ["qk", "sqrt_d"], ["scores"]),
        n("Add", ["scores", "bias"], ["masked"]),
        n("Softmax", ["masked"], ["probs"], axis=-1),
        n("MatMul", ["probs", "v"], ["context"]),
        n("Add", [x, "context"], ["hidden"]),
    ]
    if reads_padding:
        nodes.append(n("ReduceMean", ["hidden", "axes1"], ["pooled"], keepdims=0))
    else:
        nodes += [
            n("Unsqueeze", ["mask_f", "axes2"], ["mask3"]),
            n("Mul", ["hidden", "mask3"], ["kept"]),
            n("ReduceSum", ["kept", "axes1"], ["summed"], keepdims=0),
            n("ReduceSum", ["mask3", "axes1"], ["count"], keepdims=0),
            n("Div", ["summed", "count"], ["pooled"]),
        ]
    names = ["input_ids", "attention_mask", *(["token_type_ids"] if token_types else [])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", seq]) for name in names]
    outputs = [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", seq, HIDDEN]),
        helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", HIDDEN]),
    ]
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def token_rows(lengths: list[int], seq: int, seed: int = 0, token_types: bool = False) -> dict[str, np.ndarray]:
    """Rows of random ids with these real lengths, padded with zeros to `seq` (as a client sends them)."""
    g = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), seq), np.int64)
    mask = np.zeros((len(lengths), seq), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = g.integers(1, VOCAB, n)
        mask[i, :n] = 1
    rows = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        rows["token_type_ids"] = np.zeros_like(ids)
    return rows
