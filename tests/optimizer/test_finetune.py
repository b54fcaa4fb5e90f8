"""Tests for optimizer/finetune/loop.py: LR curves, regularization hooks, divergence and early stopping."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from slimserve.optimizer.base import OptimizerError, PassContext, ProgressEvent
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.data import TrainData
from slimserve.optimizer.finetune.augment import AugmentConfig
from slimserve.optimizer.finetune.loop import FineTuneConfig, fine_tune_, insert_dropout_, lr_curve

# --- schedules -----------------------------------------------------------------------------------------


def test_constant_and_step_schedules():
    assert set(lr_curve(FineTuneConfig(epochs=3, schedule="constant", lr=0.01), 4)) == {0.01}
    curve = lr_curve(FineTuneConfig(epochs=3, schedule="step", lr=0.1, step_epochs=1, gamma=0.5), 4)
    assert curve[:4] == pytest.approx([0.1] * 4) and curve[4:8] == pytest.approx([0.05] * 4) and curve[8:] == pytest.approx([0.025] * 4)


def test_cosine_falls_monotonically_from_lr_to_min_lr():
    curve = lr_curve(FineTuneConfig(epochs=2, schedule="cosine", lr=0.1, min_lr=0.001), 50)
    assert curve[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(curve))
    assert curve[50] == pytest.approx(0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi / 2)) / 2, rel=1e-3)
    assert curve[-1] < 0.0015


def test_cyclical_is_a_triangle_between_min_lr_and_lr():
    curve = lr_curve(FineTuneConfig(epochs=4, schedule="cyclical", lr=0.1, min_lr=0.01, cycle_epochs=1.0), 10)
    assert curve[0] == pytest.approx(0.01) and curve[5] == pytest.approx(0.1) and curve[10] == pytest.approx(0.01)
    assert curve[:11] == pytest.approx(curve[10:21])  # periodic
    assert max(curve) == pytest.approx(0.1) and min(curve) == pytest.approx(0.01)


def test_one_cycle_warms_up_then_anneals_far_below_the_start():
    curve = lr_curve(FineTuneConfig(epochs=2, schedule="one-cycle", lr=0.1, warmup_fraction=0.25), 20)
    peak = int(np.argmax(curve))
    assert abs(peak - 10) <= 1 and curve[peak] == pytest.approx(0.1, rel=1e-3)
    assert curve[0] < 0.1 / 10 and curve[-1] < curve[0] / 100


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_trains(name):
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(128, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = nn.Sequential(nn.Linear(4, 2))
    results = fine_tune_(
        model,
        TrainData([x], y),
        FineTuneConfig(epochs=4, optimizer=name, lr=0.05, augment=AugmentConfig(kind="none")),
        PassContext(workdir="."),
        "test",
    )
    assert results[-1].loss < results[0].loss


def test_bad_settings_name_the_choices():
    with pytest.raises(OptimizerError, match=r"optimizer must be one of sgd, adam, adamw, rmsprop, got 'adagrad'"):
        FineTuneConfig(optimizer="adagrad")
    with pytest.raises(OptimizerError, match=r"schedule must be one of constant, step, cosine, cyclical, one-cycle"):
        FineTuneConfig(schedule="linear")
    with pytest.raises(OptimizerError, match=r"pass 'prune-weight': finetune: unknown setting 'epoch'"):
        make_pass("prune-weight", {"finetune": {"epoch": 1}})
    with pytest.raises(OptimizerError, match=r"finetune: augment: augment flip is a probability in \[0, 1\]"):
        make_pass("prune-weight", {"finetune": {"augment": {"flip": 2}}})


def test_a_partial_finetune_setting_keeps_the_pass_defaults():
    config = make_pass("prune-weight", {"finetune": {"epochs": 1}}).config
    assert (config.finetune.epochs, config.finetune.lr) == (1, make_pass("prune-weight").config.finetune.lr)


def test_nan_loss_raises_a_precise_error():
    x = np.full((32, 4), np.nan, np.float32)
    with pytest.raises(
        OptimizerError, match=r"test: the training loss became nan at epoch 1, step 1 \(lr 0.001\); the run diverged: lower finetune.lr"
    ):
        fine_tune_(
            nn.Linear(4, 2),
            TrainData([x], np.zeros(32, np.int64)),
            FineTuneConfig(augment=AugmentConfig(kind="none")),
            PassContext(workdir="."),
            "test",
        )


def test_early_stopping_ends_when_evaluation_accuracy_stalls_and_progress_streams_per_epoch():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype(np.float32), rng.integers(0, 2, 64)
    events: list[ProgressEvent] = []
    data = TrainData([x], y, eval_inputs=[x], eval_labels=y)
    config = FineTuneConfig(epochs=6, lr=1e-12, early_stopping=2, augment=AugmentConfig(kind="none"))
    results = fine_tune_(nn.Linear(4, 2), data, config, PassContext(workdir=".", progress=events.append), "test")
    assert len(results) == 3  # epoch 1 is best; 2 and 3 do not improve on it
    epochs = [e for e in events if e.epoch is not None]
    assert [e.epoch for e in epochs] == [1, 2, 3] and all(e.loss > 0 and 0 <= e.accuracy <= 1 for e in epochs)
    assert any("early stop after epoch 3" in e.message for e in events)


def test_dropout_goes_before_hidden_linear_layers_only():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    module = torch.fx.symbolic_trace(Net())
    assert insert_dropout_(module, 0.3) == 1
    assert insert_dropout_(module, 0.3) == 0  # not twice
    drops = [n for n in module.graph.nodes if n.op == "call_module" and isinstance(module.get_submodule(n.target), nn.Dropout)]
    assert len(drops) == 1 and next(iter(drops[0].users)).target == "b"
