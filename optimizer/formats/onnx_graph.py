"""ONNX graph facts and small edits the quantization passes need: node names, dot-product lengths, mask paths, INT8 checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.formats.export import onnx_io_names

INT8_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm")
# A constant this large added to or multiplied into activations is a mask value (finfo.min, -1e4, -inf), not data.
MASK_MAGNITUDE = 1e3
# Operators that carry a mask value from their input to their output; any other consumer ends the mask path.
_MASK_CARRIERS = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Where",
        "Cast",
        "Expand",
        "Unsqueeze",
        "Squeeze",
        "Reshape",
        "Flatten",
        "Transpose",
        "Concat",
        "Slice",
        "Tile",
        "Min",
        "Max",
        "Identity",
        "ConstantOfShape",
        "Gather",
    }
)


def name_unnamed_nodes_(model: onnx.ModelProto) -> None:
    """Node names are how ORT's quantizer includes or excludes nodes: give every node one."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def dot_length(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> int | None:
    """Length of the dot products a Conv / Gemm / MatMul computes, from its constant weight; None if unknown."""
    if len(node.input) < 2 or node.input[1] not in initializers:
        return None
    dims = list(initializers[node.input[1]].dims)
    if node.op_type == "Conv" and len(dims) >= 3:
        return int(np.prod(dims[1:]))
    if node.op_type == "Gemm" and len(dims) == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return dims[1] if trans_b else dims[0]
    if node.op_type == "MatMul" and len(dims) >= 2:
        return dims[-2]
    return None


def short_dot_nodes(model: onnx.ModelProto, min_length: int) -> list[str]:
    if min_length <= 0:
        return []
    initializers = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node if (k := dot_length(n, initializers)) is not None and k < min_length and not _grouped(n)]


def _grouped(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and next((a.i for a in node.attribute if a.name == "group"), 1) > 1


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant / ConstantOfShape values of the main graph, by the tensor they define."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and node.output:
                values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def mask_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute or apply an additive attention mask (a constant of magnitude >= 1e3, or inf).

    The mask bias (`(1 - mask) * finfo.min`, `-10000`, or `Where(mask, scores, -inf)`) spans ~1e38: an INT8 pair on
    it gets a scale of ~1e36 and rounds every attention score to the same value. The path runs forward from such a
    constant through elementwise and shape operators, and ends at the first other consumer (Softmax), included.
    """
    huge = set()
    for name, value in _constant_values(model).items():
        if value.dtype.kind == "f" and value.size and float(np.abs(value).max()) >= MASK_MAGNITUDE:
            huge.add(name)
    nodes = []
    for node in model.graph.node:  # graph order is topological
        if not any(i in huge for i in node.input) and not (node.op_type == "ConstantOfShape" and node.output[0] in huge):
            continue
        nodes.append(node.name)
        if node.op_type in _MASK_CARRIERS:
            huge.update(node.output)
    return nodes


def has_attention(model: onnx.ModelProto) -> bool:
    """Whether the graph computes attention: a Softmax whose output is multiplied by another activation (P @ V)."""
    constants = set(_constant_values(model))
    producers = {o: n for n in model.graph.node for o in n.output}
    if any(n.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention") for n in model.graph.node):
        return True
    for node in model.graph.node:
        if node.op_type != "MatMul" or any(i in constants for i in node.input[:2]):
            continue
        source = producers.get(node.input[0])
        for _ in range(4):  # P may pass a Cast / Dropout / Reshape on its way to the product
            if source is None or source.op_type == "Softmax":
                break
            source = producers.get(source.input[0]) if source.input else None
        if source is not None and source.op_type == "Softmax":
            return True
    return False


def activation_products(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes with no constant operand: attention's Q @ K^T and P @ V, not the layers' weights."""
    constants = set(_constant_values(model))
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input[:2])]


def matmul_weights(model: onnx.ModelProto) -> list[str]:
    """Names of the initializers that MatMul nodes take as their B operand (the weights of linear layers)."""
    initializers = {t.name for t in model.graph.initializer}
    return sorted({n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers})


def depthwise_scale_spread(model: onnx.ModelProto) -> float:
    """How far apart the channel ranges of the grouped convolutions' weights are (largest / smallest |w| max); 1 if none.

    A per-tensor INT8 scale is set by the widest channel, so this is how much coarser it is on the narrowest one.
    """
    values = {t.name: t for t in model.graph.initializer}
    spread = 1.0
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "Conv" or group <= 1 or len(node.input) < 2 or node.input[1] not in values:
            continue
        from onnx import numpy_helper

        w = numpy_helper.to_array(values[node.input[1]])
        ranges = np.abs(w.reshape(w.shape[0], -1)).max(1)
        if ranges.min() > 0:
            spread = max(spread, float(ranges.max() / ranges.min()))
    return spread


def weights_by_op_type(path: Path) -> dict[str, int]:
    """Elements of the constant weights (input 1) of each Conv / MatMul / Gemm / LSTM / GRU / Gather, by op type."""
    model = onnx.load(str(path))
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        index = 0 if node.op_type == "Gather" else 1
        weight = node.input[index] if len(node.input) > index else ""
        if node.op_type in ("Conv", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Gather") and sizes.get(weight, 0) > 1:
            counts[node.op_type] = counts.get(node.op_type, 0) + sizes[weight]
    return counts


def huge_activations(path: Path, limit: float) -> dict[str, float]:
    """Activations a quantized QDQ model quantizes over a range wider than `limit` (tensor name -> its range)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers or node.input[1] not in initializers:
            continue
        scale = numpy_helper.to_array(initializers[node.input[1]])
        span = float(np.max(scale)) * 255.0
        if not np.isfinite(span) or span > limit:
            found[node.input[0]] = span
    return found


def nodes_touching(model: onnx.ModelProto, tensors: set[str]) -> list[str]:
    """Names of the nodes that produce or consume any of `tensors`."""
    return [n.name for n in model.graph.node if tensors & (set(n.input) | set(n.output))]


def int8_facts(path: Path) -> dict[str, int]:
    """Counts of what makes a model INT8: 8-bit initializers and quantized operators, by op type."""
    model = onnx.load(str(path))
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    facts = {"int8_initializers": sum(1 for i in model.graph.initializer if i.data_type in eight_bit)}
    for node in model.graph.node:
        if node.op_type in INT8_OPS or node.op_type.startswith("QLinear"):
            facts[node.op_type] = facts.get(node.op_type, 0) + 1
    return facts


def check_quantized(source: Path, target: Path, needed_by: str, hint: str) -> None:
    if onnx_io_names(source) != onnx_io_names(target):
        raise OptimizerError(f"{needed_by}: the quantized model renamed its inputs or outputs ({onnx_io_names(target)})")
    facts = int8_facts(target)
    if facts["int8_initializers"] == 0 or len(facts) == 1:
        raise OptimizerError(f"{needed_by}: no operator of {source.name} was quantized; {hint}")


def strip_debug_info(path: Path) -> None:
    """Drops per-node stack traces and doc strings that torch's exporter writes (a third of a small model's bytes)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]  # intermediate shapes: ORT infers them again at load
    onnx.save(model, str(path))
