"""ONNX graph facts and small edits the quantization passes need: node names, dot-product lengths, INT8 checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from optimizer.base import OptimizerError
from optimizer.export import onnx_io_names

INT8_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm")


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
    return [n.name for n in model.graph.node if (k := dot_length(n, initializers)) is not None and k < min_length]


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
