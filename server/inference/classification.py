"""Triton's classification extension: `class_count=K` on a requested output answers its top-K as BYTES "score:index",
or "score:index:label" where the output has labels (a load `config`'s label_filename)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from slimserve.server.errors import InvalidArgument
from slimserve.server.runtimes import TensorSpec


def _label(value: np.generic, index: int, labels: Sequence[str] = ()) -> bytes:
    # Triton writes std::to_string(value): "%f" for floating point, "%d" for integers; the label when it has one.
    text = f"{float(value):f}" if np.issubdtype(type(value), np.floating) else str(int(value))
    return f"{text}:{index}:{labels[index]}".encode() if index < len(labels) else f"{text}:{index}".encode()


def check(specs: Mapping[str, TensorSpec], counts: Mapping[str, int], batched: bool) -> None:
    """Refuses before running what the output's static shape already rules out."""
    for name, k in counts.items():
        if k < 1:
            raise InvalidArgument(f"output '{name}': class_count must be >= 1, got {k}")
        dims = specs[name].shape[1:] if batched else specs[name].shape
        if dims and all(d > 0 for d in dims) and k > int(np.prod(dims)):
            raise InvalidArgument(f"output '{name}': class_count {k} is larger than its {int(np.prod(dims))} classes")


def classify(name: str, array: np.ndarray, k: int, batched: bool, labels: Sequence[str] = ()) -> np.ndarray:
    """Top-k of each sample (of the whole tensor when the model does not batch), best first: [batch, k] or [k]."""
    rows = array.reshape(array.shape[0], -1) if batched and array.ndim >= 1 else array.reshape(1, -1)
    if k > rows.shape[1]:
        raise InvalidArgument(f"output '{name}': class_count {k} is larger than its {rows.shape[1]} classes")
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        for j, index in enumerate(np.argsort(-row.astype(np.float64), kind="stable")[:k]):
            out[r, j] = _label(row[index], int(index), labels)
    return out if batched and array.ndim >= 1 else out.reshape(k)


def apply(
    outputs: dict[str, np.ndarray],
    specs: dict[str, TensorSpec],
    counts: Mapping[str, int],
    batched: bool,
    labels: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, TensorSpec]]:
    """The answer with each classified output replaced by its BYTES top-k (with its labels where it has them)."""
    outputs, specs = dict(outputs), dict(specs)
    for name, k in counts.items():
        outputs[name] = classify(name, outputs[name], k, batched, (labels or {}).get(name, ()))
        specs[name] = TensorSpec(name, "BYTES", tuple(outputs[name].shape))
    return outputs, specs
