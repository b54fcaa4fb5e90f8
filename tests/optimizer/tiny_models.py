"""Tiny models the optimizer tests build in milliseconds to seconds: ONNX graphs from numpy weights, a .pt2 MLP and
test-only passes that swap in a prepared model file (budget, quality and search tests); and tiny torch modules of the
architectures the optimizer must handle (LSTM, transformer encoder, CNN), exported as .pt2 and ONNX, with data.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from slimserve.optimizer.base import Artifact, Pass, PassContext
from slimserve.optimizer.catalog import PASSES
from slimserve.optimizer.formats.export import export_dynamic_batch, export_program_to_onnx

FEATURES = 16


def _save(path: Path, nodes: list, weights: dict[str, np.ndarray], in_shape: list, out_name: str, out_shape: list) -> Path:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v if v.dtype.kind == "i" else v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def dense_onnx(path: Path, layers: list[np.ndarray], output: str = "embedding", slow: int = 0) -> Path:
    """x [batch, 16] through MatMul layers (Relu between); `slow` > 0 adds that many 512x512 MatMuls whose result is
    multiplied by zero before it is added: the same answers, several times the latency."""
    nodes, weights, current = [], {}, "x"
    for i, w in enumerate(layers):
        weights[f"w{i}"] = w
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    if slow:
        weights.update(pad_in=np.full((FEATURES, 512), 0.01), pad=np.eye(512) * 0.5, zero=np.zeros(1))
        nodes.append(helper.make_node("MatMul", ["x", "pad_in"], ["t0"]))
        for k in range(slow):
            nodes.append(helper.make_node("MatMul", [f"t{k}", "pad"], [f"t{k + 1}"]))
        nodes.append(helper.make_node("Mul", [f"t{slow}", "zero"], ["tz"]))
        nodes.append(helper.make_node("ReduceSum", ["tz"], ["ts"], keepdims=1, noop_with_empty_axes=0))
        nodes.append(helper.make_node("Add", [current, "ts"], ["padded"]))
        current = "padded"
    nodes.append(helper.make_node("Identity", [current], [output]))
    return _save(path, nodes, weights, ["batch", FEATURES], output, ["batch", layers[-1].shape[1]])


def conv_onnx(path: Path) -> Path:
    """x [batch, 16] reshaped to [batch, 1, 4, 4], one 3x3 Conv, flattened: a convolutional model for dynamic INT8 checks."""
    weights = {"w": np.random.default_rng(0).standard_normal((4, 1, 3, 3)), "shape": np.array([-1, 1, 4, 4], np.int64)}
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["img"]),
        helper.make_node("Conv", ["img", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["embedding"]),
    ]
    return _save(path, nodes, weights, ["batch", FEATURES], "embedding", ["batch", 64])


def weights(rng: np.random.Generator, *dims: int) -> list[np.ndarray]:
    return [rng.standard_normal((a, b)) / np.sqrt(a) for a, b in itertools.pairwise(dims)]


def onnx_artifact(path: Path, output: str = "embedding") -> Artifact:
    return Artifact(path, "onnx", input_names=("x",), output_names=(output,))


def mlp_pt2(path: Path, out: int = 32) -> Path:
    """A 2-layer MLP (16 -> 64 -> out) as a torch.export archive with a dynamic batch."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(FEATURES, 64), torch.nn.Linear(64, out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(MLP().eval(), (torch.zeros(2, FEATURES),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def add_pass(monkeypatch, cls: type[Pass], name: str = "") -> None:
    """Adds, for one test, the pass class `cls` to the catalog as `name` (its own name by default): the table holds
    `module:Class`, so a class made in a function is set on this module for the test, under a name of its own."""
    name = name or cls.name
    module, attr = cls.__module__, cls.__qualname__
    if "<locals>" in attr:
        module, attr = __name__, "_test_pass_" + name.replace("-", "_")
        monkeypatch.setattr(sys.modules[__name__], attr, cls, raising=False)
    monkeypatch.setitem(PASSES, name, f"{module}:{attr}")


def register_file_pass(monkeypatch, name: str, path: Path) -> None:
    """Adds, for one test, a pass `name` whose result is the prepared ONNX file `path` (a slower, lossy or leaner model)."""

    class FilePass(Pass):
        def run(self, artifact: Artifact, context: PassContext) -> Artifact:
            return artifact.derive(path, format="onnx", runtime="onnxruntime")

    FilePass.name = name
    add_pass(monkeypatch, FilePass)


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------- torch modules of real architectures

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
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU()
        )
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
    return TinyModel(
        Artifact(root / f"{name}.pt2", "pt2", **names),
        Artifact(root / f"{name}.onnx", "onnx", **names),
        root / f"{name}-train.npz",
        {"x": x[:1]},
    )


def tokens(rows: int = 128, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).integers(0, VOCAB, (rows, TOKENS))
    return x, (x[:, -1] % classes).astype(np.int64)


def images(rows: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, 1, 8, 8)).astype(np.float32)
    return x, (x[:, 0, :4].sum((1, 2)) > 0).astype(np.int64)
