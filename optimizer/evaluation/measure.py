"""Measures one variant: parameters, bytes, FLOPs, latency and throughput on its serving runtime, accuracy, agreement.

Every variant of a model is measured by `evaluate` the same way, on the runtime that will serve it
(the caller passes a RuntimeFactory), so that the numbers of a report compare like with like.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from slimserve.client.datatypes import DATATYPE_TO_NUMPY
from slimserve.optimizer.base import (
    Artifact,
    OptimizerError,
    Predictor,
    ProgressEvent,
    RuntimeFactory,
)
from slimserve.optimizer.counting.model_file import artifact_size, count_flops, count_params, load_model
from slimserve.optimizer.data import take
from slimserve.optimizer.evaluation.quality import (
    Quality,
    choose_metrics,
    cosine_per_sample,
    labelled_output,
    measure,
    measure_outputs,
    worst,
)
from slimserve.optimizer.evaluation.timing import Feeds, Ratio, TimingOptions, interleaved_ratio, percentiles_ms, time_until_tight
from slimserve.optimizer.formats.sequence_axis import MASK_NAME, SEQUENCE_NAMES, kept_length, trailing_lengths

if TYPE_CHECKING:
    from slimserve.optimizer.evaluation.evaluators import Evaluator

log = logging.getLogger(__name__)

# The outputs of a model on the evaluation data, by output name (what variants are compared with).
Outputs = dict[str, np.ndarray]

# Size given to a variable dimension other than the batch when inputs are synthesized.
SYNTHETIC_DIM = 8
# Samples synthesized when no data is given (at least the serving batch).
SYNTHETIC_SAMPLES = 64
# Evaluation rows a text model is timed on at their real lengths (served_calls), taken in turn.
SERVED_ROWS = 256


@dataclass
class Evaluation:
    """The measures of one variant; None where a measure does not apply or could not be taken.

    The field names are a contract: the server copies params, nonzero_params, flops,
    latency_p50_ms, latency_p99_ms, throughput, accuracy and accuracy_delta into its records.
    """

    params: int | None = None
    nonzero_params: int | None = None
    size_bytes: int | None = None
    flops: float | None = None  # per sample, 2 x multiply-accumulates, as torch.utils.flop_counter counts
    latency_p50_ms: float | None = None  # batch 1 (or the batch a model is fixed to)
    latency_p99_ms: float | None = None
    serving_batch: int | None = None
    latency_p50_ms_batch: float | None = None  # at serving_batch
    latency_p99_ms_batch: float | None = None
    throughput: float | None = None  # samples / s at serving_batch
    accuracy: float | None = None  # top-1 in [0, 1]; None without labels
    accuracy_delta: float | None = None  # percentage points against the baseline
    agreement: float | None = None  # top-1 agreement with the baseline (logits), or mean cosine similarity (embeddings)
    # The quality the accuracy budget holds (optimizer.quality): metric name, value, worst sample, points lost. For a
    # variant, those of the output (or evaluator) that lost most; for the baseline, those of its main output.
    quality_metric: str | None = None  # accuracy | top1-agreement | cosine | relative-error | evaluator:NAME
    quality: float | None = None
    quality_min: float | None = None  # lowest per-sample cosine similarity (cosine only)
    quality_drop: float | None = None  # points lost against the baseline in the budget's unit (negative: better)
    quality_output: str | None = None  # the output (or evaluator:NAME) the quality fields above are of
    # Every output's quality, and the evaluator's: {name: {"metric", "value", "drop", "worst"}}, in the model's output order.
    qualities: dict[str, dict[str, Any]] | None = None
    runtime: str | None = None
    device: str | None = None
    threads: int | None = None  # intra-op threads of the session that was timed (the serving runtime's choice)
    # The speed-up over the FP32 source, timed in turns in the same job (timing.interleaved_ratio): the report's speedup_x.
    speedup_x: float | None = None
    speedup_ci: list[float] | None = None  # its 95% interval [low, high]
    speedup_rounds: int | None = None
    timing_seconds: float | None = None  # what the interleaved timing took
    # A text model timed at its rows' real lengths (served_calls): "N rows at their real lengths, mean M of L positions".
    timed_lengths: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        """Reads a saved evaluation; keys this version does not know are ignored, missing ones are None."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------
# evaluate


def evaluate(
    artifact: Artifact,
    runtime_factory: RuntimeFactory,
    data: dict[str, np.ndarray] | None,
    baseline: Evaluation | None = None,
    baseline_outputs: Outputs | None = None,
    serving_batch: int = 32,
    warmup: int = 20,
    iterations: int = 200,
    progress: Callable[[ProgressEvent], None] | None = None,
    metric: str | None = None,
    declared: dict[str, str] | None = None,
    evaluator: Evaluator | None = None,
    timing: TimingOptions | None = None,
    outputs: Outputs | None = None,
) -> tuple[Evaluation, Outputs | None]:
    """Measures `artifact` on the runtime `runtime_factory` loads for it.

    Returns the evaluation and every output of the model on the data (on synthesized inputs
    when `data` is None), to pass as `baseline_outputs` when the next variants are measured.
    Latency is the wall time of one `predict` call (time.perf_counter) after `warmup` calls, timed until its median is
    known within `timing.rel_ci`, for `timing.max_seconds` at most, and `iterations` calls at most (timing.TimingOptions).
    Quality (`score`): every output by the baseline's metrics, else by `declared` ({output: metric}; `metric`: the main
    output's), else chosen from each output; and by `evaluator` when one is given. `outputs`: the artifact's outputs on
    `data` when a budget search already computed them (the data is not run again).
    """

    def step(fraction: float, message: str) -> None:
        if progress is not None:
            progress(ProgressEvent(stage="evaluate", fraction=fraction, message=message))

    if serving_batch < 1:
        raise OptimizerError(f"serving batch must be at least 1, got {serving_batch}")
    if iterations < 1:
        raise OptimizerError(f"latency needs at least 1 iteration, got {iterations}")
    step(0.0, f"loading {artifact.path.name} on {artifact.runtime}")
    predictor = runtime_factory(artifact.path, artifact.runtime)
    try:
        evaluation = Evaluation(runtime=artifact.runtime, device=str(getattr(predictor, "device", "cpu")))
        threads = getattr(predictor, "intra_op_threads", None)
        evaluation.threads = threads if isinstance(threads, int) and threads > 0 else None
        options = timing or TimingOptions(min_calls=min(5, iterations), max_calls=iterations, warmup_calls=warmup)
        feeds = model_inputs(predictor, data, max(serving_batch, SYNTHETIC_SAMPLES))
        fixed_batch = _fixed_batch(predictor)
        batch = fixed_batch or serving_batch
        evaluation.serving_batch = batch

        step(0.1, "running the evaluation data")
        if outputs is None:
            outputs = run_in_batches(predictor, feeds, batch)
        score(evaluation, outputs, data, baseline, baseline_outputs, metric, declared, evaluator)

        step(0.4, "latency at batch 1")
        one = served_calls(predictor, feeds, 1) or take(feeds, fixed_batch or 1)
        times = time_until_tight(predictor, one, options)
        evaluation.latency_p50_ms, evaluation.latency_p99_ms = percentiles_ms(times)
        evaluation.timed_lengths = timed_lengths(one)
        step(0.7, f"latency at batch {batch}")
        many = served_calls(predictor, feeds, batch) or take(feeds, batch)
        times = times if batch == (fixed_batch or 1) else time_until_tight(predictor, many, options)
        evaluation.latency_p50_ms_batch, evaluation.latency_p99_ms_batch = percentiles_ms(times)
        evaluation.throughput = batch / float(np.median(times))  # the median: a short, capped timing's mean is its outliers

        step(0.9, "parameters and FLOPs")
        evaluation.size_bytes = artifact_size(artifact.path, artifact.format)
        # An exotic graph must not cost the whole evaluation: what cannot be counted stays None.
        try:
            model = load_model(artifact.path, artifact.format)
        except Exception as e:
            model = None
            log.warning("%s: not read as a graph, so neither parameters nor FLOPs are counted: %s", artifact.path.name, e)
        if model is not None:
            try:
                evaluation.params, evaluation.nonzero_params = count_params(model, artifact.format)
            except Exception as e:
                log.warning("%s: parameters not counted: %s", artifact.path.name, e)
            try:
                evaluation.flops = count_flops(model, artifact.format, take(feeds, 1))
            except Exception as e:
                log.warning("%s: FLOPs not counted: %s", artifact.path.name, e)
        step(1.0, "evaluated")
        return evaluation, outputs
    finally:
        unload = getattr(predictor, "unload", None)
        if callable(unload):
            unload()


def quality_plan(
    outputs: Outputs, labels: np.ndarray | None, baseline: Evaluation | None, metric: str | None, declared: dict[str, str] | None
) -> dict[str, str]:
    """The metric of each output: the baseline's (variants are scored as it was), else declared / chosen."""
    if baseline is not None and baseline.qualities:
        return {n: q["metric"] for n, q in baseline.qualities.items() if not n.startswith("evaluator:")}
    declared = dict(declared or {})
    if baseline is not None and baseline.quality_metric:  # an evaluation saved before outputs were scored one by one
        metric = metric or baseline.quality_metric
    if metric and outputs:
        main = labelled_output(outputs, labels, declared) if metric == "accuracy" else None
        declared.setdefault(main or next(iter(outputs)), metric)
    return choose_metrics(outputs, labels, declared)


def score(
    evaluation: Evaluation,
    outputs: Outputs,
    data: dict[str, np.ndarray] | None,
    baseline: Evaluation | None,
    baseline_outputs: Outputs | None,
    metric: str | None = None,
    declared: dict[str, str] | None = None,
    evaluator: Evaluator | None = None,
) -> Quality:
    """Scores every output (and the evaluator) into `evaluation`; returns the quality the budget holds (the worst drop)."""
    labels = None if data is None else data.get("labels")
    if baseline_outputs is not None and set(outputs) != set(baseline_outputs) and len(outputs) == len(baseline_outputs):
        outputs = dict(zip(baseline_outputs, outputs.values()))  # the same outputs under other names (a .pt2's output_0): by position
    plan = quality_plan(outputs, labels, baseline, metric, declared)
    before: dict[str, float | None] = {}
    if baseline is not None and baseline.qualities:  # the values a drop is taken from: accuracy's and the evaluator's
        before = {n: q.get("value") for n, q in baseline.qualities.items() if q.get("metric") == "accuracy" or n.startswith("evaluator:")}
    if baseline is not None and not baseline.qualities and plan:  # a baseline saved before outputs were scored one by one
        before = {n: (baseline.accuracy if m == "accuracy" else baseline.quality) for n, m in plan.items()}
    qualities = measure_outputs(plan, outputs, labels, baseline_outputs, before)
    if evaluator is not None:
        qualities[evaluator.key] = evaluator.quality(outputs, data or {}, baseline_outputs, before.get(evaluator.key))
    if not qualities:
        return Quality("", None, None)
    evaluation.qualities = {n: {"metric": q.metric, "value": q.value, "drop": q.drop, "worst": q.worst} for n, q in qualities.items()}
    scored = outputs if baseline_outputs is not None else {}
    main = labelled_output(outputs, labels, {n: m for n, m in plan.items() if m == "accuracy"}) or next(iter(plan), None)
    bound = worst(qualities) if baseline_outputs is not None else (main or next(iter(qualities)))
    quality = qualities[bound]
    evaluation.quality_output = bound
    evaluation.quality_metric, evaluation.quality, evaluation.quality_min = quality.metric, quality.value, quality.worst
    evaluation.quality_drop = quality.drop if baseline is not None else None
    if main is not None and labels is not None and outputs[main].ndim == 2 and outputs[main].shape[1] > 1:
        # accuracy whenever it applies, whatever the budget holds
        evaluation.accuracy = (
            qualities[main].value if plan.get(main) == "accuracy" else measure("accuracy", outputs[main], labels, None, None).value
        )
        if baseline is not None and baseline.accuracy is not None and evaluation.accuracy is not None:
            evaluation.accuracy_delta = (evaluation.accuracy - baseline.accuracy) * 100.0
    if main is not None and main in scored:
        chosen = plan[main]
        if chosen in ("cosine", "top1-agreement"):
            evaluation.agreement = qualities[main].value
        elif chosen == "accuracy":
            evaluation.agreement = agreement(outputs[main], baseline_outputs[main])  # type: ignore[index]
    return quality


def agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Top-1 agreement for classifier logits [N, classes]; otherwise the mean cosine similarity per sample."""
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        return float(np.mean(outputs.argmax(axis=1) == reference.argmax(axis=1)))
    return float(np.mean(cosine_per_sample(outputs, reference)))


# --------------------------------------------------------------------------------------------
# inputs and running


def model_inputs(
    predictor: Predictor, data: dict[str, np.ndarray] | None, synthetic_samples: int = SYNTHETIC_SAMPLES
) -> dict[str, np.ndarray]:
    """The arrays to feed, one per model input, cast to the input's datatype; synthesized when there is no data."""
    specs = list(predictor.inputs)
    if data is None:
        return synthesize_inputs(specs, synthetic_samples)
    arrays = {k: v for k, v in data.items() if k != "labels"}
    feeds = {}
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None and len(specs) == 1 and len(arrays) == 1:
            array = next(iter(arrays.values()))  # one input, one array: the names need not match
        if array is None:
            raise OptimizerError(f"evaluation data has no array for input '{spec.name}' (it holds: {', '.join(sorted(data)) or 'nothing'})")
        dtype = DATATYPE_TO_NUMPY.get(spec.datatype)
        feeds[spec.name] = np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))
    sizes = {len(v) for v in feeds.values()}
    if len(sizes) > 1:
        raise OptimizerError(f"evaluation data: the inputs hold different numbers of samples ({sorted(sizes)})")
    if 0 in sizes:
        raise OptimizerError("evaluation data holds no samples")
    return feeds


def synthesize_inputs(specs: list[Any], samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs from specs: the batch dimension gets `samples`, other variable dimensions SYNTHETIC_DIM."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dims = list(spec.shape)
        shape = [samples if (i == 0 and d < 0) else (SYNTHETIC_DIM if d < 0 else d) for i, d in enumerate(dims)]
        dtype = np.dtype(DATATYPE_TO_NUMPY.get(spec.datatype, np.float32))
        if dtype.kind == "f":
            array = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            array = rng.integers(0, 10, shape).astype(dtype)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, shape).astype(bool)
        else:
            array = np.full(shape, b"a", dtype=object)
        feeds[spec.name] = array
    return feeds


def served_calls(predictor: Predictor, feeds: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]] | None:
    """The calls of `batch` rows a text model runs when served padding-free (server/batching/sequence.py), to be timed in
    turn: each call cut to its rows' longest real length rounded up to BUCKET; at batch 1 the first SERVED_ROWS rows in
    order, at a larger batch rows of similar length together, as the batcher groups them by length.

    None (time the rows as sent) unless the model takes `attention_mask` and the other token inputs (SEQUENCE_NAMES) as
    INT64 `[batch, seq]` with a free `seq` and a free batch, the data's mask is 0/1 trailing padding, and some padding is
    cut. A model exported at a fixed length is rewritten to take any length when the server loads it (its runtime then
    reports a free `seq`), so its FP32 form is timed as served too."""
    specs = {s.name: s for s in predictor.inputs}
    names = [n for n in SEQUENCE_NAMES if n in specs and n in feeds]
    if MASK_NAME not in names or _fixed_batch(predictor) is not None:
        return None
    if any(specs[n].datatype != "INT64" or len(specs[n].shape) != 2 or specs[n].shape[1] != -1 for n in names):
        return None
    mask = feeds[MASK_NAME]
    rows = min(len(mask), max(SERVED_ROWS, batch))
    if mask.ndim != 2 or rows < batch:
        return None
    lengths = trailing_lengths(mask[:rows])
    if lengths is None:
        return None
    full = mask.shape[1]
    order = np.arange(rows) if batch == 1 else np.argsort(lengths, kind="stable")
    calls = []
    for start in range(0, rows - batch + 1, batch):
        picked = order[start : start + batch]
        keep = kept_length(lengths[picked], full)
        calls.append({k: np.ascontiguousarray(v[picked][:, :keep] if k in names else v[picked]) for k, v in feeds.items()})
    if all(call[MASK_NAME].shape[1] == full for call in calls):
        return None
    return calls


def timed_lengths(feeds: Feeds) -> str | None:
    """What served_calls timed, for the report: '64 rows at their real lengths (mean 24.1 positions)'; None for one feed."""
    if not isinstance(feeds, list):
        return None
    positions = [call[MASK_NAME].shape[1] for call in feeds]
    return f"{len(feeds)} calls at their rows' real lengths (mean {np.mean(positions):.1f} positions, rounded up to a multiple of 8)"


def _fixed_batch(predictor: Predictor) -> int | None:
    """The batch size the model is fixed to, or None when its first dimension is variable."""
    first = next(iter(predictor.inputs)).shape if predictor.inputs else ()
    return int(first[0]) if first and first[0] > 0 else None


def run_in_batches(predictor: Predictor, feeds: dict[str, np.ndarray], batch: int) -> Outputs:
    """Every output over all samples, computed `batch` samples at a time (the last batch padded), by output name."""
    n = len(next(iter(feeds.values())))
    chunks: dict[str, list[np.ndarray]] = {}
    skipped: set[str] = set()
    for start in range(0, n, batch):
        part = {k: v[start : start + batch] for k, v in feeds.items()}
        size = len(next(iter(part.values())))
        if size < batch and _fixed_batch(predictor) is not None:
            part = take(part, batch)
        fed = len(next(iter(part.values())))
        result = predictor.predict(part)
        names = [o.name for o in predictor.outputs] if predictor.outputs else list(result)
        for name in names:
            array = np.asarray(result[name])
            if array.ndim == 0 or array.shape[0] != fed:  # not one row per sample (a scalar, a state batched on another axis)
                skipped.add(name)
                continue
            chunks.setdefault(name, []).append(array[:size])
    if skipped:
        log.info("outputs %s hold no row per sample on axis 0 and are not scored", ", ".join(sorted(skipped)))
    return {name: np.concatenate(parts, axis=0) for name, parts in chunks.items() if name not in skipped}


def timed_speedup(
    candidate: Artifact,
    reference: Artifact,
    runtime_factory: RuntimeFactory,
    data: dict[str, np.ndarray] | None,
    timing: TimingOptions | None = None,
) -> Ratio:
    """The candidate's speed-up over the reference at batch 1 (or the batch a model is fixed to), both loaded on the
    runtimes (and thread counts) that serve them and timed in turns in this job, until the ratio is known (TimingOptions)."""
    loaded = []
    try:
        runs = []
        for artifact in (candidate, reference):
            predictor = runtime_factory(artifact.path, artifact.runtime)
            loaded.append(predictor)
            feeds = model_inputs(predictor, data)
            runs.append((predictor, served_calls(predictor, feeds, 1) or take(feeds, _fixed_batch(predictor) or 1)))
        return interleaved_ratio(runs[0], runs[1], timing or TimingOptions())
    finally:
        for predictor in loaded:
            unload = getattr(predictor, "unload", None)
            if callable(unload):
                unload()


def record_speedup(evaluation: Evaluation, ratio: Ratio) -> None:
    evaluation.speedup_x = ratio.speedup
    evaluation.speedup_ci = [ratio.low, ratio.high]
    evaluation.speedup_rounds = ratio.rounds
    evaluation.timing_seconds = ratio.seconds
