"""Runtimes by name: one registration line each, the backend module imported only when a model uses it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from slimserve.server.runtimes.base import Runtime, RuntimeConfig, TensorSpec

__all__ = ["RUNTIMES", "Runtime", "RuntimeConfig", "TensorSpec", "create_runtime", "platform_of"]


@dataclass(frozen=True)
class RuntimeEntry:
    """Where a runtime's class lives (`module:Class`) and the platform name Triton's clients see for it."""

    target: str
    platform: str


# A new runtime for an existing format: its module under server/runtimes/ and one line here.
RUNTIMES: dict[str, RuntimeEntry] = {
    "onnxruntime": RuntimeEntry("slimserve.server.runtimes.onnx:OnnxRuntime", "onnxruntime_onnx"),
    "torch": RuntimeEntry("slimserve.server.runtimes.pt2:TorchRuntime", "pytorch_torchexport"),
    "torch-compile": RuntimeEntry("slimserve.server.runtimes.compiled:CompiledTorchRuntime", "pytorch_torchexport_compiled"),
    "xla": RuntimeEntry("slimserve.server.runtimes.xla:XlaRuntime", "pytorch_torchexport_xla"),
}


def _entry(name: str) -> RuntimeEntry:
    entry = RUNTIMES.get(name)
    if entry is None:
        raise ValueError(f"unknown runtime '{name}' (known: {', '.join(RUNTIMES)})")
    return entry


def create_runtime(name: str, path: Path, config: RuntimeConfig | None = None) -> Runtime:
    """A runtime object for a model file, not yet loaded. Imports each backend only when used."""
    module, _, cls = _entry(name).target.partition(":")
    return getattr(importlib.import_module(module), cls)(path, config)


def platform_of(name: str) -> str:
    """Triton's `platform` of a runtime (ModelMetadata), e.g. onnxruntime_onnx."""
    return _entry(name).platform
