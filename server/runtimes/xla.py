"""XLA runtime: a .pt2 run through torch_xla on the PJRT device of the node (CPU, CUDA or TPU)."""

from __future__ import annotations

import json
import os
import threading

import numpy as np

from slimserve.optimizer.formats.pt2io import load_exported_program
from slimserve.server.errors import FailedPrecondition
from slimserve.server.runtimes.pt2 import TorchRuntime, signature_of


def bucket(n: int) -> int:
    """The batch size a batch of n runs at: the next power of two, so that XLA compiles a few graphs, not one per size."""
    return 1 << max(0, n - 1).bit_length()


class XlaRuntime(TorchRuntime):
    """Options come from <stem>.xla.json next to the model ({"pjrt_device": "CPU" | "CUDA" | "TPU" | ""})."""

    name = "xla"

    def load(self) -> None:
        pjrt_device = self._options()
        if pjrt_device:
            # PJRT reads the variable when the runtime starts; a value the operator set wins.
            os.environ.setdefault("PJRT_DEVICE", pjrt_device)
        try:
            import torch_xla
            import torch_xla.core.xla_model as xm
        except ImportError as e:
            from slimserve.optimizer.passes.graph import torch_xla_missing_message

            raise FailedPrecondition(torch_xla_missing_message()) from e
        program = load_exported_program(self.path)
        self.inputs, self.outputs = signature_of(program)
        self._device = torch_xla.device() if hasattr(torch_xla, "device") else xm.xla_device()
        self._sync = torch_xla.sync if hasattr(torch_xla, "sync") else xm.mark_step
        self.module = program.module().to(self._device)
        # One XLA graph runs at a time per device; the server calls predict from several threads.
        self._lock = threading.Lock()
        self._pad_batch = bool(self.inputs) and all(spec.shape[:1] == (-1,) for spec in self.inputs)
        from slimserve.optimizer.evaluation.measure import synthesize_inputs

        self.predict(synthesize_inputs(self.inputs, 1))  # the first trace and compile happen here, not in a request

    def _options(self) -> str:
        path = self.path.with_name(f"{self.path.stem}.xla.json")
        if not path.is_file():
            return ""
        try:
            device = json.loads(path.read_text()).get("pjrt_device", "")
        except json.JSONDecodeError as e:
            raise FailedPrecondition(f"xla: {path.name} is not valid JSON: {e}") from e
        if device not in ("", "CPU", "CUDA", "TPU"):
            raise FailedPrecondition(f"xla: {path.name}: pjrt_device {device!r} is not one of CPU, CUDA, TPU")
        return device

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        import torch

        arrays = [np.asarray(inputs[spec.name]) for spec in self.inputs]
        n = len(arrays[0]) if arrays and arrays[0].ndim else 0
        size = bucket(n) if self._pad_batch and n else n
        if size != n:
            arrays = [np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)], axis=0) for a in arrays]
        with self._lock, torch.no_grad():
            args = [torch.from_numpy(np.array(a, copy=True)).to(self._device) for a in arrays]
            result = self.module(*args)
            self._sync()
            flat = result if isinstance(result, (tuple, list)) else (result,)
            named = {spec.name: t.detach().cpu().numpy() for spec, t in zip(self.outputs, flat)}
        if size != n:
            named = {k: v[:n] for k, v in named.items()}
        return {k: named[k] for k in outputs} if outputs else named

    @property
    def device(self) -> str:
        return "xla"
