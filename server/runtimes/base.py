"""The runtime interface: load a model file, run it on named numpy arrays, describe its tensors."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: protocol datatype and shape, -1 for a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["datatype"], tuple(int(x) for x in d["shape"]))

    def describe(self) -> str:
        return f"{self.datatype} [{','.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class RuntimeConfig:
    """How a runtime uses the node: threads, and which device it may use."""

    intra_op_threads: int = 0  # 0: the runtime chooses (ONNX Runtime on the CPU: measured at load), else exactly this
    # The node's cores shared out among the calls that run at once: what a runtime that measures nothing uses for 0
    # (torch, ORT on a GPU provider); 0 here too: the backend's default (all cores).
    threads_per_call: int = 0
    inter_op_threads: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # ORT execution providers in order of preference; empty means TensorRT, CUDA, CPU as available.
    providers: tuple[str, ...] = field(default_factory=tuple)
    # ONNX Runtime: a text export of fixed sequence length is rewritten in memory to take any length (checked exactly
    # against the file), so that it is served padding-free (server/batching/sequence.py).
    any_length: bool = True
    # ONNX Runtime on the CPU: write the measured thread count beside the model file (`<file>.threads.json`); a read-only
    # replica only reads what the writer kept.
    keep_threads: bool = True


class Runtime(abc.ABC):
    """A loaded model. `predict` is synchronous and thread-safe; the server calls it on worker threads."""

    name: str = "base"

    def __init__(self, path: Path, config: RuntimeConfig | None = None) -> None:
        self.path = Path(path)
        self.config = config or RuntimeConfig()
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    @abc.abstractmethod
    def load(self) -> None:
        """Reads the model and fills `inputs` and `outputs`."""

    @abc.abstractmethod
    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Runs the model; `outputs` restricts which outputs are computed (None: all)."""

    def unload(self) -> None:  # noqa: B027  a runtime with nothing to release need not override it
        """Releases what `load` took; the object must not be used afterwards."""

    @property
    def device(self) -> str:
        """Where compute runs, for metrics and records: cpu, cuda, or an execution provider list."""
        return "cpu"

    @property
    def config_parameters(self) -> dict[str, str]:
        """Backend settings the variant's ModelConfig shows under `parameters`, keyed as Triton's backend for it keys them."""
        return {}

    @property
    def inline_safe(self) -> bool:
        """Whether a short call may run on the event loop's thread: never when a call can stall for
        seconds (a torch.compile recompiling for a new shape, a TensorRT engine build)."""
        return False
