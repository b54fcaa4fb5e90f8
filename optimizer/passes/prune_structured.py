"""prune-structured: whole channels removed with their dependencies (Torch-Pruning), or whole attention heads and FFN
channels of a transformer (optimizer/compress/transformer.py), then fine-tuned; the ONNX file is smaller and faster.

Trains a .pt2 model in torch (optimizer/formats/torchlayers.py rebuilds its layers) with the shared loop (optimizer/finetune/loop.py);
channel pruning is optimizer/compress/pruning.py's, shared with distillation. Without labels it fine-tunes toward the unpruned
model's outputs (optimizer/finetune/objectives.py).
"""

from __future__ import annotations

from dataclasses import dataclass

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
from slimserve.optimizer.compress.pruning import IMPORTANCES, prune_channels_, taylor_gradients, untouched_layers
from slimserve.optimizer.compress.transformer import find_encoder, prune_heads_and_ffn_
from slimserve.optimizer.counting.torch_counts import flops_per_sample, parameter_count
from slimserve.optimizer.finetune.guard import current_guard, guarding
from slimserve.optimizer.finetune.loop import FineTuneConfig, fine_tune_, finetune_field, nested_finetune
from slimserve.optimizer.finetune.objectives import toward_itself
from slimserve.optimizer.formats.torchmodel import finish, prepare


@dataclass(frozen=True)
class PruneStructuredConfig(PassConfig):
    """Channel pruning with Torch-Pruning: whole filters / neurons go, with every layer that depends on them.

    pruning_ratio: share of channels removed from each conv / linear layer, in (0, 1) (the output
    layer keeps its outputs); on the digits CNN 0.5 left a quarter of the FLOPs but lost 2 points,
    0.3 (channels not multiples of 8) kept accuracy but ran no faster on ORT's CPU kernels, so
    the default 0.25 with round_to 8 keeps 24 / 48 channels; with global_pruning the ratio holds for the model as a whole and
    layers lose channels by global rank. importance: magnitude (L2 of each group's weights) |
    taylor (|weight × gradient| on a few train batches) | bn-scale (|BatchNorm γ|, needs BatchNorm).
    iterative_steps: prune in that many steps with fine-tuning between them (finetune.epochs split
    across steps). round_to: keep channel counts multiples of this (0: any; 8 by default: CPU
    convolution kernels work on blocks of 8 channels, so other counts cost time without FLOPs). exclude:
    layer names never pruned. finetune: the shared loop.
    """

    pruning_ratio: float = setting(0.25, "share of channels removed from each conv / linear layer, in (0, 1)")
    importance: str = setting("magnitude", "magnitude (L2 of each group) | taylor (|weight x gradient|) | bn-scale (|BatchNorm gamma|)")
    global_pruning: bool = setting(False, "hold the ratio for the model as a whole, layers losing channels by global rank")
    iterative_steps: int = setting(1, "prune in this many steps with fine-tuning between them")
    round_to: int = setting(8, "keep channel counts multiples of this (0: any; 8 suits CPU convolution kernels)")
    exclude: tuple[str, ...] = setting((), "layer names never pruned")
    finetune: FineTuneConfig = finetune_field(epochs=3, lr=1e-3, description="the shared fine-tuning loop's settings")

    def __post_init__(self) -> None:
        nested_finetune(self)
        check_fraction("pruning_ratio", self.pruning_ratio)
        check_choice("importance", self.importance, IMPORTANCES)
        if self.iterative_steps < 1:
            raise ConfigValueError(f"iterative_steps must be at least 1, got {self.iterative_steps}")
        if self.round_to < 0:
            raise ConfigValueError(f"round_to must be 0 (off) or more, got {self.round_to}")
        check_names("exclude", self.exclude, "layer names")


class PruneStructuredPass(Pass[PruneStructuredConfig]):
    """Channel pruning with Torch-Pruning's dependency graph (magnitude, Taylor or BN-scale), fine-tuned; a smaller dense ONNX."""

    name = "prune-structured"
    trains = True
    label_free = True
    budget_knob = Knob("pruning_ratio", gentle=0.2, aggressive=0.8)
    config_cls = PruneStructuredConfig
    kind = "prune"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        import dataclasses

        config = self.config
        prepared = prepare(artifact, context, self.name, with_eval=config.finetune.early_stopping > 0, label_free=True)
        module, example = prepared.module, prepared.example
        params0, flops0 = parameter_count(module), flops_per_sample(module, example)
        loss_fn, objective = None, "cross-entropy on the labels"
        if prepared.data.labels is None:  # no labels: the pruned model learns the unpruned model's outputs (optimizer.objectives)
            if config.importance == "taylor":
                raise OptimizerError(
                    f"{self.name}: taylor importance takes gradients of the loss on the labels, and the train data has no 'labels'; "
                    "use importance magnitude (or bn-scale), or add 'labels' to TRAIN.npz"
                )
            loss_fn, objective = toward_itself(module, example, prepared.outputs[0], self.name)
        steps = config.iterative_steps
        per_step = [config.finetune.epochs // steps + (1 if i < config.finetune.epochs % steps else 0) for i in range(steps)]

        def between(i: int) -> None:
            context.progress(
                ProgressEvent(
                    stage=self.name,
                    fraction=0.05 + 0.9 * i / steps,
                    message=f"step {i + 1}/{steps}: {parameter_count(module)} parameters ({100 * parameter_count(module) / params0:.1f}%), "
                    f"{100 * flops_per_sample(module, example) / flops0:.1f}% of the FLOPs",
                )
            )
            if per_step[i]:
                # Only the last step's fine-tuning may go on while over a budget: the steps before it are not the result.
                with guarding(current_guard() if i == steps - 1 else None):
                    fine_tune_(
                        module,
                        prepared.data,
                        dataclasses.replace(config.finetune, epochs=per_step[i]),
                        context,
                        self.name,
                        loss_fn=loss_fn,
                        fraction=(0.05 + 0.9 * i / steps, 0.9 / steps),
                    )

        removed = ""
        if find_encoder(module) is not None:  # a transformer: whole heads and FFN channels, not Torch-Pruning's channels
            removed = prune_heads_and_ffn_(module, example, config, self.name, taylor_gradients(module, prepared.data), between)
        else:
            prune_channels_(
                module,
                example,
                config.pruning_ratio,
                config.importance,
                self.name,
                ignored=config.exclude,
                global_pruning=config.global_pruning,
                steps=steps,
                round_to=config.round_to,
                gradients=taylor_gradients(module, prepared.data),
                between_steps=between,
            )
        params, flops = parameter_count(module), flops_per_sample(module, example)
        if params >= params0:
            raise OptimizerError(
                f"{self.name} removed nothing from {artifact.path.name} ({params} parameters before and after), so no variant was made; "
                f"it could not prune: {'; '.join(untouched_layers(module, config.exclude))}"
            )
        return finish(
            prepared,
            context,
            artifact,
            f"{artifact.path.stem}-channels",
            self.name,
            pruned=f"structured {config.importance} {config.pruning_ratio:g}" + (f": {removed}" if removed else ""),
            params_fraction=f"{params / params0:.4f}",
            flops_fraction=f"{flops / flops0:.4f}",
            objective=objective,
        )
