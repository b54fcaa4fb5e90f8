"""The settings of the shared fine-tuning loop (`FineTuneConfig`) and the `finetune` field a training pass embeds them in.

Plain dataclasses, checked where a recipe is read; slimserve.optimizer.finetune.loop turns them into torch optimizers,
schedules and the loop. A pass's config declares `finetune: FineTuneConfig = finetune_field(epochs=..., lr=...)`
and calls `nested_finetune(self)` in its `__post_init__`, so a recipe's `finetune` dict overrides the pass's defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from slimserve.optimizer.base import ConfigValueError, OptimizerError, PassConfig, check_choice, config_from_dict, setting
from slimserve.optimizer.finetune.augment import AugmentConfig

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "cyclical", "one-cycle")


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

    epochs: int = setting(2, "training epochs")
    batch_size: int = setting(64, "train rows per step")
    max_samples: int = setting(0, "train rows used at most (0: all)")
    optimizer: str = setting("adamw", "sgd | adam | adamw | rmsprop")
    lr: float = setting(1e-3, "learning rate (the peak for one-cycle and cyclical)")
    momentum: float = setting(0.9, "momentum of SGD and RMSprop")
    schedule: str = setting("cosine", "constant | step | cosine | cyclical | one-cycle (per batch)")
    step_epochs: int = setting(1, "epochs between the step schedule's decays")
    gamma: float = setting(0.1, "the step schedule's decay factor")
    min_lr: float = setting(0.0, "the lowest learning rate of cosine and cyclical")
    cycle_epochs: float = setting(1.0, "epochs per cycle of the cyclical schedule")
    warmup_fraction: float = setting(0.3, "share of the run one-cycle warms up over")
    weight_decay: float = setting(1e-4, "L2 (decoupled for adamw; never on biases and norms)")
    l1: float = setting(0.0, "factor of the sum of |weights| added to the loss")
    dropout: float = setting(0.0, "probability of a dropout layer inserted before each hidden linear layer (removed at export)")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")
    clip_grad_norm: float = setting(0.0, "largest gradient norm (0: off)")
    early_stopping: int = setting(0, "patience in epochs on the evaluation data's accuracy (0: off; the best epoch is kept)")
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"description": "data augmentation of each training batch"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", _nested(self.augment, AugmentConfig, "augment"))
        _check(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        _check(self.max_samples >= 0, f"max_samples must be 0 (all) or more, got {self.max_samples}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
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


def finetune_field(description: str = "the shared fine-tuning loop's settings", **defaults: Any) -> Any:
    """The `finetune` field of a training pass's config, with that pass's defaults and its description."""
    return field(default_factory=lambda: FineTuneConfig(**defaults), metadata={"description": description})


def nested_finetune(config: PassConfig) -> None:
    """Call from a pass config's __post_init__: turns a recipe's `finetune` dict into a FineTuneConfig."""
    declared = next(f for f in dataclasses.fields(config) if f.name == "finetune")
    base = declared.default_factory() if declared.default_factory is not dataclasses.MISSING else None  # the pass's own defaults
    object.__setattr__(config, "finetune", _nested(config.finetune, FineTuneConfig, "finetune", base))  # type: ignore[attr-defined]
