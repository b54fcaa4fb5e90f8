"""torch runtime for `torch.export` archives (.pt2), loaded without ever unpickling what the archive holds."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slimserve.client.datatypes import DATATYPE_TO_NUMPY
from slimserve.optimizer.formats.pt2io import UnsafeArchiveError, load_exported_program
from slimserve.server.runtimes.base import Runtime, TensorSpec

__all__ = ["TorchRuntime", "UnsafeArchiveError", "load_exported_program", "signature_of"]

# torch names its dtypes as numpy does: derived from the one datatype table (BYTES has no tensor dtype).
TORCH_TO_DATATYPE = {getattr(torch, dtype.name): name for name, dtype in DATATYPE_TO_NUMPY.items() if name != "BYTES"}


def _spec(name: str, value: Any) -> TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"input or output '{name}' is a {type(value).__name__}, not a tensor; only tensors can be served")
    datatype = TORCH_TO_DATATYPE.get(value.dtype)
    if datatype is None:
        raise ValueError(f"tensor '{name}' has dtype {value.dtype}, which the Open Inference Protocol cannot carry")
    shape = tuple(int(d) if isinstance(d, int) or str(d).isdigit() else -1 for d in value.shape)
    return TensorSpec(name, datatype, shape)


def signature_of(program: torch.export.ExportedProgram) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of an exported program, inputs named as the model's arguments."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = [_spec(name, placeholders[name].meta.get("val")) for name in program.graph_signature.user_inputs]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    out_values = output_node.args[0]
    by_name = {n.name: n for n in program.graph.nodes}
    outputs = []
    for i, name in enumerate(program.graph_signature.user_outputs):
        node = by_name.get(name)
        value = node.meta.get("val") if node is not None else None
        if value is None and i < len(out_values) and hasattr(out_values[i], "meta"):
            value = out_values[i].meta.get("val")
        outputs.append(_spec(f"output_{i}", value))
    return inputs, outputs


class TorchRuntime(Runtime):
    name = "torch"

    def load(self) -> None:
        program = load_exported_program(self.path)
        self.inputs, self.outputs = signature_of(program)
        use_cuda = self.config.device in ("auto", "cuda") and torch.cuda.is_available()
        self._device = torch.device("cuda" if use_cuda else "cpu")
        threads = self.config.intra_op_threads or self.config.threads_per_call
        if threads > 0:
            torch.set_num_threads(threads)
        self.module = program.module().to(self._device)

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.array(inputs[spec.name], copy=True)).to(self._device) for spec in self.inputs]
        with torch.inference_mode():
            result = self.module(*args)
        flat = result if isinstance(result, (tuple, list)) else (result,)
        named = {spec.name: t.detach().cpu().numpy() for spec, t in zip(self.outputs, flat)}
        return {k: named[k] for k in outputs} if outputs else named

    def unload(self) -> None:
        self.module = None

    @property
    def device(self) -> str:
        return getattr(self, "_device", torch.device("cpu")).type
