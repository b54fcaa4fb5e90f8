"""Parameters, non-zero parameters and FLOPs of an ONNX graph, counted the way torch.utils.flop_counter counts a .pt2."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from slimserve.optimizer.data import take

log = logging.getLogger(__name__)

# Inputs that hold quantization scales or zero points, by operator: they are not parameters.
_QPARAM_INPUTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "DynamicQuantizeLinear": frozenset(),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "ConvInteger": frozenset({2, 3}),
    "MatMulInteger": frozenset({2, 3}),
    "MatMulIntegerToFloat": frozenset({2, 3, 4, 5}),  # com.microsoft: A, B, a_scale, b_scale, a_zp, b_zp, bias
    "DynamicQuantizeMatMul": frozenset({2, 3}),  # com.microsoft: A, B, b_scale, b_zp, bias
    "QGemm": frozenset({1, 2, 4, 5, 7, 8}),  # com.microsoft: A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp
    "MatMulNBits": frozenset({2, 3}),  # com.microsoft: A, B, scales, zero_points, ...
}
# Quantized weights: operator -> (weight input, its zero-point input, the axis the zero point runs along).
_QUANT_WEIGHTS: dict[str, tuple[int, int, int]] = {
    "DequantizeLinear": (0, 2, 1),  # axis from the node's attribute
    "QLinearConv": (3, 5, 0),
    "ConvInteger": (1, 3, 0),
    "QLinearMatMul": (3, 5, -1),
    "MatMulInteger": (1, 3, -1),
    "MatMulIntegerToFloat": (1, 5, -1),
    "DynamicQuantizeMatMul": (1, 3, -1),
}
# Integer tensors that are weights (INT32 biases of quantized models); other 32/64-bit ints are shapes and indices.
_INT_BIAS_INPUTS = {("DequantizeLinear", 0), ("QLinearConv", 8)}
_ONNX_LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm"}


def all_tensors(graph: Any):
    """Initializers and Constant values of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                yield attr.t
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from all_tensors(sub)


def _named_constants(graph: Any) -> dict[str, Any]:
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = attr.t
    return tensors


def onnx_params(model: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters) of an ONNX model, counted over its weight tensors.

    A weight is an initializer (or Constant value) of more than one element that is either
    floating point, or an 8/4-bit integer (quantized weights count as parameters), or an INT32
    bias of a quantized model (the data input of DequantizeLinear, the bias of QLinearConv).
    Scale and zero-point tensors are never counted, even per channel (nor dynamic INT8's weight
    scales, which a Mul multiplies by the input's run-time scale): they travel with the
    weight they describe, so counting them would count a quantized weight twice. Other integer
    tensors (INT32 / INT64 shapes, axes, indices) are not weights. BatchNormalization that
    follows a convolution or matrix product is counted as folded into it (its four vectors are
    not counted; a folded bias is, where the producer had none), as every runtime and the torch
    ONNX exporter fold it: a model then has the same count before and after graph
    optimization, and the same count in .pt2 and ONNX. A quantized weight's non-zeros are its
    values that differ from its zero point.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    tensors = _named_constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, i))

    excluded: set[str] = set()
    folded_bias = 0
    for node in graph.node:
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            producer = producers.get(node.input[0])
            if producer is None or producer.op_type not in _ONNX_LINEAR or len(consumers.get(node.input[0], [])) != 1:
                continue
            excluded.update(n for n in node.input[1:5] if n in tensors)
            has_bias = len(producer.input) > 2 and producer.input[2] != ""
            if not has_bias and node.input[1] in tensors:
                folded_bias += int(np.prod(tensors[node.input[1]].dims))

    integer_weights = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    for name in ("INT4", "UINT4"):
        if hasattr(onnx.TensorProto, name):
            integer_weights.add(getattr(onnx.TensorProto, name))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}

    # Dynamic INT8 multiplies each weight's scale by its input's run-time scale (DynamicQuantizeLinear output 1).
    dynamic_scales = {n.output[1] for n in graph.node if n.op_type == "DynamicQuantizeLinear" and len(n.output) > 1}
    params, nonzero = folded_bias, folded_bias
    for name, tensor in tensors.items():
        if name in excluded:
            continue
        size = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        if size <= 1:
            continue
        uses = consumers.get(name, [])
        if uses and all(
            i in _QPARAM_INPUTS.get(node.op_type, ()) or _scales_an_activation_scale(node, i, dynamic_scales) for node, i in uses
        ):
            continue  # a scale or a zero point
        int_bias = tensor.data_type == onnx.TensorProto.INT32 and any((node.op_type, i) in _INT_BIAS_INPUTS for node, i in uses)
        if not (tensor.data_type in floats or tensor.data_type in integer_weights or int_bias):
            continue
        values = numpy_helper.to_array(tensor)
        zero = _zero_point(values, uses, tensors) if tensor.data_type in integer_weights else None
        params += size
        nonzero += int(np.count_nonzero(values != zero)) if zero is not None else int(np.count_nonzero(values))
    return params, nonzero


def _scales_an_activation_scale(node: Any, index: int, dynamic_scales: set[str]) -> bool:
    """Whether input `index` of `node` is a weight scale that dynamic INT8 multiplies by an activation's run-time scale."""
    return node.op_type == "Mul" and len(node.input) == 2 and node.input[1 - index] in dynamic_scales


def _zero_point(values: np.ndarray, uses: list[tuple[Any, int]], tensors: dict[str, Any]) -> np.ndarray | None:
    """The zero point of a quantized weight, shaped to broadcast against it; None means 0."""
    from onnx import helper, numpy_helper

    for node, i in uses:
        spec = _QUANT_WEIGHTS.get(node.op_type)
        if spec is None or spec[0] != i:
            continue
        zp_index, axis = spec[1], spec[2]
        if node.op_type == "DequantizeLinear":
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        if len(node.input) <= zp_index or node.input[zp_index] not in tensors:
            return None
        zp = numpy_helper.to_array(tensors[node.input[zp_index]])
        if zp.size == 1:
            return zp.reshape(())
        if zp.ndim == values.ndim:  # blocked quantization: one zero point per block
            for dim in range(values.ndim):
                if zp.shape[dim] != values.shape[dim]:
                    block = math.ceil(values.shape[dim] / zp.shape[dim])
                    zp = np.take(np.repeat(zp, block, axis=dim), np.arange(values.shape[dim]), axis=dim)
            return zp
        axis = axis % values.ndim
        shape = [1] * values.ndim
        shape[axis] = zp.size
        return zp.reshape(shape)
    return None


def onnx_flops(model: Any, sample: dict[str, np.ndarray]) -> float:
    """FLOPs of one sample through an ONNX graph: 2 x the multiply-accumulates of its convolutions and matrix products.

    onnxruntime has no FLOP counter, and the libraries that count ONNX FLOPs (onnx-tool,
    onnx-opcounter) do not know the com.microsoft operators that ORT's own graph optimization
    writes (FusedConv, FusedGemm, NCHWc Conv, MatMulIntegerToFloat, ...), so the variants
    graph-ort makes could not be measured. We count what torch.utils.flop_counter counts — the
    MACs of convolutions and matrix products, times 2, nothing for biases, activations or
    pooling — so that a .pt2 and its ONNX export report the same number. Shapes come from
    onnx.shape_inference with the inputs fixed to the batch-1 `sample`; where inference cannot
    see (contrib operators), one onnxruntime run on the sample measures them. NCHWc
    convolutions (ORT's 'all' level) count the channels padded to the CPU's block size.
    """
    batch = 1
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in sample and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            batch = int(dims[0].dim_value)  # a model exported for a fixed batch runs at it; FLOPs are divided back
    sample = take({k: v[:1] for k, v in sample.items()}, batch)
    counted = [n for n in model.graph.node if _flop_kind(n) is not None]
    if not counted:
        return 0.0
    constants = _named_constants(model.graph)
    shapes: dict[str, tuple[int, ...]] = {name: tuple(int(d) for d in t.dims) for name, t in constants.items()}
    shapes.update({k: tuple(v.shape) for k, v in sample.items()})
    try:
        shapes.update({k: v for k, v in _inferred_shapes(model, sample).items() if k not in shapes})
    except Exception as e:  # inference is a shortcut; measured shapes below are the fallback
        log.debug("shape inference failed: %s", e)
    needed = {name for n in counted for name in _flop_tensors(n) if name}
    missing = sorted(name for name in needed if name not in shapes)
    if missing:
        shapes.update(_measured_shapes(model, sample, missing))
    total = 0.0
    for node in counted:
        total += _node_flops(node, shapes)
    return float(total) / batch


def _flop_kind(node: Any) -> str | None:
    if node.domain not in ("", "ai.onnx", "com.microsoft", "com.microsoft.nchwc"):
        return None
    op = node.op_type
    if op in ("Conv", "FusedConv", "ConvInteger", "QLinearConv", "NhwcConv"):
        return "conv"
    if op == "ConvTranspose":
        return "conv_transpose"
    if op in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"):
        return "recurrent"
    if op in ("Gemm", "FusedGemm", "QGemm"):
        return "gemm"
    if op in ("MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"):
        return "matmul"
    return None


def _weight_index(node: Any) -> int:
    return {"QLinearConv": 3, "QGemm": 3}.get(node.op_type, 1)


def _flop_tensors(node: Any) -> list[str]:
    """The tensors whose shapes a node's FLOPs need: its first input, its weight, its first output (a recurrent
    layer: its input and both weight matrices)."""
    if _flop_kind(node) == "recurrent":
        return [node.input[0], node.input[1], node.input[2]]
    return [node.input[0], node.input[_weight_index(node)], node.output[0]]


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _node_flops(node: Any, shapes: dict[str, tuple[int, ...]]) -> float:
    kind = _flop_kind(node)
    x = shapes[node.input[0]]
    if kind == "recurrent":
        # Every time step multiplies the input by W [directions, gates x hidden, input] and the state by
        # R [directions, gates x hidden, hidden], as torch's counter sees a recurrent layer step by step.
        steps, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
        weights = np.prod(shapes[node.input[1]], dtype=np.float64) + np.prod(shapes[node.input[2]], dtype=np.float64)
        return 2.0 * steps * batch * weights
    out = shapes[node.output[0]]
    if kind == "conv":
        w = shapes[node.input[_weight_index(node)]]
        channels_last = bool(_attr(node, "channels_last", 0)) or node.op_type == "NhwcConv"
        out_channels = out[-1] if channels_last else out[1]
        # Each output element of a channel costs (in_channels / group) x kernel MACs.
        return 2.0 * np.prod(out, dtype=np.float64) / out_channels * np.prod(w, dtype=np.float64)
    if kind == "conv_transpose":
        w = shapes[node.input[1]]
        return 2.0 * np.prod(x, dtype=np.float64) / x[1] * np.prod(w, dtype=np.float64)
    if kind == "gemm":
        k = x[0] if _attr(node, "transA", 0) else x[-1]
        return 2.0 * np.prod(out, dtype=np.float64) * k
    # matmul
    if node.op_type == "MatMulNBits":
        k = _attr(node, "K", x[-1])
    elif len(x) == 1:
        k = x[0]
    else:
        k = x[-2] if _attr(node, "transA", 0) else x[-1]
    return 2.0 * np.prod(out, dtype=np.float64) * k


def _inferred_shapes(model: Any, sample: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]  # ORT writes value_info with symbolic batch dims; recompute it all at batch 1
    for inp in m.graph.input:
        if inp.name in sample:
            dims = inp.type.tensor_type.shape.dim
            del dims[:]
            for d in sample[inp.name].shape:
                dims.add().dim_value = int(d)
    for out in m.graph.output:
        out.type.tensor_type.ClearField("shape")
    inferred = shape_inference.infer_shapes(m, data_prop=True)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = tuple(int(d.dim_value) for d in t.shape.dim)
    return shapes


def _measured_shapes(model: Any, sample: dict[str, np.ndarray], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of intermediate tensors, read from one onnxruntime run that exposes them as outputs."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for name in names:
        if name not in present:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {i.name: sample[i.name] for i in session.get_inputs() if i.name in sample}
    results = session.run(names, feed)
    return {name: tuple(r.shape) for name, r in zip(names, results)}
