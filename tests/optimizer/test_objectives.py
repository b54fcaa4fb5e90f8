"""Tests for optimizer/finetune/objectives.py: the label-free objective follows the output's kind, and training toward a reference works without labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimserve.optimizer.base import OptimizerError, PassContext
from slimserve.optimizer.data import TrainData
from slimserve.optimizer.finetune.loop import FineTuneConfig, fine_tune_
from slimserve.optimizer.finetune.objectives import LabelFreeObjective, choose_objective, reference_loss


def test_the_objective_follows_the_outputs_kind_and_is_named():
    rng = np.random.default_rng(0)
    embedding = choose_objective(rng.standard_normal((4, 384)).astype(np.float32), "sentence_embedding", "distill-soft")
    assert embedding.kind == "embedding"
    assert embedding.describe() == "label-free: 1 - cosine + relative MSE to the teacher's output"
    logits = choose_objective(rng.standard_normal((4, 10)).astype(np.float32), "logits", "distill-soft", temperature=2.0)
    assert logits.describe() == "label-free: KL divergence to the teacher's temperature-softened outputs (T=2)"
    regression = choose_objective(rng.standard_normal((4, 1)).astype(np.float32), "price", "prune-structured", who="unpruned model")
    assert regression.describe() == "label-free: relative MSE to the unpruned model's output"
    with pytest.raises(OptimizerError, match=r"distill-soft: the train data has no 'labels' and the model's output 'ids' is int64"):
        choose_objective(np.zeros((4, 3), np.int64), "ids", "distill-soft")


@pytest.mark.parametrize("kind", ["embedding", "soft-targets", "regression"])
def test_each_loss_is_zero_at_the_target_and_grows_away_from_it(kind):
    target = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    objective = LabelFreeObjective(kind)
    near, far = target + 0.05 * torch.randn_like(target), target + 1.0 * torch.randn_like(target)
    assert float(objective.output_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    assert 0 < float(objective.output_loss(near, target)) < float(objective.output_loss(far, target))


def test_without_labels_fine_tuning_needs_an_objective_and_with_one_learns_the_reference(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((256, 8)).astype(np.float32)
    reference, model = (
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6)),
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6)),
    )
    data, context = TrainData([x], None), PassContext(workdir=tmp_path)
    config = FineTuneConfig(epochs=8, batch_size=32, lr=1e-2)
    with pytest.raises(OptimizerError, match="test: the train data has no 'labels' array"):
        fine_tune_(model, data, config, context, "test")

    def cosine() -> float:
        with torch.no_grad():
            return float(nn.functional.cosine_similarity(model(torch.from_numpy(x)), reference(torch.from_numpy(x))).mean())

    before = cosine()
    events = []
    context = PassContext(workdir=tmp_path, progress=events.append)
    results = fine_tune_(model, data, config, context, "test", loss_fn=reference_loss(reference, LabelFreeObjective("embedding")))
    assert cosine() > max(0.95, before + 0.3)
    assert results[-1].loss < results[0].loss
    epochs = [e for e in events if e.epoch is not None]
    assert epochs and all(e.accuracy is None and "accuracy" not in e.message for e in epochs)  # no labels: no accuracy claimed
