"""Quantization passes: ONNX Runtime dynamic and static INT8, and quantization-aware training exported to INT8 ONNX."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from optimizer.base import (
    Artifact, ConfigValueError, OptimizerError, Pass, PassConfig, PassContext, ProgressEvent, check_choice, check_names, register_pass,
)
from optimizer.export import (
    export_dynamic_batch,
    export_program_to_onnx,
    load_program,
    onnx_input_types,
    onnx_io_names,
    program_input_types,
    served_names,
    to_onnx,
)
from optimizer.finetune import AugmentConfig, FineTuneConfig, TrainData, fine_tune_

QUANT_TYPES = ("qint8", "quint8")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATION_BATCH = 32  # rows per calibration run: large enough to be quick, small enough for histogram memory
TORCHAO_PIN = "torchao==0.18.0"
INT8_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm")


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class QuantizeDynamicConfig(PassConfig):
    """ORT dynamic quantization: INT8 weights stored, activations quantized per batch at run time.

    weight_type: qint8 | quint8. per_channel: one scale per output channel of each weight (ORT's
    default is per tensor; per channel keeps MiniLM's embeddings at cosine 0.993 to FP32 instead of
    0.965, for 0.5% more bytes and the same speed). op_types: operator types to quantize (e.g. ['MatMul']); empty: ONNX Runtime's default set
    (Conv, MatMul — Gemm is rewritten to MatMul — Gather, Attention, LSTM, ...).
    nodes_to_exclude: node names to keep in FP32. preprocess: run ORT's quantization
    pre-processing (shape inference and graph clean-up) first, as ORT recommends.
    Pays off where MatMuls dominate (transformers, RNNs); on small conv nets the run-time
    quantization of activations costs more than INT8 convolutions save — use quantize-static there.
    """

    weight_type: str = "qint8"
    per_channel: bool = True
    op_types: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()
    preprocess: bool = True

    def __post_init__(self) -> None:
        check_choice("weight_type", self.weight_type, QUANT_TYPES)
        check_names("op_types", self.op_types)
        check_names("nodes_to_exclude", self.nodes_to_exclude)


@dataclass(frozen=True)
class QuantizeStaticConfig(PassConfig):
    """ORT static quantization: weights and activations INT8, activation ranges calibrated offline.

    calibrate_method: minmax | entropy | percentile (percentile keeps `percentile` % of values).
    max_samples: calibration rows used at most (a random subset when the data holds more).
    quant_format: qdq (QuantizeLinear/DequantizeLinear around standard ops: portable, and ORT's
    CPU provider fuses each DQ->op->Q group into QLinearConv / QGemm at load, so it runs as fast
    as qoperator) | qoperator (ORT's QLinear* operators written out; on x86 give it quint8
    activations: its S8S8 kernels are slow there, 5x slower than FP32 on the digits CNN). per_channel: one weight
    scale per output channel. activation_type / weight_type: qint8 | quint8 (S8S8 is ORT's
    recommended CPU default). reduce_range: 7-bit weights, for x86 CPUs without VNNI where
    U8S8 products can saturate. op_types / nodes_to_exclude: as for quantize-dynamic.
    min_dot_length: Conv / Gemm / MatMul nodes whose dot products (input channels x kernel
    area, or the inner dimension) are shorter than this stay FP32: INT8 kernels only pay off on
    long dot products, and such a layer (a first conv on one channel) is cheap and
    precision-sensitive in FP32. 0 quantizes every such node.
    """

    calibrate_method: str = "minmax"
    max_samples: int = 256
    percentile: float = 99.999
    quant_format: str = "qdq"
    per_channel: bool = True
    activation_type: str = "qint8"
    weight_type: str = "qint8"
    reduce_range: bool = False
    op_types: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()
    min_dot_length: int = 16
    preprocess: bool = True

    def __post_init__(self) -> None:
        check_choice("calibrate_method", self.calibrate_method, CALIBRATE_METHODS)
        check_choice("quant_format", self.quant_format, QUANT_FORMATS)
        check_choice("activation_type", self.activation_type, QUANT_TYPES)
        check_choice("weight_type", self.weight_type, QUANT_TYPES)
        check_names("op_types", self.op_types)
        check_names("nodes_to_exclude", self.nodes_to_exclude)
        if self.max_samples < 1:
            raise ConfigValueError(f"max_samples must be at least 1, got {self.max_samples}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.min_dot_length < 0:
            raise ConfigValueError(f"min_dot_length must be 0 or more, got {self.min_dot_length}")


@dataclass(frozen=True)
class QuantizeQatConfig(PassConfig):
    """Quantization-aware fine-tuning of a .pt2 classifier on its train data, exported as INT8 (QDQ) ONNX.

    epochs, lr (AdamW, cosine decay to 0 over all steps), batch_size, weight_decay: the shared
    fine-tuning loop (optimizer/finetune.py) with these settings and no augmentation.
    max_samples: train rows used at most per epoch (0: all). freeze_observers: keep the
    activation ranges fixed during the last epoch, so the final weights adapt to the ranges
    that ship (as torch's QAT recipes do). fold_batchnorm: fold each BatchNorm into the conv
    before it, with its running statistics, before training — BN frozen, the usual choice when
    fine-tuning a trained model for a few epochs, and it spares torchao's conv-BN pattern
    matching (~15 s per run on a CPU); false: torchao simulates BN folding while training.
    """

    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 64
    weight_decay: float = 0.0
    max_samples: int = 0
    freeze_observers: bool = True
    fold_batchnorm: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigValueError(f"epochs must be at least 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigValueError(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ConfigValueError(f"weight_decay must be 0 or more, got {self.weight_decay}")
        if self.max_samples < 0:
            raise ConfigValueError(f"max_samples must be 0 (all) or more, got {self.max_samples}")


# ---------------------------------------------------------------------------------------------
# Helpers: datasets, ORT calls, graph facts


def model_arrays(
    data: dict[str, np.ndarray],
    specs: dict[str, tuple[np.dtype, tuple[int | str, ...]]],
    role: str,
    needed_by: str,
) -> dict[str, np.ndarray]:
    """The dataset's array per model input, cast to the input's dtype, after checking names, ranks and fixed dims."""
    arrays = {}
    missing = [name for name in specs if name not in data]
    if missing:
        have = ", ".join(repr(k) for k in data) or "none"
        raise OptimizerError(
            f"{needed_by}: the {role} data has no array {', '.join(repr(m) for m in missing)} (arrays: {have}); "
            f"it needs one array per model input: {', '.join(specs)}; register the model again with a --{role} .npz that has them"
        )
    rows = None
    for name, (dtype, shape) in specs.items():
        array = data[name]
        if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise OptimizerError(f"{needed_by}: {role} array {name!r} is {array.dtype}, the model takes {dtype}")
        expected = ["N" if isinstance(d, str) or d <= 0 else d for d in shape]
        fixed_ok = all(isinstance(e, str) or e == got for e, got in zip(expected[1:], array.shape[1:]))
        if array.ndim != len(shape) or not fixed_ok:
            raise OptimizerError(
                f"{needed_by}: {role} array {name!r} has shape {list(array.shape)}, the model takes {expected} (N: samples)"
            )
        if rows is not None and len(array) != rows:
            raise OptimizerError(f"{needed_by}: the {role} arrays hold different numbers of samples ({rows} and {len(array)} in {name!r})")
        rows = len(array)
        arrays[name] = np.ascontiguousarray(array.astype(dtype, copy=False))
    if not rows:
        raise OptimizerError(f"{needed_by}: the {role} data holds no samples")
    return arrays


def subsample(arrays: dict[str, np.ndarray], limit: int, seed: int) -> dict[str, np.ndarray]:
    """At most `limit` rows, drawn at random (in their original order) when there are more."""
    rows = len(next(iter(arrays.values())))
    if limit <= 0 or rows <= limit:
        return arrays
    keep = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return {k: v[keep] for k, v in arrays.items()}


def _calibration_reader(arrays: dict[str, np.ndarray], batch: int, fixed_batch: bool):
    """Feeds the arrays to ORT's calibrator `batch` rows at a time (whole batches only where the model fixes its batch)."""
    from onnxruntime.quantization import CalibrationDataReader

    rows = len(next(iter(arrays.values())))
    last = rows - batch + 1 if fixed_batch else rows

    class ArrayReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[dict[str, np.ndarray]] = iter(
                [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, last, batch)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return ArrayReader()


def _fixed_batch(specs: dict[str, tuple[np.dtype, tuple[int | str, ...]]]) -> int | None:
    """The model's own batch size where it fixes dim 0 of an input, else None."""
    fixed = {s[0] for _, s in specs.values() if s and isinstance(s[0], int) and s[0] > 0}
    return fixed.pop() if fixed else None


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[name]


# Runs in a child process whose working directory is a scratch folder: ORT's symbolic shape
# inference dumps a model and a uuid-named copy of its weights into the cwd whenever it gives up.
_PREPROCESS_SCRIPT = """
import json, sys
from onnxruntime.quantization.shape_inference import quant_pre_process
source, target = sys.argv[1], sys.argv[2]
errors = []
for kwargs in ({}, {"skip_symbolic_shape": True}, {"skip_symbolic_shape": True, "skip_optimization": True}):
    try:
        quant_pre_process(source, target, **kwargs)
        print(json.dumps({"done": kwargs, "errors": errors}))
        break
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}".splitlines()[0])
else:
    print(json.dumps({"done": None, "errors": errors}))
"""


def preprocess(source: Path, target: Path, context: PassContext, needed_by: str) -> Path:
    """ORT's quant_pre_process (symbolic + ONNX shape inference, graph clean-up), dropping the steps that fail.

    Returns `target`, or `source` when every attempt failed (quantization then runs without it).
    """
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        child = subprocess.run(
            [sys.executable, "-c", _PREPROCESS_SCRIPT, str(source.resolve()), str(target.resolve())],
            check=False, cwd=scratch, capture_output=True, text=True,
        )
    lines = child.stdout.strip().splitlines()
    try:
        outcome = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        outcome = {"done": None, "errors": [f"the pre-processing process exited with {child.returncode}: {child.stderr.strip()[-300:]}"]}
    if outcome["done"] is None or not target.is_file():
        context.progress(ProgressEvent(stage=needed_by, message=f"pre-processing skipped ({'; '.join(outcome['errors'])})"))
        return source
    if outcome["errors"]:
        skipped = ", ".join(k.removeprefix("skip_").replace("_", " ") for k in outcome["done"])
        context.progress(ProgressEvent(stage=needed_by, message=f"pre-processing without {skipped} ({outcome['errors'][0]})"))
    return target


def _name_unnamed_nodes(model: onnx.ModelProto) -> None:
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


def _check_op_types(op_types: tuple[str, ...], known: set[str], needed_by: str) -> list[str] | None:
    unknown = sorted(set(op_types) - known)
    if unknown:
        raise OptimizerError(f"{needed_by}: op_types {', '.join(unknown)} cannot be quantized (choose from {', '.join(sorted(known))})")
    return list(op_types) or None


def int8_facts(path: Path) -> dict[str, int]:
    """Counts of what makes a model INT8: 8-bit initializers and quantized operators, by op type."""
    model = onnx.load(str(path))
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    facts = {"int8_initializers": sum(1 for i in model.graph.initializer if i.data_type in eight_bit)}
    for node in model.graph.node:
        if node.op_type in INT8_OPS or node.op_type.startswith("QLinear"):
            facts[node.op_type] = facts.get(node.op_type, 0) + 1
    return facts


def _check_result(source: Path, target: Path, needed_by: str, hint: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# Passes


@register_pass
class QuantizeDynamicPass(Pass):
    name = "quantize-dynamic"
    config_cls = QuantizeDynamicConfig
    summary = "ONNX Runtime dynamic INT8: weights INT8, activations quantized at run time (transformers, RNNs)"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        from onnxruntime.quantization import quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        config: QuantizeDynamicConfig = self.config  # type: ignore[assignment]
        op_types = _check_op_types(config.op_types, set(IntegerOpsRegistry) | {"Gemm"}, self.name)
        if op_types and "Gemm" in op_types and "MatMul" not in op_types:
            op_types.append("MatMul")  # ORT rewrites Gemm as MatMul + Add before it quantizes
        source = to_onnx(artifact, context)
        target = context.new_path(f"{artifact.path.stem}-int8-dynamic", ".onnx")
        with tempfile.TemporaryDirectory(dir=context.workdir) as tmp:
            model_in = source.path
            if config.preprocess:
                context.progress(ProgressEvent(stage=self.name, fraction=0.1, message="pre-processing (shape inference)"))
                model_in = preprocess(source.path, Path(tmp) / "pre.onnx", context, self.name)
            context.progress(ProgressEvent(stage=self.name, fraction=0.4, message="quantizing weights to INT8"))
            try:
                quantize_dynamic(
                    str(model_in),
                    str(target),
                    op_types_to_quantize=op_types,
                    per_channel=config.per_channel,
                    weight_type=_quant_type(config.weight_type),
                    nodes_to_exclude=list(config.nodes_to_exclude) or None,
                )
            except Exception as e:  # ORT raises assorted types for models it cannot quantize
                raise OptimizerError(f"{self.name}: onnxruntime cannot quantize {source.path.name}: {type(e).__name__}: {e}") from e
        _check_result(source.path, target, self.name, "it has no Conv / MatMul / Gemm with constant weights, or op_types / nodes_to_exclude left none")
        context.progress(ProgressEvent(stage=self.name, fraction=1.0, message=f"wrote {target.name}"))
        return source.derive(target, format="onnx", runtime="onnxruntime", quantized="int8-dynamic")


@register_pass
class QuantizeStaticPass(Pass):
    name = "quantize-static"
    config_cls = QuantizeStaticConfig
    summary = "ONNX Runtime static INT8 (QDQ), activation ranges calibrated on the calibration data"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        config: QuantizeStaticConfig = self.config  # type: ignore[assignment]
        registry = QDQRegistry if config.quant_format == "qdq" else QLinearOpsRegistry
        op_types = _check_op_types(config.op_types, set(registry), self.name)
        data = context.dataset("calibration", needed_by=self.name)
        source = to_onnx(artifact, context)
        specs = onnx_input_types(source.path)
        arrays = subsample(model_arrays(data, specs, "calibration", self.name), config.max_samples, context.seed)
        rows = len(next(iter(arrays.values())))
        fixed_batch = _fixed_batch(specs)
        if fixed_batch and rows < fixed_batch:
            raise OptimizerError(f"{self.name}: the model takes batches of {fixed_batch} and the calibration data holds {rows} samples")
        if config.quant_format == "qoperator" and config.activation_type == "qint8":
            context.progress(ProgressEvent(
                stage=self.name, message="qoperator with qint8 activations runs slowly on x86 CPUs; prefer quant_format qdq or activation_type quint8",
            ))
        target = context.new_path(f"{artifact.path.stem}-int8-static", ".onnx")
        with tempfile.TemporaryDirectory(dir=context.workdir) as tmp:
            model_in = source.path
            if config.preprocess:
                context.progress(ProgressEvent(stage=self.name, fraction=0.1, message="pre-processing (shape inference)"))
                model_in = preprocess(source.path, Path(tmp) / "pre.onnx", context, self.name)
            model = onnx.load(str(model_in))
            _name_unnamed_nodes(model)
            excluded = list(config.nodes_to_exclude) + short_dot_nodes(model, config.min_dot_length)
            named = Path(tmp) / "named.onnx"
            onnx.save(model, str(named))
            context.progress(ProgressEvent(
                stage=self.name, fraction=0.3,
                message=f"calibrating ({config.calibrate_method}) on {rows} samples" + (f"; FP32: {', '.join(excluded)}" if excluded else ""),
            ))
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
            try:
                quantize_static(
                    str(named),
                    str(target),
                    _calibration_reader(arrays, fixed_batch or CALIBRATION_BATCH, fixed_batch is not None),
                    quant_format=QuantFormat.QDQ if config.quant_format == "qdq" else QuantFormat.QOperator,
                    op_types_to_quantize=op_types,
                    per_channel=config.per_channel,
                    reduce_range=config.reduce_range,
                    activation_type=_quant_type(config.activation_type),
                    weight_type=_quant_type(config.weight_type),
                    nodes_to_exclude=excluded or None,
                    calibrate_method=method[config.calibrate_method],
                    calibration_providers=["CPUExecutionProvider"],
                    extra_options={"CalibPercentile": config.percentile},
                )
            except Exception as e:  # ORT raises assorted types for models it cannot calibrate or quantize
                raise OptimizerError(f"{self.name}: onnxruntime cannot quantize {source.path.name}: {type(e).__name__}: {e}") from e
        _check_result(source.path, target, self.name, "check op_types, nodes_to_exclude and min_dot_length")
        context.progress(ProgressEvent(stage=self.name, fraction=1.0, message=f"wrote {target.name}"))
        return source.derive(target, format="onnx", runtime="onnxruntime", quantized="int8-static")


# ---------------------------------------------------------------------------------------------
# Quantization-aware training


def _import_torchao_pt2e(needed_by: str):
    """torchao's PT2E QAT API; its import logs about CUDA kernels a CPU node lacks, which we silence."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import pt2e
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as e:
        raise OptimizerError(f"{needed_by} needs torchao on this node ({e}); pip install {TORCHAO_PIN}") from e
    finally:
        logger.setLevel(level)
    return pt2e, quantize_pt2e, x86_inductor_quantizer


def fold_conv_batchnorm_(graph) -> int:
    """Folds every BatchNorm that only follows a conv into the conv's weight and bias; returns how many."""
    from torchao.quantization.pt2e.utils import _is_bn_node, _is_conv_or_conv_transpose_node, fold_bn_weights_into_conv_node

    folded = 0
    for bn in list(graph.graph.nodes):
        if bn.op != "call_function" or not _is_bn_node(bn):
            continue
        conv = bn.args[0]
        if not _is_conv_or_conv_transpose_node(conv) or len(conv.users) != 1 or conv.args[1].op != "get_attr":
            continue
        bias = conv.args[2] if len(conv.args) > 2 else None
        if bias is not None and bias.op != "get_attr":
            continue
        fold_bn_weights_into_conv_node(conv, conv.args[1], bias, bn, graph)
        folded += 1
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return folded


def _check_labels(data: dict[str, np.ndarray], rows: int, needed_by: str) -> np.ndarray:
    labels = data.get("labels")
    if labels is None:
        raise OptimizerError(f"{needed_by}: the train data has no 'labels' array; add the class index of each sample as 'labels' to TRAIN.npz")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != rows:
        raise OptimizerError(
            f"{needed_by}: 'labels' must hold one integer class index per sample ({rows}), got {labels.dtype} {list(labels.shape)}"
        )
    if labels.min() < 0:
        raise OptimizerError(f"{needed_by}: 'labels' holds negative class indices")
    return labels.astype(np.int64)


def _class_count(program) -> int | None:
    """The last dim of the program's first output (the logits), when its shape is known."""
    output = next(n for n in program.graph.nodes if n.op == "output").args[0][0]
    value = getattr(output, "meta", {}).get("val")
    return int(value.shape[-1]) if value is not None and value.dim() > 0 and isinstance(value.shape[-1], int) else None


@register_pass
class QuantizeQatPass(Pass):
    """Quantization-aware training with torchao's PT2E flow, served as QDQ INT8 ONNX by ONNX Runtime.

    Approach: the .pt2 graph is re-exported with a dynamic batch, BatchNorms are folded into their
    convs (config fold_batchnorm; else torchao simulates the folding while training),
    `prepare_qat_pt2e` inserts fake-quantize modules chosen by torchao's X86InductorQuantizer (QAT
    config: UINT8 per-tensor activations, INT8 per-channel symmetric weights, straight-through
    gradients), the model is fine-tuned on the train data, and `convert_pt2e` turns the learned
    ranges into quantize/dequantize ops. torch.onnx.export (dynamo) writes those as standard
    QuantizeLinear / DequantizeLinear with the INT8 weights as initializers, which ONNX Runtime
    fuses into QLinearConv / QGemm at load. We chose the library flow over hand-written fake
    quantization because it works on torch 2.13 CPU with torchao 0.18 and its output exports to
    ONNX unchanged: the ranges ORT serves are exactly the ones the model was trained with.
    """

    name = "quantize-qat"
    config_cls = QuantizeQatConfig
    summary = "quantization-aware fine-tuning (torchao PT2E) on the train data, served as INT8 ONNX"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        import torch

        config: QuantizeQatConfig = self.config  # type: ignore[assignment]
        if artifact.format != "pt2":
            raise OptimizerError(
                f"quantize-qat needs a .pt2 model to train, and {artifact.path.name} is {artifact.format.upper()}; "
                "register the model as a torch.export archive (torch.export.save) to use quantize-qat, "
                "or use quantize-static for ONNX models"
            )
        program = load_program(artifact, self.name)
        inputs, outputs = served_names(artifact, program, self.name)
        data = context.dataset("train", needed_by=self.name)
        specs = dict(zip(inputs, program_input_types(program).values()))
        arrays = model_arrays(data, specs, "train", self.name)
        rows = len(next(iter(arrays.values())))
        labels = _check_labels(data, rows, self.name)
        arrays["labels"] = labels
        arrays = subsample(arrays, config.max_samples, context.seed)
        labels = arrays.pop("labels")
        classes = _class_count(program)
        if classes is not None and labels.max() >= classes:
            raise OptimizerError(f"{self.name}: 'labels' holds class {int(labels.max())}, and the model has {classes} outputs")
        pt2e, quantize_pt2e, xiq = _import_torchao_pt2e(self.name)

        context.progress(ProgressEvent(stage=self.name, fraction=0.0, message="inserting fake quantization (torchao PT2E)"))
        example = tuple(torch.from_numpy(arrays[name][:2]) for name in inputs)
        graph = export_dynamic_batch(program.module(check_guards=False), example, self.name).module()
        if config.fold_batchnorm:
            fold_conv_batchnorm_(graph)
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
        try:
            model = quantize_pt2e.prepare_qat_pt2e(graph, quantizer)
        except Exception as e:  # torchao raises assorted types on graphs it cannot annotate
            raise OptimizerError(f"{self.name}: torchao cannot prepare the model for QAT: {type(e).__name__}: {e}") from e
        pt2e.allow_exported_model_train_eval(model)

        def before_epoch(epoch: int) -> None:
            if config.freeze_observers and config.epochs > 1 and epoch == config.epochs - 1:
                model.apply(pt2e.disable_observer)

        # Augmentation off: the fake-quantize observers must calibrate on the data the model will serve.
        finetune = FineTuneConfig(
            epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, weight_decay=config.weight_decay,
            optimizer="adamw", schedule="cosine", augment=AugmentConfig(kind="none"),
        )
        fine_tune_(model, TrainData([arrays[name] for name in inputs], labels), finetune, context, self.name, before_epoch=before_epoch)
        context.progress(ProgressEvent(stage=self.name, fraction=1.0, message="converting to INT8 and exporting ONNX"))
        try:
            converted = quantize_pt2e.convert_pt2e(model)
        except Exception as e:  # torchao raises assorted types on graphs it cannot convert
            raise OptimizerError(f"{self.name}: torchao cannot convert the trained model to INT8: {type(e).__name__}: {e}") from e
        target = context.new_path(f"{artifact.path.stem}-int8-qat", ".onnx")
        export_program_to_onnx(export_dynamic_batch(converted, example, self.name), target, inputs, outputs, self.name)
        strip_debug_info(target)
        facts = int8_facts(target)
        if facts["int8_initializers"] == 0 or "QuantizeLinear" not in facts:
            raise OptimizerError(f"{self.name}: the exported model holds no INT8 operators; torchao found nothing to quantize in it")
        # The served names travel with the artifact even when the .pt2 was registered without them.
        return Artifact(
            path=target, format="onnx", runtime="onnxruntime", input_names=tuple(inputs), output_names=tuple(outputs),
            notes={**artifact.notes, "quantized": "int8-qat"},
        )
