"""The fine-tuning loop every training pass shares: optimizers, LR schedules, augmentation, regularization, early stopping.

A pass embeds a `FineTuneConfig` in its own config (field `finetune`) and calls `fine_tune_` with its
model, its train data and, where it has one, a loss of its own (distillation). Schedules are
torch.optim.lr_scheduler's, stepped once per batch; augmentation is chosen by the input's kind
(images, token ids, time series) and runs on whole batches as torch ops.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from optimizer.base import ConfigValueError, OptimizerError, PassConfig, PassContext, ProgressEvent, config_from_dict

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "cyclical", "one-cycle")
AUGMENT_KINDS = ("auto", "none", "image", "text", "timeseries")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigValueError(message)


def _nested(value: Any, cls: type[PassConfig], where: str, base: PassConfig | None = None) -> Any:
    """A nested config given as a dict (from a recipe file) becomes its dataclass, over `base`'s values where given."""
    if isinstance(value, dict):
        if base is not None:
            defaults = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
            value = {**defaults, **value}
        try:
            return config_from_dict(cls, value, where)
        except OptimizerError as e:  # a ValueError, so that the outer config names the pass
            raise ConfigValueError(str(e)) from e
    if not isinstance(value, cls):
        raise ConfigValueError(f"{where} must be a mapping of settings, got {value!r}")
    return value


@dataclass(frozen=True)
class AugmentConfig(PassConfig):
    """Data augmentation, applied to each training batch; `kind` auto picks by the model's first input.

    kind: auto | none | image | text | timeseries. auto: float [N, C, H, W] -> image, integer
    inputs -> text (token ids), float [N, T] or [N, C, T] -> timeseries.
    Images: shift (random crop / translation, fraction of the side), rotation (degrees), scale
    (± fraction), flip (probability of a horizontal flip: off by default, it changes digits and
    letters), brightness and contrast (± fraction: colour jitter).
    Text: token_dropout (probability a token becomes pad_token_id), token_swap (probability a
    token swaps with its neighbour), token_insert (probability of inserting a token drawn from the
    same sequence, no synonyms), all on positions that are not padding.
    Time series: noise (jitter, × each series' std), magnitude (± scaling per channel),
    time_warp (strength of a smooth random warp of the time axis).
    """

    kind: str = "auto"
    shift: float = 0.1
    rotation: float = 10.0
    scale: float = 0.1
    flip: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    token_dropout: float = 0.1
    token_swap: float = 0.05
    token_insert: float = 0.05
    pad_token_id: int = 0
    noise: float = 0.03
    magnitude: float = 0.1
    time_warp: float = 0.2

    def __post_init__(self) -> None:
        _check(self.kind in AUGMENT_KINDS, f"augment kind must be one of {', '.join(AUGMENT_KINDS)}, got {self.kind!r}")
        for name in ("flip", "token_dropout", "token_swap", "token_insert"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"augment {name} is a probability in [0, 1], got {value}")
        for name in ("shift", "rotation", "scale", "brightness", "contrast", "noise", "magnitude", "time_warp"):
            value = getattr(self, name)
            _check(value >= 0 and math.isfinite(value), f"augment {name} must be 0 or more, got {value}")


@dataclass(frozen=True)
class FineTuneConfig(PassConfig):
    """How a pass fine-tunes: the settings of `fine_tune_`.

    epochs, batch_size; max_samples: train rows used at most (0: all).
    optimizer: sgd | adam | adamw | rmsprop; lr (the peak LR for one-cycle and cyclical), momentum
    (SGD, RMSprop). schedule (per batch, torch.optim.lr_scheduler): constant | step (× gamma every
    step_epochs) | cosine (to min_lr over the run) | cyclical (triangular between min_lr and lr,
    one cycle per cycle_epochs) | one-cycle (warm-up over warmup_fraction of the run, then anneal).
    Regularization: weight_decay (L2, decoupled for adamw; never on biases and norms), l1 (× sum of
    |weights| added to the loss), dropout (probability; a dropout layer is inserted before each
    hidden linear layer where the architecture allows, removed at export), label_smoothing.
    clip_grad_norm: 0 = off. early_stopping: patience in epochs on the evaluation data's accuracy
    (0 = off; the best epoch's weights are kept). augment: see AugmentConfig.
    """

    epochs: int = 2
    batch_size: int = 64
    max_samples: int = 0
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    schedule: str = "cosine"
    step_epochs: int = 1
    gamma: float = 0.1
    min_lr: float = 0.0
    cycle_epochs: float = 1.0
    warmup_fraction: float = 0.3
    weight_decay: float = 1e-4
    l1: float = 0.0
    dropout: float = 0.0
    label_smoothing: float = 0.0
    clip_grad_norm: float = 0.0
    early_stopping: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", _nested(self.augment, AugmentConfig, "augment"))
        _check(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        _check(self.max_samples >= 0, f"max_samples must be 0 (all) or more, got {self.max_samples}")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        _check(0 <= self.min_lr < self.lr, f"min_lr must be in [0, lr), got {self.min_lr}")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.step_epochs >= 1, f"step_epochs must be at least 1, got {self.step_epochs}")
        _check(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        _check(self.cycle_epochs > 0, f"cycle_epochs must be positive, got {self.cycle_epochs}")
        _check(0 < self.warmup_fraction < 1, f"warmup_fraction must be in (0, 1), got {self.warmup_fraction}")
        for name in ("weight_decay", "l1", "clip_grad_norm"):
            _check(getattr(self, name) >= 0, f"{name} must be 0 or more, got {getattr(self, name)}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.early_stopping >= 0, f"early_stopping is a patience in epochs (0: off), got {self.early_stopping}")


def finetune_field(**defaults: Any) -> Any:
    """The `finetune` field of a training pass's config, with that pass's defaults."""
    return field(default_factory=lambda: FineTuneConfig(**defaults))


def nested_finetune(config: PassConfig) -> None:
    """Call from a pass config's __post_init__: turns a recipe's `finetune` dict into a FineTuneConfig."""
    declared = next(f for f in dataclasses.fields(config) if f.name == "finetune")
    base = declared.default_factory() if declared.default_factory is not dataclasses.MISSING else None  # the pass's own defaults
    object.__setattr__(config, "finetune", _nested(config.finetune, FineTuneConfig, "finetune", base))  # type: ignore[attr-defined]


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
        optimizer, max_lr=config.lr, total_steps=total, pct_start=config.warmup_fraction,
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
# Augmentation


def input_kind(x: torch.Tensor | np.ndarray) -> str:
    """image | text | timeseries | none, from a batch's dtype and rank."""
    dtype = np.dtype(str(x.dtype).removeprefix("torch.")) if not isinstance(x, np.ndarray) else x.dtype
    if np.issubdtype(dtype, np.integer):
        return "text"
    if np.issubdtype(dtype, np.floating):
        if x.ndim == 4:
            return "image"
        if x.ndim in (2, 3):
            return "timeseries"
    return "none"


def augment_images(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random affine (translation = random crop, rotation, scale), horizontal flip, brightness and contrast jitter."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    angle = uniform(math.radians(config.rotation))
    scale = 1 + uniform(config.scale)
    shift = torch.stack([uniform(2 * config.shift), uniform(2 * config.shift)], dim=1)  # grid units span 2 per side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if config.flip > 0:
        flip = torch.rand(n, generator=generator) < config.flip
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if config.contrast > 0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * (1 + uniform(config.contrast)).view(n, 1, 1, 1).to(x.dtype) + mean
    if config.brightness > 0:
        out = out + uniform(config.brightness).view(n, 1, 1, 1).to(x.dtype) * x.abs().amax().clamp(min=1e-6)
    return out


def augment_tokens(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Token dropout (to the pad id), neighbour swap and random insertion of a token of the same sequence."""
    import torch

    out = x.clone()
    if out.ndim != 2 or out.shape[1] < 2:
        return out
    n, length = out.shape
    real = out != config.pad_token_id
    if config.token_swap > 0:
        swap = (torch.rand(n, length - 1, generator=generator) < config.token_swap) & real[:, :-1] & real[:, 1:]
        for i, j in swap.nonzero().tolist():
            out[i, j], out[i, j + 1] = out[i, j + 1].clone(), out[i, j].clone()
    if config.token_insert > 0:
        insert = (torch.rand(n, length, generator=generator) < config.token_insert) & real
        for i in insert.any(dim=1).nonzero().flatten().tolist():
            positions = insert[i].nonzero().flatten().tolist()
            row = out[i].tolist()
            words = [t for t in row if t != config.pad_token_id]
            for pos in reversed(positions):
                word = words[int(torch.randint(len(words), (1,), generator=generator))]
                row.insert(pos, word)
            out[i] = torch.tensor(row[:length], dtype=out.dtype)  # the sequence keeps its length
    if config.token_dropout > 0:
        drop = (torch.rand(n, length, generator=generator) < config.token_dropout) & (out != config.pad_token_id)
        out = out.masked_fill(drop, config.pad_token_id)
    return out


def augment_series(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Jitter (Gaussian noise), per-channel magnitude scaling and a smooth random time warp, on [N, T] or [N, C, T]."""
    import torch

    out = x if x.ndim == 3 else x[:, None, :]
    n, channels, length = out.shape
    if config.time_warp > 0 and length > 2:
        knots = 4
        speed = (1 + config.time_warp * torch.randn(n, knots, generator=generator)).clamp(min=0.1)
        speed = torch.nn.functional.interpolate(speed[:, None, :], size=length, mode="linear", align_corners=True)[:, 0]
        position = torch.cumsum(speed, dim=1)
        position = (position - position[:, :1]) / (position[:, -1:] - position[:, :1]).clamp(min=1e-6) * (length - 1)
        low = position.floor().long().clamp(0, length - 1)
        high = (low + 1).clamp(max=length - 1)
        weight = (position - low).to(out.dtype)[:, None, :]
        index = lambda i: i[:, None, :].expand(n, channels, length)  # noqa: E731
        out = out.gather(2, index(low)) * (1 - weight) + out.gather(2, index(high)) * weight
    if config.magnitude > 0:
        out = out * (1 + config.magnitude * torch.randn(n, channels, 1, generator=generator)).to(out.dtype)
    if config.noise > 0:
        std = out.std(dim=2, keepdim=True).clamp(min=1e-6)
        out = out + config.noise * std * torch.randn(out.shape, generator=generator).to(out.dtype)
    return out if x.ndim == 3 else out[:, 0, :]


def augment(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """The batch augmented as its kind (or config.kind) calls for; shape and dtype are kept."""
    kind = input_kind(x) if config.kind == "auto" else config.kind
    if kind == "none":
        return x
    if kind == "image" and x.ndim == 4 and x.is_floating_point():
        return augment_images(x, config, generator)
    if kind == "text" and not x.is_floating_point():
        return augment_tokens(x, config, generator)
    if kind == "timeseries" and x.ndim in (2, 3) and x.is_floating_point():
        return augment_series(x, config, generator)
    raise OptimizerError(f"augment kind {kind!r} does not apply to an input of {x.dtype} {list(x.shape)}; set augment.kind to auto or none")


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


@dataclass
class TrainData:
    """Arrays in the model's input order, the labels, and (optional) evaluation data for early stopping."""

    inputs: list[np.ndarray]
    labels: np.ndarray
    eval_inputs: list[np.ndarray] | None = None
    eval_labels: np.ndarray | None = None

    def subsample(self, limit: int, seed: int) -> TrainData:
        rows = len(self.labels)
        if limit <= 0 or rows <= limit:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
        return dataclasses.replace(self, inputs=[x[keep] for x in self.inputs], labels=self.labels[keep])


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
) -> list[EpochResult]:
    """Fine-tunes `model` in place and leaves it in eval mode; returns one result per epoch run.

    loss_fn replaces cross-entropy (distillation); extra_params train alongside the model (feature
    projections); before_epoch(epoch) and after_step(global step) let a pass act during training
    (freeze observers, raise sparsity); may_stop(epoch) says whether early stopping may end or
    roll back to that epoch (gradual pruning forbids it before the final sparsity). Raises
    OptimizerError when the loss or the gradients stop being finite, or the job is cancelled.
    """
    import torch

    if data.labels.ndim != 1 or len(data.labels) != len(data.inputs[0]):
        raise OptimizerError(f"{stage}: 'labels' must hold one class index per training sample")
    data = data.subsample(config.max_samples, context.seed)
    torch.manual_seed(context.seed)
    generator = torch.Generator().manual_seed(context.seed)
    xs = [torch.from_numpy(np.ascontiguousarray(x)) for x in data.inputs]
    ys = torch.from_numpy(data.labels.astype(np.int64, copy=False))
    steps_per_epoch = math.ceil(len(ys) / config.batch_size)
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
    context.progress(ProgressEvent(
        stage=stage, fraction=start,
        message=f"fine-tuning {config.epochs} epoch(s) on {len(ys)} samples: {config.optimizer}, lr {config.lr:g} {config.schedule}, "
        f"augmentation {'/'.join(sorted(set(kinds)))}" + (f", {inserted} dropout layer(s)" if inserted else ""),
    ))
    results: list[EpochResult] = []
    best: tuple[float, int, dict[str, Any], list[Any]] | None = None
    step = 0
    for epoch in range(config.epochs):
        before_epoch(epoch)
        model.train()
        total_loss, correct = 0.0, 0
        for batch_no, idx in enumerate(torch.randperm(len(ys), generator=generator).split(config.batch_size)):
            if context.cancelled():
                raise OptimizerError(f"{stage}: the job was cancelled")
            inputs = tuple(x[idx] if kind == "none" else augment(x[idx], config.augment, generator) for x, kind in zip(xs, kinds))
            optimizer.zero_grad(set_to_none=True)
            loss, logits = loss_fn(model, inputs, ys[idx])
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
            schedule.step()
            step += 1
            after_step(step)
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(-1) == ys[idx]).sum())
        eval_accuracy = None
        if data.eval_inputs is not None and data.eval_labels is not None:
            eval_accuracy = accuracy_of(model, data.eval_inputs, data.eval_labels)
        result = EpochResult(epoch + 1, total_loss / len(ys), correct / len(ys), eval_accuracy, optimizer.param_groups[0]["lr"])
        results.append(result)
        shown = result.accuracy if eval_accuracy is None else eval_accuracy
        context.progress(ProgressEvent(
            stage=stage, fraction=start + span * (epoch + 1) / config.epochs, epoch=result.epoch, loss=result.loss, accuracy=shown,
            message=f"epoch {result.epoch}/{config.epochs}: loss {result.loss:.4f}, train accuracy {result.accuracy:.4f}"
            + (f", evaluation accuracy {eval_accuracy:.4f}" if eval_accuracy is not None else ""),
        ))
        if config.early_stopping and eval_accuracy is not None and may_stop(epoch):
            if best is None or eval_accuracy > best[0]:
                best = (eval_accuracy, epoch, copy.deepcopy(model.state_dict()), [p.detach().clone() for p in extra_params])
            elif epoch - best[1] >= config.early_stopping:
                context.progress(ProgressEvent(
                    stage=stage, fraction=start + span,
                    message=f"early stop after epoch {epoch + 1}: evaluation accuracy has not improved on epoch {best[1] + 1}'s {best[0]:.4f}",
                ))
                break
    if best is not None and results[-1].eval_accuracy is not None and best[0] > results[-1].eval_accuracy:
        model.load_state_dict(best[2])
        for p, saved in zip(extra_params, best[3]):
            p.data.copy_(saved)
    model.eval()
    return results


# ---------------------------------------------------------------------------------------------
# Data for training passes


def check_labels(data: dict[str, np.ndarray], rows: int, needed_by: str, role: str = "train") -> np.ndarray:
    labels = data.get("labels")
    upper = role.upper()
    if labels is None:
        raise OptimizerError(
            f"{needed_by}: the {role} data has no 'labels' array; add the class index of each sample as 'labels' to {upper}.npz"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != rows:
        raise OptimizerError(
            f"{needed_by}: 'labels' must hold one integer class index per sample ({rows}), got {labels.dtype} {list(labels.shape)}"
        )
    if len(labels) and labels.min() < 0:
        raise OptimizerError(f"{needed_by}: 'labels' holds negative class indices")
    return labels.astype(np.int64)


def load_train_data(
    context: PassContext,
    inputs: list[str],
    specs: dict[str, tuple[np.dtype, tuple[int | str, ...]]],
    needed_by: str,
    classes: int | None = None,
    with_eval: bool = False,
) -> TrainData:
    """The train data (and, when asked and registered, the evaluation data) as arrays in input order, labels checked."""
    from optimizer.passes.quantize import model_arrays

    if "train" not in context.datasets:
        raise OptimizerError(
            f"{needed_by} fine-tunes the model and needs train data, and the model was registered without it; "
            "register it again with slimctl register NAME MODEL --train TRAIN.npz (one array per model input, plus 'labels')"
        )
    raw = context.dataset("train", needed_by)
    arrays = model_arrays(raw, specs, "train", needed_by)
    labels = check_labels(raw, len(next(iter(arrays.values()))), needed_by)
    if classes is not None and len(labels) and labels.max() >= classes:
        raise OptimizerError(f"{needed_by}: 'labels' holds class {int(labels.max())}, and the model has {classes} outputs")
    data = TrainData([arrays[name] for name in inputs], labels)
    if with_eval and "data" in context.datasets:
        raw_eval = context.dataset("data", needed_by)
        if "labels" in raw_eval:
            eval_arrays = model_arrays(raw_eval, specs, "data", needed_by)
            data.eval_inputs = [eval_arrays[name] for name in inputs]
            data.eval_labels = check_labels(raw_eval, len(data.eval_inputs[0]), needed_by, "data")
    return data
