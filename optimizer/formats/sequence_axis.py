"""The sequence axis of a text model, as numbers: which inputs carry tokens, a mask's real lengths, and how far two
outputs differ. Shared by `graph-dynamic-seq` (optimizer/passes/dynamic_seq.py) and padding-free serving
(server/batching/sequence.py); numpy only."""

from __future__ import annotations

import numpy as np

# Inputs taken by name for tokens along a sequence axis ([batch, seq] INT64), and the mask among them.
SEQUENCE_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MASK_NAME = "attention_mask"
# Relative difference (max |got - want| / max |want|) beyond which running at the real length is refused.
TOLERANCE = 1e-4
# Real lengths are rounded up to a multiple of this before a request runs (server/batching/sequence.py says why), and
# `auto` times text models at the lengths so rounded (slimserve.optimizer.evaluation.measure.served_calls).
BUCKET = 8


def kept_length(lengths: np.ndarray, full: int, bucket: int = BUCKET) -> int:
    """The positions a call of rows of these real lengths runs at: the longest rounded up to `bucket`, at most `full`."""
    return min(full, -(-int(lengths.max()) // bucket) * bucket)


def trailing_lengths(mask: np.ndarray) -> np.ndarray | None:
    """Each row's count of ones when every row of a 2-D mask is ones then zeros (at least one one); None otherwise."""
    if mask.dtype == np.bool_:
        ones = mask
    else:
        ones = mask == 1
        if not (ones | (mask == 0)).all():
            return None
    if mask.shape[1] > 1 and (ones[:, 1:] & ~ones[:, :-1]).any():  # a one after a zero: not trailing padding
        return None
    lengths = ones.sum(axis=1)
    if not lengths.all():  # a row without a token: its meaning depends on the padding, keep it
        return None
    return lengths


def relative_difference(want: np.ndarray, got: np.ndarray) -> float:
    """max |want - got| / max |want| (the absolute difference when `want` is all zeros; inf when the shapes differ)."""
    want, got = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if want.shape != got.shape:
        return float("inf")
    if not want.size:
        return 0.0
    scale = float(np.abs(want).max())
    diff = float(np.abs(want - got).max())
    return diff / scale if scale > 0 else diff


def declaration_problem(specs: dict[str, tuple[str, tuple[int, ...]]], names: list[str] | tuple[str, ...], mask: str) -> str:
    """Why a declared sequence does not fit a model's inputs (name -> (datatype, shape)), '' when it does: every input
    exists and is INT64 [batch, seq], and the mask is one of them."""
    if not names:
        return "declare at least one sequence input (e.g. input_ids,attention_mask with the mask attention_mask)"
    unknown = [n for n in (*names, mask) if n and n not in specs]
    if unknown:
        return f"the model has no input {', '.join(repr(u) for u in unknown)}; its inputs are: {', '.join(specs)}"
    if mask not in names:
        return f"the mask {mask!r} must be one of the declared sequence inputs {list(names)}"
    for name in names:
        datatype, shape = specs[name]
        if len(shape) != 2 or datatype != "INT64":
            return (
                f"input '{name}' is {datatype} [{','.join(str(d) for d in shape)}], not INT64 [batch, seq]; declare only the "
                "token inputs (ids, mask, token types), or register without a sequence declaration to serve it padded"
            )
    return ""


def mask_problem(mask: np.ndarray, name: str, where: str) -> str:
    """Why a dataset's mask is not 0/1 trailing padding with a token in every row, '' when it is."""
    if mask.ndim != 2:
        return f"{where}: '{name}' has shape {list(mask.shape)}, not [batch, seq]"
    if trailing_lengths(mask) is not None:
        return ""
    ones = mask == 1
    if not (ones | (mask == 0)).all():
        bad = np.unique(mask[~(ones | (mask == 0))])[:5].tolist()
        return f"{where}: '{name}' holds values other than 0 and 1 ({bad})"
    for i, row in enumerate(ones):
        if not row.any():
            return f"{where}: row {i} of '{name}' has no token (all zeros)"
        if (row[1:] & ~row[:-1]).any():
            return f"{where}: row {i} of '{name}' is not trailing padding (a 1 after a 0: left padding or a hole)"
    return ""
