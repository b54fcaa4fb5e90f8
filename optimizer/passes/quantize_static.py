"""quantize-static: ONNX Runtime static INT8 (QDQ or QOperator), activation ranges calibrated on the calibration data."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from slimserve.optimizer.base import (
    Artifact,
    ConfigValueError,
    OptimizerError,
    Pass,
    PassConfig,
    PassContext,
    ProgressEvent,
    check_choice,
    check_names,
    setting,
)
from slimserve.optimizer.compress.ortquant import (
    QUANT_TYPES,
    calibration_reader,
    check_op_types,
    int8_kernels,
    preprocess,
    quant_type,
)
from slimserve.optimizer.data import InputSpecs, batch_axis, model_arrays, needs_layout, subsample
from slimserve.optimizer.formats.export import onnx_input_types, to_onnx
from slimserve.optimizer.formats.onnx_graph import (
    activation_products,
    check_quantized,
    depthwise_scale_spread,
    has_attention,
    huge_activations,
    mask_path_nodes,
    matmul_weights,
    name_unnamed_nodes_,
    nodes_touching,
    short_dot_nodes,
    strip_debug_info,
)
from slimserve.optimizer.formats.onnx_import import fp32_around_subgraphs, import_onnx, sort_with_subgraphs

CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATION_BATCH = 32  # rows per calibration run: large enough to be quick, small enough for histogram memory
TRANSFORMER_OP_TYPES = ("MatMul", "Gemm", "Conv")  # with MatMulConstBOnly: the weight products, not the attention ones
# A per-tensor scale this much coarser on a depthwise channel than its own range loses that channel (EfficientNet: 3066x).
MAX_DEPTHWISE_SPREAD = 100.0


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
    U8S8 products can saturate. op_types: operator types to quantize; empty: chosen from the
    graph — in a transformer (a Softmax feeding a MatMul) only MatMul / Gemm / Conv with constant
    weights, as ORT advises (quantizing Softmax, LayerNorm, residual Adds and the attention
    products costs accuracy and adds Q/DQ pairs that are slower than FP32); elsewhere ORT's full
    set. exclude: node names to keep in FP32.
    min_dot_length: Conv / Gemm / MatMul nodes whose dot products (input channels x kernel
    area, or the inner dimension) are shorter than this stay FP32: INT8 kernels only pay off on
    long dot products, and such a layer (a first conv on one channel) is cheap and
    precision-sensitive in FP32. 0 quantizes every such node. Depthwise convolutions are exempt:
    keeping them FP32 puts a DQ/Q pair inside every inverted-residual block.
    keep_masks_fp32: keep the attention-mask path (a constant of magnitude >= 1e3 or inf, added
    before Softmax) in FP32 whatever op_types says: INT8 on it gives a scale of ~1e36 that
    flattens every attention score. max_activation_range: after calibration, an activation
    quantized over a wider range than this (a mask, an unbounded value) is put back in FP32 and
    the model quantized again; 0 turns the check off.
    """

    calibrate_method: str = setting("minmax", "minmax | entropy | percentile")
    max_samples: int = setting(256, "calibration rows used at most (a random subset when the data holds more)")
    percentile: float = setting(99.999, "the share of values (in %) the percentile method keeps in range")
    quant_format: str = setting("qdq", "qdq (portable QuantizeLinear/DequantizeLinear pairs) | qoperator (ORT's QLinear* operators)")
    per_channel: bool = setting(True, "one weight scale per output channel")
    per_channel_matmul: bool = setting(False, "also one scale per channel for MatMul weights (false: per tensor while per_channel is on)")
    activation_type: str = setting("qint8", "qint8 | quint8")
    weight_type: str = setting("qint8", "qint8 | quint8")
    reduce_range: bool = setting(False, "7-bit weights, for x86 CPUs without VNNI")
    op_types: tuple[str, ...] = setting(
        (), "operator types to quantize; empty: chosen from the graph (a transformer: weighted MatMul / Gemm / Conv)"
    )
    exclude: tuple[str, ...] = setting((), "node names kept in FP32")
    min_dot_length: int = setting(16, "Conv / Gemm / MatMul with shorter dot products stay FP32 (0: quantize all)")
    preprocess: bool = setting(True, "run ORT's quantization pre-processing (shape inference, graph clean-up) first")
    keep_masks_fp32: bool = setting(True, "keep the attention-mask path in FP32 whatever op_types says")
    max_activation_range: float = setting(1e4, "activations calibrated over a wider range go back to FP32 (0: off)")

    def __post_init__(self) -> None:
        check_choice("calibrate_method", self.calibrate_method, CALIBRATE_METHODS)
        check_choice("quant_format", self.quant_format, QUANT_FORMATS)
        check_choice("activation_type", self.activation_type, QUANT_TYPES)
        check_choice("weight_type", self.weight_type, QUANT_TYPES)
        check_names("op_types", self.op_types)
        check_names("exclude", self.exclude, "node names")
        if self.max_samples < 1:
            raise ConfigValueError(f"max_samples must be at least 1, got {self.max_samples}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.min_dot_length < 0:
            raise ConfigValueError(f"min_dot_length must be 0 or more, got {self.min_dot_length}")
        if self.max_activation_range < 0:
            raise ConfigValueError(f"max_activation_range must be 0 (off) or more, got {self.max_activation_range}")


def _fixed_batch(specs: InputSpecs) -> int | None:
    """The model's own batch size where an input fixes its batch axis (slimserve.optimizer.data.batch_axis), else None."""
    axes = {name: batch_axis(s) for name, (_, s) in specs.items()}
    fixed = {s[a] for name, (_, s) in specs.items() if (a := axes[name]) is not None and isinstance(s[a], int) and s[a] > 0}
    return fixed.pop() if fixed else None


class QuantizeStaticPass(Pass[QuantizeStaticConfig]):
    """ONNX Runtime static INT8 (QDQ), activation ranges calibrated on the calibration data."""

    name = "quantize-static"
    needs = ("calibration",)
    config_cls = QuantizeStaticConfig
    kind = "quantize"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        config = self.config
        # ORT's QDQ quantizer takes the QOperator types too (Add, Mul, Softmax, ... get a plain Q/DQ pair).
        known = set(QLinearOpsRegistry) | (set(QDQRegistry) if config.quant_format == "qdq" else set())
        op_types = check_op_types(config.op_types, known, self.name)
        data = context.dataset("calibration", needed_by=self.name)
        source, per_channel = self._import(to_onnx(artifact, context), context, config.per_channel)
        specs = onnx_input_types(source.path)
        shapes = {name: shape for name, (_, shape) in specs.items()}
        layout = shapes if needs_layout(shapes) else None  # the calibration rows go back to a state's axis, a scalar's one value
        arrays = subsample(model_arrays(data, specs, "calibration", self.name), config.max_samples, context.seed)
        rows = len(next(iter(arrays.values())))
        fixed_batch = _fixed_batch(specs)
        if fixed_batch and rows < fixed_batch:
            raise OptimizerError(f"{self.name}: the model takes batches of {fixed_batch} and the calibration data holds {rows} samples")
        if config.quant_format == "qoperator" and config.activation_type == "qint8":
            context.progress(
                ProgressEvent(
                    stage=self.name,
                    message="qoperator with qint8 activations runs slowly on x86 CPUs; prefer quant_format qdq or activation_type quint8",
                )
            )
        target = context.new_path(f"{artifact.path.stem}-int8-static", ".onnx")
        with tempfile.TemporaryDirectory(dir=context.workdir) as tmp:
            model_in = source.path
            if config.preprocess:
                context.progress(ProgressEvent(stage=self.name, fraction=0.1, message="pre-processing (shape inference)"))
                model_in = preprocess(source.path, Path(tmp) / "pre.onnx", context, self.name)
            model = onnx.load(str(model_in))
            name_unnamed_nodes_(model)
            plan = _plan(model, config, op_types)
            for line in plan.messages:
                context.progress(ProgressEvent(stage=self.name, fraction=0.2, message=line))
            named = Path(tmp) / "named.onnx"
            onnx.save(model, str(named))
            excluded = plan.excluded
            for attempt in range(2):
                context.progress(
                    ProgressEvent(
                        stage=self.name,
                        fraction=0.3 + 0.3 * attempt,
                        message=f"calibrating ({config.calibrate_method}) on {rows} samples"
                        + (f"; FP32: {_names(excluded)}" if excluded else ""),
                    )
                )
                self._quantize(named, target, arrays, fixed_batch, plan.op_types, excluded, plan.extra_options, per_channel, layout)
                huge = huge_activations(target, config.max_activation_range) if config.max_activation_range else {}
                if not huge:
                    break
                spans = ", ".join(f"{k} ({v:.3g})" for k, v in sorted(huge.items())[:4])
                if attempt == 1:
                    raise OptimizerError(
                        f"{self.name}: activations {spans} still span more than max_activation_range "
                        f"{config.max_activation_range:g} after their nodes were kept in FP32; add their consumers to exclude"
                    )
                excluded = sorted(set(excluded) | set(nodes_touching(model, set(huge))))
                context.progress(
                    ProgressEvent(
                        stage=self.name,
                        fraction=0.5,
                        message=f"activations {spans} span more than {config.max_activation_range:g}: their nodes stay FP32",
                    )
                )
        sort_with_subgraphs(target)
        check_quantized(source.path, target, self.name, "check op_types, exclude and min_dot_length")
        strip_debug_info(target)
        kernels = int8_kernels()
        context.progress(
            ProgressEvent(stage=self.name, fraction=1.0, message=f"wrote {target.name}; {len(excluded)} nodes FP32; CPU: {kernels}")
        )
        return source.derive(
            target,
            format="onnx",
            runtime="onnxruntime",
            quantized="int8-static",
            op_types=",".join(plan.op_types or ["all"]),
            fp32_nodes=str(len(excluded)),
            int8_kernels=kernels,
        )

    def _import(self, artifact: Artifact, context: PassContext, per_channel: bool) -> tuple[Artifact, bool]:
        """The imported graph at opset 13 (per-channel DequantizeLinear takes `axis` from 13), else per tensor at its own opset, said."""
        try:
            return import_onnx(artifact, context, self.name, min_opset=13), per_channel
        except OptimizerError as e:
            if not per_channel or "version converter" not in str(e):
                raise
            context.progress(
                ProgressEvent(
                    stage=self.name, fraction=0.05, message=f"{e}: quantizing per tensor at the model's opset (per_channel needs opset 13)"
                )
            )
            return import_onnx(artifact, context, self.name), False

    def _quantize(
        self,
        model: Path,
        target: Path,
        arrays: dict[str, np.ndarray],
        fixed_batch: int | None,
        op_types: list[str] | None,
        excluded: list[str],
        extra_options: dict[str, object],
        per_channel: bool,
        layout: dict | None = None,
    ) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        config = self.config
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
        try:
            quantize_static(
                str(model),
                str(target),
                calibration_reader(
                    arrays,
                    fixed_batch or CALIBRATION_BATCH,
                    fixed_batch is not None,
                    equal=config.calibrate_method != "minmax",
                    shapes=layout,
                ),
                quant_format=QuantFormat.QDQ if config.quant_format == "qdq" else QuantFormat.QOperator,
                op_types_to_quantize=op_types,
                per_channel=per_channel,
                reduce_range=config.reduce_range,
                activation_type=quant_type(config.activation_type),
                weight_type=quant_type(config.weight_type),
                nodes_to_exclude=list(excluded) or None,
                calibrate_method=method[config.calibrate_method],
                calibration_providers=["CPUExecutionProvider"],
                extra_options={"CalibPercentile": config.percentile, **extra_options},
            )
        except Exception as e:  # ORT raises assorted types for models it cannot calibrate or quantize
            raise OptimizerError(f"{self.name}: onnxruntime cannot quantize {model.name}: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class _Plan:
    op_types: list[str] | None
    excluded: list[str]
    extra_options: dict[str, object]
    messages: list[str]


def _plan(model: onnx.ModelProto, config: QuantizeStaticConfig, op_types: list[str] | None) -> _Plan:
    """What to quantize: op types (transformer-aware when not given), the nodes kept in FP32, and why."""
    messages, extra, products = [], {}, []
    if op_types is None and has_attention(model):
        # MatMulConstBOnly is ORT's switch for this, but its QDQ quantizer ignores it: the products are excluded by name.
        # A DQ shared by Q, K and V blocks ORT's fusion of each into an INT8 kernel: one pair per consumer.
        extra = {"MatMulConstBOnly": True, "DedicatedQDQPair": True}
        op_types, products = list(TRANSFORMER_OP_TYPES), activation_products(model)
        messages.append("attention found: quantizing only MatMul / Gemm / Conv with constant weights (set op_types to override)")
    masks = mask_path_nodes(model) if config.keep_masks_fp32 else []
    if masks:
        messages.append(f"attention-mask path kept FP32 (a constant of magnitude >= 1e3 or inf): {_names(masks)}")
    spread = depthwise_scale_spread(model)
    if not config.per_channel and spread > MAX_DEPTHWISE_SPREAD:
        messages.append(
            f"per_channel is off and depthwise weight channels differ up to {spread:.0f}x in range: "
            "one scale per tensor rounds the narrow channels to zero; set per_channel true"
        )
    around = fp32_around_subgraphs(model)
    if around:
        messages.append(
            f"If / Loop / Scan subgraphs are not entered: they and the nodes whose outputs they read stay FP32: {_names(around)}"
        )
    excluded = list(dict.fromkeys([*config.exclude, *short_dot_nodes(model, config.min_dot_length), *masks, *products, *around]))
    if config.per_channel and not config.per_channel_matmul:
        # An override without an axis is ORT's way to quantize one weight per tensor while per_channel is on.
        extra["TensorQuantOverrides"] = {name: [{}] for name in matmul_weights(model)}
    return _Plan(op_types, excluded, extra, messages)


def _names(nodes: list[str], shown: int = 6) -> str:
    return ", ".join(nodes[:shown]) + (f" and {len(nodes) - shown} more" if len(nodes) > shown else "")
