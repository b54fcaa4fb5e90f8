"""Measures one variant: parameters, bytes, FLOPs, latency and throughput on its serving runtime, accuracy, agreement.

Every variant of a model is measured by `evaluate` the same way, on the runtime that will serve it
(the caller passes a RuntimeFactory), so that the numbers of a report compare like with like.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.base import Artifact, OptimizerError, Predictor, ProgressEvent, RuntimeFactory

log = logging.getLogger(__name__)

# Size given to a variable dimension other than the batch when inputs are synthesized.
SYNTHETIC_DIM = 8
# Samples synthesized when no data is given (at least the serving batch).
SYNTHETIC_SAMPLES = 64

DATATYPE_TO_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


@dataclass
class Evaluation:
    """The measures of one variant; None where a measure does not apply or could not be taken.

    The field names are a contract: the server copies params, nonzero_params, flops,
    latency_p50_ms, latency_p99_ms, throughput, accuracy and accuracy_delta into its records.
    """

    params: int | None = None
    nonzero_params: int | None = None
    size_bytes: int | None = None
    flops: float | None = None  # per sample, 2 x multiply-accumulates, as torch.utils.flop_counter counts
    latency_p50_ms: float | None = None  # batch 1 (or the batch a model is fixed to)
    latency_p99_ms: float | None = None
    serving_batch: int | None = None
    latency_p50_ms_batch: float | None = None  # at serving_batch
    latency_p99_ms_batch: float | None = None
    throughput: float | None = None  # samples / s at serving_batch
    accuracy: float | None = None  # top-1 in [0, 1]; None without labels
    accuracy_delta: float | None = None  # percentage points against the baseline
    agreement: float | None = None  # top-1 agreement with the baseline, or mean cosine similarity
    runtime: str | None = None
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Evaluation":
        """Reads a saved evaluation; keys this version does not know are ignored, missing ones are None."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------
# evaluate


def evaluate(
    artifact: Artifact,
    runtime_factory: RuntimeFactory,
    data: dict[str, np.ndarray] | None,
    baseline: Evaluation | None = None,
    baseline_outputs: np.ndarray | None = None,
    serving_batch: int = 32,
    warmup: int = 20,
    iterations: int = 200,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> tuple[Evaluation, np.ndarray | None]:
    """Measures `artifact` on the runtime `runtime_factory` loads for it.

    Returns the evaluation and the first output of the model on the data (on synthesized inputs
    when `data` is None), to pass as `baseline_outputs` when the next variants are measured.
    Latency is the wall time of one `predict` call (time.perf_counter) after `warmup` calls.
    """

    def step(fraction: float, message: str) -> None:
        if progress is not None:
            progress(ProgressEvent(stage="evaluate", fraction=fraction, message=message))

    if serving_batch < 1:
        raise OptimizerError(f"serving batch must be at least 1, got {serving_batch}")
    if iterations < 1:
        raise OptimizerError(f"latency needs at least 1 iteration, got {iterations}")
    step(0.0, f"loading {artifact.path.name} on {artifact.runtime}")
    predictor = runtime_factory(artifact.path, artifact.runtime)
    try:
        evaluation = Evaluation(runtime=artifact.runtime, device=str(getattr(predictor, "device", "cpu")))
        feeds = model_inputs(predictor, data, max(serving_batch, SYNTHETIC_SAMPLES))
        fixed_batch = _fixed_batch(predictor)
        batch = fixed_batch or serving_batch
        evaluation.serving_batch = batch

        step(0.1, "running the evaluation data")
        outputs = run_in_batches(predictor, feeds, batch)
        labels = None if data is None else data.get("labels")
        _score(evaluation, outputs, labels, baseline, baseline_outputs)

        step(0.4, "latency at batch 1")
        one = _take(feeds, fixed_batch or 1)
        times = time_predict(predictor, one, warmup, iterations)
        evaluation.latency_p50_ms, evaluation.latency_p99_ms = _percentiles_ms(times)
        step(0.7, f"latency at batch {batch}")
        many = _take(feeds, batch)
        times = times if batch == (fixed_batch or 1) else time_predict(predictor, many, warmup, iterations)
        evaluation.latency_p50_ms_batch, evaluation.latency_p99_ms_batch = _percentiles_ms(times)
        evaluation.throughput = batch / float(np.mean(times))

        step(0.9, "parameters and FLOPs")
        evaluation.size_bytes = artifact_size(artifact.path, artifact.format)
        # An exotic graph must not cost the whole evaluation: what cannot be counted stays None.
        try:
            model = _load_model(artifact.path, artifact.format)
        except Exception as e:
            model = None
            log.warning("%s: not read as a graph, so neither parameters nor FLOPs are counted: %s", artifact.path.name, e)
        if model is not None:
            try:
                evaluation.params, evaluation.nonzero_params = count_params(model, artifact.format)
            except Exception as e:
                log.warning("%s: parameters not counted: %s", artifact.path.name, e)
            try:
                evaluation.flops = count_flops(model, artifact.format, _take(feeds, 1))
            except Exception as e:
                log.warning("%s: FLOPs not counted: %s", artifact.path.name, e)
        step(1.0, "evaluated")
        return evaluation, outputs
    finally:
        unload = getattr(predictor, "unload", None)
        if callable(unload):
            unload()


def _score(
    evaluation: Evaluation,
    outputs: np.ndarray,
    labels: np.ndarray | None,
    baseline: Evaluation | None,
    baseline_outputs: np.ndarray | None,
) -> None:
    classifier = outputs.ndim == 2 and outputs.shape[1] > 1
    if labels is not None and classifier:
        if len(labels) != len(outputs):
            raise OptimizerError(f"evaluation data: {len(labels)} labels for {len(outputs)} samples")
        evaluation.accuracy = float(np.mean(outputs.argmax(axis=1) == labels.reshape(-1)))
        if baseline is not None and baseline.accuracy is not None:
            evaluation.accuracy_delta = (evaluation.accuracy - baseline.accuracy) * 100.0
    if baseline_outputs is not None:
        if baseline_outputs.shape != outputs.shape:
            raise OptimizerError(
                f"the variant's first output has shape {list(outputs.shape)}, the baseline's {list(baseline_outputs.shape)}: "
                "they cannot be compared"
            )
        evaluation.agreement = agreement(outputs, baseline_outputs)


def agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Top-1 agreement for classifier logits [N, classes]; otherwise the mean cosine similarity per sample."""
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        return float(np.mean(outputs.argmax(axis=1) == reference.argmax(axis=1)))
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # Two all-zero answers agree; one zero against a non-zero answer does not.
    cos = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0), np.all(a == b, axis=1).astype(np.float64))
    return float(np.mean(cos))


# --------------------------------------------------------------------------------------------
# inputs and running


def model_inputs(
    predictor: Predictor, data: dict[str, np.ndarray] | None, synthetic_samples: int = SYNTHETIC_SAMPLES
) -> dict[str, np.ndarray]:
    """The arrays to feed, one per model input, cast to the input's datatype; synthesized when there is no data."""
    specs = list(predictor.inputs)
    if data is None:
        return synthesize_inputs(specs, synthetic_samples)
    arrays = {k: v for k, v in data.items() if k != "labels"}
    feeds = {}
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None and len(specs) == 1 and len(arrays) == 1:
            array = next(iter(arrays.values()))  # one input, one array: the names need not match
        if array is None:
            raise OptimizerError(
                f"evaluation data has no array for input '{spec.name}' (it holds: {', '.join(sorted(data)) or 'nothing'})"
            )
        dtype = DATATYPE_TO_NUMPY.get(spec.datatype)
        feeds[spec.name] = np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))
    sizes = {len(v) for v in feeds.values()}
    if len(sizes) > 1:
        raise OptimizerError(f"evaluation data: the inputs hold different numbers of samples ({sorted(sizes)})")
    if 0 in sizes:
        raise OptimizerError("evaluation data holds no samples")
    return feeds


def synthesize_inputs(specs: list[Any], samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs from specs: the batch dimension gets `samples`, other variable dimensions SYNTHETIC_DIM."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dims = list(spec.shape)
        shape = [samples if (i == 0 and d < 0) else (SYNTHETIC_DIM if d < 0 else d) for i, d in enumerate(dims)]
        dtype = np.dtype(DATATYPE_TO_NUMPY.get(spec.datatype, np.float32))
        if dtype.kind == "f":
            array = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            array = rng.integers(0, 10, shape).astype(dtype)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, shape).astype(bool)
        else:
            array = np.full(shape, b"a", dtype=object)
        feeds[spec.name] = array
    return feeds


def _fixed_batch(predictor: Predictor) -> int | None:
    """The batch size the model is fixed to, or None when its first dimension is variable."""
    first = list(predictor.inputs)[0].shape if predictor.inputs else ()
    return int(first[0]) if first and first[0] > 0 else None


def _take(feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first n samples, repeated when there are fewer."""
    out = {}
    for name, array in feeds.items():
        if len(array) < n:
            array = np.concatenate([array] * math.ceil(n / len(array)), axis=0)
        out[name] = np.ascontiguousarray(array[:n])
    return out


def _first_output(predictor: Predictor, result: dict[str, np.ndarray]) -> np.ndarray:
    name = predictor.outputs[0].name if predictor.outputs else next(iter(result))
    return np.asarray(result[name])


def run_in_batches(predictor: Predictor, feeds: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """The first output over all samples, computed `batch` samples at a time (the last batch padded)."""
    n = len(next(iter(feeds.values())))
    chunks = []
    for start in range(0, n, batch):
        part = {k: v[start : start + batch] for k, v in feeds.items()}
        size = len(next(iter(part.values())))
        if size < batch and _fixed_batch(predictor) is not None:
            part = _take(part, batch)
        chunks.append(_first_output(predictor, predictor.predict(part))[:size])
    return np.concatenate(chunks, axis=0)


def time_predict(predictor: Predictor, feeds: dict[str, np.ndarray], warmup: int, iterations: int) -> np.ndarray:
    """Seconds per predict() call, after warm-up; the garbage collector is held off while timing."""
    for _ in range(warmup):
        predictor.predict(feeds)
    times = np.empty(iterations)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(iterations):
            start = time.perf_counter()
            predictor.predict(feeds)
            times[i] = time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
    return times


def _percentiles_ms(times: np.ndarray) -> tuple[float, float]:
    p50, p99 = np.percentile(times, [50, 99])
    return float(p50 * 1000.0), float(p99 * 1000.0)


# --------------------------------------------------------------------------------------------
# size, parameters, FLOPs


def artifact_size(path: Path, fmt: str) -> int:
    """Bytes on disk, with the external-data files an ONNX model names."""
    path = Path(path)
    size = path.stat().st_size
    if fmt == "onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        locations = set()
        for tensor in _all_tensors(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                locations.update(e.value for e in tensor.external_data if e.key == "location")
        size += sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
    return size


def _load_model(path: Path, fmt: str) -> Any:
    """The model file as a graph: an onnx.ModelProto, or a torch.export program loaded without unpickling."""
    if fmt == "onnx":
        import onnx

        return onnx.load(str(path))
    if fmt == "pt2":
        from optimizer.pt2io import load_exported_program

        return load_exported_program(path)
    raise OptimizerError(f"cannot read a '{fmt}' model")


def count_params(model: Any, fmt: str) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a model (a path, or what _load_model returns); see onnx_params and pt2_params."""
    if isinstance(model, (str, Path)):
        model = _load_model(Path(model), fmt)
    return onnx_params(model) if fmt == "onnx" else pt2_params(model)


def count_flops(model: Any, fmt: str, sample: dict[str, np.ndarray]) -> float:
    """FLOPs of one sample (`sample` holds arrays by input name; only the first sample is used)."""
    if isinstance(model, (str, Path)):
        model = _load_model(Path(model), fmt)
    return onnx_flops(model, sample) if fmt == "onnx" else pt2_flops(model, sample)


# ---- ONNX

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


def _all_tensors(graph: Any):
    """Initializers and Constant values of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                yield attr.t
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _all_tensors(sub)


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
    Scale and zero-point tensors are never counted, even per channel: they travel with the
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

    params, nonzero = folded_bias, folded_bias
    for name, tensor in tensors.items():
        if name in excluded:
            continue
        size = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        if size <= 1:
            continue
        uses = consumers.get(name, [])
        if uses and all(i in _QPARAM_INPUTS.get(node.op_type, ()) for node, i in uses):
            continue  # a scale or a zero point
        if tensor.data_type in floats or tensor.data_type in integer_weights:
            pass
        elif tensor.data_type == onnx.TensorProto.INT32 and any((node.op_type, i) in _INT_BIAS_INPUTS for node, i in uses):
            pass
        else:
            continue
        values = numpy_helper.to_array(tensor)
        zero = _zero_point(values, uses, tensors) if tensor.data_type in integer_weights else None
        params += size
        nonzero += int(np.count_nonzero(values != zero)) if zero is not None else int(np.count_nonzero(values))
    return params, nonzero


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
    sample = _take({k: v[:1] for k, v in sample.items()}, batch)
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
    if op in ("Gemm", "FusedGemm", "QGemm"):
        return "gemm"
    if op in ("MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"):
        return "matmul"
    return None


def _weight_index(node: Any) -> int:
    return {"QLinearConv": 3, "QGemm": 3}.get(node.op_type, 1)


def _flop_tensors(node: Any) -> list[str]:
    """The tensors whose shapes a node's FLOPs need: its first input, its weight, its first output."""
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


# ---- torch.export

_TORCH_LINEAR = ("conv", "linear", "addmm", "mm")


def _target_name(node: Any) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)).split(".")[0]


def pt2_params(program: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a torch.export program, over its state_dict and lifted constants.

    The rule is onnx_params's: tensors of more than one element that are floating point or
    8-bit integers (quantized weights); quantization scales and zero points (the arguments 1
    and 2 of quantize / dequantize operators) and integer buffers (counters, indices) are not
    parameters; a BatchNorm in inference mode after a convolution or linear layer counts as
    folded into it (a folded bias is counted where the layer had none). A quantized weight's
    non-zeros are its values that differ from its zero point.
    """
    import torch

    signature = program.graph_signature
    by_placeholder: dict[str, str] = {}
    for mapping in ("inputs_to_parameters", "inputs_to_buffers", "inputs_to_lifted_tensor_constants"):
        by_placeholder.update(getattr(signature, mapping, {}) or {})
    tensors: dict[str, Any] = {**program.state_dict, **program.constants}

    def source(arg: Any) -> str | None:
        return by_placeholder.get(arg.name) if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" else None

    excluded: set[str] = set()
    zero_points: dict[str, tuple[Any, int | None]] = {}
    folded_bias = 0
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = _target_name(node)
        if "batch_norm" in name:
            training = node.args[5] if name == "batch_norm" and len(node.args) > 5 else False
            producer = node.args[0]
            if training or not isinstance(producer, torch.fx.Node) or len(producer.users) != 1:
                continue
            if producer.op != "call_function" or not any(k in _target_name(producer) for k in _TORCH_LINEAR):
                continue
            keys = [source(a) for a in node.args[1:5]]
            excluded.update(k for k in keys if k)
            producer_bias = producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("bias")
            if producer_bias is None and keys[0] in tensors:
                folded_bias += int(tensors[keys[0]].numel())
        elif "quantize" in name:  # quantize_per_tensor / dequantize_per_channel / ...
            for arg in node.args[1:3]:
                key = source(arg)
                if key:
                    excluded.add(key)
            weight = source(node.args[0])
            if weight and name.startswith("dequantize"):
                axis = node.args[3] if "per_channel" in name and len(node.args) > 3 else None
                zero_points[weight] = (node.args[2] if len(node.args) > 2 else 0, axis)

    quantized = {torch.int8, torch.uint8}
    params, nonzero = folded_bias, folded_bias
    for key, value in tensors.items():
        if key in excluded or not isinstance(value, torch.Tensor) or value.numel() <= 1:
            continue
        if not (value.is_floating_point() or value.dtype in quantized):
            continue
        data = value.detach()
        zero: Any = 0
        if key in zero_points:
            zp, axis = zero_points[key]
            zp_key = source(zp)
            zero = tensors[zp_key] if zp_key else zp
            if isinstance(zero, torch.Tensor) and zero.numel() > 1 and axis is not None:
                shape = [1] * data.dim()
                shape[axis] = zero.numel()
                zero = zero.reshape(shape)
        params += int(data.numel())
        nonzero += int((data != zero).sum()) if data.dtype in quantized else int(torch.count_nonzero(data))
    return params, nonzero


def pt2_flops(program: Any, sample: dict[str, np.ndarray]) -> float:
    """FLOPs of one sample by torch.utils.flop_counter.FlopCounterMode (2 x MACs of convolutions and matmuls)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module = program.module()
    names = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    args, batch = [], 1
    for name in names:
        array = sample.get(name)
        if array is None and len(names) == 1 and len(sample) == 1:
            array = next(iter(sample.values()))
        if array is None:
            raise OptimizerError(f"no sample for input '{name}'")
        value = placeholders[name].meta.get("val") if name in placeholders else None
        shape = getattr(value, "shape", ())
        if len(shape) and isinstance(shape[0], int) and shape[0] > 0:
            batch = shape[0]  # exported for a fixed batch: run at it, divide back
        args.append(array[:1])
    tensors = [torch.from_numpy(np.array(a, copy=True)) for a in _take(dict(enumerate(args)), batch).values()]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*tensors)
    return float(counter.get_total_flops()) / batch
