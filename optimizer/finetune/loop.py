"""The fine-tuning loop every training pass shares: optimizers, LR schedules, regularization, early stopping.

A pass embeds a `FineTuneConfig` (slimserve.optimizer.finetune.config: the settings) in its own config (field
`finetune`) and calls `fine_tune_` with its model, its train data and, where it has one, a loss of its own
(distillation). Schedules are
torch.optim.lr_scheduler's, stepped once per batch; augmentation is chosen by the input's kind
(images, token ids, time series: slimserve.optimizer.finetune.augment) and runs on whole batches as torch ops.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from slimserve.optimizer.base import OptimizerError, PassContext, ProgressEvent
from slimserve.optimizer.data import TrainData
from slimserve.optimizer.finetune.augment import augment, input_kind
from slimserve.optimizer.finetune.config import FineTuneConfig, finetune_field, nested_finetune
from slimserve.optimizer.finetune.guard import EXTRA_LR_FACTOR, continue_while_over_budget, current_guard

if TYPE_CHECKING:
    import torch

    from slimserve.optimizer.finetune.padding_free import LengthBatches

__all__ = [  # the settings live in optimizer.finetune_config; passes import them from here with the loop
    "EpochResult",
    "FineTuneConfig",
    "accuracy_of",
    "fine_tune_",
    "finetune_field",
    "first_output",
    "insert_dropout_",
    "l1_penalty",
    "lr_curve",
    "make_optimizer",
    "make_schedule",
    "nested_finetune",
]

# ---------------------------------------------------------------------------------------------
# Optimizers and schedules


def make_optimizer(params: Sequence[Any], config: FineTuneConfig) -> torch.optim.Optimizer:
    """The configured optimizer; weight decay on weight matrices and kernels only (not biases, norms)."""
    import torch

    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.RMSprop(groups, lr=config.lr, momentum=config.momentum)


def make_schedule(optimizer: torch.optim.Optimizer, config: FineTuneConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured LR schedule, to be stepped once per batch."""
    from torch.optim import lr_scheduler

    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "constant":
        return lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if config.schedule == "step":
        return lr_scheduler.StepLR(optimizer, step_size=config.step_epochs * steps_per_epoch, gamma=config.gamma)
    if config.schedule == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=config.min_lr)
    if config.schedule == "cyclical":
        half = max(1, round(config.cycle_epochs * steps_per_epoch / 2))
        return lr_scheduler.CyclicLR(
            optimizer, base_lr=config.min_lr, max_lr=config.lr, step_size_up=half, mode="triangular", cycle_momentum=False
        )
    return lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=total,
        pct_start=config.warmup_fraction,
        cycle_momentum=config.optimizer in ("sgd", "adam", "adamw"),
    )


def lr_curve(config: FineTuneConfig, steps_per_epoch: int) -> list[float]:
    """The LR of every training step, as the loop would use it."""
    import torch

    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], config)
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    curve = []
    for _ in range(config.epochs * steps_per_epoch):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return curve


# ---------------------------------------------------------------------------------------------
# Regularization helpers


def insert_dropout_(module: torch.nn.Module, p: float) -> int:
    """Inserts nn.Dropout(p) before each linear layer that reads a hidden activation (fx graphs only); returns how many."""
    import torch
    from torch import nn

    graph = getattr(module, "graph", None)
    if p <= 0 or not isinstance(graph, torch.fx.Graph):
        return 0
    inserted = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), nn.Linear):
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op == "placeholder":
            continue
        if source.op == "call_module" and isinstance(module.get_submodule(source.target), nn.Dropout):
            continue  # inserted by an earlier fine-tuning round
        name = f"dropout_{inserted}"
        while hasattr(module, name):
            name += "_"
        module.add_submodule(name, nn.Dropout(p))
        with graph.inserting_before(node):
            drop = graph.call_module(name, (source,))
        node.replace_input_with(source, drop)
        inserted += 1
    if inserted:
        graph.lint()
        module.recompile()
    return inserted


def l1_penalty(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(p.abs().sum() for p in params)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    loss: float
    accuracy: float  # on the train data as augmented
    eval_accuracy: float | None = None
    lr: float = 0.0


# (model, inputs, labels) -> (loss, logits): the default is cross-entropy with label smoothing.
LossFn = Callable[[Any, tuple[Any, ...], Any], tuple[Any, Any]]


def first_output(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value


def accuracy_of(model: Any, inputs: list[np.ndarray], labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of the model (eval mode) on arrays."""
    import torch

    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = first_output(model(*(torch.from_numpy(x[start : start + batch_size]) for x in inputs)))
            correct += int((logits.argmax(-1).numpy() == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(labels))


def fine_tune_(
    model: Any,
    data: TrainData,
    config: FineTuneConfig,
    context: PassContext,
    stage: str,
    *,
    loss_fn: LossFn | None = None,
    extra_params: Sequence[Any] = (),
    before_epoch: Callable[[int], None] = lambda epoch: None,
    after_step: Callable[[int], None] = lambda step: None,
    may_stop: Callable[[int], bool] = lambda epoch: True,
    fraction: tuple[float, float] = (0.0, 1.0),
    batches: LengthBatches | None = None,
) -> list[EpochResult]:
    """Fine-tunes `model` in place and leaves it in eval mode; returns one result per epoch run.

    loss_fn replaces cross-entropy (distillation); extra_params train alongside the model (feature
    projections); before_epoch(epoch) and after_step(global step) let a pass act during training
    (freeze observers, raise sparsity); may_stop(epoch) says whether early stopping may end or
    roll back to that epoch (gradual pruning forbids it before the final sparsity). Under a budget
    guard (slimserve.optimizer.finetune.guard.guarding) training goes on after the last epoch while the model is over
    the budget and improving. Raises OptimizerError when the loss or the gradients stop being
    finite, or the job is cancelled. Data without labels (data.labels None) needs a loss_fn that ignores them
    (slimserve.optimizer.finetune.objectives: toward a teacher's outputs); accuracy is then not reported.
    batches: padding-free batches of a text model (slimserve.optimizer.finetune.padding_free.LengthBatches, made on
    `data` as given: max_samples must not cut it further): rows of similar length, each batch cut to its longest member;
    the loss_fn is then called with `rows=` the batch's row indices (a cache of the teacher's outputs looks them up).
    """
    import torch

    if data.labels is None:
        if loss_fn is None:
            raise OptimizerError(
                f"{stage}: the train data has no 'labels' array; add the class index of each sample as 'labels' to TRAIN.npz"
            )
    elif data.labels.ndim != 1 or len(data.labels) != len(data.inputs[0]):
        raise OptimizerError(f"{stage}: 'labels' must hold one class index per training sample")
    subsampled = data.subsample(config.max_samples, context.seed)
    if batches is not None and subsampled is not data:
        raise OptimizerError(f"{stage}: padding-free batches index the rows as given; subsample the data (max_samples) before making them")
    data = subsampled
    torch.manual_seed(context.seed)
    generator = torch.Generator().manual_seed(context.seed)
    xs = [torch.from_numpy(np.ascontiguousarray(x)) for x in data.inputs]
    ys = None if data.labels is None else torch.from_numpy(data.labels.astype(np.int64, copy=False))
    rows = len(xs[0])
    steps_per_epoch = math.ceil(rows / config.batch_size) if batches is None else len(batches)
    inserted = insert_dropout_(model, config.dropout)
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in extra_params if p.requires_grad]
    optimizer = make_optimizer(params, config)
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    l1_params = [p for p in model.parameters() if p.requires_grad and p.dim() > 1] if config.l1 > 0 else []
    kinds = [input_kind(x) if config.augment.kind == "auto" else config.augment.kind for x in xs]
    if loss_fn is None:

        def loss_fn(m: Any, inputs: tuple[Any, ...], labels: Any) -> tuple[Any, Any]:
            logits = first_output(m(*inputs))
            return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=config.label_smoothing), logits

    start, span = fraction
    context.progress(
        ProgressEvent(
            stage=stage,
            fraction=start,
            message=f"fine-tuning {config.epochs} epoch(s) on {rows} samples: {config.optimizer}, lr {config.lr:g} {config.schedule}, "
            f"augmentation {'/'.join(sorted(set(kinds)))}" + (f", {inserted} dropout layer(s)" if inserted else ""),
        )
    )
    results: list[EpochResult] = []
    best: tuple[float, int, dict[str, Any], list[Any]] | None = None
    step = 0

    def run_epoch(epoch: int, total_epochs: int, scheduled: bool) -> EpochResult:
        nonlocal step
        before_epoch(epoch)
        model.train()
        total_loss, correct = 0.0, 0
        order = torch.randperm(rows, generator=generator).split(config.batch_size) if batches is None else batches.epoch(generator)
        for batch_no, idx in enumerate(order):
            if context.cancelled():
                raise OptimizerError(f"{stage}: the job was cancelled")
            taken = tuple(x[idx] for x in xs) if batches is None else batches.take(xs, idx)
            inputs = tuple(x if kind == "none" else augment(x, config.augment, generator) for x, kind in zip(taken, kinds))
            optimizer.zero_grad(set_to_none=True)
            labels = None if ys is None else ys[idx]
            loss, logits = loss_fn(model, inputs, labels) if batches is None else loss_fn(model, inputs, labels, rows=idx)
            if l1_params:
                loss = loss + config.l1 * l1_penalty(l1_params)
            lr = optimizer.param_groups[0]["lr"]
            if not torch.isfinite(loss):
                raise OptimizerError(
                    f"{stage}: the training loss became {float(loss.detach())} at epoch {epoch + 1}, step {batch_no + 1} (lr {lr:g}); "
                    f"the run diverged: lower finetune.lr (now {config.lr:g}) or set finetune.clip_grad_norm"
                )
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm if config.clip_grad_norm > 0 else float("inf"))
            if not torch.isfinite(norm):
                raise OptimizerError(
                    f"{stage}: the gradients became {float(norm)} at epoch {epoch + 1}, step {batch_no + 1} (lr {lr:g}); "
                    f"the run diverged: lower finetune.lr (now {config.lr:g}) or set finetune.clip_grad_norm"
                )
            optimizer.step()
            if scheduled:
                schedule.step()
            step += 1
            after_step(step)
            total_loss += float(loss.detach()) * len(idx)
            if ys is not None:
                correct += int((logits.detach().argmax(-1) == ys[idx]).sum())
        eval_accuracy = None
        if data.eval_inputs is not None and data.eval_labels is not None:
            eval_accuracy = accuracy_of(model, data.eval_inputs, data.eval_labels)
        accuracy = correct / rows if ys is not None else float("nan")  # no labels: no accuracy to report
        result = EpochResult(epoch + 1, total_loss / rows, accuracy, eval_accuracy, optimizer.param_groups[0]["lr"])
        shown = (None if ys is None else result.accuracy) if eval_accuracy is None else eval_accuracy
        context.progress(
            ProgressEvent(
                stage=stage,
                fraction=start + span * min(1.0, (epoch + 1) / config.epochs),
                epoch=result.epoch,
                loss=result.loss,
                accuracy=shown,
                message=f"epoch {result.epoch}/{total_epochs}: loss {result.loss:.4f}"
                + (f", train accuracy {result.accuracy:.4f}" if ys is not None else "")
                + (f", evaluation accuracy {eval_accuracy:.4f}" if eval_accuracy is not None else ""),
            )
        )
        return result

    for epoch in range(config.epochs):
        result = run_epoch(epoch, config.epochs, scheduled=True)
        results.append(result)
        eval_accuracy = result.eval_accuracy
        if config.early_stopping and eval_accuracy is not None and may_stop(epoch):
            if best is None or eval_accuracy > best[0]:
                best = (eval_accuracy, epoch, copy.deepcopy(model.state_dict()), [p.detach().clone() for p in extra_params])
            elif epoch - best[1] >= config.early_stopping:
                context.progress(
                    ProgressEvent(
                        stage=stage,
                        fraction=start + span,
                        message=f"early stop after epoch {epoch + 1}: evaluation accuracy has not improved on epoch {best[1] + 1}'s {best[0]:.4f}",
                    )
                )
                break
    if best is not None and results[-1].eval_accuracy is not None and best[0] > results[-1].eval_accuracy:
        model.load_state_dict(best[2])
        for p, saved in zip(extra_params, best[3]):
            p.data.copy_(saved)
    guard = current_guard()
    if guard is not None and guard.extra_epochs > 0:
        for group in optimizer.param_groups:  # the schedule has ended (cosine at min_lr): go on at a fraction of the peak
            group["lr"] = config.lr * EXTRA_LR_FACTOR
        dtypes = [x.dtype for x in data.inputs]
        results += continue_while_over_budget(model, extra_params, guard, dtypes, context, stage, len(results), run_epoch)
    model.eval()
    return results
