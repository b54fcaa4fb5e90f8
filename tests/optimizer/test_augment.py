"""Tests for optimizer/finetune/augment.py: augmentation by input kind keeps shapes, dtypes and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.finetune.augment import AugmentConfig, augment, input_kind

# --- schedules -----------------------------------------------------------------------------------------


def test_input_kind_from_dtype_and_rank():
    assert input_kind(np.zeros((2, 1, 8, 8), np.float32)) == "image"
    assert input_kind(np.arange(32, dtype=np.int64).reshape(2, 16)) == "text"
    assert input_kind(np.ones((2, 16), np.int64)) == "none"  # an attention mask (0s and 1s) is not text
    assert input_kind(torch.zeros(2, 3, 50)) == "timeseries"
    assert input_kind(torch.zeros(2, 50)) == "timeseries"


def test_image_augmentation_keeps_shape_and_dtype_and_changes_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 12, 12)
    config = AugmentConfig(flip=0.5)
    out = augment(x, config, g)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.allclose(out, x)
    assert augment(x, AugmentConfig(kind="none"), g) is x


def test_flip_alone_mirrors_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 6, 6)
    config = AugmentConfig(shift=0, rotation=0, scale=0, flip=1.0, brightness=0, contrast=0)
    assert torch.allclose(augment(x, config, g), x.flip(-1), atol=1e-5)


def test_token_augmentation_keeps_shape_dtype_padding_and_vocabulary():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 50, (32, 20))
    x[:, 15:] = 0  # padding
    out = augment(x, AugmentConfig(token_dropout=0.2, token_swap=0.2, token_insert=0.2), g)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    for row_in, row_out in zip(x, out):
        assert set(row_out.tolist()) <= set(row_in.tolist()) | {0}  # no token from outside the sequence
    assert ((out == 0).sum(1) >= (x == 0).sum(1) - 3).all()


@pytest.mark.parametrize("shape", [(8, 100), (8, 3, 100)])
def test_time_series_augmentation_keeps_shape_and_dtype(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.sin(torch.linspace(0, 12, shape[-1])).expand(*shape).contiguous()
    out = augment(x, AugmentConfig(), g)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.allclose(out, x)
    warped = augment(x, AugmentConfig(noise=0, magnitude=0, time_warp=0.3), g)
    assert warped[..., 0] == pytest.approx(x[..., 0]) and warped.abs().max() <= 1.0 + 1e-5  # a warp only moves samples


def test_an_augmentation_that_does_not_fit_the_input_is_refused():
    with pytest.raises(OptimizerError, match=r"augment kind 'image' does not apply to an input of torch.int64 \[2, 5\]"):
        augment(torch.arange(10, dtype=torch.int64).reshape(2, 5), AugmentConfig(kind="image"), torch.Generator())


def test_text_augmentation_leaves_the_attention_mask_alone():
    """Token dropout and insertion on an attention mask took real tokens out of attention and shifted the mask
    against the ids: a 0/1 input is never augmented, even when the kind is asked as text."""
    ids = torch.tensor([[5, 9, 7, 3, 0, 0], [4, 8, 6, 2, 11, 12]])
    mask = (ids != 0).long()
    config = AugmentConfig(kind="text", token_dropout=0.9, token_insert=0.9, token_swap=0.9)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment(mask, config, generator), mask)
    assert not torch.equal(augment(ids, config, generator), ids)  # the ids themselves still are
