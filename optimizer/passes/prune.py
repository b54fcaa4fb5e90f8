"""Pruning passes: unstructured magnitude (torch.nn.utils.prune) and gradual with regrowth (prune-structured: prune_structured.py).

Every pass trains a .pt2 model in torch (optimizer/formats/torchlayers.py rebuilds its layers), fine-tunes
with the shared loop (optimizer/finetune/loop.py) and writes ONNX for onnxruntime; channel pruning is
optimizer/compress/pruning.py's, shared with distillation. Unstructured
sparsity lands as real zeros in the ONNX weights (evaluation's nonzero_params counts them; dense
kernels run no faster).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from slimserve.optimizer.base import (
    Artifact,
    ConfigValueError,
    Knob,
    OptimizerError,
    Pass,
    PassConfig,
    PassContext,
    ProgressEvent,
    check_choice,
    check_fraction,
    check_names,
    setting,
)
from slimserve.optimizer.finetune.loop import (
    FineTuneConfig,
    fine_tune_,
    finetune_field,
    nested_finetune,
)
from slimserve.optimizer.formats.torchlayers import check_layer_names, layers_in_order, weight_names
from slimserve.optimizer.formats.torchmodel import finish, prepare

SCOPES = ("global", "layer")
SPARSITY_SCHEDULES = ("cubic", "linear")


def weight_layers(module: Any, exclude: tuple[str, ...], needed_by: str) -> list[tuple[str, Any]]:
    check_layer_names(module, exclude, "exclude", needed_by)
    layers = [(name, module.get_submodule(name)) for name in layers_in_order(module) if name not in exclude]
    if not layers:
        raise OptimizerError(f"{needed_by}: the model has no convolution or linear layer left to prune")
    return layers


def weight_tensors(layers: list[tuple[str, Any]]) -> list[tuple[Any, str]]:
    """(module, parameter name) of every weight matrix the layers hold: a recurrent layer's input and hidden weights too."""
    return [(m, name) for _, m in layers for name in weight_names(m)]


def weight_sparsity(layers: list[tuple[str, Any]]) -> float:
    """Share of zeros in the layers' weights."""
    weights = [getattr(m, name) for m, name in weight_tensors(layers)]
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))


# ---------------------------------------------------------------------------------------------
# prune-weight


@dataclass(frozen=True)
class PruneWeightConfig(PassConfig):
    """Unstructured magnitude pruning (torch.nn.utils.prune, L1) of conv and linear weights, then fine-tuning with the masks held.

    sparsity: share of weights set to zero, in (0, 1). scope: global (one magnitude threshold
    across layers: layers with many small weights lose more) | layer (each layer to `sparsity`).
    exclude: layer names kept dense (e.g. the first conv). finetune: the shared loop's settings.
    """

    sparsity: float = setting(0.5, "share of weights set to zero, in (0, 1)")
    scope: str = setting("global", "global (one magnitude threshold across layers) | layer (each layer to the sparsity)")
    exclude: tuple[str, ...] = setting((), "layer names kept dense (e.g. the first conv)")
    finetune: FineTuneConfig = finetune_field(epochs=2, lr=5e-4, description="the shared fine-tuning loop's settings")

    def __post_init__(self) -> None:
        nested_finetune(self)
        check_fraction("sparsity", self.sparsity)
        check_choice("scope", self.scope, SCOPES)
        check_names("exclude", self.exclude, "layer names")


class PruneWeightPass(Pass[PruneWeightConfig]):
    """Unstructured magnitude pruning to a target sparsity, fine-tuned; zeros in the ONNX weights."""

    name = "prune-weight"
    trains = True
    budget_knob = Knob("sparsity", gentle=0.3, aggressive=0.95)  # what a budget search moves (optimizer.budget)
    config_cls = PruneWeightConfig
    kind = "prune"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        from torch.nn.utils import prune

        config = self.config
        prepared = prepare(artifact, context, self.name, with_eval=config.finetune.early_stopping > 0)
        layers = weight_layers(prepared.module, config.exclude, self.name)
        zeros_before = weight_sparsity(layers)
        if config.scope == "global":
            prune.global_unstructured(weight_tensors(layers), pruning_method=prune.L1Unstructured, amount=config.sparsity)
        else:
            for m, name in weight_tensors(layers):
                prune.l1_unstructured(m, name, amount=config.sparsity)
        context.progress(
            ProgressEvent(
                stage=self.name,
                fraction=0.05,
                message=f"{100 * weight_sparsity(layers):.1f}% of the weights of {len(layers)} layers zeroed",
            )
        )
        fine_tune_(prepared.module, prepared.data, config.finetune, context, self.name, fraction=(0.05, 0.9))
        for m, name in weight_tensors(layers):
            prune.remove(m, name)  # the zeros become the weights
        sparsity = weight_sparsity(layers)
        if sparsity <= zeros_before:
            raise OptimizerError(
                f"{self.name}: the weights of {', '.join(n for n, _ in layers)} were {100 * zeros_before:.1f}% zeros already and are "
                f"{100 * sparsity:.1f}% now: nothing was removed, so no variant was made; raise sparsity"
            )
        return finish(prepared, context, artifact, f"{artifact.path.stem}-pruned", self.name, pruned=f"weight {sparsity:.4f}")


# ---------------------------------------------------------------------------------------------
# prune-gradual


def sparsity_at(step: int, total: int, config: PruneGradualConfig) -> float:
    """The target sparsity after `step` of `total` training steps (Zhu & Gupta's cubic ramp, or linear)."""
    start, end = round(config.start_fraction * total), max(1, round(config.end_fraction * total))
    if step <= start:
        return config.initial_sparsity
    if step >= end:
        return config.sparsity
    progress = (step - start) / max(1, end - start)
    remaining = (1 - progress) ** 3 if config.schedule == "cubic" else 1 - progress
    return config.sparsity + (config.initial_sparsity - config.sparsity) * remaining


def _straight_through_method():
    """A torch.nn.utils.prune method whose masked weights pass dense gradients to the weights behind them (for regrowth)."""
    from torch.nn.utils import prune

    class StraightThroughMask(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            return default_mask

        def apply_mask(self, module):
            orig = getattr(module, self._tensor_name + "_orig")
            mask = getattr(module, self._tensor_name + "_mask").to(dtype=orig.dtype)
            # Forward sees the masked weight; backward updates every weight, so pruned ones can grow back.
            return orig + (orig * mask - orig).detach()

    return StraightThroughMask


class GradualMasks:
    """Global magnitude masks over the layers' weights, raised to a target sparsity on demand."""

    def __init__(self, layers: list[tuple[str, Any]], regrowth: bool) -> None:
        from torch.nn.utils import prune

        self.weights = weight_tensors(layers)
        self.regrowth = regrowth
        method = _straight_through_method() if regrowth else None
        for m, name in self.weights:
            if method is not None:
                method.apply(m, name)
            else:
                prune.identity(m, name)
        self.total = sum(getattr(m, name + "_orig").numel() for m, name in self.weights)
        self.sparsity = 0.0

    def update(self, sparsity: float) -> None:
        """Keeps the largest weights; without regrowth a pruned weight stays pruned (its score is 0)."""
        import torch

        with torch.no_grad():
            pairs = [(getattr(m, name + "_orig"), getattr(m, name + "_mask")) for m, name in self.weights]
            scores = torch.cat([(orig.abs() if self.regrowth else orig.abs() * mask).flatten() for orig, mask in pairs])
            keep = self.total - round(sparsity * self.total)
            flat = torch.zeros_like(scores)
            flat[torch.topk(scores, keep, sorted=False).indices] = 1.0
            offset = 0
            for orig, mask in pairs:
                n = orig.numel()
                mask.copy_(flat[offset : offset + n].view_as(mask))
                offset += n
        self.sparsity = sparsity

    def remove(self) -> None:
        from torch.nn.utils import prune

        for m, name in self.weights:
            prune.remove(m, name)


@dataclass(frozen=True)
class PruneGradualConfig(PassConfig):
    """Gradual magnitude pruning during fine-tuning (Zhu & Gupta, 2017), optionally with regrowth (Lin et al.'s DPF).

    sparsity: the final share of zero weights, in (0, 1); initial_sparsity: where it starts.
    schedule: cubic (prunes fast early, gently at the end) | linear. The ramp runs from
    start_fraction to end_fraction of the training steps; masks are recomputed (one global
    magnitude threshold) every update_every steps. regrowth: pruned weights keep receiving
    gradients (straight-through), so a weight that grows large again returns at the next update.
    exclude: layer names kept dense. finetune: the shared loop (more epochs than prune-weight:
    the model recovers while sparsity rises; early stopping only counts once the final sparsity is reached).
    """

    sparsity: float = setting(0.6, "the final share of zero weights, in (0, 1)")
    initial_sparsity: float = setting(0.0, "the share of zero weights the ramp starts from")
    schedule: str = setting("cubic", "cubic (prunes fast early, gently at the end) | linear")
    start_fraction: float = setting(0.0, "where in the training steps the sparsity ramp starts, in [0, 1)")
    end_fraction: float = setting(0.6, "where in the training steps the sparsity ramp ends, in (0, 1]")
    update_every: int = setting(5, "steps between mask updates (one global magnitude threshold)")
    regrowth: bool = setting(False, "pruned weights keep receiving gradients and may return at the next update")
    exclude: tuple[str, ...] = setting((), "layer names kept dense")
    finetune: FineTuneConfig = finetune_field(epochs=3, lr=1e-3, description="the shared fine-tuning loop's settings")

    def __post_init__(self) -> None:
        nested_finetune(self)
        check_fraction("sparsity", self.sparsity)
        if not 0.0 <= self.initial_sparsity < self.sparsity:
            raise ConfigValueError(f"initial_sparsity must be in [0, sparsity), got {self.initial_sparsity}")
        check_choice("schedule", self.schedule, SPARSITY_SCHEDULES)
        if not 0.0 <= self.start_fraction < self.end_fraction <= 1.0:
            raise ConfigValueError(f"need 0 <= start_fraction < end_fraction <= 1, got {self.start_fraction} and {self.end_fraction}")
        if self.update_every < 1:
            raise ConfigValueError(f"update_every must be at least 1 step, got {self.update_every}")
        check_names("exclude", self.exclude, "layer names")


class PruneGradualPass(Pass[PruneGradualConfig]):
    """Sparsity raised on a schedule while fine-tuning (optionally with regrowth); zeros in the ONNX weights."""

    name = "prune-gradual"
    trains = True
    budget_knob = Knob("sparsity", gentle=0.3, aggressive=0.95)
    config_cls = PruneGradualConfig
    kind = "prune"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        config = self.config
        prepared = prepare(artifact, context, self.name, with_eval=config.finetune.early_stopping > 0)
        layers = weight_layers(prepared.module, config.exclude, self.name)
        rows = (
            len(prepared.data.labels) if config.finetune.max_samples <= 0 else min(config.finetune.max_samples, len(prepared.data.labels))
        )
        steps_per_epoch = math.ceil(rows / config.finetune.batch_size)
        total = config.finetune.epochs * steps_per_epoch
        end_step = max(1, round(config.end_fraction * total))
        masks = GradualMasks(layers, config.regrowth)
        masks.update(sparsity_at(0, total, config))

        def after_step(step: int) -> None:
            if step % config.update_every == 0 or step == end_step or (config.regrowth and step == total):
                target = sparsity_at(step, total, config)
                if target != masks.sparsity or config.regrowth:
                    masks.update(target)

        def may_stop(epoch: int) -> bool:
            return (epoch + 1) * steps_per_epoch >= end_step

        fine_tune_(
            prepared.module,
            prepared.data,
            config.finetune,
            context,
            self.name,
            after_step=after_step,
            may_stop=may_stop,
            fraction=(0.0, 0.9),
        )
        masks.update(config.sparsity)  # exactly the target, whatever step the run ended on
        masks.remove()
        sparsity = weight_sparsity(layers)
        context.progress(ProgressEvent(stage=self.name, fraction=0.95, message=f"{100 * sparsity:.1f}% of the weights are zero"))
        return finish(prepared, context, artifact, f"{artifact.path.stem}-gradual", self.name, pruned=f"gradual {sparsity:.4f}")
