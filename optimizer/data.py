"""Datasets as the passes use them: arrays per model input checked against its types, labels, train data, subsets.

The .npz files come from PassContext.dataset (no pickle); these helpers turn them into arrays in the
model's input order, with messages that name the array, the role and the `slimctl register` flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """The dataset's array per model input, cast to the input's dtype, after checking names, ranks and fixed dims.

    For a model with an input not batched on axis 0 (a state on axis 1, a scalar), the arrays come back
    sample-major (samples_first): a caller that feeds the model turns its rows back with model_layout.
    """
    arrays = {}
    missing = [name for name in specs if name not in data]
    if missing:
        have = ", ".join(repr(k) for k in data) or "none"
        raise OptimizerError(
            f"{needed_by}: the {role} data has no array {', '.join(repr(m) for m in missing)} (arrays: {have}); "
            f"it needs one array per model input: {', '.join(specs)}; register the model again with a --{role} .npz that has them"
        )
    shapes = {name: shape for name, (_, shape) in specs.items()}
    if needs_layout(shapes):
        data = samples_first(data, shapes, role)
        specs = {name: (dtype, ("N", *_rest(shape))) for name, (dtype, shape) in specs.items()}
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


# --------------------------------------------------------------------------------------------
# The .npz convention for any input layout (docs/optimizer/data.md)
#
# An .npz holds one array per model input, in the model's own layout, with the samples stacked on the
# input's batch axis: the first variable dimension (`state [2, N, 128]`: axis 1), or axis 0 of a batch
# fixed to 1 (`[1, 3, 224, 224]`: samples stacked on axis 0, fed one by one). An input with neither (a 0-d
# sample rate, a fixed `[2]` parameter) is one value per model: its array holds exactly the model's shape and
# goes with every request. One sample is one request's inputs, whatever the batch axis. Inside the optimizer
# the arrays are turned sample-major (samples on axis 0, per-model values repeated per sample) so that
# evaluation slices rows alike for every model; `SampleMajorPredictor` turns them back for the runtime.

PER_MODEL = None  # the batch axis of an input that takes one value per model


def batch_axis(shape: tuple[int | str, ...]) -> int | None:
    """The axis an input stacks its samples on: its first variable dimension, else axis 0 of a batch fixed to 1, else None."""
    variable = [i for i, d in enumerate(shape) if isinstance(d, str) or d is None or d <= 0]
    if variable:
        return variable[0]
    ones = [i for i, d in enumerate(shape) if d == 1]  # a batch fixed to 1: `[1, 3, 224, 224]`, or a state `[2, 1, 128]`
    return ones[0] if ones else PER_MODEL


def needs_layout(shapes: dict[str, tuple[int | str, ...]]) -> bool:
    """Whether any input is not batched on axis 0 (state on another axis, or one value per model)."""
    return any(batch_axis(s) != 0 for s in shapes.values())


def shown(shape: tuple[int | str, ...], axis: int | None) -> list[int | str]:
    return ["N" if i == axis else ("?" if isinstance(d, str) or d is None or d <= 0 else d) for i, d in enumerate(shape)]


def samples_first(data: dict[str, np.ndarray], shapes: dict[str, tuple[int | str, ...]], role: str = "data") -> dict[str, np.ndarray]:
    """The .npz arrays (model layout) as sample-major arrays: samples on axis 0, per-model values repeated once per sample.

    Refuses an array that does not fit its input: which array, its shape, the shape expected (N: samples).
    Arrays that are not model inputs (e.g. 'labels') pass through.
    """
    out = {k: v for k, v in data.items() if k not in shapes}
    rows: int | None = None
    per_model = {}
    for name, shape in shapes.items():
        if name not in data:
            continue  # the caller names what is missing
        array, axis = data[name], batch_axis(shape)
        if axis is PER_MODEL:
            fits = array.ndim == len(shape) and all(isinstance(d, str) or d <= 0 or d == a for d, a in zip(shape, array.shape))
            if not fits:
                raise OptimizerError(
                    f"the {role} array {name!r} has shape {list(array.shape)}; input {name!r} takes one value per model of shape "
                    f"{list(shape)} (sent with every request): store that one value (np.array(VALUE) for a scalar), not one per sample"
                )
            per_model[name] = array
            continue
        if array.ndim != len(shape):
            raise OptimizerError(
                f"the {role} array {name!r} has shape {list(array.shape)}; input {name!r} takes {shown(shape, axis)} "
                f"(samples stacked on axis {axis}, N: samples)"
            )
        n = array.shape[axis]
        if rows is not None and n != rows:
            raise OptimizerError(
                f"the {role} arrays hold different numbers of samples: {rows}, and {n} in {name!r} of shape {list(array.shape)} "
                f"(its samples are on axis {axis}: {shown(shape, axis)})"
            )
        rows = n
        out[name] = np.moveaxis(array, axis, 0) if axis else array
    if rows is None:
        raise OptimizerError(f"the {role} data has no input with a batch axis to take samples from")
    for name, array in per_model.items():
        out[name] = np.broadcast_to(array[None], (rows, *array.shape))
    return out


def model_layout(feeds: dict[str, np.ndarray], shapes: dict[str, tuple[int | str, ...]]) -> dict[str, np.ndarray]:
    """Sample-major rows back in the model's layout: the batch axis where the model has it, per-model values once."""
    out = {}
    for name, array in feeds.items():
        axis = batch_axis(shapes[name]) if name in shapes else 0
        if axis is PER_MODEL:
            out[name] = np.array(array[0])  # keeps a 0-d value 0-d (ascontiguousarray would make it [1])
        elif axis:
            out[name] = np.ascontiguousarray(np.moveaxis(array, 0, axis))
        else:
            out[name] = array
    return out


class SampleMajorPredictor:
    """A Predictor whose inputs and outputs are sample-major, over one that takes the model's own layout.

    Evaluation slices and joins rows on axis 0; this turns each call's rows into the model's layout and its
    outputs back (an output batched on another axis, e.g. the next state `[2, N, 128]`, comes back with N first).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.input_shapes = {s.name: tuple(s.shape) for s in inner.inputs}
        self.output_axes = {s.name: batch_axis(tuple(s.shape)) for s in inner.outputs}
        self.inputs = [_sample_major_spec(s) for s in inner.inputs]
        self.outputs = [_sample_major_spec(s) for s in inner.outputs]

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        result = self.inner.predict(model_layout(inputs, self.input_shapes), outputs)
        return {k: (np.moveaxis(v, self.output_axes[k], 0) if self.output_axes.get(k) else v) for k, v in result.items()}

    def __getattr__(self, name: str) -> Any:  # unload, threads, ... of the runtime beneath
        if name == "inner":  # not set yet (a copy in progress): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _rest(shape: tuple) -> tuple:
    """A shape without its batch axis (all of it for a per-model input)."""
    axis = batch_axis(shape)
    return tuple(shape) if axis is PER_MODEL else tuple(shape[:axis]) + tuple(shape[axis + 1 :])


def _sample_major_spec(spec: Any) -> Any:
    new = (-1, *_rest(tuple(spec.shape)))
    if dataclasses.is_dataclass(spec):
        return dataclasses.replace(spec, shape=new)
    return type("Spec", (), {"name": spec.name, "datatype": spec.datatype, "shape": new})()
