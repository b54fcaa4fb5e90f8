"""Tests for optimizer/finetune/padding_free.py: batches of similar length cut to their longest member, a teacher's states cached at
each row's real length, and the check that a model gives the same output with its padding cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimserve.optimizer.finetune.padding_free import LengthBatches, TeacherCache, cut_changes_output, sequence_layout

SPECS = {"input_ids": (np.int64, ("", 10)), "attention_mask": (np.int64, ("", 10))}


def rows(lengths: list[int], full: int = 10) -> list[np.ndarray]:
    lengths_array = np.array(lengths)
    mask = (np.arange(full)[None, :] < lengths_array[:, None]).astype(np.int64)
    ids = (np.arange(1, full + 1)[None, :] * 100 + np.arange(len(lengths))[:, None]) * mask  # row i, position p: (p + 1) * 100 + i
    return [ids, mask]


def test_each_epoch_takes_every_row_once_in_batches_of_about_one_length_cut_to_their_longest():
    rng = np.random.default_rng(0)
    data = rows(rng.integers(1, 11, 200).tolist())
    layout, why = sequence_layout(["input_ids", "attention_mask"], SPECS, data)
    assert why == "" and layout is not None and layout.positions == (0, 1) and layout.mask == 1 and layout.full == 10
    batches = LengthBatches(layout, batch_size=16, pool=4)
    generator = torch.Generator().manual_seed(0)
    first, second = batches.epoch(generator), batches.epoch(generator)
    assert len(first) == len(batches) == 13  # ceil(200 / 16): the schedule's steps per epoch
    assert sorted(torch.cat(first).tolist()) == list(range(200))
    assert [b.tolist() for b in first] != [b.tolist() for b in second]  # reshuffled every epoch
    xs = [torch.from_numpy(x) for x in data]
    for idx in first:
        ids, mask = batches.take(xs, idx)
        want = int(layout.lengths[idx.numpy()].max())
        assert ids.shape == mask.shape == (len(idx), want)  # cut to the longest member
        assert torch.equal(ids, xs[0][idx, :want]) and bool(mask[:, -1].any())
    spread = np.mean([np.ptp(layout.lengths[idx.numpy()]) for idx in first])
    assert spread <= 3, spread  # a pool of 4 batches spans lengths 1..10: about a quarter each; random batches would span ~8


def test_a_layout_is_refused_with_its_reason():
    data = rows([3, 5])
    assert sequence_layout(["x"], {"x": (np.float32, ("", 4))}, [np.zeros((2, 4), np.float32)]) == (None, "")
    assert "no 'attention_mask' input" in sequence_layout(["input_ids"], SPECS, data[:1])[1]
    holes = [data[0], data[1].copy()]
    holes[1][0, 1] = 0
    assert "not 0/1 trailing padding" in sequence_layout(["input_ids", "attention_mask"], SPECS, holes)[1]
    floats = {**SPECS, "input_ids": (np.float32, ("", 10))}
    assert "is float32 with 2 dims, not INT64 [batch, seq]" in sequence_layout(["input_ids", "attention_mask"], floats, data)[1]


def test_the_cache_gives_back_each_rows_states_at_its_real_length_and_zeros_beyond():
    data = rows([3, 7, 1, 10, 5])
    layout, _ = sequence_layout(["input_ids", "attention_mask"], SPECS, data)
    batches = LengthBatches(layout, batch_size=2)
    xs = [torch.from_numpy(x) for x in data]
    calls = []

    def run(inputs):  # a "model": per-token states [B, L, 2] from the ids, a pooled [B, 3] output, a per-row state [B, 4]
        ids = inputs[0]
        calls.append(ids.shape[1])
        states = torch.stack([ids.float(), -ids.float()], dim=-1)
        return ids.float().sum(1, keepdim=True).repeat(1, 3), {"hidden": states, "pooled": states.sum(1).repeat(1, 2)}

    cache = TeacherCache(batches)
    cache.fill(run, xs, batch_size=2)
    assert calls == [3, 7, 10]  # padding-free: rows sorted by length (1, 3 | 5, 7 | 10), each batch cut to its longest
    assert cache.dtype == "float32" and cache.packed["hidden"].shape == (26, 2)  # 3 + 7 + 1 + 10 + 5 tokens, packed
    idx = torch.tensor([3, 0, 2])
    full_output, full_states = run(tuple(x[idx] for x in xs))
    assert torch.equal(cache.first_output(idx), full_output)
    got = cache.state("hidden", idx, 10)
    mask = xs[1][idx].bool()
    assert torch.equal(got[mask], full_states["hidden"][mask]) and not got[~mask].any()
    assert torch.equal(cache.state("pooled", idx, 10), full_states["pooled"])
    assert cache.state("hidden", torch.tensor([0, 2]), 3).shape == (2, 3, 2)


def test_a_model_of_a_fixed_length_or_that_reads_its_padding_is_named_and_one_that_masks_it_passes():
    data = rows([2, 4, 9, 10])
    layout, _ = sequence_layout(["input_ids", "attention_mask"], SPECS, data)
    xs = [torch.from_numpy(x) for x in data]

    class Pooled(torch.nn.Module):
        def __init__(self, read_padding: bool = False, fixed: int = 0) -> None:
            super().__init__()
            self.read_padding, self.fixed = read_padding, fixed

        def forward(self, ids, mask):
            if self.fixed:
                ids = ids.reshape(len(ids), self.fixed)
            weight = torch.ones_like(mask) if self.read_padding else mask
            return (ids.float() * weight).sum(1) / weight.sum(1)

    assert cut_changes_output(Pooled(), xs, layout, 1e-4) == ""
    assert "differs by" in cut_changes_output(Pooled(read_padding=True), xs, layout, 1e-4)
    fixed = cut_changes_output(Pooled(fixed=10), xs, layout, 1e-4)
    assert fixed.startswith("the program takes a fixed length of 10 (RuntimeError at 9:") and "torch.export.Dim" in fixed
    full = rows([10, 10])
    layout_full, _ = sequence_layout(["input_ids", "attention_mask"], SPECS, full)
    assert "no padding to cut" in cut_changes_output(Pooled(), [torch.from_numpy(x) for x in full], layout_full, 1e-4)


def test_masked_relative_mse_ignores_padding():
    from slimserve.optimizer.finetune.objectives import masked_relative_mse, relative_mse

    torch.manual_seed(0)
    target, output = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = output.clone()
    padded[0, 3:] = 100.0  # what the padding holds changes nothing
    assert masked_relative_mse(padded, target, mask).item() == pytest.approx(masked_relative_mse(output, target, mask).item())
    assert masked_relative_mse(output, target, torch.ones(2, 5)).item() == pytest.approx(relative_mse(output, target).item())
