"""torch.compile runtime: a .pt2 loaded like the torch runtime, compiled by Inductor and warmed up before it serves."""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from slimserve.server.errors import FailedPrecondition
from slimserve.server.runtimes.pt2 import TorchRuntime

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# Batch sizes compiled at load when the batch is dynamic: 1 is specialized apart, and Inductor's
# convolutions guard small batches (2-15) apart from larger ones, so three graphs cover all sizes.
WARMUP_BATCHES = (1, 2, 32)


class CompiledTorchRuntime(TorchRuntime):
    """Options come from <stem>.compile.json next to the model ({"mode": ..., "dynamic": ...}); defaults without it."""

    name = "torch-compile"

    def load(self) -> None:
        import torch

        super().load()
        self.mode, self.dynamic = self._options()
        eager = self.module
        self.module = torch.compile(eager, mode=self.mode, dynamic=self.dynamic)
        start = time.perf_counter()
        try:
            self._warm_up()
        except Exception as e:  # Inductor's failures come as many exception types; all mean "cannot serve compiled"
            self.module = None
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FailedPrecondition(
                f"torch-compile: compiling {self.path.name} (mode {self.mode}, dynamic {self.dynamic}) failed at load: "
                f"{type(e).__name__}: {reason}; Inductor needs a working C++ compiler (gcc or clang) on CPU nodes "
                "and Triton on GPUs — serve this model with the 'torch' runtime instead"
            ) from e
        log.info("%s: compiled (mode %s, dynamic %s) in %.1f s", self.path.name, self.mode, self.dynamic, time.perf_counter() - start)

    def _options(self) -> tuple[str, bool]:
        path = self.path.with_name(f"{self.path.stem}.compile.json")
        if not path.is_file():
            return "default", True
        try:
            options = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FailedPrecondition(f"torch-compile: {path.name} is not valid JSON: {e}") from e
        mode, dynamic = options.get("mode", "default"), options.get("dynamic", True)
        if mode not in COMPILE_MODES:
            raise FailedPrecondition(f"torch-compile: {path.name}: mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if not isinstance(dynamic, bool):
            raise FailedPrecondition(f"torch-compile: {path.name}: 'dynamic' must be true or false, got {dynamic!r}")
        return mode, dynamic

    def _warm_up(self) -> None:
        """Compiles now, so that no request pays for it (with a static batch, only batch 1 is compiled ahead)."""
        from slimserve.optimizer.evaluation.measure import synthesize_inputs

        batch_dynamic = bool(self.inputs) and self.inputs[0].shape[:1] == (-1,)
        sizes = WARMUP_BATCHES if (batch_dynamic and self.dynamic) else (1,)
        for size in sizes:
            feeds = synthesize_inputs(self.inputs, size)
            self.predict({k: np.ascontiguousarray(v) for k, v in feeds.items()})
