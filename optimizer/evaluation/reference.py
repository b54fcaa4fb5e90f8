"""The reference a search must beat: the model's best FP32 runtime, timing against it, and graph facts that decide candidates.

A .pt2 served by torch eager is rarely what anyone would serve: its ONNX export in ONNX Runtime is often
several times faster. So `auto` measures that export too and takes the faster of the two as the
reference; a candidate is kept only when it beats the reference by a noise margin in interleaved timing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext, RuntimeFactory
from slimserve.optimizer.data import take
from slimserve.optimizer.evaluation.measure import Evaluation, Outputs, evaluate, model_inputs, served_calls
from slimserve.optimizer.evaluation.timing import interleaved_p50_ms

EXPORT = "fp32-onnxruntime"  # the name of the FP32 ONNX Runtime form of a model in reports
# How far (points of the budget's unit) the FP32 export may stray from the model before it is not the same model.
EXPORT_TOLERANCE = 0.01


@dataclass(frozen=True)
class Reference:
    """The fastest FP32 form of the model: the baseline itself, or its export in ONNX Runtime."""

    name: str  # "baseline" or EXPORT
    artifact: Artifact
    evaluation: Evaluation
    export: tuple[Artifact, Evaluation] | None = None  # the FP32 ONNX Runtime form, when measured apart from the baseline
    note: str = ""  # why the export is not the reference, when it is not

    @property
    def p50_ms(self) -> float:
        return float(self.evaluation.latency_p50_ms or 0.0)

    def describe(self) -> str:
        runtime = self.artifact.runtime
        return f"FP32 {runtime} ({self.p50_ms:.3f} ms)"


def measure_reference(
    source: Artifact,
    baseline: Evaluation,
    baseline_outputs: Outputs | None,
    context: PassContext,
    runtime_factory: RuntimeFactory,
    data: dict[str, np.ndarray] | None,
    serving_batch: int,
    evaluator: Any = None,
) -> Reference:
    """The baseline, or its FP32 ONNX Runtime form when that is faster; the export is measured like any variant."""
    if source.runtime == "onnxruntime":
        return Reference("baseline", source, baseline)
    try:
        if source.format == "onnx":
            export = source.derive(source.path, format="onnx", runtime="onnxruntime")
        else:
            from slimserve.optimizer.formats.export import to_onnx

            export = to_onnx(source, context)
        evaluation, _ = evaluate(
            export,
            runtime_factory,
            data,
            baseline=baseline,
            baseline_outputs=baseline_outputs,
            serving_batch=serving_batch,
            evaluator=evaluator,
        )
    except OptimizerError as e:
        return Reference("baseline", source, baseline, note=f"no FP32 ONNX Runtime form: {e}")
    pair = (export, evaluation)
    if evaluation.quality_drop is not None and evaluation.quality_drop > EXPORT_TOLERANCE:
        note = f"the ONNX export differs from the model ({evaluation.quality_drop:.3f} points of {evaluation.quality_metric})"
        return Reference("baseline", source, baseline, export=pair, note=note)
    if (evaluation.latency_p50_ms or float("inf")) < (baseline.latency_p50_ms or float("inf")):
        return Reference(EXPORT, export, evaluation, export=pair)
    return Reference("baseline", source, baseline, export=pair)


def timed_against(
    candidate: Artifact, reference: Artifact, runtime_factory: RuntimeFactory, data: dict[str, np.ndarray] | None
) -> tuple[float, float]:
    """p50 ms at batch 1 of (candidate, reference), timed in turns on their serving runtimes (a text model at its rows'
    real lengths, as served: measure.served_calls)."""
    loaded = []
    try:
        for artifact in (candidate, reference):
            predictor = runtime_factory(artifact.path, artifact.runtime)
            loaded.append(predictor)
        runs = {}
        for key, predictor in zip(("candidate", "reference"), loaded):
            shape = next(iter(predictor.inputs)).shape if predictor.inputs else ()
            batch = int(shape[0]) if shape and shape[0] > 0 else 1
            feeds = model_inputs(predictor, data)
            runs[key] = (predictor, (served_calls(predictor, feeds, 1) if batch == 1 else None) or take(feeds, batch))
        p50 = interleaved_p50_ms(runs)
        return p50["candidate"], p50["reference"]
    finally:
        for predictor in loaded:
            unload = getattr(predictor, "unload", None)
            if callable(unload):
                unload()


def op_counts(path: Path) -> Counter[str]:
    """Operator types of an ONNX graph (subgraphs of If / Loop included), counted."""
    model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)

    walk(model.graph)
    return counts


def dynamic_int8_unfit(path: Path) -> str | None:
    """Why ORT dynamic INT8 would not pay on this graph (None: it may): it pays where MatMul / Gemm dominate, without convolutions.

    Dynamic INT8 quantizes activations at run time, per batch; on convolutions that costs more than INT8
    kernels save (7-10 ms against 0.4-0.9 ms FP32 on the ResNet-style model of issue 16), on transformers it
    pays (MiniLM 2.16x).
    """
    counts = op_counts(path)
    convs = counts["Conv"] + counts["ConvTranspose"]
    dots = counts["MatMul"] + counts["Gemm"] + counts["LSTM"]
    if convs:
        return f"dynamic INT8 is slower than FP32 on convolutions, and the model has {convs} Conv"
    if not dots:
        return "the model has no MatMul / Gemm / LSTM for dynamic INT8 to quantize"
    return None
