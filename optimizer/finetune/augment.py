"""Data augmentation of training batches as torch ops, chosen by the input's kind: images, token ids, time series."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from slimserve.optimizer.base import ConfigValueError, OptimizerError, PassConfig, check_choice, setting

if TYPE_CHECKING:
    import torch

AUGMENT_KINDS = ("auto", "none", "image", "text", "timeseries")


@dataclass(frozen=True)
class AugmentConfig(PassConfig):
    """Data augmentation, applied to each training batch; `kind` auto picks by the model's first input.

    kind: auto | none | image | text | timeseries. auto: float [N, C, H, W] -> image, integer
    inputs -> text (token ids), float [N, T] or [N, C, T] -> timeseries.
    Images: shift (random crop / translation, fraction of the side), rotation (degrees), scale
    (± fraction), flip (probability of a horizontal flip: off by default, it changes digits and
    letters), brightness and contrast (± fraction: colour jitter).
    Text: token_dropout (probability a token becomes pad_token_id), token_swap (probability a
    token swaps with its neighbour), token_insert (probability of inserting a token drawn from the
    same sequence, no synonyms), all on positions that are not padding.
    Time series: noise (jitter, × each series' std), magnitude (± scaling per channel),
    time_warp (strength of a smooth random warp of the time axis).
    """

    kind: str = setting("auto", "auto | none | image | text | timeseries (auto: from the model's first input)")
    shift: float = setting(0.1, "images: random translation, as a fraction of the side")
    rotation: float = setting(10.0, "images: random rotation, in degrees")
    scale: float = setting(0.1, "images: random scaling, +/- this fraction")
    flip: float = setting(0.0, "images: probability of a horizontal flip")
    brightness: float = setting(0.1, "images: brightness jitter, +/- this fraction")
    contrast: float = setting(0.1, "images: contrast jitter, +/- this fraction")
    token_dropout: float = setting(0.1, "text: probability a token becomes pad_token_id")
    token_swap: float = setting(0.05, "text: probability a token swaps with its neighbour")
    token_insert: float = setting(0.05, "text: probability of inserting a token drawn from the same sequence")
    pad_token_id: int = setting(0, "text: the padding token, never augmented")
    noise: float = setting(0.03, "time series: jitter, times each series' standard deviation")
    magnitude: float = setting(0.1, "time series: random scaling per channel, +/- this fraction")
    time_warp: float = setting(0.2, "time series: strength of a smooth random warp of the time axis")

    def __post_init__(self) -> None:
        check_choice("augment kind", self.kind, AUGMENT_KINDS)
        for name in ("flip", "token_dropout", "token_swap", "token_insert"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigValueError(f"augment {name} is a probability in [0, 1], got {value}")
        for name in ("shift", "rotation", "scale", "brightness", "contrast", "noise", "magnitude", "time_warp"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigValueError(f"augment {name} must be 0 or more, got {value}")


def input_kind(x: torch.Tensor | np.ndarray) -> str:
    """image | text | timeseries | none, from a batch's dtype and rank. An integer input of 0s and 1s alone is an
    attention mask or segment ids, not text: token dropout and insertion on it took ~10% of the real tokens out of
    attention and shifted the mask against the ids (every text model's fine-tuning had it on by default)."""
    dtype = np.dtype(str(x.dtype).removeprefix("torch.")) if not isinstance(x, np.ndarray) else x.dtype
    if np.issubdtype(dtype, np.integer):
        return "none" if mask_like(x) else "text"
    if np.issubdtype(dtype, np.floating):
        if x.ndim == 4:
            return "image"
        if x.ndim in (2, 3):
            return "timeseries"
    return "none"


def mask_like(x: torch.Tensor | np.ndarray) -> bool:
    """An integer input of 0s and 1s alone (an attention mask, segment ids): never augmented, whatever the kind asked."""
    array = x if isinstance(x, np.ndarray) else x.numpy()
    if not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return False
    return int(array.min()) >= 0 and int(array.max()) <= 1


def augment_images(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random affine (translation = random crop, rotation, scale), horizontal flip, brightness and contrast jitter."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    angle = uniform(math.radians(config.rotation))
    scale = 1 + uniform(config.scale)
    shift = torch.stack([uniform(2 * config.shift), uniform(2 * config.shift)], dim=1)  # grid units span 2 per side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if config.flip > 0:
        flip = torch.rand(n, generator=generator) < config.flip
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if config.contrast > 0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * (1 + uniform(config.contrast)).view(n, 1, 1, 1).to(x.dtype) + mean
    if config.brightness > 0:
        out = out + uniform(config.brightness).view(n, 1, 1, 1).to(x.dtype) * x.abs().amax().clamp(min=1e-6)
    return out


def augment_tokens(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Token dropout (to the pad id), neighbour swap and random insertion of a token of the same sequence."""
    import torch

    out = x.clone()
    if out.ndim != 2 or out.shape[1] < 2:
        return out
    n, length = out.shape
    real = out != config.pad_token_id
    if config.token_swap > 0:
        swap = (torch.rand(n, length - 1, generator=generator) < config.token_swap) & real[:, :-1] & real[:, 1:]
        for i, j in swap.nonzero().tolist():
            out[i, j], out[i, j + 1] = out[i, j + 1].clone(), out[i, j].clone()
    if config.token_insert > 0:
        insert = (torch.rand(n, length, generator=generator) < config.token_insert) & real
        for i in insert.any(dim=1).nonzero().flatten().tolist():
            positions = insert[i].nonzero().flatten().tolist()
            row = out[i].tolist()
            words = [t for t in row if t != config.pad_token_id]
            for pos in reversed(positions):
                word = words[int(torch.randint(len(words), (1,), generator=generator))]
                row.insert(pos, word)
            out[i] = torch.tensor(row[:length], dtype=out.dtype)  # the sequence keeps its length
    if config.token_dropout > 0:
        drop = (torch.rand(n, length, generator=generator) < config.token_dropout) & (out != config.pad_token_id)
        out = out.masked_fill(drop, config.pad_token_id)
    return out


def augment_series(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Jitter (Gaussian noise), per-channel magnitude scaling and a smooth random time warp, on [N, T] or [N, C, T]."""
    import torch

    out = x if x.ndim == 3 else x[:, None, :]
    n, channels, length = out.shape
    if config.time_warp > 0 and length > 2:
        knots = 4
        speed = (1 + config.time_warp * torch.randn(n, knots, generator=generator)).clamp(min=0.1)
        speed = torch.nn.functional.interpolate(speed[:, None, :], size=length, mode="linear", align_corners=True)[:, 0]
        position = torch.cumsum(speed, dim=1)
        position = (position - position[:, :1]) / (position[:, -1:] - position[:, :1]).clamp(min=1e-6) * (length - 1)
        low = position.floor().long().clamp(0, length - 1)
        high = (low + 1).clamp(max=length - 1)
        weight = (position - low).to(out.dtype)[:, None, :]
        index = lambda i: i[:, None, :].expand(n, channels, length)  # noqa: E731
        out = out.gather(2, index(low)) * (1 - weight) + out.gather(2, index(high)) * weight
    if config.magnitude > 0:
        out = out * (1 + config.magnitude * torch.randn(n, channels, 1, generator=generator)).to(out.dtype)
    if config.noise > 0:
        std = out.std(dim=2, keepdim=True).clamp(min=1e-6)
        out = out + config.noise * std * torch.randn(out.shape, generator=generator).to(out.dtype)
    return out if x.ndim == 3 else out[:, 0, :]


def augment(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """The batch augmented as its kind (or config.kind) calls for; shape and dtype are kept."""
    if mask_like(x):
        return x
    kind = input_kind(x) if config.kind == "auto" else config.kind
    if kind == "none":
        return x
    if kind == "image" and x.ndim == 4 and x.is_floating_point():
        return augment_images(x, config, generator)
    if kind == "text" and not x.is_floating_point():
        return augment_tokens(x, config, generator)
    if kind == "timeseries" and x.ndim in (2, 3) and x.is_floating_point():
        return augment_series(x, config, generator)
    raise OptimizerError(f"augment kind {kind!r} does not apply to an input of {x.dtype} {list(x.shape)}; set augment.kind to auto or none")
