"""ONNX Runtime: one InferenceSession per variant, on the best execution provider the node has."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as InvalidArgumentError

from client.datatypes import DATATYPE_TO_NUMPY
from server.errors import InvalidArgument
from server.runtimes.base import Runtime, RuntimeConfig, TensorSpec

log = logging.getLogger(__name__)

# Preference order when the caller names none: TensorRT, then CUDA, then the CPU.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# ORT names its element types after numpy's, except these two; derived from the one datatype table.
_ORT_NAMES = {"float32": "float", "float64": "double"}
ORT_TYPE_TO_DATATYPE = {
    f"tensor({_ORT_NAMES.get(dtype.name, dtype.name)})": name for name, dtype in DATATYPE_TO_NUMPY.items() if name != "BYTES"
} | {"tensor(string)": "BYTES"}


def choose_providers(config: RuntimeConfig, available: list[str] | None = None) -> list[str]:
    """The execution providers to ask for, best first, limited to what this onnxruntime build has."""
    available = list(available if available is not None else ort.get_available_providers())
    if config.device == "cpu":
        wanted = ["CPUExecutionProvider"]
    elif config.providers:
        wanted = list(config.providers)
    else:
        wanted = list(PROVIDER_PREFERENCE)
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def session_options(config: RuntimeConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT's warnings would flood the server log
    # Idle ORT workers spin by default, burning the cores that the event loop and gRPC need
    # (measured: ~0.6 of 2 cores at 16 callers on the digits CNN). A server wants them asleep.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def spec_of(node: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TYPE_TO_DATATYPE.get(node.type)
    if datatype is None:
        raise ValueError(f"tensor '{node.name}' has type {node.type}, which the Open Inference Protocol cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape)


def as_text(name: str, array: np.ndarray) -> np.ndarray:
    """ONNX string tensors hold text: BYTES elements are decoded as UTF-8 (ORT would str() raw bytes)."""
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"input '{name}': BYTES element {i} is not UTF-8 text, which ONNX string tensors need") from None
        flat_out[i] = item
    return out


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def load(self) -> None:
        providers = choose_providers(self.config)
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options(self.config), providers=providers)
        actual = self.session.get_providers()
        # onnxruntime-gpu falls back to the CPU silently when CUDA cannot start; say so once.
        if providers[0] != "CPUExecutionProvider" and actual[0] != providers[0]:
            log.warning("%s: asked for %s, onnxruntime runs it on %s", self.path, providers[0], actual[0])
        self.inputs = [spec_of(n) for n in self.session.get_inputs()]
        self.outputs = [spec_of(n) for n in self.session.get_outputs()]

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or [o.name for o in self.outputs]
        feed = {k: as_text(k, v) if v.dtype == object else v for k, v in inputs.items()}
        try:
            results = self.session.run(names, feed)
        except InvalidArgumentError as e:  # inputs that pass the specs but not the graph (e.g. dims that must agree)
            raise InvalidArgument(f"the model refused the inputs: {str(e).splitlines()[0][:500]}") from None
        return dict(zip(names, results))

    def unload(self) -> None:
        self.session = None

    @property
    def device(self) -> str:
        session = getattr(self, "session", None)
        if session is None:
            return "unloaded"
        return {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}.get(session.get_providers()[0], "cpu")

    @property
    def inline_safe(self) -> bool:
        return self.device == "cpu"  # the CPU provider has no per-shape build step

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())
