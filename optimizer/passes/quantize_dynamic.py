"""quantize-dynamic: ONNX Runtime dynamic INT8 (weights INT8, activations quantized per batch at run time)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

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
from slimserve.optimizer.compress.ortquant import QUANT_TYPES, check_op_types, int8_kernels, preprocess, quant_type
from slimserve.optimizer.formats.export import to_onnx
from slimserve.optimizer.formats.onnx_graph import check_quantized, weights_by_op_type
from slimserve.optimizer.formats.onnx_import import fp32_around_subgraphs, import_onnx, sort_with_subgraphs

# Operator types whose run-time activation quantization costs more than their INT8 kernels save on CPUs.
SLOW_DYNAMIC_OPS = frozenset({"Conv"})
# Below this share of the weights quantized, the variant is the FP32 model again (a CNN's classifier head alone).
MIN_QUANTIZED_SHARE = 0.1


@dataclass(frozen=True)
class QuantizeDynamicConfig(PassConfig):
    """ORT dynamic quantization: INT8 weights stored, activations quantized per batch at run time.

    weight_type: qint8 | quint8. per_channel: one scale per output channel of each weight (ORT's
    default is per tensor; per channel keeps MiniLM's embeddings at cosine 0.993 to FP32 instead of
    0.965, for 0.5% more bytes and the same speed). op_types: operator types to quantize (e.g. ['MatMul']);
    empty: ONNX Runtime's default set without Conv (MatMul — Gemm is rewritten to MatMul — Gather,
    Attention, LSTM, ...). Dynamic INT8 pays off where MatMuls dominate (transformers, RNNs), as
    ORT advises; a convolution becomes ConvInteger, which quantizes its input at every call and ran
    7-10 ms where FP32 took 0.4-0.9 ms, so Conv is quantized only when op_types names it, and a model
    with little else to quantize (under 10% of its weights: a CNN's classifier head) is refused in favour
    of quantize-static.
    exclude: node names to keep in FP32. keep_fp32: also keep in FP32 the N weight MatMuls whose INT8 error is largest
    on the calibration data (else the evaluation data), each row run at its real length
    (slimserve.optimizer.compress.int8_sensitivity; embedding Gathers are ranked too). MiniLM on 160 sentences
    (`python -m bench.bench_int8_rows`): worst sentence 0.969 with none kept, 0.984 with 4 (its 2 embedding tables
    first) at the same speed (2.06x FP32), 0.991 with 16 at 1.27x FP32. preprocess: run ORT's quantization
    pre-processing (shape inference and graph clean-up) first, as ORT recommends.
    """

    weight_type: str = setting("qint8", "qint8 | quint8")
    per_channel: bool = setting(True, "one scale per output channel of each weight (false: per tensor)")
    op_types: tuple[str, ...] = setting((), "operator types to quantize (e.g. ['MatMul']); empty: ORT's default set without Conv")
    exclude: tuple[str, ...] = setting((), "node names kept in FP32")
    keep_fp32: int = setting(0, "the N weight MatMuls with the largest INT8 error on the calibration (else evaluation) data stay FP32")
    preprocess: bool = setting(True, "run ORT's quantization pre-processing (shape inference, graph clean-up) first")

    def __post_init__(self) -> None:
        check_choice("weight_type", self.weight_type, QUANT_TYPES)
        check_names("op_types", self.op_types)
        check_names("exclude", self.exclude, "node names")
        if isinstance(self.keep_fp32, bool) or not isinstance(self.keep_fp32, int) or self.keep_fp32 < 0:
            raise ConfigValueError(f"keep_fp32 must be a whole number of MatMuls, 0 or more, got {self.keep_fp32!r}")


class QuantizeDynamicPass(Pass[QuantizeDynamicConfig]):
    """ONNX Runtime dynamic INT8: weights INT8, activations quantized at run time (transformers, RNNs)."""

    name = "quantize-dynamic"
    config_cls = QuantizeDynamicConfig
    kind = "quantize"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        from onnxruntime.quantization import quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        config = self.config
        op_types = check_op_types(config.op_types, set(IntegerOpsRegistry) | {"Gemm"}, self.name)
        if op_types is None:
            op_types = sorted(set(IntegerOpsRegistry) - SLOW_DYNAMIC_OPS)
        if "Gemm" in op_types and "MatMul" not in op_types:
            op_types.append("MatMul")  # ORT rewrites Gemm as MatMul + Add before it quantizes
        # DynamicQuantizeLinear is opset 11; a per-channel DequantizeLinear takes `axis` from opset 13.
        source = import_onnx(to_onnx(artifact, context), context, self.name, min_opset=13 if config.per_channel else 11)
        self._check_worth_it(source.path, op_types, context)
        target = context.new_path(f"{artifact.path.stem}-int8-dynamic", ".onnx")
        with tempfile.TemporaryDirectory(dir=context.workdir) as tmp:
            model_in = source.path
            if config.preprocess:
                context.progress(ProgressEvent(stage=self.name, fraction=0.1, message="pre-processing (shape inference)"))
                model_in = preprocess(source.path, Path(tmp) / "pre.onnx", context, self.name)
            excluded = list(config.exclude)
            sensitive: list[str] = []
            if config.keep_fp32:
                from slimserve.optimizer.compress.int8_sensitivity import with_node_names

                model_in = with_node_names(model_in, Path(tmp) / "named-nodes.onnx")
                sensitive = self._most_sensitive(model_in, context)
            excluded += [n for n in sensitive if n not in excluded]
            model = onnx.load(str(model_in))
            around = fp32_around_subgraphs(model)
            if around:  # ORT's quantizer rewrites the main graph's tensors that If / Loop subgraphs read: those stay FP32
                excluded += around
                model_in = Path(tmp) / "named.onnx"
                onnx.save(model, str(model_in))
                context.progress(
                    ProgressEvent(
                        stage=self.name, fraction=0.3, message=f"If / Loop / Scan subgraphs stay FP32, with {len(around)} nodes around them"
                    )
                )
            context.progress(ProgressEvent(stage=self.name, fraction=0.4, message="quantizing weights to INT8"))
            try:
                quantize_dynamic(
                    str(model_in),
                    str(target),
                    op_types_to_quantize=op_types,
                    per_channel=config.per_channel,
                    weight_type=quant_type(config.weight_type),
                    nodes_to_exclude=excluded or None,
                )
            except Exception as e:  # ORT raises assorted types for models it cannot quantize
                raise OptimizerError(f"{self.name}: onnxruntime cannot quantize {source.path.name}: {type(e).__name__}: {e}") from e
        sort_with_subgraphs(target)
        check_quantized(source.path, target, self.name, "it has no MatMul / Gemm with constant weights, or op_types / exclude left none")
        kernels = int8_kernels()
        context.progress(ProgressEvent(stage=self.name, fraction=1.0, message=f"wrote {target.name}; CPU: {kernels}"))
        return source.derive(
            target,
            format="onnx",
            runtime="onnxruntime",
            quantized="int8-dynamic",
            op_types=",".join(op_types),
            int8_kernels=kernels,
            **({"kept_fp32": ",".join(sensitive)} if sensitive else {}),
        )

    def _most_sensitive(self, model: Path, context: PassContext) -> list[str]:
        """The keep_fp32 weight MatMuls with the largest worst-row INT8 error on the calibration (else evaluation) data."""
        from slimserve.optimizer.compress.int8_sensitivity import rank

        role = next((r for r in ("calibration", "data") if r in context.datasets), None)
        if role is None:
            raise OptimizerError(
                f"{self.name}: keep_fp32 {self.config.keep_fp32} ranks the MatMuls on data, and the model has none: register it "
                "with --calibration CALIBRATION.npz (or --data EVAL.npz), or set keep_fp32 0"
            )
        context.progress(ProgressEvent(stage=self.name, fraction=0.2, message=f"ranking MatMuls by INT8 error on the {role} data"))
        ranked = rank(model, context.dataset(role, self.name))
        if not ranked:
            raise OptimizerError(
                f"{self.name}: keep_fp32 {self.config.keep_fp32}: no weight MatMul could be ranked on the {role} data (the graph has "
                "no MatMul with a constant 2-D weight and a node name, or the data lacks its inputs); set keep_fp32 0"
            )
        kept = [s.node for s in ranked[: self.config.keep_fp32]]
        worst = ", ".join(f"{s.node} {s.worst:.3f}" for s in ranked[: min(3, len(kept))])
        context.progress(
            ProgressEvent(
                stage=self.name, fraction=0.3, message=f"{len(kept)} of {len(ranked)} MatMuls stay FP32 (worst-row error: {worst}, ...)"
            )
        )
        return kept

    def _check_worth_it(self, model: Path, op_types: list[str], context: PassContext) -> None:
        """Refuses a model with nothing but convolutions to quantize; warns when convolutions hold most of its weights."""
        weights = weights_by_op_type(model)
        chosen = sum(n for op, n in weights.items() if op in op_types or (op == "Gemm" and "MatMul" in op_types))
        slow = sum(n for op, n in weights.items() if op in SLOW_DYNAMIC_OPS and op not in op_types)
        if chosen == 0:
            found = f"this model's weights are all in Conv layers ({slow:,} weights)" if slow else "this model has no constant weights"
            raise OptimizerError(
                f"{self.name} found no {' / '.join(op_types)} with constant weights to quantize: {found}; dynamic INT8 "
                "convolutions (ConvInteger) run slower than FP32 on CPUs, so use quantize-static, or set op_types ['Conv'] to force them"
            )
        if chosen < MIN_QUANTIZED_SHARE * (chosen + slow):
            raise OptimizerError(
                f"{self.name} would quantize only {chosen:,} of {chosen + slow:,} weights: the rest are in Conv layers, and dynamic "
                "INT8 convolutions (ConvInteger) run slower than FP32 on CPUs; use quantize-static, or set op_types ['Conv', 'MatMul'] to force them"
            )
        if slow > chosen:
            context.progress(
                ProgressEvent(
                    stage=self.name,
                    fraction=0.05,
                    message=f"{slow:,} of {slow + chosen:,} weights are in Conv layers, which stay FP32 (dynamic INT8 convolutions "
                    "run slower than FP32 on CPUs): use quantize-static to quantize them",
                )
            )
