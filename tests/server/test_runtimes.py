"""Runtimes: execution-provider choice, both backends on the same model, GPU selection where a GPU exists."""

import numpy as np
import pytest

from slimserve.server.runtimes import RuntimeConfig, create_runtime
from slimserve.server.runtimes.onnx import choose_providers

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    "available, config, expected",
    [
        (ALL, RuntimeConfig(), ALL),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], RuntimeConfig(), ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (["CPUExecutionProvider"], RuntimeConfig(), ["CPUExecutionProvider"]),
        (ALL, RuntimeConfig(device="cpu"), ["CPUExecutionProvider"]),
        (ALL, RuntimeConfig(providers=("CUDAExecutionProvider",)), ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (["CPUExecutionProvider"], RuntimeConfig(providers=("CUDAExecutionProvider",)), ["CPUExecutionProvider"]),
    ],
)
def test_provider_preference(available, config, expected):
    assert choose_providers(config, available) == expected


def test_onnx_and_torch_runtimes_agree(digits):
    x = digits.x_test[:32]
    ort_rt = create_runtime("onnxruntime", digits.onnx, RuntimeConfig(intra_op_threads=1))
    torch_rt = create_runtime("torch", digits.pt2)
    ort_rt.load()
    torch_rt.load()
    assert [s.describe() for s in ort_rt.inputs] == [s.describe() for s in torch_rt.inputs] == ["FP32 [-1,1,8,8]"]
    assert ort_rt.device == "cpu" and ort_rt.providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(ort_rt.predict({"x": x})["logits"], torch_rt.predict({"x": x})["output_0"], rtol=1e-4, atol=1e-4)


def test_unknown_runtime_name(digits):
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'"):
        create_runtime("tensorflow", digits.onnx)


@pytest.mark.gpu
def test_gpu_node_runs_on_cuda(digits):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (install slimserve[gpu])")
    rt = create_runtime("onnxruntime", digits.onnx)
    rt.load()
    assert rt.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    torch_rt = create_runtime("torch", digits.pt2)
    torch_rt.load()
    assert torch_rt.device == "cuda"
    np.testing.assert_allclose(rt.predict({"x": digits.x_test})["logits"], torch_rt.predict({"x": digits.x_test})["output_0"], atol=1e-3)
