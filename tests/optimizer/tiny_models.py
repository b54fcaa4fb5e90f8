"""Tiny models the budget, quality and search tests build in a few milliseconds: ONNX from numpy weights, a .pt2 MLP,
and test-only passes that swap in a prepared model file (registered for one test, then removed).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.base import Artifact, Pass, PassContext
from optimizer.registry import PASSES, load_builtin_passes

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


def register_file_pass(monkeypatch, name: str, path: Path) -> None:
    """Registers, for one test, a pass `name` whose result is the prepared ONNX file `path` (a slower, lossy or leaner model)."""
    load_builtin_passes()

    class FilePass(Pass):
        def run(self, artifact: Artifact, context: PassContext) -> Artifact:
            return artifact.derive(path, format="onnx", runtime="onnxruntime")

    FilePass.name = name
    monkeypatch.setitem(PASSES, name, FilePass)


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path
