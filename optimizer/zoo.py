"""Small real models and data that ship inside PyPI packages: a CNN trained on scikit-learn's digits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 [N, 1, 8, 8], scaled to [0, 1]
    y: np.ndarray  # int64 [N]


def load_digits_splits(seed: int = 0, test_fraction: float = 0.25) -> tuple[Split, Split]:
    """scikit-learn's 1,797 8x8 digit images (bundled with the package), split into train and test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test])


class DigitsCNN(nn.Module):
    """Two conv blocks and a classifier: 85 k parameters at width 32, 10 logits out."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, padding=1),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 2 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_digits_cnn(epochs: int = 8, seed: int = 0, width: int = 32) -> tuple[DigitsCNN, float]:
    """Trains DigitsCNN on the digits train split; returns the model (eval mode) and its test accuracy."""
    torch.manual_seed(seed)
    train, test = load_digits_splits(seed)
    model = DigitsCNN(width)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xs, ys = torch.from_numpy(train.x), torch.from_numpy(train.y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ys), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean())
    return model, acc


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor, input_name: str = "x", output_name: str = "logits") -> Path:
    """ONNX with a dynamic batch dimension and weights inside the file (no side file)."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,
    )
    program.save(str(path), external_data=False)
    return Path(path)


def export_pt2(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """A torch.export archive with a dynamic batch dimension."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return Path(path)
