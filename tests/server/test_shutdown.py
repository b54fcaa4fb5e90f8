"""SIGTERM: the server stops accepting, finishes the call in flight, and exits 0."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from client.client import SlimServeClient, SlimServeClientError
from tests.conftest import free_port


def slow_matmul_onnx(path, n: int = 1024):
    """y = x @ W repeated: enough work to keep a call in flight for a moment."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [n, n], np.random.default_rng(0).normal(size=(n, n)).astype(np.float32).reshape(-1).tolist())
    nodes, prev = [], "x"
    for i in range(12):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def wait_ready(address: str, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            with SlimServeClient(address) as c:
                if c.server_ready():
                    return
        except SlimServeClientError:
            time.sleep(0.2)
    raise TimeoutError(f"slimserve at {address} did not become ready")


@pytest.mark.slow
def test_sigterm_finishes_inflight_call_then_exits_zero(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "start", "--repository", str(tmp_path / "repo"), "--grpc-port", str(port),
         "--metrics-port", "-1", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_ready(address, proc)
        with SlimServeClient(address) as c:
            c.register("slow", slow_matmul_onnx(tmp_path / "slow.onnx"))
            x = np.ones((512, 1024), np.float32)
            start = time.perf_counter()
            c.infer("slow", {"x": x})
            one_call = time.perf_counter() - start
            results = {}

            def call():
                try:
                    results["answer"] = c.infer("slow", {"x": x}, timeout=60)
                except SlimServeClientError as e:
                    results["error"] = e

            t = threading.Thread(target=call)
            t.start()
            time.sleep(min(0.05, one_call / 4))
            proc.send_signal(signal.SIGTERM)
            t.join(60)
        assert "answer" in results, f"the call in flight failed: {results.get('error')}"
        assert proc.wait(60) == 0
        with pytest.raises(SlimServeClientError) as e:
            with SlimServeClient(address) as c:
                c.server_live()
        assert e.value.code == "UNAVAILABLE"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
