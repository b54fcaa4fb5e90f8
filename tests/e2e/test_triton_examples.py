"""Triton's own example clients (tests/e2e/triton_examples, unmodified) against slimserve over gRPC and HTTP/REST."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from client.client import SlimServeClient
from tests.e2e.test_triton_http import _io, _save, simple_onnx, simple_string_onnx
from tests.helpers import ServerProcess

EXAMPLES = Path(__file__).parent / "triton_examples"


def simple_int8_onnx(path: Path) -> Path:
    """Triton's `simple_int8`: `simple` over INT8 tensors."""
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]), helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    return _save(path, nodes, _io("INPUT", T.INT8), _io("OUTPUT", T.INT8))


def simple_identity_onnx(path: Path) -> Path:
    """Triton's `simple_identity`: OUTPUT0 = INPUT0, BYTES [-1, 16]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "simple_identity",
        [helper.make_tensor_value_info("INPUT0", T.STRING, ["batch", 16])],
        [helper.make_tensor_value_info("OUTPUT0", T.STRING, ["batch", 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-examples")
    # --server-name triton: the health_metadata examples check the name ServerMetadata answers.
    server = ServerProcess(root / "repo", root / "server.log", "--server-name", "triton", http=True)
    try:
        with SlimServeClient(server.address) as client:
            for name, make in (
                ("simple", simple_onnx),
                ("simple_string", simple_string_onnx),
                ("simple_int8", simple_int8_onnx),
                ("simple_identity", simple_identity_onnx),
            ):
                client.register(name, make(root / f"{name}.onnx"))
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.py")))
def test_the_example_passes_unmodified(served, example):
    # reuse_infer_objects_client speaks HTTP by default, like every simple_http_* example.
    url = served.http_address if ("http" in example or example == "reuse_infer_objects_client") else served.address
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{example}.py"), "-u", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{example} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.mark.slow
def test_the_http_model_control_example_passes_on_a_repository_of_seven_models(tmp_path):
    """simple_http_model_control.py counts Triton's test repository (7 models), loads `simple` with a config override,
    refuses an invalid one and a wrong name with "failed to load", and unloads."""
    server = ServerProcess(tmp_path / "repo", tmp_path / "server.log", http=True)
    try:
        with SlimServeClient(server.address) as client:
            client.register("simple", simple_onnx(tmp_path / "simple.onnx"))
            for i in range(6):
                client.register(f"other{i}", simple_onnx(tmp_path / f"other{i}.onnx"))
        example = EXAMPLES / "model_control" / "simple_http_model_control.py"
        done = subprocess.run([sys.executable, str(example), "-u", server.http_address], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "PASS: model control" in done.stdout, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    finally:
        server.stop()
