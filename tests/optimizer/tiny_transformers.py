"""Tiny transformer encoders (2-4 layers, hidden 32, 4 heads) for the transformer-aware passes' tests, as modules and as .pt2 files with data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.zoo.models import BertClassifier
from slimserve.optimizer.base import Artifact
from slimserve.optimizer.formats.export import export_dynamic_batch

VOCAB, TOKENS, CLASSES = 50, 12, 3


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder (fused in_proj attention), hidden 32, 4 heads; norm_first for the pre-LN layout."""

    def __init__(self, layers: int = 2, norm_first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.emb(x))[:, 0])


class GluLayer(nn.Module):
    """A LLaMA-style layer: separate q / k / v / o projections, 4 heads, and a GLU FFN down(silu(gate(x)) * up(x)) of width 64."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(32, 64, bias=False), nn.Linear(32, 64, bias=False), nn.Linear(64, 32, bias=False)
        self.norm1, self.norm2 = nn.LayerNorm(32), nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).reshape(b, s, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.o(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 32))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class GluEncoder(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 32)
        self.layers = nn.ModuleList(GluLayer() for _ in range(layers))
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for layer in self.layers:
            h = layer(h)
        return self.fc(h[:, 0])


def bert(layers: int = 2) -> nn.Module:
    """The zoo's BERT-style classifier (Hugging Face layout: separate query / key / value Linear layers) at hidden 32, 4 heads."""
    torch.manual_seed(0)
    return BertClassifier(VOCAB, CLASSES, hidden=32, layers=layers, heads=4, max_len=TOKENS).eval()


def bert_example(rows: int = 2) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(0, VOCAB, (rows, TOKENS), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(rows, TOKENS, dtype=torch.long)
    mask[0, 8:] = 0
    return ids, mask


def torch_example(rows: int = 2) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, VOCAB, (rows, TOKENS), generator=torch.Generator().manual_seed(1)),)


def bert_pt2(root: Path, layers: int = 2, rows: int = 96) -> tuple[Artifact, Path]:
    """The tiny BERT as model.pt2 (inputs input_ids / attention_mask, output logits) and a labelled train.npz (label: a token's class)."""
    root.mkdir(parents=True, exist_ok=True)
    program = export_dynamic_batch(bert(layers), bert_example(), "test")
    torch.export.save(program, str(root / "model.pt2"))
    ids, mask = (t.numpy() for t in bert_example(rows))
    np.savez(root / "train.npz", input_ids=ids, attention_mask=mask, labels=(ids[:, 1] % CLASSES).astype(np.int64))
    names = {"input_names": ("input_ids", "attention_mask"), "output_names": ("logits",)}
    return Artifact(root / "model.pt2", "pt2", **names), root / "train.npz"


def embedding(layers: int = 4) -> nn.Module:
    """A tiny sentence-embedding model as the zoo's MiniLM (BertEncoder, mean-pooled and L2-normalized), with random weights."""
    from bench.zoo.models import BertEncoder, SentenceEmbedding

    torch.manual_seed(0)
    return SentenceEmbedding(BertEncoder(VOCAB, 32, layers, 4, 64, max_len=TOKENS)).eval()


def embedding_pt2(root: Path, layers: int = 4, rows: int = 128, free_length: bool = False) -> tuple[Artifact, Path, Path]:
    """The tiny embedding model as model.pt2 (inputs input_ids / attention_mask, output sentence_embedding), and train / eval .npz without labels.

    free_length: the program takes any sequence length (what padding-free training needs), not only TOKENS."""
    root.mkdir(parents=True, exist_ok=True)
    program = export_dynamic_batch(embedding(layers), bert_example(), "test", sequence=(0, 1) if free_length else ())
    torch.export.save(program, str(root / "model.pt2"))
    for name, seed in (("train", 2), ("data", 3)):
        ids = torch.randint(1, VOCAB, (rows, TOKENS), generator=torch.Generator().manual_seed(seed)).numpy()
        lengths = np.random.default_rng(seed).integers(4, TOKENS + 1, rows)
        mask = (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
        np.savez(root / f"{name}.npz", input_ids=ids * mask, attention_mask=mask)
    names = {"input_names": ("input_ids", "attention_mask"), "output_names": ("sentence_embedding",)}
    return Artifact(root / "model.pt2", "pt2", **names), root / "train.npz", root / "data.npz"
