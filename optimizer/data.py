"""Datasets as the passes use them: arrays per model input checked against its types, labels, train data, subsets.

The .npz files come from PassContext.dataset (no pickle); these helpers turn them into arrays in the
model's input order, with messages that name the array, the role and the `slimctl register` flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.optimizer.base import OptimizerError, PassContext

# An input's numpy dtype and shape (dims: int, or a name / <= 0 where the model takes any size).
InputSpecs = dict[str, tuple[np.dtype, tuple[int | str, ...]]]


def model_arrays(
    data: dict[str, np.ndarray],
    specs: InputSpecs,
    role: str,
    needed_by: str,
) -> dict[str, np.ndarray]:
    """The dataset's array per model input, cast to the input's dtype, after checking names, ranks and fixed dims."""
    arrays = {}
    missing = [name for name in specs if name not in data]
    if missing:
        have = ", ".join(repr(k) for k in data) or "none"
        raise OptimizerError(
            f"{needed_by}: the {role} data has no array {', '.join(repr(m) for m in missing)} (arrays: {have}); "
            f"it needs one array per model input: {', '.join(specs)}; register the model again with a --{role} .npz that has them"
        )
    rows = None
    for name, (dtype, shape) in specs.items():
        array = data[name]
        if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise OptimizerError(f"{needed_by}: {role} array {name!r} is {array.dtype}, the model takes {dtype}")
        expected = ["N" if isinstance(d, str) or d <= 0 else d for d in shape]
        fixed_ok = all(isinstance(e, str) or e == got for e, got in zip(expected[1:], array.shape[1:]))
        if array.ndim != len(shape) or not fixed_ok:
            raise OptimizerError(
                f"{needed_by}: {role} array {name!r} has shape {list(array.shape)}, the model takes {expected} (N: samples)"
            )
        if rows is not None and len(array) != rows:
            raise OptimizerError(f"{needed_by}: the {role} arrays hold different numbers of samples ({rows} and {len(array)} in {name!r})")
        rows = len(array)
        arrays[name] = np.ascontiguousarray(array.astype(dtype, copy=False))
    if not rows:
        raise OptimizerError(f"{needed_by}: the {role} data holds no samples")
    return arrays


def subsample(arrays: dict[str, np.ndarray], limit: int, seed: int) -> dict[str, np.ndarray]:
    """At most `limit` rows, drawn at random (in their original order) when there are more."""
    rows = len(next(iter(arrays.values())))
    if limit <= 0 or rows <= limit:
        return arrays
    keep = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return {k: v[keep] for k, v in arrays.items()}


def take(feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first n samples, repeated when there are fewer."""
    out = {}
    for name, array in feeds.items():
        if len(array) < n:
            array = np.concatenate([array] * math.ceil(n / len(array)), axis=0)
        out[name] = np.ascontiguousarray(array[:n])
    return out


@dataclass
class TrainData:
    """Arrays in the model's input order, the labels (None: a label-free pass, slimserve.optimizer.finetune.objectives), and (optional) evaluation data."""

    inputs: list[np.ndarray]
    labels: np.ndarray | None
    eval_inputs: list[np.ndarray] | None = None
    eval_labels: np.ndarray | None = None

    def subsample(self, limit: int, seed: int) -> TrainData:
        rows = len(self.inputs[0])
        if limit <= 0 or rows <= limit:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
        labels = None if self.labels is None else self.labels[keep]
        return dataclasses.replace(self, inputs=[x[keep] for x in self.inputs], labels=labels)


def has_labels(path: Path) -> bool:
    """Whether an .npz holds a 'labels' array, read from its list of names alone (no array is loaded)."""
    with np.load(path, allow_pickle=False) as npz:
        return "labels" in npz.files


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
    specs: InputSpecs,
    needed_by: str,
    classes: int | None = None,
    with_eval: bool = False,
    labels_required: bool = True,
) -> TrainData:
    """The train data (and, when asked and registered, the evaluation data) as arrays in input order, labels checked.

    labels_required False: train data without 'labels' gives TrainData.labels None (a pass that trains toward its teacher's outputs).
    """
    if "train" not in context.datasets:
        raise OptimizerError(
            f"{needed_by} fine-tunes the model and needs train data, and the model was registered without it; "
            "register it again with slimctl register NAME MODEL --train TRAIN.npz (one array per model input, plus 'labels')"
        )
    raw = context.dataset("train", needed_by)
    arrays = model_arrays(raw, specs, "train", needed_by)
    if not labels_required and "labels" not in raw:
        return TrainData([arrays[name] for name in inputs], None)
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
