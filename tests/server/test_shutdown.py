"""SIGTERM: the server refuses new calls, finishes the call in flight (its answer delivered before the transport
closes), and exits 0."""

import signal
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from slimserve.client.client import SlimServeClientError
from tests.helpers import ServerProcess, free_port, wait_until


def slow_matmul_onnx(path, n: int = 1024):
    """y = x @ W repeated: enough work to keep a call in flight for a moment."""
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [n, n], np.random.default_rng(0).normal(size=(n, n)).astype(np.float32).reshape(-1).tolist()
    )
    nodes, prev = [], "x"
    for i in range(12):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


@pytest.mark.slow
def test_sigterm_finishes_inflight_call_then_exits_zero(tmp_path):
    server = ServerProcess(tmp_path / "repo", tmp_path / "server.log", metrics_port=free_port())
    try:
        with server.client() as c:
            c.register("slow", slow_matmul_onnx(tmp_path / "slow.onnx"))
            x = np.ones((512, 1024), np.float32)
            results = {}

            def call():
                try:
                    results["answer"] = c.infer("slow", {"x": x}, timeout=60)
                except SlimServeClientError as e:
                    results["error"] = e

            t = threading.Thread(target=call)
            t.start()
            # SIGTERM once the server counts the call in flight (not after a guessed sleep).
            wait_until(
                lambda: server.metric("slimserve_inflight_requests", model="slow") == 1 or "answer" in results,
                "the call to be in flight",
                60,
                interval=0.002,
            )
            assert "answer" not in results, "the call finished before SIGTERM could reach it in flight"
            server.proc.send_signal(signal.SIGTERM)
            # While the call in flight finishes, a new one is refused (UNAVAILABLE, for the client to go elsewhere),
            # as Triton does while it exits; once the transports close, gRPC itself refuses (also UNAVAILABLE).
            refusal = None
            with server.client() as late:
                while refusal is None and t.is_alive():
                    try:
                        late.infer("slow", {"x": np.ones((1, 1024), np.float32)}, timeout=60)
                    except SlimServeClientError as e:
                        refusal = e
            t.join(60)
        assert "answer" in results, f"the call in flight failed: {results.get('error')}"
        assert refusal is not None and refusal.code == "UNAVAILABLE", refusal
        assert "shutting down" in str(refusal), refusal  # the drain's refusal, not the closed transport's
        assert server.proc.wait(60) == 0
        with pytest.raises(SlimServeClientError) as e, server.client() as c:
            c.server_live()
        assert e.value.code == "UNAVAILABLE"
    finally:
        if server.proc.poll() is None:
            server.kill9()
