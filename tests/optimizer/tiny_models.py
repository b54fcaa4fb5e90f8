"""Tiny models of the architectures the optimizer must handle (LSTM, transformer encoder, CNN), exported as .pt2 and ONNX, with data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from optimizer.base import Artifact
from optimizer.export import export_dynamic_batch, export_program_to_onnx

VOCAB, TOKENS = 50, 12


class LstmClassifier(nn.Module):
    def __init__(self, layers: int = 2, bidirectional: bool = False, embedding: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16) if embedding else nn.Identity()  # without: float features [N, T, 16]
        self.rnn = nn.LSTM(16, 32, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(64 if bidirectional else 32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(x))
        return self.fc(out[:, -1])


class EncoderClassifier(nn.Module):
    """A 2-layer transformer encoder (BERT-style: token + position embeddings, first-token head)."""

    def __init__(self, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.emb(x) + self.pos)[:, 0])


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@dataclass(frozen=True)
class TinyModel:
    pt2: Artifact
    onnx: Artifact
    train: Path
    sample: dict[str, np.ndarray]


def build(module: nn.Module, x: np.ndarray, labels: np.ndarray, root: Path, name: str) -> TinyModel:
    """Exports `module` (dynamic batch) as .pt2 and ONNX with input 'x' and output 'logits', and writes its train data."""
    torch.manual_seed(0)
    module.eval()
    root.mkdir(parents=True, exist_ok=True)
    program = export_dynamic_batch(module, (torch.from_numpy(x[:2]),), "test")
    torch.export.save(program, str(root / f"{name}.pt2"))
    export_program_to_onnx(program, root / f"{name}.onnx", ["x"], ["logits"], "test")
    np.savez(root / f"{name}-train.npz", x=x, labels=labels)
    names = {"input_names": ("x",), "output_names": ("logits",)}
    return TinyModel(Artifact(root / f"{name}.pt2", "pt2", **names), Artifact(root / f"{name}.onnx", "onnx", **names), root / f"{name}-train.npz", {"x": x[:1]})


def tokens(rows: int = 128, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).integers(0, VOCAB, (rows, TOKENS))
    return x, (x[:, -1] % classes).astype(np.int64)


def images(rows: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, 1, 8, 8)).astype(np.float32)
    return x, (x[:, 0, :4].sum((1, 2)) > 0).astype(np.int64)
