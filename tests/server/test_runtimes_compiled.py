"""Tests for server/runtimes/compiled.py and server/runtimes/xla.py: compiled runtimes answer as the torch runtime does."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from slimserve.optimizer.passes.graph import torch_xla_missing_message
from slimserve.server.errors import FailedPrecondition
from slimserve.server.runtimes import RUNTIMES, create_runtime
from slimserve.server.runtimes.compiled import CompiledTorchRuntime
from slimserve.server.runtimes.xla import XlaRuntime, bucket

HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None


def _loaded(name, path):
    runtime = create_runtime(name, path)
    runtime.load()
    return runtime


@pytest.fixture(scope="module")
def compiled(digits):
    runtime = _loaded("torch-compile", digits.pt2)
    yield runtime
    runtime.unload()


def test_runtimes_are_registered_by_name(digits):
    assert {"torch-compile", "xla"} <= set(RUNTIMES)
    assert isinstance(create_runtime("torch-compile", digits.pt2), CompiledTorchRuntime)
    assert isinstance(create_runtime("xla", digits.pt2), XlaRuntime)


@pytest.mark.slow
def test_compiled_answers_equal_the_torch_runtime(digits, compiled):
    eager = _loaded("torch", digits.pt2)
    assert compiled.inputs == eager.inputs and compiled.outputs == eager.outputs
    for n in (1, 5, 32, 100):
        x = {"x": digits.x_test[:n]}
        np.testing.assert_allclose(compiled.predict(x)["output_0"], eager.predict(x)["output_0"], atol=1e-5)


@pytest.mark.slow
def test_requests_do_not_pay_for_compilation(digits, compiled):
    from torch._dynamo.utils import counters

    frames = counters["stats"]["unique_graphs"]
    for n in (1, 3, 17, 64, 200):
        compiled.predict({"x": digits.x_test[:n]})
    assert counters["stats"]["unique_graphs"] == frames  # every batch size hit a graph compiled in load()


def test_compile_options_are_read_and_checked(digits, tmp_path):
    model = tmp_path / "model.pt2"
    shutil.copyfile(digits.pt2, model)
    runtime = CompiledTorchRuntime(model)
    assert runtime._options() == ("default", True)
    (tmp_path / "model.compile.json").write_text(json.dumps({"version": 1, "mode": "reduce-overhead", "dynamic": False}))
    assert runtime._options() == ("reduce-overhead", False)
    (tmp_path / "model.compile.json").write_text(json.dumps({"mode": "turbo"}))
    with pytest.raises(FailedPrecondition, match="mode 'turbo' is not one of default, reduce-overhead, max-autotune"):
        runtime.load()


def test_a_failed_compilation_is_a_precise_load_error(digits, monkeypatch):
    def broken_compile(module, **options):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    expected = r"torch-compile: compiling digits.pt2 .* failed at load: RuntimeError: InvalidCxxCompiler"
    with pytest.raises(FailedPrecondition, match=expected):
        _loaded("torch-compile", digits.pt2)


def test_xla_batches_run_at_power_of_two_sizes():
    assert [bucket(n) for n in (1, 2, 3, 5, 32, 33)] == [1, 2, 4, 8, 32, 64]


@pytest.mark.skipif(HAS_TORCH_XLA, reason="torch_xla is installed here")
def test_xla_runtime_says_torch_xla_is_missing(digits):
    with pytest.raises(FailedPrecondition) as info:
        _loaded("xla", digits.pt2)
    assert info.value.message == torch_xla_missing_message()


@pytest.mark.skipif(not HAS_TORCH_XLA, reason="torch_xla is not installed")
def test_xla_answers_equal_the_torch_runtime(digits, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    xla, eager = _loaded("xla", digits.pt2), _loaded("torch", digits.pt2)
    for n in (1, 5, 32):
        x = {"x": digits.x_test[:n]}
        np.testing.assert_allclose(xla.predict(x)["output_0"], eager.predict(x)["output_0"], atol=1e-5)
