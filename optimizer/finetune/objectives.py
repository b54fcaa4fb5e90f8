"""What a training pass learns when the train data has no labels: the teacher's (or unpruned baseline's) own outputs, by the output's kind.

Chosen as slimserve.optimizer.evaluation.quality chooses the metric that judges the result, so a model is trained toward what it is
measured by: an embedding (a float feature vector per sample) learns 1 - cosine + relative MSE to the teacher's
vector; a classifier's logits (an [N, C] output named like logits / probabilities / scores) learn the teacher's
temperature-softened distribution (Hinton's KL, which never needed labels); a regression head (one value per
sample) learns relative MSE. The objective's name goes into the variant's notes and its report row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.evaluation.quality import choose_metric

# Objective kind -> what it minimizes, as the report says it.
OBJECTIVES = {
    "embedding": "1 - cosine + relative MSE to the {who}'s output",
    "soft-targets": "KL divergence to the {who}'s temperature-softened outputs (T={temperature:g})",
    "regression": "relative MSE to the {who}'s output",
}
_KIND_OF_METRIC = {"cosine": "embedding", "top1-agreement": "soft-targets", "relative-error": "regression"}


def soft_target_kl(output: Any, target: Any, temperature: float) -> Any:
    """Hinton's distillation term: T² × KL(target_T ‖ output_T) on temperature-softened logits (torch tensors, classes last)."""
    import torch.nn.functional as F

    T = temperature
    kl = F.kl_div(F.log_softmax(output / T, dim=-1), F.log_softmax(target / T, dim=-1), reduction="batchmean", log_target=True)
    return T * T * kl


def relative_mse(output: Any, target: Any) -> Any:
    """MSE divided by the target's mean square: scale-free, so a raw and a normalized vector (or two layers) weigh alike."""
    return ((output - target) ** 2).mean() / (target.detach() ** 2).mean().clamp(min=1e-8)


def masked_relative_mse(output: Any, target: Any, mask: Any) -> Any:
    """relative_mse over the real positions of [batch, seq, ...] states (mask [batch, seq], 1 on tokens): padding's states are served
    to no one, and a batch cut to its longest member (padding-free training) gives the same value as at full length."""
    weight = mask.reshape(*mask.shape, *([1] * (output.dim() - 2))).to(output.dtype)
    return ((output - target) ** 2 * weight).sum() / (target.detach() ** 2 * weight).sum().clamp(min=1e-8)


@dataclass(frozen=True)
class LabelFreeObjective:
    """A loss toward a frozen reference model's outputs: `kind` from OBJECTIVES, `who` names the reference (teacher, unpruned model)."""

    kind: str
    who: str = "teacher"
    temperature: float = 4.0

    def describe(self) -> str:
        return "label-free: " + OBJECTIVES[self.kind].format(who=self.who, temperature=self.temperature)

    def output_loss(self, output: Any, target: Any) -> Any:
        """The loss of the model's first output against the reference's (both torch tensors, batch first)."""
        import torch.nn.functional as F

        if self.kind == "soft-targets":
            return soft_target_kl(output, target, self.temperature)
        s, t = output.reshape(len(output), -1), target.reshape(len(target), -1)
        relative = relative_mse(s, t)
        if self.kind == "regression":
            return relative
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean() + relative


def choose_objective(
    outputs: np.ndarray, output_name: str, needed_by: str, who: str = "teacher", temperature: float = 4.0
) -> LabelFreeObjective:
    """The label-free objective for a model whose first output on a few train rows is `outputs`; refuses outputs no loss can follow."""
    if not np.issubdtype(outputs.dtype, np.floating):
        raise OptimizerError(
            f"{needed_by}: the train data has no 'labels' and the model's output '{output_name}' is {outputs.dtype} "
            "(class indices or tokens), which gives no gradient to train toward; add 'labels' to TRAIN.npz"
        )
    return LabelFreeObjective(_KIND_OF_METRIC[choose_metric(outputs, None, output_name)], who, temperature)


def reference_loss(reference: Any, objective: LabelFreeObjective) -> Callable[[Any, tuple[Any, ...], Any], tuple[Any, Any]]:
    """A fine-tuning loss (slimserve.optimizer.finetune.loop.LossFn) toward the frozen `reference` model's outputs; the labels argument is unused."""
    import torch

    from slimserve.optimizer.finetune.loop import first_output

    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)

    def loss_fn(model: Any, inputs: tuple[Any, ...], labels: Any) -> tuple[Any, Any]:
        with torch.no_grad():
            target = first_output(reference(*inputs))
        output = first_output(model(*inputs))
        return objective.output_loss(output, target), output

    return loss_fn


def toward_itself(module: Any, example: tuple[Any, ...], output_name: str, needed_by: str) -> tuple[Any, str]:
    """The loss toward a frozen copy of `module` as it is now (before pruning changes it), and its description."""
    import copy

    objective = objective_of(module, example, output_name, needed_by, "unpruned model")
    return reference_loss(copy.deepcopy(module), objective), objective.describe()


def objective_of(module: Any, example: tuple[Any, ...], output_name: str, needed_by: str, who: str, temperature: float = 4.0):
    """The label-free objective for `module`, chosen from its first output on the example batch."""
    import torch

    from slimserve.optimizer.finetune.loop import first_output

    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = first_output(module(*example))
    module.train(was_training)
    return choose_objective(out.detach().numpy(), output_name, needed_by, who, temperature)
