"""Runtimes by name: `onnxruntime` (ONNX), `torch`, `torch-compile` and `xla` (torch.export archives)."""

from __future__ import annotations

from pathlib import Path

from server.runtimes.base import Runtime, RuntimeConfig, TensorSpec

__all__ = ["Runtime", "RuntimeConfig", "TensorSpec", "create_runtime", "RUNTIMES"]

RUNTIMES = ("onnxruntime", "torch", "torch-compile", "xla")


def create_runtime(name: str, path: Path, config: RuntimeConfig | None = None) -> Runtime:
    """A runtime object for a model file, not yet loaded. Imports each backend only when used."""
    if name == "onnxruntime":
        from server.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(path, config)
    if name == "torch":
        from server.runtimes.pt2 import TorchRuntime

        return TorchRuntime(path, config)
    if name == "torch-compile":
        from server.runtimes.compiled import CompiledTorchRuntime

        return CompiledTorchRuntime(path, config)
    if name == "xla":
        from server.runtimes.xla import XlaRuntime

        return XlaRuntime(path, config)
    raise ValueError(f"unknown runtime '{name}' (known: {', '.join(RUNTIMES)})")
