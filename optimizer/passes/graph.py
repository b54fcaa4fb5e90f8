"""Graph-optimization passes: ONNX Runtime offline optimization, torch.compile, and XLA (runtime choices, weights unchanged)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from slimserve.optimizer.base import (
    Artifact,
    ConfigValueError,
    OptimizerError,
    Pass,
    PassConfig,
    PassContext,
    ProgressEvent,
    check_choice,
    setting,
)
from slimserve.optimizer.formats.onnx_import import import_onnx

ORT_LEVELS = ("basic", "extended", "all")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
PJRT_DEVICES = ("CPU", "CUDA", "TPU", "")  # empty: the node's PJRT_DEVICE


def compile_options_path(model: Path) -> Path:
    """Where the torch-compile runtime finds its options: <stem>.compile.json next to the model."""
    return model.with_name(f"{model.stem}.compile.json")


def xla_options_path(model: Path) -> Path:
    """Where the xla runtime finds its options: <stem>.xla.json next to the model."""
    return model.with_name(f"{model.stem}.xla.json")


def torch_xla_missing_message() -> str:
    import torch

    version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return (
        f"graph-xla: torch_xla is not installed on this node; install torch_xla matching torch {version} and set PJRT_DEVICE=CPU|CUDA|TPU"
    )


def torch_xla_available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def _as_onnx(artifact: Artifact, context: PassContext, needed_by: str) -> Artifact:
    """The artifact itself when it is ONNX; a .pt2 is converted first (input and output names kept)."""
    if artifact.format == "onnx":
        return artifact
    try:
        from slimserve.optimizer.formats.export import to_onnx
    except ImportError as e:
        raise OptimizerError(f"{needed_by} needs an ONNX model and this slimserve cannot convert .pt2 to ONNX ({e})") from e
    context.progress(ProgressEvent(stage=needed_by, fraction=0.0, message="converting the .pt2 to ONNX"))
    return to_onnx(artifact, context)


def _copy_pt2(artifact: Artifact, context: PassContext, pass_name: str, alternative: str) -> Path:
    if artifact.format != "pt2":
        raise OptimizerError(
            f"{pass_name} compiles torch.export archives (.pt2), and this model is {artifact.format.upper()} "
            f"({artifact.path.name}); register the model as a .pt2, or use {alternative}"
        )
    target = context.new_path(artifact.path.stem, ".pt2")
    shutil.copyfile(artifact.path, target)
    return target


@dataclass(frozen=True)
class OrtGraphConfig(PassConfig):
    """ONNX Runtime graph optimization, applied once offline and saved as ONNX.

    level: basic — constant folding, redundant-node elimination and semantics-preserving fusions
    (Conv+BatchNorm, Conv+Add, ...): standard ONNX operators, portable to any runtime and device.
    extended — adds fusions into com.microsoft operators (FusedConv, FusedGemm, GELU, attention,
    LayerNorm, ...) for the CPU and CUDA providers: the file needs ONNX Runtime, but not this
    machine. all — adds layout optimizations (NCHWc blocked convolutions) sized to this CPU's
    vector width (AVX2 / AVX-512): ORT itself warns that such a saved model "should only be used
    in the same environment the model was optimized in", so it is only safe where the optimizing
    and serving nodes have the same CPU. Offline optimization must also target the providers
    that will serve the model (`providers`); the default is the CPU.
    """

    level: str = setting(
        "extended",
        "basic (portable fusions) | extended (com.microsoft fused operators, needs ORT) | all (layouts sized to this CPU: serve on the same CPU)",
    )
    providers: tuple[str, ...] = setting(
        ("CPUExecutionProvider",), "execution providers the model is optimized for: those that will serve it"
    )

    def __post_init__(self) -> None:
        check_choice("level", self.level, ORT_LEVELS)
        if not self.providers:
            raise ConfigValueError("providers must name at least one execution provider, e.g. ['CPUExecutionProvider']")


class OrtGraphPass(Pass[OrtGraphConfig]):
    """ONNX Runtime graph optimization (fusions, constant folding), saved offline."""

    name = "graph-ort"
    config_cls = OrtGraphConfig
    kind = "graph"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        import onnxruntime as ort

        config = self.config
        source = import_onnx(_as_onnx(artifact, context, self.name), context, self.name)
        available = ort.get_available_providers()
        missing = [p for p in config.providers if p not in available]
        if missing:
            raise OptimizerError(
                f"graph-ort: execution provider {', '.join(missing)} is not available on this node "
                f"(available: {', '.join(available)}); optimize on a node of the kind that will serve the model"
            )
        target = context.new_path(f"{artifact.path.stem}-ort-{config.level}", ".onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[config.level]
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3  # ORT's warning for 'all' goes to the job's progress instead
        if config.level == "all":
            context.progress(
                ProgressEvent(
                    stage=self.name,
                    fraction=0.5,
                    message="level 'all' saves NCHWc layouts sized to this CPU: serve the variant only on nodes with the same CPU",
                )
            )
        try:
            ort.InferenceSession(str(source.path), sess_options=options, providers=list(config.providers))
        except Exception as e:  # ORT raises its own exception types for bad models
            raise OptimizerError(f"graph-ort: onnxruntime cannot load {source.path.name}: {e}") from e
        if not target.is_file():
            raise OptimizerError(f"graph-ort: onnxruntime did not write the optimized model to {target}")
        return source.derive(target, format="onnx", runtime="onnxruntime", ort_level=config.level)


@dataclass(frozen=True)
class CompileConfig(PassConfig):
    """torch.compile on the serving node; the variant is the same .pt2 served by the 'torch-compile' runtime.

    mode: default | reduce-overhead (CUDA graphs: helps small batches on GPUs) | max-autotune
    (searches kernels: slow to compile). dynamic: compile for any batch size at once (true),
    or specialize to each batch size seen, recompiling per size (false), which the dynamic
    batcher would trigger for every new size.
    """

    mode: str = setting("default", "torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune (slow to compile)")
    dynamic: bool = setting(True, "compile once for any batch size (true) or per batch size seen (false)")

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, COMPILE_MODES)


class CompilePass(Pass[CompileConfig]):
    """torch.compile (Inductor) on the serving node, warmed up at load."""

    name = "graph-compile"
    config_cls = CompileConfig
    kind = "graph"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        config = self.config
        target = _copy_pt2(artifact, context, self.name, "graph-ort for ONNX models")
        compile_options_path(target).write_text(json.dumps({"version": config.version, "mode": config.mode, "dynamic": config.dynamic}))
        return artifact.derive(target, format="pt2", runtime="torch-compile", compile_mode=config.mode)


@dataclass(frozen=True)
class XlaConfig(PassConfig):
    """XLA through torch_xla / PJRT. pjrt_device: CPU | CUDA | TPU, or empty to use the node's PJRT_DEVICE."""

    pjrt_device: str = setting("", "CPU | CUDA | TPU, or empty for the node's PJRT_DEVICE")

    def __post_init__(self) -> None:
        check_choice("pjrt_device", self.pjrt_device, PJRT_DEVICES)


class XlaPass(Pass[XlaConfig]):
    """XLA compilation through torch_xla (PJRT: CPU, CUDA or TPU)."""

    name = "graph-xla"
    config_cls = XlaConfig
    kind = "graph"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        config = self.config
        if not torch_xla_available():
            raise OptimizerError(torch_xla_missing_message())
        target = _copy_pt2(artifact, context, self.name, "graph-ort for ONNX models")
        xla_options_path(target).write_text(json.dumps({"version": config.version, "pjrt_device": config.pjrt_device}))
        return artifact.derive(target, format="pt2", runtime="xla")
