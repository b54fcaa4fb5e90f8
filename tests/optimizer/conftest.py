"""Fixtures of the optimizer tests: the server's runtimes as the runtime factory, the digits evaluation data.

The trained digits CNN itself (ONNX and .pt2, session scope) is the `digits` fixture of tests/conftest.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.runtimes import create_runtime


@pytest.fixture(scope="session")
def runtime_factory():
    """Loads a model file on the runtime the server would use for it, as the server's jobs do."""
    return lambda path, name: (r := create_runtime(name, path)).load() or r


@pytest.fixture(scope="session")
def digits_data(digits) -> dict[str, np.ndarray]:
    """The digits test split as the evaluation .npz holds it: the input 'x' and 'labels'."""
    with np.load(digits.data, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
