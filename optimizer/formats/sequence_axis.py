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
