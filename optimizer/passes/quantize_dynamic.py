"""quantize-dynamic: ONNX Runtime dynamic INT8 (weights INT8, activations quantized per batch at run time)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from optimizer.base import (
    Artifact,
    OptimizerError,
    Pass,
    PassConfig,
    PassContext,
    ProgressEvent,
    check_choice,
    check_names,
)
from optimizer.export import to_onnx
from optimizer.onnx_graph import check_quantized
from optimizer.ortquant import QUANT_TYPES, check_op_types, preprocess, quant_type
from optimizer.registry import register


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


@register
class QuantizeDynamicPass(Pass):
    name = "quantize-dynamic"
    config_cls = QuantizeDynamicConfig
    summary = "ONNX Runtime dynamic INT8: weights INT8, activations quantized at run time (transformers, RNNs)"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        from onnxruntime.quantization import quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        config: QuantizeDynamicConfig = self.config  # type: ignore[assignment]
        op_types = check_op_types(config.op_types, set(IntegerOpsRegistry) | {"Gemm"}, self.name)
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
                    weight_type=quant_type(config.weight_type),
                    nodes_to_exclude=list(config.nodes_to_exclude) or None,
                )
            except Exception as e:  # ORT raises assorted types for models it cannot quantize
                raise OptimizerError(f"{self.name}: onnxruntime cannot quantize {source.path.name}: {type(e).__name__}: {e}") from e
        check_quantized(source.path, target, self.name, "it has no Conv / MatMul / Gemm with constant weights, or op_types / nodes_to_exclude left none")
        context.progress(ProgressEvent(stage=self.name, fraction=1.0, message=f"wrote {target.name}"))
        return source.derive(target, format="onnx", runtime="onnxruntime", quantized="int8-dynamic")
