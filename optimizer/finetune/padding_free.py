"""Padding-free training of a text model: batches of rows of similar real length, each cut to its longest member, and a
frozen model's (a teacher's) outputs computed once per row at its real length.

Train rows of a text model are padded to one length (MiniLM's bench pads to 64 tokens) while the sentences average far
fewer (bench/bench_students.py's: a third of it), so most of a padded batch's work is padding. Hugging Face's
`group_by_length` (its LengthGroupedSampler) groups rows by length in mega-batches of 50 batches; `LengthBatches` does
the same: each epoch the rows are shuffled, cut into pools of `POOL` batches, each pool sorted by length and split into
batches, and the batches shuffled, so a batch holds rows of about one length and the order still changes every epoch.
A batch runs at its longest member's length: only the inputs with the sequence on axis 1 are cut, which is exact for a
model that masks its padding (checked by the caller on a few rows before training: `cut_changes_output`).

`TeacherCache` runs the frozen model once over the rows (padding-free too) and keeps its first output per row and the
hidden states a loss matches at each row's real length, packed end to end ([total tokens, channels], float16 when
float32 would pass `CACHE_FLOAT32_BYTES`); a batch's states come back zero-padded to the batch's length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from slimserve.optimizer.formats.sequence_axis import MASK_NAME, SEQUENCE_NAMES, relative_difference, trailing_lengths

if TYPE_CHECKING:
    import torch

POOL = 50  # batches per length-sorted pool (Hugging Face's LengthGroupedSampler: mega_batch_mult 50)
CACHE_FLOAT32_BYTES = 1 << 30  # hidden states cached beyond this many bytes in float32 are kept in float16
CHECK_ROWS = 8  # rows run at full and at cut length before training padding-free


@dataclass(frozen=True)
class SequenceLayout:
    """Which inputs carry the sequence on axis 1 (by position), the mask's position, each row's real length, the padded length."""

    positions: tuple[int, ...]
    mask: int
    lengths: np.ndarray
    full: int


def sequence_layout(
    names: Sequence[str], specs: dict[str, tuple[Any, tuple]], inputs: Sequence[np.ndarray]
) -> tuple[SequenceLayout | None, str]:
    """The layout of a text model's train rows, or None and why padding cannot be cut (no mask, not INT64 [batch, seq], not trailing;
    '' for a model without token inputs)."""
    positions = tuple(i for i, name in enumerate(names) if name in SEQUENCE_NAMES)
    if not positions:
        return None, ""
    if MASK_NAME not in names:
        return None, f"the model has no '{MASK_NAME}' input to tell padding from tokens"
    for i in positions:
        dtype, shape = specs[names[i]]
        if np.dtype(dtype) != np.int64 or len(shape) != 2:
            return None, f"input '{names[i]}' is {np.dtype(dtype)} with {len(shape)} dims, not INT64 [batch, seq]"
    mask_at = names.index(MASK_NAME)
    full = int(inputs[mask_at].shape[1])
    if any(inputs[i].shape[1] != full for i in positions):
        return None, "the token inputs of the train data differ in length"
    lengths = trailing_lengths(inputs[mask_at])
    if lengths is None:
        return None, f"the train data's '{MASK_NAME}' is not 0/1 trailing padding with a token in every row"
    return SequenceLayout(positions, mask_at, lengths.astype(np.int64), full), ""


def cut(inputs: Sequence[torch.Tensor], layout: SequenceLayout, length: int) -> tuple[torch.Tensor, ...]:
    """The inputs with the sequence ones cut to `length` positions (the others as they are)."""
    return tuple(x[:, :length] if i in layout.positions else x for i, x in enumerate(inputs))


def cut_changes_output(model: Any, xs: Sequence[torch.Tensor], layout: SequenceLayout, tolerance: float) -> str:
    """'' when the model gives the same first output on the shortest rows cut to their longest member as at full length, else why not."""
    import torch

    def first_output(value: Any) -> Any:
        return value[0] if isinstance(value, (tuple, list)) else value

    shorter = np.flatnonzero(layout.lengths < layout.full)
    if not len(shorter):
        return f"every row fills the {layout.full} positions, so there is no padding to cut"
    rows = torch.from_numpy(shorter[np.argsort(layout.lengths[shorter], kind="stable")[:CHECK_ROWS]])
    length = int(layout.lengths[rows.numpy()].max())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = first_output(model(*(x[rows] for x in xs))).float().numpy()
            try:
                got = first_output(model(*cut([x[rows] for x in xs], layout, length))).float().numpy()
            except Exception as e:  # a program exported at a fixed length refuses (or mis-shapes) a shorter one
                first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                return (
                    f"the program takes a fixed length of {layout.full} ({type(e).__name__} at {length}: {first}); export it with a dynamic "
                    "sequence dimension (torch.export.Dim on axis 1 of the token inputs) to train padding-free"
                )
    finally:
        model.train(was_training)
    difference = relative_difference(want, got)
    if difference > tolerance:
        return (
            f"its output differs by {difference:.2g} (relative) when its inputs are cut from {layout.full} to {length} positions, "
            f"more than {tolerance:g}: the padding changes what it computes"
        )
    return ""


class LengthBatches:
    """Row indices in batches of similar real length, reshuffled every epoch; `take` cuts a batch to its longest member."""

    def __init__(self, layout: SequenceLayout, batch_size: int, pool: int = POOL) -> None:
        import torch

        self.layout = layout
        self.batch_size = batch_size
        self.pool = pool
        self.lengths = torch.from_numpy(layout.lengths)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def epoch(self, generator: torch.Generator) -> list[torch.Tensor]:
        import torch

        batches: list[torch.Tensor] = []
        for part in torch.randperm(len(self.lengths), generator=generator).split(self.batch_size * self.pool):
            part = part[torch.argsort(self.lengths[part], stable=True)]
            batches += list(part.split(self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def in_order(self, batch_size: int) -> list[torch.Tensor]:
        """Every row once, sorted by length, in batches of `batch_size` (for a pass over the data without training)."""
        import torch

        return list(torch.argsort(self.lengths, stable=True).split(batch_size))

    def length_of(self, idx: torch.Tensor) -> int:
        return int(self.lengths[idx].max())

    def take(self, xs: Sequence[torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows' inputs, the sequence ones cut to the longest row's length (contiguous copies)."""
        length = self.length_of(idx)
        return tuple(x[idx, :length] if i in self.layout.positions else x[idx] for i, x in enumerate(xs))


class TeacherCache:
    """A frozen model's first output for every row and named hidden states at each row's real length, computed once."""

    def __init__(self, batches: LengthBatches) -> None:
        self.batches = batches
        self.output: torch.Tensor | None = None
        self.rowwise: dict[str, torch.Tensor] = {}  # states without the sequence axis: one per row
        self.packed: dict[str, torch.Tensor] = {}  # sequence states: [total tokens, ...], rows end to end
        lengths = batches.lengths
        self.offsets = lengths.cumsum(0) - lengths
        self.dtype = "float32"

    def fill(
        self,
        run: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        xs: Sequence[torch.Tensor],
        batch_size: int = 64,
    ) -> None:
        """Runs `run` (the model's first output and named states of a batch) over every row once, in batches sorted by length
        and cut to their longest member, and keeps them."""
        import torch

        rows = len(self.batches.lengths)
        total = int(self.batches.lengths.sum())
        for idx in self.batches.in_order(batch_size):
            inputs = self.batches.take(xs, idx)
            length = inputs[self.batches.layout.mask].shape[1]
            with torch.no_grad():
                out, states = run(inputs)
            if self.output is None:
                self.output = torch.empty((rows, *out.shape[1:]), dtype=out.dtype)
                sequence = [n for n, s in states.items() if s.dim() >= 3 and s.shape[1] == length]
                width = sum(int(np.prod(states[n].shape[2:])) for n in sequence)
                half = total * width * 4 > CACHE_FLOAT32_BYTES
                self.dtype = "float16" if half else "float32"
                for name, state in states.items():
                    if name in sequence:
                        self.packed[name] = torch.empty((total, *state.shape[2:]), dtype=torch.float16 if half else state.dtype)
                    else:
                        self.rowwise[name] = torch.empty((rows, *state.shape[1:]), dtype=state.dtype)
            self.output[idx] = out.detach()
            for name, state in states.items():
                if name in self.rowwise:
                    self.rowwise[name][idx] = state.detach()
                    continue
                real = self.batches.lengths[idx]
                keep = torch.arange(length)[None, :] < real[:, None]
                target = (self.offsets[idx][:, None] + torch.arange(length)[None, :])[keep]
                self.packed[name][target] = state.detach()[keep].to(self.packed[name].dtype)

    def nbytes(self) -> int:
        tensors = [self.output, *self.rowwise.values(), *self.packed.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def first_output(self, idx: torch.Tensor) -> torch.Tensor:
        assert self.output is not None
        return self.output[idx]

    def state(self, name: str, idx: torch.Tensor, length: int) -> torch.Tensor:
        """The rows' cached state, zero beyond each row's real length, as [rows, length, ...] (or [rows, ...] without a sequence)."""
        import torch

        if name in self.rowwise:
            return self.rowwise[name][idx]
        packed = self.packed[name]
        positions = torch.arange(length)[None, :]
        keep = positions < self.batches.lengths[idx][:, None]
        where = (self.offsets[idx][:, None] + positions).clamp(max=len(packed) - 1)
        out = packed[where].float()
        return out * keep.reshape(*keep.shape, *([1] * (out.dim() - 2))).to(out.dtype)
