"""Which MatMuls of an ONNX graph dynamic INT8 hurts most: each weight MatMul's own error, simulated on real activations.

ORT's dynamic INT8 turns `Y = X @ W` into an INT8 product: W per output channel, symmetric (qint8), X per call as one
uint8 tensor with a scale and zero point from its own min and max (DynamicQuantizeLinear). Where X has a few outliers
(MiniLM's FFN output MatMul reads GELU activations), one scale for the whole call leaves the other values a handful
of levels, and that MatMul's error dominates the model's. `rank` runs the FP32 graph once per row at the row's real
length (as it is served), reads every weight MatMul's input, and simulates exactly that arithmetic in numpy: the
relative error ||Xq Wq - X W|| / ||X W|| of each row, and the worst row's. The MatMuls with the largest worst-row error
are the ones to keep in FP32 (`quantize-dynamic`'s `keep_fp32`): one FP32 run and numpy, no quantization per node.
An embedding table read by a Gather is quantized with one scale for the whole table; its rows' error is ranked the same way
(MiniLM: its word and position embeddings rank first, and keeping them FP32 costs no speed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.optimizer.formats.sequence_axis import MASK_NAME, kept_length, trailing_lengths

# Rows of the data read (each a call of its own, at its real length): enough to find the worst, few enough to be quick.
ROWS = 32


@dataclass(frozen=True)
class Sensitivity:
    node: str  # the MatMul's node name (what nodes_to_exclude takes)
    worst: float  # the largest relative error over the rows
    mean: float


def _fake_uint8(x: np.ndarray) -> np.ndarray:
    """x through DynamicQuantizeLinear and back: uint8, one scale and zero point from the tensor's range (0 included)."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_int8_per_channel(w: np.ndarray) -> np.ndarray:
    """W [K, N] as qint8 per output channel (axis 1), symmetric, and back."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


def _fake_int8_per_tensor(w: np.ndarray) -> np.ndarray:
    """A Gather's table as qint8 with one symmetric scale (how ORT quantizes a Gather's data), and back."""
    scale = float(np.abs(w).max()) / 127.0 or 1.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def with_node_names(path: Path, target: Path) -> Path:
    """The file with every node named (nodes_to_exclude goes by name): `path` itself when all are, else a named copy."""
    import onnx

    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node if n.name}
    unnamed = [n for n in model.graph.node if not n.name]
    if not unnamed:
        return path
    for i, node in enumerate(unnamed):
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    onnx.save(model, str(target))
    return target


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def rank(path: Path, data: dict[str, np.ndarray], rows: int = ROWS) -> list[Sensitivity]:
    """The graph's weight MatMuls (constant 2-D second input, float) and constant-table Gathers (embeddings: their rows as
    qint8 with one scale, so a few large entries leave the rest few levels), worst first; [] when it has none or no data fits."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    weights = {i.name: i for i in model.graph.initializer}
    targets: list[tuple[str, str, np.ndarray]] = []
    tables: list[tuple[str, str, np.ndarray]] = []  # Gathers of a constant table (embeddings): (node, indices, table)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.name:
            w = numpy_helper.to_array(weights[node.input[1]])
            if w.ndim == 2 and w.dtype == np.float32:
                targets.append((node.name, node.input[0], w))
        elif node.op_type == "Gather" and node.input[0] in weights and node.name and _axis(node) == 0:
            w = numpy_helper.to_array(weights[node.input[0]])
            if w.ndim == 2 and w.dtype == np.float32:
                tables.append((node.name, node.input[1], w))
    if not targets:
        return []
    known = {o.name for o in model.graph.output}
    for name in dict.fromkeys(t[1] for t in targets):
        if name not in known:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    for name in dict.fromkeys(t[1] for t in tables):
        if name not in known and name not in weights:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
    tables = [t for t in tables if t[1] not in weights]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the MatMuls as they are in the file
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if any(n not in data for n in names):
        return []
    n = min(rows, min(len(data[k]) for k in names))
    mask = data.get(MASK_NAME)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    free = MASK_NAME in shapes and len(shapes[MASK_NAME]) == 2 and not isinstance(shapes[MASK_NAME][1], int)
    lengths = trailing_lengths(mask[:n]) if free and mask is not None and mask.ndim == 2 else None  # a fixed length: rows as sent
    wanted = list(dict.fromkeys([t[1] for t in targets] + [t[1] for t in tables]))
    quantized_w = [_fake_int8_per_channel(t[2]) for t in targets]
    quantized_tables = [_fake_int8_per_tensor(t[2]) for t in tables]
    errors = np.zeros((len(targets) + len(tables), n))
    for row in range(n):
        keep = None if lengths is None else kept_length(lengths[row : row + 1], mask.shape[1])
        feed = {
            k: np.ascontiguousarray(data[k][row : row + 1] if keep is None or data[k].ndim != 2 else data[k][row : row + 1, :keep])
            for k in names
        }
        for k, spec in zip(names, session.get_inputs()):
            if "int64" in spec.type:
                feed[k] = feed[k].astype(np.int64, copy=False)
            elif "float" in spec.type:
                feed[k] = feed[k].astype(np.float32, copy=False)
        acts = dict(zip(wanted, session.run(wanted, feed)))
        for i, ((_, x_name, w), wq) in enumerate(zip(targets, quantized_w)):
            x = acts[x_name].astype(np.float64)
            want = x @ w
            got = _fake_uint8(x) @ wq
            norm = float(np.linalg.norm(want))
            errors[i, row] = float(np.linalg.norm(got - want)) / norm if norm > 0 else 0.0
        for j, ((_, ids_name, table), tq) in enumerate(zip(tables, quantized_tables)):
            ids = np.asarray(acts[ids_name]).astype(np.int64).ravel()
            want, got = table[ids].astype(np.float64), tq[ids]
            norm = float(np.linalg.norm(want))
            errors[len(targets) + j, row] = float(np.linalg.norm(got - want)) / norm if norm > 0 else 0.0
    ranked = [Sensitivity(t[0], float(errors[i].max()), float(errors[i].mean())) for i, t in enumerate(targets + tables)]
    return sorted(ranked, key=lambda s: -s.worst)
