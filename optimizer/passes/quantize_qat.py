"""quantize-qat: quantization-aware fine-tuning of a classifier (.pt2, or ONNX through onnx2torch; torchao PT2E), exported as INT8 (QDQ) ONNX."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from slimserve.optimizer.base import (
    Artifact,
    ConfigValueError,
    OptimizerError,
    Pass,
    PassConfig,
    PassContext,
    ProgressEvent,
    setting,
)
from slimserve.optimizer.data import TrainData, check_labels, model_arrays, subsample
from slimserve.optimizer.finetune.augment import AugmentConfig
from slimserve.optimizer.finetune.loop import FineTuneConfig, fine_tune_
from slimserve.optimizer.formats.export import export_dynamic_batch, export_program_to_onnx
from slimserve.optimizer.formats.onnx_graph import int8_facts, strip_debug_info
from slimserve.optimizer.formats.torchmodel import source_program

TORCHAO_PIN = "torchao==0.18.0"


@dataclass(frozen=True)
class QuantizeQatConfig(PassConfig):
    """Quantization-aware fine-tuning of a .pt2 classifier on its train data, exported as INT8 (QDQ) ONNX.

    epochs, lr (AdamW, cosine decay to 0 over all steps), batch_size, weight_decay: the shared
    fine-tuning loop (optimizer/finetune/loop.py) with these settings and no augmentation.
    max_samples: train rows used at most per epoch (0: all). freeze_observers: keep the
    ranges calibrated before training fixed while it trains, so the weights adapt to the ranges
    that ship (as torch's QAT recipes do late in training); false: the observers follow the training. fold_batchnorm: fold each BatchNorm into the conv
    before it, with its running statistics, before training — BN frozen, the usual choice when
    fine-tuning a trained model for a few epochs, and it spares torchao's conv-BN pattern
    matching (~15 s per run on a CPU); false: torchao simulates BN folding while training.
    calibration_samples: rows (of the calibration data, else the train data) that calibrate the static-INT8 ranges
    training starts from. keep_better: after training, the QAT model and the static INT8 model of those calibrated
    ranges are scored on the evaluation data (the train data without it), and QAT is kept only when it is not worse.
    """

    epochs: int = setting(3, "quantization-aware fine-tuning epochs")
    lr: float = setting(1e-4, "AdamW's learning rate (cosine decay to 0)")
    batch_size: int = setting(64, "train rows per step")
    weight_decay: float = setting(0.0, "AdamW's weight decay")
    max_samples: int = setting(0, "train rows used at most per epoch (0: all)")
    freeze_observers: bool = setting(True, "keep activation ranges fixed in the last epoch, so the weights adapt to the ranges that ship")
    fold_batchnorm: bool = setting(True, "fold each BatchNorm into the conv before it before training (false: torchao simulates folding)")
    calibration_samples: int = setting(
        512, "rows (calibration data, else train data) that calibrate the static-INT8 ranges QAT starts from"
    )
    keep_better: bool = setting(True, "keep QAT only when it scores no worse than static INT8 from the same ranges")

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
        if self.calibration_samples < 1:
            raise ConfigValueError(f"calibration_samples must be at least 1, got {self.calibration_samples}")


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
    from torchao.quantization.pt2e.utils import (
        _is_bn_node,
        _is_conv_or_conv_transpose_node,
        fold_bn_weights_into_conv_node,
    )

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


def _class_count(program) -> int | None:
    """The last dim of the program's first output (the logits), when its shape is known."""
    output = next(n for n in program.graph.nodes if n.op == "output").args[0][0]
    value = getattr(output, "meta", {}).get("val")
    return int(value.shape[-1]) if value is not None and value.dim() > 0 and isinstance(value.shape[-1], int) else None


class QuantizeQatPass(Pass[QuantizeQatConfig]):
    """Quantization-aware fine-tuning (torchao PT2E) on the train data, served as INT8 ONNX.

    Quantization-aware training with torchao's PT2E flow, served as QDQ INT8 ONNX by ONNX Runtime.

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
    trains = True
    config_cls = QuantizeQatConfig
    kind = "quantize"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        import torch

        config = self.config
        program, inputs, outputs, specs = source_program(artifact, context, self.name)  # ONNX: converted and checked first
        data = context.dataset("train", needed_by=self.name)
        arrays = model_arrays(data, specs, "train", self.name)
        rows = len(next(iter(arrays.values())))
        labels = check_labels(data, rows, self.name)
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

        # Static INT8 first: the observers calibrated on calibration rows, as post-training quantization would. Training
        # starts from those ranges, and that static model is the answer whenever QAT does not beat it.
        context.progress(ProgressEvent(stage=self.name, fraction=0.0, message="calibrating the static INT8 ranges QAT starts from"))
        calibration = self._calibration_rows(context, specs, arrays, inputs, config)
        _calibrate(model, calibration, config.batch_size)
        static = None
        if config.keep_better:
            import copy

            static = self._export(copy.deepcopy(model), quantize_pt2e, example, context, artifact, inputs, outputs, "int8-ptq")
        if config.freeze_observers:
            model.apply(pt2e.disable_observer)  # the calibrated ranges ship; the weights learn to them

        # Augmentation off: the fake-quantize observers must calibrate on the data the model will serve.
        finetune = FineTuneConfig(
            epochs=config.epochs,
            lr=config.lr,
            batch_size=config.batch_size,
            weight_decay=config.weight_decay,
            optimizer="adamw",
            schedule="cosine",
            augment=AugmentConfig(kind="none"),
        )
        fine_tune_(model, TrainData([arrays[name] for name in inputs], labels), finetune, context, self.name)
        context.progress(ProgressEvent(stage=self.name, fraction=1.0, message="converting to INT8 and exporting ONNX"))
        trained = self._export(model, quantize_pt2e, example, context, artifact, inputs, outputs, "int8-qat")
        if static is None:
            return trained
        return self._better(trained, static, context, specs, arrays, labels, inputs)

    def _calibration_rows(self, context: PassContext, specs, train: dict, inputs: list[str], config: QuantizeQatConfig) -> list:
        """The model's inputs to calibrate on: the calibration data when the model has it, else the train rows."""
        source = train
        if "calibration" in context.datasets:
            source = model_arrays(context.dataset("calibration", needed_by=self.name), specs, "calibration", self.name)
        rows = subsample(dict(source), config.calibration_samples, context.seed)
        return [rows[name] for name in inputs]

    def _export(self, model, quantize_pt2e, example, context: PassContext, artifact: Artifact, inputs, outputs, kind: str) -> Artifact:
        try:
            converted = quantize_pt2e.convert_pt2e(model)
        except Exception as e:  # torchao raises assorted types on graphs it cannot convert
            raise OptimizerError(f"{self.name}: torchao cannot convert the model to INT8 ({kind}): {type(e).__name__}: {e}") from e
        target = context.new_path(f"{artifact.path.stem}-{kind}", ".onnx")
        export_program_to_onnx(export_dynamic_batch(converted, example, self.name), target, inputs, outputs, self.name)
        strip_debug_info(target)
        facts = int8_facts(target)
        if facts["int8_initializers"] == 0 or "QuantizeLinear" not in facts:
            raise OptimizerError(f"{self.name}: the exported model holds no INT8 operators; torchao found nothing to quantize in it")
        # The served names travel with the artifact even when the .pt2 was registered without them.
        return Artifact(
            path=target,
            format="onnx",
            runtime="onnxruntime",
            input_names=tuple(inputs),
            output_names=tuple(outputs),
            notes={**artifact.notes, "quantized": kind},
        )

    def _better(self, trained: Artifact, static: Artifact, context: PassContext, specs, train: dict, labels, inputs) -> Artifact:
        """QAT when it scores at least static INT8's accuracy on the evaluation data (the train data without it), else static."""
        where = "evaluation data"
        if "data" in context.datasets and "labels" in (data := context.dataset("data", needed_by=self.name)):
            arrays = model_arrays(data, specs, "data", self.name)
            truth = check_labels(data, len(next(iter(arrays.values()))), self.name, role="data")
        else:
            arrays, truth, where = train, labels, "train data"
        qat, ptq = (onnx_accuracy(a.path, [arrays[n] for n in inputs], inputs, truth) for a in (trained, static))
        said = f"on the {where}: QAT {100 * qat:.2f}%, static INT8 of the calibrated ranges {100 * ptq:.2f}%"
        if qat >= ptq:
            return trained.derive(trained.path, qat=f"QAT kept {said}")
        context.progress(ProgressEvent(stage=self.name, fraction=1.0, message=f"static INT8 kept: {said}"))
        return static.derive(static.path, qat=f"QAT was worse than static INT8, which is the answer; {said}")


def _calibrate(model, rows: list, batch_size: int) -> None:
    """Forward passes without gradients: the observers record the activation and weight ranges."""
    import torch

    with torch.no_grad():
        for start in range(0, len(rows[0]), batch_size):
            model(*(torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])) for x in rows))


def onnx_accuracy(path, rows: list, names: list[str], labels) -> float:
    """Top-1 accuracy of an ONNX classifier's first output on the rows, in ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hits = 0
    for start in range(0, len(rows[0]), 256):
        logits = session.run(None, {n: np.ascontiguousarray(x[start : start + 256]) for n, x in zip(names, rows)})[0]
        hits += int(np.sum(logits.reshape(len(logits), -1).argmax(1) == labels[start : start + 256].reshape(-1)))
    return hits / len(rows[0])
