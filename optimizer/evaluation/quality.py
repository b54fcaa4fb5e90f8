"""Quality of a variant against the baseline: the metric chosen from the output's kind, and the drop in the budget's unit.

With labels and a classifier's logits the metric is top-1 accuracy and the drop is accuracy points lost, as
always. Without labels the baseline's own outputs on the evaluation data are the reference: mean cosine
similarity for embeddings (a float feature vector per sample), relative error for regression (one value per
sample), top-1 agreement for logits (an output named like logits / probabilities / scores). Every drop is in
points, so that one `--accuracy-budget` reads for all: accuracy points, (1 - agreement) x 100,
(1 - mean cosine) x 100, relative error x 100 (percent).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from slimserve.optimizer.base import OptimizerError

# The metrics, with what one point of drop means (said in reports and in budget messages).
METRICS = {
    "accuracy": "points of top-1 accuracy",
    "top1-agreement": "points of top-1 agreement with the baseline",
    "cosine": "points of (1 - mean cosine similarity to the baseline) x 100",
    "relative-error": "percent of relative error against the baseline",
}
# An unlabelled [N, C] output whose name says it is a classifier's is scored by top-1 agreement, not cosine.
_LOGITS_NAME = re.compile(r"logit|prob|score|class|conf", re.IGNORECASE)
# Boxes, landmarks, offsets: coordinates, scored by relative error (never argmax, never labels).
_BOX_NAME = re.compile(r"box|bbox|loc|coord|regress|offset|landmark|delta|anchor", re.IGNORECASE)
# Feature vectors: scored by cosine whatever their width.
_EMBEDDING_NAME = re.compile(r"embed|feature|hidden|pool|vector|encod", re.IGNORECASE)
# An unnamed float [N, C] this narrow is a classifier's (C classes), scored by top-1 agreement, not cosine: cosine of
# two 2-class logits stays near 1 while their decisions flip. Wider unnamed outputs are taken for embeddings.
MAX_UNNAMED_CLASSES = 16


@dataclass(frozen=True)
class Quality:
    """A variant's quality: the metric, its value, its worst sample (cosine) and the drop against the baseline in points."""

    metric: str
    value: float | None  # accuracy / agreement / mean cosine in [0, 1]; relative error >= 0
    drop: float | None  # points lost against the baseline (negative: better); None for the baseline itself
    worst: float | None = None  # the lowest per-sample cosine similarity


def choose_metric(outputs: np.ndarray, labels: np.ndarray | None, output_name: str = "", requested: str | None = None) -> str:
    """The metric for this output: `requested` when given (checked), else from labels, the output's shape, datatype and name."""
    classifier = outputs.ndim == 2 and outputs.shape[1] > 1
    if requested:
        if requested not in METRICS:
            raise OptimizerError(f"quality metric must be one of {', '.join(METRICS)}, got {requested!r}")
        if requested == "accuracy" and (labels is None or not classifier):
            raise OptimizerError(
                f"quality metric 'accuracy' of output '{output_name}' needs a classifier's logits [N, classes] (it is "
                f"{list(outputs.shape)}) and evaluation data holding 'labels'"
            )
        return requested
    if not np.issubdtype(outputs.dtype, np.floating):
        return "top1-agreement"  # class indices or tokens: equal or not
    if _BOX_NAME.search(output_name):
        return "relative-error"
    if labels is not None and classifier:
        return "accuracy"
    if outputs.ndim == 1 or int(np.prod(outputs.shape[1:])) == 1:
        return "relative-error"
    if classifier and _EMBEDDING_NAME.search(output_name):
        return "cosine"
    if classifier and (_LOGITS_NAME.search(output_name) or outputs.shape[1] <= MAX_UNNAMED_CLASSES or _softmax_rows(outputs)):
        return "top1-agreement"
    return "cosine"


def _softmax_rows(outputs: np.ndarray) -> bool:
    """Rows of probabilities: non-negative, each summing to 1."""
    if len(outputs) == 0 or not np.all(np.isfinite(outputs)):
        return False
    return bool(np.all(outputs >= 0) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3))


def labelled_output(outputs: dict[str, np.ndarray], labels: np.ndarray | None, declared: dict[str, str]) -> str | None:
    """The output the 'labels' belong to: the one declared 'accuracy', else the first classifier's logits [N, C] that
    can hold every label (C > the largest), box-like names excepted; None when no output is a classifier's."""
    if labels is None:
        return None
    named = [n for n, m in declared.items() if m == "accuracy"]
    if named:
        return named[0]
    top = int(np.max(labels)) if labels.size else 0
    fits = [
        n
        for n, o in outputs.items()
        if n not in declared
        and o.ndim == 2
        and o.shape[1] > max(1, top)
        and np.issubdtype(o.dtype, np.floating)
        and not _BOX_NAME.search(n)
    ]
    return next((n for n in fits if _LOGITS_NAME.search(n)), fits[0] if fits else None)


def parse_declared(specs: list[str] | tuple[str, ...] | None, outputs: list[str] | None = None) -> dict[str, str]:
    """`--quality OUTPUT=METRIC` settings as {output: metric}, checked against the metric names and the model's outputs."""
    declared: dict[str, str] = {}
    for spec in specs or ():
        name, sep, metric = str(spec).partition("=")
        name, metric = name.strip(), metric.strip()
        if not sep or not name or not metric:
            raise OptimizerError(f"--quality takes OUTPUT=METRIC (e.g. logits=top1-agreement), got {spec!r}")
        if metric not in METRICS:
            raise OptimizerError(f"--quality {spec}: the metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if outputs is not None and name not in outputs:
            raise OptimizerError(f"--quality {spec}: the model has no output '{name}' (its outputs: {', '.join(outputs) or 'none'})")
        if name in declared and declared[name] != metric:
            raise OptimizerError(f"--quality names output '{name}' twice, as {declared[name]} and {metric}")
        declared[name] = metric
    return declared


def choose_metrics(outputs: dict[str, np.ndarray], labels: np.ndarray | None, declared: dict[str, str] | None = None) -> dict[str, str]:
    """A metric per output: the declared one, else chosen from its shape, datatype and name; labels go to one output only."""
    declared = dict(declared or {})
    unknown = sorted(set(declared) - set(outputs))
    if unknown:
        raise OptimizerError(f"--quality names output {', '.join(unknown)}, and the model's outputs are {', '.join(outputs)}")
    labelled = labelled_output(outputs, labels, declared)
    return {n: choose_metric(o, labels if n == labelled else None, n, declared.get(n)) for n, o in outputs.items()}


def cosine_per_sample(outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened output with the reference's; two all-zero answers agree."""
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0), np.all(a == b, axis=1).astype(np.float64))


def relative_error(outputs: np.ndarray, reference: np.ndarray) -> float:
    """||outputs - reference|| / ||reference|| over all samples (robust to single values near zero)."""
    a, b = outputs.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    scale = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return float(diff / scale) if scale > 0 else (0.0 if diff == 0 else float("inf"))


def top1(outputs: np.ndarray) -> np.ndarray:
    return outputs.argmax(axis=-1) if outputs.ndim >= 2 and np.issubdtype(outputs.dtype, np.floating) else outputs


def measure(
    metric: str,
    outputs: np.ndarray,
    labels: np.ndarray | None,
    reference: np.ndarray | None,
    baseline_value: float | None,
    output: str = "first",
) -> Quality:
    """The variant's quality by `metric`; `reference` (the baseline's outputs) is None when measuring the baseline itself."""
    if reference is not None and reference.shape != outputs.shape:
        raise OptimizerError(
            f"the variant's output '{output}' has shape {list(outputs.shape)}, the baseline's {list(reference.shape)}: "
            "they cannot be compared"
        )
    if metric == "accuracy":
        assert labels is not None
        if len(labels) != len(outputs):
            raise OptimizerError(f"evaluation data: {len(labels)} labels for {len(outputs)} samples")
        value = float(np.mean(outputs.argmax(axis=1) == labels.reshape(-1)))
        drop = None if reference is None or baseline_value is None else (baseline_value - value) * 100.0
        return Quality(metric, value, drop)
    if reference is None:
        return Quality(metric, None, None)
    if metric == "top1-agreement":
        value = float(np.mean(top1(outputs) == top1(reference)))
        return Quality(metric, value, (1.0 - value) * 100.0)
    if metric == "cosine":
        cos = cosine_per_sample(outputs, reference)
        return Quality(metric, float(np.mean(cos)), (1.0 - float(np.mean(cos))) * 100.0, worst=float(np.min(cos)))
    error = relative_error(outputs, reference)
    return Quality(metric, error, error * 100.0)


def describe(metric: str | None, value: float | None) -> str:
    """'cosine 0.9931', 'accuracy 97.25%', 'relative error 0.41%': a quality as a message says it."""
    if metric is None or value is None:
        return "quality not measured"
    if metric == "relative-error":
        return f"relative error {100 * value:.2f}%"
    if metric == "cosine":
        return f"cosine {value:.4f}"
    if metric.startswith("evaluator"):
        return f"{metric} {value:.2f} points"
    return f"{metric} {100 * value:.2f}%"


def measure_outputs(
    metrics: dict[str, str],
    outputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    reference: dict[str, np.ndarray] | None,
    baseline_values: dict[str, float | None],
) -> dict[str, Quality]:
    """Each output's quality by its metric; `reference` is None when measuring the baseline itself."""
    qualities = {}
    for name, metric in metrics.items():
        if name not in outputs:
            raise OptimizerError(f"the model has no output '{name}' to score (its outputs: {', '.join(outputs)})")
        ref = None if reference is None else reference.get(name)
        if reference is not None and ref is None:
            raise OptimizerError(f"the baseline has no output '{name}' to compare the variant's with (its outputs: {', '.join(reference)})")
        qualities[name] = measure(metric, outputs[name], labels if metric == "accuracy" else None, ref, baseline_values.get(name), name)
    return qualities


def worst(qualities: dict[str, Quality]) -> str:
    """The name whose drop is largest (the one the budget binds on); the first when none has a drop."""
    dropped = [(q.drop, n) for n, q in qualities.items() if q.drop is not None]
    return max(dropped)[1] if dropped else next(iter(qualities))
