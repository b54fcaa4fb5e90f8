"""Fixtures of the optimizer tests: the server's runtimes as the runtime factory, the digits evaluation data.

The trained digits CNN itself (ONNX and .pt2, session scope) is the `digits` fixture of tests/conftest.py.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from slimserve.optimizer.base import Artifact
from slimserve.server.runtimes import create_runtime


def top1(path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier file on (x, y), run by ONNX Runtime on the CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1) == y).mean())


def ort_session(path, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session; threads > 0 pins the intra-op threads (for timing)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def runtime_factory():
    """Loads a model file on the runtime the server would use for it, as the server's jobs do."""
    return lambda path, name: (r := create_runtime(name, path)).load() or r


@pytest.fixture(scope="session")
def digits_data(digits) -> dict[str, np.ndarray]:
    """The digits test split as the evaluation .npz holds it: the input 'x' and 'labels'."""
    with np.load(digits.data, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture
def onnx_model(digits) -> Artifact:
    return Artifact(digits.onnx, "onnx", input_names=("x",), output_names=("logits",))


@pytest.fixture
def pt2_model(digits) -> Artifact:
    return Artifact(digits.pt2, "pt2", input_names=("x",), output_names=("logits",))


@pytest.fixture(scope="module")
def baseline_accuracy(digits) -> float:
    return top1(digits.onnx, digits.x_test, digits.y_test)
