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
_LOGITS_NAME = re.compile(r"logit|prob|score|class", re.IGNORECASE)


@dataclass(frozen=True)
class Quality:
    """A variant's quality: the metric, its value, its worst sample (cosine) and the drop against the baseline in points."""

    metric: str
    value: float | None  # accuracy / agreement / mean cosine in [0, 1]; relative error >= 0
    drop: float | None  # points lost against the baseline (negative: better); None for the baseline itself
    worst: float | None = None  # the lowest per-sample cosine similarity


def choose_metric(outputs: np.ndarray, labels: np.ndarray | None, output_name: str = "", requested: str | None = None) -> str:
    """The metric for this output: `requested` when given (checked), else from labels, the output's shape and name."""
    classifier = outputs.ndim == 2 and outputs.shape[1] > 1
    if requested:
        if requested not in METRICS:
            raise OptimizerError(f"quality metric must be one of {', '.join(METRICS)}, got {requested!r}")
        if requested == "accuracy" and (labels is None or not classifier):
            raise OptimizerError("quality metric 'accuracy' needs a classifier's logits [N, classes] and evaluation data holding 'labels'")
        return requested
    if labels is not None and classifier:
        return "accuracy"
    if not np.issubdtype(outputs.dtype, np.floating):
        return "top1-agreement"  # class indices or tokens: equal or not
    if outputs.ndim == 1 or int(np.prod(outputs.shape[1:])) == 1:
        return "relative-error"
    if classifier and _LOGITS_NAME.search(output_name):
        return "top1-agreement"
    return "cosine"


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
) -> Quality:
    """The variant's quality by `metric`; `reference` (the baseline's outputs) is None when measuring the baseline itself."""
    if reference is not None and reference.shape != outputs.shape:
        raise OptimizerError(
            f"the variant's first output has shape {list(outputs.shape)}, the baseline's {list(reference.shape)}: they cannot be compared"
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
    return f"{metric} {100 * value:.2f}%"
