"""A lossy pass held to an accuracy budget: the bisection for its most aggressive ratio within the budget, and the guard that keeps fine-tuning while it is over.

A ratio-controlled pass declares its `budget_knob` (a config field with a gentle and an aggressive end:
prune-weight's sparsity, prune-structured's pruning_ratio, a distillation student's width). With a budget the
pipeline runs it through `run_within_budget`: probes (the pass at one setting, trained as the final run would be
unless `probe_epochs` says otherwise, then its quality on the evaluation data by slimserve.optimizer.evaluation.quality's metric)
bisect between the two ends, as NNCF's accuracy-aware training and INC's tolerable loss do, within an evaluation
count and a time limit. A probe at the pass's own epochs is the final run: `Guard` lets its fine-tuning continue
(slimserve.optimizer.finetune.loop) while it is over the budget and still improving, so its verdict is what the final run would
reach; with shorter probes the chosen setting is trained again in full, under the guard. A pass without a knob
(QAT) gets the guard alone.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimserve.optimizer.base import (
    Artifact,
    ConfigValueError,
    Knob,
    OptimizerError,
    Pass,
    PassConfig,
    PassContext,
    ProgressEvent,
    RuntimeFactory,
    setting,
)
from slimserve.optimizer.evaluation.measure import Evaluation, Outputs, model_inputs, run_in_batches, score
from slimserve.optimizer.evaluation.quality import Quality, describe
from slimserve.optimizer.finetune.guard import guarding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetOptions(PassConfig):
    """A recipe entry's budget settings: `"budget": {...}` beside `pass` and `config` (`"max_drop"` may also stand alone).

    max_drop: this pass's budget in points of the quality metric (None: the job's --accuracy-budget).
    search: bisect the pass's knob (false: keep the configured setting, fine-tune while over the budget).
    gentle, aggressive: the search's ends (None: the pass's own). max_evaluations: probes at most;
    max_seconds: the search's time limit (a probe starts only when one more, as long as the slowest so far, still
    fits). probe_epochs: fine-tuning epochs of a probe (None: the pass's own, so that a probe's verdict is the full
    run's: one-epoch probes judged a ResNet's gentle end over a budget its full run met). resolution: stop
    when the bracket is this narrow. extra_epochs, extra_seconds: how long fine-tuning of the chosen
    setting may continue while it is over the budget and improving.
    """

    max_drop: float | None = setting(None, "this pass's budget in points of the quality metric (null: the job's --accuracy-budget)")
    search: bool = setting(True, "bisect the pass's knob (false: keep the configured setting, fine-tune while over the budget)")
    gentle: float | None = setting(None, "the search's gentle end (null: the pass's own)")
    aggressive: float | None = setting(None, "the search's aggressive end (null: the pass's own)")
    max_evaluations: int = setting(6, "probes at most")
    max_seconds: float = setting(900.0, "the search's time limit")
    probe_epochs: int | None = setting(None, "fine-tuning epochs of a probe (null: the pass's own)")
    resolution: float = setting(0.02, "stop when the bracket is this narrow")
    extra_epochs: int = setting(3, "epochs fine-tuning of the chosen setting may continue while over the budget and improving")
    extra_seconds: float = setting(300.0, "seconds fine-tuning of the chosen setting may continue while over the budget and improving")

    def __post_init__(self) -> None:
        for name in ("max_drop", "gentle", "aggressive"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigValueError(f"budget {name} must be a number >= 0, got {value!r}")
        if self.max_evaluations < 2:
            raise ConfigValueError(f"budget max_evaluations must be at least 2 (both ends), got {self.max_evaluations}")
        if (self.probe_epochs is not None and self.probe_epochs < 1) or self.extra_epochs < 0:
            raise ConfigValueError(f"budget probe_epochs must be >= 1 and extra_epochs >= 0, got {self.probe_epochs}, {self.extra_epochs}")
        if self.max_seconds <= 0 or self.extra_seconds < 0 or self.resolution <= 0:
            raise ConfigValueError("budget max_seconds and resolution must be positive and extra_seconds >= 0")


# ---------------------------------------------------------------------------------------------
# Scoring against the baseline


@dataclass
class Judge:
    """Scores a model against the baseline on the evaluation data by the baseline's metric: an artifact on its runtime, or a torch module."""

    runtime_factory: RuntimeFactory
    data: dict[str, np.ndarray]
    baseline: Evaluation
    baseline_outputs: Outputs | None
    input_names: tuple[str, ...]
    serving_batch: int = 32
    evaluations: int = 0  # every scoring, probes and guard alike
    evaluator: Any = None  # slimserve.optimizer.evaluation.evaluators.Evaluator, scored beside the outputs
    last: tuple[Any, Outputs] | None = None  # the last artifact's path and outputs, so that its final measure reuses them

    def _measure(self, outputs: Outputs) -> Quality:
        """The quality the budget holds: the worst of every output's drop (by the baseline's metrics) and the evaluator's."""
        self.evaluations += 1
        return score(Evaluation(), outputs, self.data, self.baseline, self.baseline_outputs, evaluator=self.evaluator)

    def artifact(self, artifact: Artifact) -> Quality:
        predictor = self.runtime_factory(artifact.path, artifact.runtime)
        try:
            outputs = run_in_batches(predictor, model_inputs(predictor, self.data), self.serving_batch)
        finally:
            unload = getattr(predictor, "unload", None)
            if callable(unload):
                unload()
        self.last = (artifact.path, outputs)
        return self._measure(outputs)

    def module(self, module: Any, dtypes: list[np.dtype]) -> Quality:
        import torch

        arrays = {k: v for k, v in self.data.items() if k != "labels"}
        names = list(self.input_names) or list(arrays)
        if len(names) == 1 and names[0] not in arrays and len(arrays) == 1:
            names = list(arrays)  # one input, one array: the names need not match (as evaluation reads it)
        inputs = [arrays[n].astype(d, copy=False) for n, d in zip(names, dtypes)]
        was_training = module.training
        module.eval()
        output_names = list(self.baseline_outputs or {})
        chunks: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for start in range(0, len(inputs[0]), 256):
                out = module(*(torch.from_numpy(np.ascontiguousarray(x[start : start + 256])) for x in inputs))
                for name, tensor in zip(output_names, tensors_of(out)):
                    chunks.setdefault(name, []).append(tensor.detach().numpy())
        module.train(was_training)
        return self._measure({name: np.concatenate(parts, axis=0) for name, parts in chunks.items()})


def tensors_of(value: Any) -> list[Any]:
    """A torch model's outputs in order: a tensor, or the tensors of a tuple / list / dict (nested ones flattened)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


@dataclass
class Guard:
    """What slimserve.optimizer.finetune.loop asks while a pass is held to a budget: the torch model's drop, the budget, how long to go on."""

    judge: Judge
    budget: float
    extra_epochs: int
    extra_seconds: float

    def drop(self, model: Any, dtypes: list[np.dtype]) -> float | None:
        try:
            return self.judge.module(model, dtypes).drop
        except Exception as e:  # a model that cannot run outside its training graph (a QAT program) is judged after export only
            log.warning("the budget guard cannot score the model in torch (%s: %s); fine-tuning does not continue", type(e).__name__, e)
            return None


# ---------------------------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class Probe:
    value: float
    drop: float | None  # None: the probe failed (`error`)
    quality: float | None
    seconds: float
    error: str = ""


@dataclass(frozen=True)
class SearchResult:
    """What a pass held to a budget reached: the setting kept, its quality and drop, and what finding it cost."""

    pass_name: str
    field: str  # the knob's field; empty for a pass without one
    value: float | None  # the setting kept
    budget: float
    metric: str
    quality: float | None
    drop: float | None
    within: bool
    evaluations: int
    seconds: float
    probes: tuple[Probe, ...] = ()

    @property
    def setting(self) -> str:
        return f"{self.field}={self.value:.4g}" if self.field and self.value is not None else "as configured"

    def summary(self) -> str:
        """'prune-structured pruning_ratio=0.45: 5 evaluations, 31.2 s'"""
        searched = f", {len(self.probes)} probes" if self.probes else ""
        return f"{self.pass_name} {self.setting}: {self.evaluations} evaluations{searched}, {self.seconds:.1f} s"

    def tried(self, errors: bool = False) -> str:
        """'0.2 (0.00 pt), 0.5 (1.50 pt), 0.8 (failed)': every setting probed, in order of the setting, with its drop."""
        return ", ".join(
            f"{p.value:.4g} ({('failed: ' + p.error if errors else 'failed') if p.drop is None else f'{p.drop:.2f} pt'})"
            for p in sorted(self.probes, key=lambda p: p.value)
        )

    def refusal(self, variant_name: str) -> str:
        """The report of a pass that could not meet its budget: the best it reached, and what was tried."""
        tried = self.tried(errors=True)
        reached = (
            "nothing measurable"
            if self.drop is None
            else f"{self.drop:.2f} points of {self.metric} ({describe(self.metric, self.quality)})"
        )
        return (
            f"{variant_name}: {self.pass_name} cannot stay within the budget of {self.budget:g} points: the best it reached, at "
            f"{self.setting}, loses {reached}"
            + (f"; {self.field} tried: {tried}" if tried else "")
            + f"; {self.evaluations} evaluations in {self.seconds:.1f} s; nothing was registered (raise the budget or max_drop, "
            "or pass --keep-over-budget to register the best reached)"
        )


def _with(pass_: Pass, where: str, **changes: Any) -> Pass:
    """The pass with some config fields changed (a probe's setting, its shorter fine-tuning)."""
    try:
        config = dataclasses.replace(pass_.config, **changes)
    except (TypeError, ValueError) as e:
        raise OptimizerError(f"{pass_.name}: {where}: {e}") from e
    return type(pass_)(config)


def _epochs(config: PassConfig) -> int | None:
    finetune = getattr(config, "finetune", None)
    return getattr(finetune, "epochs", None)


def run_within_budget(
    pass_: Pass, options: BudgetOptions, artifact: Artifact, context: PassContext, judge: Judge, budget: float
) -> tuple[Artifact, SearchResult]:
    """Runs `pass_` held to `budget` points: searches its knob when it has one, fine-tunes while over; returns the artifact kept."""
    start, first_evaluation = time.monotonic(), judge.evaluations
    metric = judge.baseline.quality_metric or "accuracy"
    knob: Knob | None = getattr(pass_, "budget_knob", None)
    guard = Guard(judge, budget, options.extra_epochs, options.extra_seconds)

    def result(value: float | None, quality: Quality, probes: list[Probe]) -> SearchResult:
        within = quality.drop is not None and quality.drop <= budget + 1e-9
        return SearchResult(
            pass_.name,
            knob.field if knob is not None else "",
            value,
            budget,
            metric,
            quality.value,
            quality.drop,
            within,
            judge.evaluations - first_evaluation,
            time.monotonic() - start,
            tuple(probes),
        )

    def say(fraction: float, message: str) -> None:
        context.progress(ProgressEvent(stage=f"{pass_.name} budget", fraction=min(1.0, fraction), message=message))

    if knob is None or not options.search or not knob.applies(pass_.config):
        with guarding(guard):
            out = pass_.run(artifact, context)
        quality = judge.artifact(out)
        value = None if knob is None else getattr(pass_.config, knob.field)
        return out, result(value, quality, [])

    gentle = knob.gentle if options.gentle is None else options.gentle
    aggressive = knob.aggressive if options.aggressive is None else options.aggressive
    full_epochs = _epochs(pass_.config)
    probe_epochs = full_epochs if options.probe_epochs is None or full_epochs is None else min(options.probe_epochs, full_epochs)
    full_probe = probe_epochs == full_epochs  # also a pass without fine-tuning epochs: nothing to shorten
    epochs_said = (
        ""
        if probe_epochs is None
        else f", {probe_epochs} epoch(s) of fine-tuning" + ("" if probe_epochs == full_epochs else f" (the final run: {full_epochs})")
    )
    slots = options.max_evaluations + 1  # the probes and the final run, for the progress bar
    probes: list[Probe] = []
    kept: dict[float, Artifact] = {}

    def probe(value: float) -> Probe:
        if context.cancelled():
            raise OptimizerError(f"{pass_.name}: the job was cancelled during the budget search")
        n = len(probes)
        left = options.max_seconds - (time.monotonic() - start)
        say(n / slots, f"probe {n + 1}/{options.max_evaluations}: {knob.field} {value:.4g}{epochs_said}; {left:.0f} s of the search left")
        changes: dict[str, Any] = {knob.field: value}
        if not full_probe:  # a shortened probe: the pass has fine-tuning epochs and the probe trains fewer
            changes["finetune"] = dataclasses.replace(pass_.config.finetune, epochs=probe_epochs)  # type: ignore[attr-defined]
        t0 = time.monotonic()

        def relay(event: ProgressEvent) -> None:
            context.progress(
                dataclasses.replace(
                    event, fraction=(n + event.fraction) / slots, message=f"probe {n + 1} ({knob.field} {value:.4g}): {event.message}"
                )
            )

        sub = dataclasses.replace(context, workdir=context.workdir / f"{pass_.name}-probe-{n + 1}", progress=relay)
        try:
            # A probe at the pass's own epochs is the final run, fine-tuning on while over the budget included (one without it
            # judged a ResNet's gentle end over a budget its final run met); shortened probes compare settings at equal training.
            with guarding(guard if full_probe else None):
                out = _with(pass_, f"{knob.field} {value:.4g}", **changes).run(artifact, sub)
            quality = judge.artifact(out)
        except OptimizerError as e:
            if context.cancelled():
                raise
            p = Probe(value, None, None, time.monotonic() - t0, str(e))
        else:
            p = Probe(value, quality.drop, quality.value, time.monotonic() - t0)
            kept[value] = out
        probes.append(p)
        verdict = "failed" if p.drop is None else f"loses {p.drop:.2f} pt ({'within' if ok(p) else 'over'} {budget:g})"
        say((n + 1) / slots, f"probe {n + 1}: {knob.field} {value:.4g} {verdict} in {p.seconds:.1f} s")
        return p

    def ok(p: Probe) -> bool:
        return p.drop is not None and p.drop <= budget + 1e-9

    def may_probe() -> bool:
        # One more probe only when it fits: as long as the slowest so far, it must end within max_seconds.
        slowest = max((p.seconds for p in probes), default=0.0)
        fits = time.monotonic() - start + slowest <= options.max_seconds
        if len(probes) < options.max_evaluations and not fits:
            say(
                len(probes) / slots,
                f"no more probes: one takes up to {slowest:.1f} s and the search's {options.max_seconds:g} s would be over",
            )
        return len(probes) < options.max_evaluations and fits

    best_ok: Probe | None = None
    if ok(high := probe(aggressive)):
        best_ok = high
    elif may_probe() and ok(low := probe(gentle)):
        best_ok = low
        lo, hi = gentle, aggressive  # lo meets the budget, hi does not
        while may_probe() and abs(hi - lo) > options.resolution:
            mid = probe((lo + hi) / 2)
            if ok(mid):
                lo, best_ok = mid.value, mid
            else:
                hi = mid.value
    measured = [p for p in probes if p.drop is not None]
    chosen = best_ok or (min(measured, key=lambda p: p.drop) if measured else None)  # type: ignore[arg-type,return-value]
    if chosen is None:
        raise OptimizerError(
            f"{pass_.name}: no setting of {knob.field} could be tried: " + "; ".join(f"{p.value:.4g}: {p.error}" for p in probes)
        )
    for value, out in kept.items():  # rejected probes' files go now: a search must not fill the disk
        if value != chosen.value:
            shutil.rmtree(out.path.parent, ignore_errors=True)

    out, quality = kept[chosen.value], Quality(metric, chosen.quality, chosen.drop)
    # The chosen setting trains again only when its probe trained less than the final run (and without the guard).
    if not full_probe:
        say(len(probes) / slots, f"training {knob.field} {chosen.value:.4g} in full ({full_epochs} epochs)")
        done = len(probes) / slots

        def relay_final(event: ProgressEvent) -> None:  # the final run fills what is left of the bar after the probes
            context.progress(dataclasses.replace(event, fraction=done + (1 - done) * event.fraction * 0.99))

        final_context = dataclasses.replace(context, workdir=context.workdir / f"{pass_.name}-final", progress=relay_final)
        with guarding(guard):
            final = _with(pass_, f"{knob.field} {chosen.value:.4g}", **{knob.field: chosen.value}).run(artifact, final_context)
        final_quality = judge.artifact(final)
        if final_quality.drop is not None and (quality.drop is None or final_quality.drop <= quality.drop):
            out, quality = final, final_quality
    searched = result(chosen.value, quality, probes)
    say(1.0, f"{searched.summary()}; loses {quality.drop:.2f} pt ({'within' if searched.within else 'over'} {budget:g})")
    return out, searched


def budget_columns(searches: list[SearchResult]) -> dict[str, Any]:
    """The report's budget columns of a variant from the searches of its passes (slimserve.optimizer.report)."""
    if not searches:
        return {}
    return {
        "budget_pt": min(s.budget for s in searches),
        "within_budget": all(s.within for s in searches),
        "budget_setting": "; ".join(f"{s.pass_name} {s.setting}" for s in searches),
        "budget_evaluations": sum(s.evaluations for s in searches),
        "budget_search_s": round(sum(s.seconds for s in searches), 1),
        "budget_probes": "; ".join(s.tried() for s in searches if s.probes) or None,
    }
