"""Channel pruning with Torch-Pruning's dependency graph, shared by prune-structured and by distillation's derived students."""

from __future__ import annotations

from typing import Any

from optimizer.base import OptimizerError
from optimizer.data import TrainData
from optimizer.torchmodel import check_layer_names, output_layers, output_shapes

TORCH_PRUNING_PIN = "torch-pruning==1.6.1"
IMPORTANCES = ("magnitude", "taylor", "bn-scale")


def import_torch_pruning(needed_by: str):
    try:
        import torch_pruning
    except ImportError as e:
        raise OptimizerError(f"{needed_by} needs Torch-Pruning on this node ({e}); pip install {TORCH_PRUNING_PIN}") from e
    return torch_pruning


def make_importance(name: str, module: Any, needed_by: str):
    tp = import_torch_pruning(needed_by)
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        raise OptimizerError(f"{needed_by}: importance bn-scale ranks channels by their BatchNorm scale, and the model has no BatchNorm; use magnitude or taylor")
    return tp.importance.BNScaleImportance()


def prune_channels_(
    module: Any,
    example: tuple[Any, ...],
    ratio: float,
    importance: str,
    needed_by: str,
    *,
    ignored: tuple[str, ...] = (),
    global_pruning: bool = False,
    steps: int = 1,
    round_to: int = 0,
    gradients: Any = None,
    between_steps: Any = None,
) -> None:
    """Removes `ratio` of the channels of every conv / linear layer but the output layers (Torch-Pruning's dependency graph).

    gradients(): fills .grad for Taylor importance before each step; between_steps(i) runs after step i (fine-tuning).
    """
    tp = import_torch_pruning(needed_by)
    check_layer_names(module, ignored, "ignored_layers", needed_by)
    before = output_shapes(module, example)
    keep = [module.get_submodule(n) for n in (*output_layers(module), *ignored)]
    pruner = tp.pruner.MetaPruner(
        module, example, importance=make_importance(importance, module, needed_by), global_pruning=global_pruning,
        pruning_ratio=ratio, iterative_steps=steps, ignored_layers=keep, round_to=round_to or None,
    )
    for i in range(steps):
        if importance == "taylor" and gradients is not None:
            gradients()
        pruner.step()
        module.zero_grad(set_to_none=True)
        if between_steps is not None:
            between_steps(i)
    after = output_shapes(module, example)
    if after != before:
        raise OptimizerError(f"{needed_by}: pruning changed the model's output shapes from {before} to {after}; add the output layer to ignored_layers")


def taylor_gradients(module: Any, data: TrainData, batches: int = 4, batch_size: int = 64):
    """A closure that accumulates cross-entropy gradients over a few train batches (Taylor importance needs them)."""
    import torch

    def fill() -> None:
        module.eval()  # BatchNorm statistics stay as they are
        module.zero_grad(set_to_none=True)
        for start in range(0, min(len(data.labels), batches * batch_size), batch_size):
            logits = module(*(torch.from_numpy(x[start : start + batch_size]) for x in data.inputs))
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.labels[start : start + batch_size])).backward()

    return fill
