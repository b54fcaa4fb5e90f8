"""Tests for optimizer/search/budget.py and optimizer/finetune/guard.py: the bisection of a pass's ratio within the budget, refusals that say the best
reached, per-pass max_drop, cancellation and progress, and fine-tuning that goes on while over the budget."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from slimserve.optimizer.base import Artifact, Knob, OptimizerError, Pass, PassConfig, PassContext, ProgressEvent
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.data import TrainData
from slimserve.optimizer.finetune.guard import guarding
from slimserve.optimizer.finetune.loop import FineTuneConfig, fine_tune_, finetune_field
from slimserve.optimizer.pipeline import optimize
from slimserve.optimizer.recipes import Recipe, recipe_from_dict
from slimserve.optimizer.search.budget import BudgetOptions
from tests.optimizer.tiny_models import FEATURES, add_pass, dense_onnx, onnx_artifact, save_npz, weights

X = np.random.default_rng(2).standard_normal((400, FEATURES)).astype(np.float32)
W = weights(np.random.default_rng(0), FEATURES, 32, 10)
NOISE = 0.03 * np.random.default_rng(3).standard_normal(W[1].shape)  # ratio 1: about 18 points lost, 0.1: 1.5


@dataclass(frozen=True)
class NoiseConfig(PassConfig):
    ratio: float = 0.5


class NoisePass(Pass[NoiseConfig]):
    """A ratio-controlled pass in milliseconds: the classifier with noise of `ratio` on its last layer (more ratio, more loss)."""

    name = "test-noise"
    config_cls = NoiseConfig
    budget_knob = Knob("ratio", gentle=0.0, aggressive=1.0)
    runs: ClassVar[list[float]] = []  # the settings it ran with, in order

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        ratio = self.config.ratio
        NoisePass.runs.append(ratio)
        path = dense_onnx(context.new_path("noisy", ".onnx"), [W[0], W[1] + ratio * NOISE], output="logits")
        return artifact.derive(path, format="onnx", runtime="onnxruntime")


@pytest.fixture
def noisy(tmp_path, monkeypatch):
    """A 16 -> 32 -> 10 classifier whose labels it gets all right, the noise pass, and an evaluation-only context."""
    add_pass(monkeypatch, NoisePass, "test-noise")
    NoisePass.runs = []
    labels = (np.maximum(X @ W[0], 0) @ W[1]).argmax(1)
    events: list[ProgressEvent] = []
    context = PassContext(
        workdir=tmp_path / "work", datasets={"data": save_npz(tmp_path / "eval.npz", x=X, labels=labels)}, progress=events.append
    )
    return onnx_artifact(dense_onnx(tmp_path / "m.onnx", W, output="logits"), "logits"), context, events


def _recipe(**budget) -> Recipe:
    return recipe_from_dict({"name": "noise", "passes": [{"pass": "test-noise", "budget": budget}]}, "noise.json")


def test_the_search_keeps_the_most_aggressive_ratio_within_the_budget(noisy, runtime_factory):
    source, context, events = noisy
    recipe = Recipe("noise", (make_pass("test-noise", {"ratio": 1.0}),))
    full = optimize(source, recipe, context, runtime_factory, "v", register_over_budget=True)
    assert full.evaluation.quality_drop > 5  # the fixed, aggressive setting breaks a 2-point budget
    NoisePass.runs = []
    result = optimize(source, _recipe(max_evaluations=7), context, runtime_factory, "v", accuracy_budget=2.0)
    (search,) = result.searches
    assert NoisePass.runs[:2] == [1.0, 0.0]  # the aggressive end first, then the gentle one, then bisection
    assert len(search.probes) == 7 and search.evaluations == 7
    within = [p.value for p in search.probes if p.drop <= 2.0]
    over = [p.value for p in search.probes if p.drop > 2.0]
    assert search.value == max(within) and 0 < search.value < min(over) <= 1.0
    assert min(over) - search.value <= 1.0 / 2**5 + 1e-9  # five halvings of the bracket
    assert search.within and result.within_budget and result.evaluation.quality_drop <= 2.0
    row = result.report[1]
    assert row["budget_setting"] == f"test-noise ratio={search.value:.4g}" and row["within_budget"] is True
    assert row["budget_evaluations"] == 7 and row["budget_search_s"] >= 0 and row["budget_pt"] == 2.0
    assert (
        row["budget_probes"] == search.tried()
        and row["budget_probes"].startswith("0 (0.00 pt), ")
        and row["budget_probes"].count(" pt)") == 7
    )
    assert result.report[0]["budget_setting"] is None  # the baseline row
    budget_events = [e for e in events if e.stage == "test-noise budget"]
    assert sum(e.message.startswith("probe ") and " loses " in e.message for e in budget_events) == 7
    fractions = [e.fraction for e in budget_events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_the_search_stops_at_its_evaluation_count_and_resolution(noisy, runtime_factory):
    source, context, _ = noisy
    assert len(optimize(source, _recipe(max_evaluations=3), context, runtime_factory, "v", accuracy_budget=2.0).searches[0].probes) == 3
    coarse = optimize(source, _recipe(max_evaluations=20, resolution=0.3), context, runtime_factory, "v", accuracy_budget=2.0)
    assert len(coarse.searches[0].probes) == 4  # ends, then brackets of 0.5 and 0.25


def test_an_aggressive_end_within_the_budget_takes_one_evaluation(noisy, runtime_factory):
    source, context, _ = noisy
    result = optimize(source, _recipe(aggressive=0.01), context, runtime_factory, "v", accuracy_budget=5.0)
    assert NoisePass.runs == [0.01] and result.searches[0].value == 0.01


def test_a_budget_no_setting_meets_is_refused_with_the_best_reached(noisy, runtime_factory):
    source, context, _ = noisy
    recipe = _recipe(gentle=0.5, aggressive=1.0)
    with pytest.raises(OptimizerError) as info:
        optimize(source, recipe, context, runtime_factory, "v", accuracy_budget=0.5)
    message = str(info.value)
    assert NoisePass.runs == [1.0, 0.5]  # both ends over: no bisection
    assert message.startswith("v: test-noise cannot stay within the budget of 0.5 points: the best it reached, at ratio=0.5, loses ")
    assert "points of accuracy (accuracy " in message and "ratio tried: 0.5 (" in message and ", 1 (" in message
    assert "2 evaluations in " in message and message.endswith("or pass --keep-over-budget to register the best reached)")
    kept = optimize(source, recipe, context, runtime_factory, "v", accuracy_budget=0.5, register_over_budget=True)
    assert kept.within_budget is False and kept.searches[0].value == 0.5
    assert kept.report[1]["within_budget"] is False and kept.report[1]["budget_setting"] == "test-noise ratio=0.5"
    assert kept.evaluation.quality_drop > 0.5


def test_max_drop_overrides_the_job_budget_for_its_pass(noisy, runtime_factory):
    source, context, _ = noisy
    tight = optimize(source, _recipe(max_evaluations=4), context, runtime_factory, "v", accuracy_budget=2.0)
    loose = recipe_from_dict({"passes": [{"pass": "test-noise", "max_drop": 30, "budget": {"max_evaluations": 4}}]}, "r.json")
    result = optimize(source, loose, context, runtime_factory, "v")  # max_drop alone holds the pass to a budget
    assert result.searches[0].budget == 30 and result.searches[0].value > tight.searches[0].value
    assert result.report[1]["budget_pt"] == 30
    with pytest.raises(OptimizerError, match="over the budget of 2 \\(test-noise ratio="):  # the job's budget still holds the variant
        optimize(source, loose, context, runtime_factory, "v", accuracy_budget=2.0)


def test_a_probe_that_fails_counts_as_over_and_is_reported(noisy, runtime_factory, monkeypatch):
    source, context, _ = noisy
    run = NoisePass.run

    def refuse_above_half(self, artifact, context):
        if self.config.ratio > 0.5:
            NoisePass.runs.append(self.config.ratio)
            raise OptimizerError("test-noise removed everything")
        return run(self, artifact, context)

    monkeypatch.setattr(NoisePass, "run", refuse_above_half)
    result = optimize(source, _recipe(max_evaluations=4), context, runtime_factory, "v", accuracy_budget=2.0)
    probes = result.searches[0].probes
    assert probes[0].value == 1.0 and probes[0].drop is None and probes[0].error == "test-noise removed everything"
    assert result.searches[0].within and result.searches[0].value <= 0.5
    with pytest.raises(OptimizerError, match=r"ratio tried: 0\.5 \(\d+\.\d\d pt\), 1 \(failed: test-noise removed everything\)"):
        optimize(source, _recipe(gentle=0.5), context, runtime_factory, "v", accuracy_budget=0.1)


def test_a_probe_starts_only_when_it_fits_the_time_limit(noisy, runtime_factory, monkeypatch):
    source, context, events = noisy
    run = NoisePass.run

    def slow(self, artifact, context):
        time.sleep(0.4)
        return run(self, artifact, context)

    monkeypatch.setattr(NoisePass, "run", slow)
    result = optimize(source, _recipe(max_evaluations=6, max_seconds=1.0), context, runtime_factory, "v", accuracy_budget=2.0)
    (search,) = result.searches
    assert len(search.probes) == 2 and search.seconds < 1.0  # a third probe of 0.4 s would have ended after the limit
    messages = [e.message for e in events if e.stage == "test-noise budget"]
    assert any(re.match(r"no more probes: one takes up to 0\.\d s and the search's 1 s would be over", m) for m in messages), messages
    assert any(m.startswith("probe 2/6: ratio 0; ") and m.endswith(" s of the search left") for m in messages), messages


@dataclass(frozen=True)
class TrainingNoiseConfig(PassConfig):
    ratio: float = 0.5
    finetune: FineTuneConfig = finetune_field(epochs=3)


class TrainingNoisePass(NoisePass):
    """test-noise as a training pass: fine-tuning on under a guard (slimserve.optimizer.finetune.guard) halves its noise."""

    config_cls = TrainingNoiseConfig
    guarded: ClassVar[list[bool]] = []

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        from slimserve.optimizer.finetune.guard import current_guard

        TrainingNoisePass.guarded.append(current_guard() is not None)
        ratio = self.config.ratio / 2 if self.guarded[-1] else self.config.ratio  # type: ignore[attr-defined]
        return NoisePass(NoiseConfig(ratio=ratio)).run(artifact, context)


def test_a_probe_at_the_pass_epochs_fine_tunes_on_under_the_guard_and_is_the_final_run(noisy, runtime_factory, monkeypatch):
    source, context, _ = noisy
    add_pass(monkeypatch, TrainingNoisePass, "test-noise")
    TrainingNoisePass.guarded = []
    result = optimize(source, _recipe(max_evaluations=3), context, runtime_factory, "v", accuracy_budget=2.0)
    assert TrainingNoisePass.guarded == [True, True, True]  # every probe ran as the final run would, and none ran again
    assert NoisePass.runs == [0.5, 0.0, 0.25]  # ratios 1.0, 0.0 and 0.5 asked for, each fine-tuned on under the guard
    short = optimize(source, _recipe(max_evaluations=3, probe_epochs=1), context, runtime_factory, "v", accuracy_budget=2.0)
    assert TrainingNoisePass.guarded[3:] == [False, False, False, True]  # shortened probes without the guard, then the final run
    assert short.searches[0].value <= result.searches[0].value


def test_a_max_drop_without_evaluation_data_is_refused_before_any_work(tmp_path):
    from slimserve.optimizer.pipeline import preflight

    recipe = recipe_from_dict({"passes": [{"pass": "prune-weight", "max_drop": 1}]}, "r.json")
    with pytest.raises(OptimizerError, match=r"a pass's max_drop holds quality within a budget.*--data EVAL\.npz"):
        preflight(recipe, {"train": save_npz(tmp_path / "t.npz", x=X, labels=np.zeros(len(X), np.int64))})


def test_the_search_stops_when_the_job_is_cancelled(noisy, runtime_factory):
    source, context, _ = noisy
    context.cancelled = lambda: len(NoisePass.runs) >= 2
    with pytest.raises(OptimizerError, match="cancelled during the budget search"):
        optimize(source, _recipe(), context, runtime_factory, "v", accuracy_budget=2.0)
    assert NoisePass.runs == [1.0, 0.0]


def test_budget_settings_are_checked_where_the_recipe_is_read():
    with pytest.raises(OptimizerError, match="passes\\[0\\] budget: unknown setting 'probes'"):
        recipe_from_dict({"passes": [{"pass": "prune-weight", "budget": {"probes": 3}}]}, "r.json")
    with pytest.raises(OptimizerError, match="max_drop' must be a number"):
        recipe_from_dict({"passes": [{"pass": "prune-weight", "max_drop": "1pt"}]}, "r.json")
    with pytest.raises(OptimizerError, match="max_evaluations must be at least 2"):
        recipe_from_dict({"passes": [{"pass": "prune-weight", "budget": {"max_evaluations": 1}}]}, "r.json")
    recipe = recipe_from_dict({"passes": [{"pass": "prune-weight", "max_drop": 0.5}, {"pass": "graph-ort"}]}, "r.json")
    assert recipe.budget(0) == BudgetOptions(max_drop=0.5) and recipe.budget(1) == BudgetOptions()
    assert recipe_from_dict(recipe.to_dict(), "again.json").budgets == recipe.budgets  # saved and read back
    for name, field in (("prune-weight", "sparsity"), ("prune-gradual", "sparsity"), ("prune-structured", "pruning_ratio")):
        assert make_pass(name).budget_knob.field == field  # type: ignore[attr-defined]
    assert make_pass("distill-soft").budget_knob.applies(make_pass("distill-soft", {"student": "s.pt2"}).config) is False  # type: ignore[attr-defined]


# --- fine-tuning that goes on while over the budget ------------------------------------------------------


class Drops:
    """A guard whose drop follows a script, one value per call."""

    def __init__(self, drops: list[float], budget: float = 1.0, extra_epochs: int = 5) -> None:
        self.drops, self.budget, self.extra_epochs, self.extra_seconds, self.calls = list(drops), budget, extra_epochs, 60.0, 0

    def drop(self, model, dtypes) -> float:
        self.calls += 1
        return self.drops.pop(0)


def _tiny_run(guard) -> tuple[list, list[ProgressEvent]]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    events: list[ProgressEvent] = []
    context = PassContext(workdir=None, progress=events.append)  # type: ignore[arg-type]
    config = FineTuneConfig(epochs=2, batch_size=16)
    with guarding(guard):
        results = fine_tune_(model, TrainData([x], x.argmax(1)[:, None].ravel() % 3), config, context, "t")
    return results, events


def test_fine_tuning_goes_on_while_over_the_budget_and_improving():
    results, events = _tiny_run(Drops([3.0, 2.5, 1.8, 0.9, 0.5]))
    assert len(results) == 2 + 3  # three extra epochs: within the budget after the third
    assert events[-1].message == "fine-tuning stopped: within the budget after 3 extra epoch(s); kept 0.90 pt"


def test_fine_tuning_stops_when_an_extra_epoch_does_not_improve_and_keeps_the_best():
    guard = Drops([3.0, 2.0, 2.4])
    results, events = _tiny_run(guard)
    assert len(results) == 4 and guard.calls == 3
    assert events[-1].message == "fine-tuning stopped: extra epoch 2 did not improve (2.40 pt against 2.00); kept 2.00 pt"


def test_fine_tuning_within_the_budget_or_unguarded_adds_nothing():
    assert len(_tiny_run(Drops([0.5]))[0]) == 2
    assert len(_tiny_run(None)[0]) == 2
    assert len(_tiny_run(Drops([3.0, 2.0, 1.5], extra_epochs=2))[0]) == 4  # the guard's epoch limit


# --- real passes on a real task: an MLP on scikit-learn's digits ---------------------------------------------


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    """A 64 -> 32 -> 10 MLP trained on the digits (about 96% on the test split), as .pt2 with train and evaluation data."""
    from slimserve.optimizer.zoo import load_digits_splits
    from tests.optimizer.tiny_models import build

    train, test = load_digits_splits()
    x_train, x_test = train.x.reshape(len(train.x), -1), test.x.reshape(len(test.x), -1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x_train)), torch.from_numpy(train.y)).backward()
        opt.step()
    root = tmp_path_factory.mktemp("digits-mlp")
    tiny = build(model, x_train, train.y, root, "mlp")
    return tiny.pt2, {"train": tiny.train, "data": save_npz(root / "eval.npz", x=x_test, labels=test.y)}


@pytest.mark.slow
def test_prune_weight_at_90_percent_breaks_the_budget_and_the_search_lands_lower(digits_mlp, runtime_factory, tmp_path):
    source, datasets = digits_mlp
    entry = {"pass": "prune-weight", "config": {"finetune": {"epochs": 1}}, "budget": {"max_evaluations": 3}}
    events: list[ProgressEvent] = []
    context = PassContext(workdir=tmp_path, datasets=datasets, progress=events.append)
    result = optimize(source, recipe_from_dict({"passes": [entry]}, "r.json"), context, runtime_factory, "pw", accuracy_budget=1.0)
    (search,) = result.searches
    aggressive = search.probes[0]
    assert aggressive.value == 0.95 and aggressive.drop > 1.0  # 95% of the weights gone: far over a 1-point budget
    assert search.within and 0.3 <= search.value < 0.95 and result.evaluation.quality_drop <= 1.0
    assert result.report[1]["sparsity_pct"] >= 100 * search.value - 2  # the zeros are in the served file
    assert any(e.stage == "prune-weight budget" and e.message.startswith("probe 3/3") for e in events)


@pytest.mark.slow
def test_a_real_pass_fine_tunes_on_while_over_the_budget(digits_mlp, runtime_factory, tmp_path):
    source, datasets = digits_mlp
    entry = {"pass": "prune-weight", "config": {"sparsity": 0.6, "finetune": {"epochs": 1, "lr": 2e-4}}, "budget": {"search": False}}
    events: list[ProgressEvent] = []
    context = PassContext(workdir=tmp_path, datasets=datasets, progress=events.append)
    recipe = recipe_from_dict({"passes": [entry]}, "r.json")
    result = optimize(source, recipe, context, runtime_factory, "pw", accuracy_budget=0.5, register_over_budget=True)
    extra = [e.message for e in events if e.message.startswith("over the budget: extra epoch")]
    assert extra, [e.message for e in events]  # one epoch at a low LR leaves 60% sparsity over the budget: training went on
    assert result.searches[0].setting == "sparsity=0.6" and not result.searches[0].probes
    assert any(e.message.startswith("fine-tuning stopped: ") for e in events)


# --- probes train as the final run does -------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs_mlp(tmp_path_factory):
    """A 16 -> 32 -> 4 MLP on a linear 4-class task (about 86% on 200 held-out rows), as .pt2 with train and evaluation data."""
    from tests.optimizer.tiny_models import build

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    y = (x @ rng.standard_normal((16, 4)).astype(np.float32)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x[:400])), torch.from_numpy(y[:400])).backward()
        opt.step()
    root = tmp_path_factory.mktemp("blobs-mlp")
    tiny = build(model, x[:400], y[:400], root, "mlp")
    return tiny.pt2, {"train": tiny.train, "data": save_npz(root / "eval.npz", x=x[400:], labels=y[400:])}


@pytest.mark.slow
def test_a_probe_trains_as_the_full_run_so_its_verdict_is_the_full_runs(blobs_mlp, runtime_factory, tmp_path):
    """Six epochs bring 70% sparsity within 10 points, one does not: a probe judges a setting as its full run would."""
    source, datasets = blobs_mlp
    config = {"sparsity": 0.7, "finetune": {"epochs": 6, "lr": 1e-2, "batch_size": 32, "schedule": "constant", "augment": {"kind": "none"}}}

    def run(name: str, budget: dict | None, accuracy_budget: float | None = None):
        entry = {"pass": "prune-weight", "config": config} | ({"budget": budget} if budget is not None else {})
        context = PassContext(workdir=tmp_path / name, datasets=datasets)
        recipe = recipe_from_dict({"passes": [entry]}, "r.json")
        return optimize(source, recipe, context, runtime_factory, name, accuracy_budget, register_over_budget=True)

    full = run("full", None).evaluation.quality_drop
    assert full <= 10.0
    searched = run("probes", {"gentle": 0.7, "aggressive": 0.9, "max_evaluations": 2}, 10.0).searches[0]
    high, low = searched.probes
    assert (high.value, low.value) == (0.9, 0.7) and high.drop > 10.0
    assert low.drop == pytest.approx(full) and searched.within and searched.value == 0.7  # the probe is the full run
    short = run("short", {"gentle": 0.7, "aggressive": 0.9, "max_evaluations": 2, "probe_epochs": 1}, 10.0).searches[0]
    assert short.probes[1].value == 0.7 and short.probes[1].drop > 10.0  # one epoch is not enough: the old verdict was "over"


def test_the_final_measure_reuses_the_outputs_the_search_scored(noisy, runtime_factory, monkeypatch):
    """Quality is measured once per variant: the evaluation data runs through the chosen variant once, in the search."""
    from slimserve.optimizer.evaluation import measure as measure_module
    from slimserve.optimizer.search import budget as budget_module

    runs: list[str] = []
    real = measure_module.run_in_batches

    def counting(predictor, feeds, batch):
        runs.append(str(getattr(predictor, "path", "")))
        return real(predictor, feeds, batch)

    monkeypatch.setattr(measure_module, "run_in_batches", counting)
    monkeypatch.setattr(budget_module, "run_in_batches", counting)
    source, context, _ = noisy
    result = optimize(source, _recipe(aggressive=0.01), context, runtime_factory, "v", accuracy_budget=5.0)
    assert runs.count(str(result.artifact.path)) == 1 and result.evaluation.quality_drop is not None
