"""Fixtures of the deployment tests: Prometheus' binaries, and one slimserve that has served traffic."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL_PROMETHEUS = ROOT / ".ci" / "install-prometheus"

MODEL = "tiny"
GOOD_REQUESTS = 12  # answered OK
BAD_REQUESTS = 1  # answered INVALID_ARGUMENT


@dataclass(frozen=True)
class PrometheusTools:
    prometheus: str
    promtool: str


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    """prometheus and promtool from PATH; installed with .ci/install-prometheus (apt) when missing."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        if not shutil.which("apt-get"):
            pytest.skip("prometheus/promtool are not installed and apt-get is not available to install Debian's `prometheus`")
        if os.geteuid() != 0:
            pytest.skip(
                "prometheus/promtool are not installed and installing Debian's `prometheus` needs root (run .ci/install-prometheus)"
            )
        out = subprocess.run(["bash", str(INSTALL_PROMETHEUS)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f".ci/install-prometheus failed:\n{out.stdout}\n{out.stderr}"
    return PrometheusTools(shutil.which("prometheus"), shutil.which("promtool"))


def make_classifier(path: Path) -> Path:
    """A 4-feature, 3-class linear classifier: logits = x @ W + b."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], rng.normal(size=12).astype(np.float32).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [0.0, 0.1, -0.1])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@dataclass
class ServedServer:
    handle: object  # tests.conftest.ServerHandle
    metrics_url: str

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def families(self) -> dict[str, object]:
        return {f.name: f for f in text_string_to_metric_families(self.scrape())}


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> ServedServer:
    """An in-process slimserve on free loopback ports that has served an A/B split with a shadow.

    Variants baseline (70%), copy (30%) and mirror (shadow), and ort (an optimize job's, no traffic); good and bad
    requests; feedback; then a rollout of copy starts.
    """
    from slimserve.client.client import SlimServeClient, SlimServeClientError
    from tests.conftest import ServerHandle

    root = tmp_path_factory.mktemp("deploy-server")
    model = make_classifier(root / "tiny.onnx")
    x = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    np.savez(root / "data.npz", x=x, labels=np.arange(32) % 3)
    handle = ServerHandle(root / "repository", job_yield="auto")  # the default a server starts with: its series exist
    try:
        with SlimServeClient(handle.address) as client:
            client.register(MODEL, model, data=root / "data.npz")
            client.optimize(MODEL, "graph-ort", variant_name="ort")  # a job: its series (paused seconds, run fraction)
            handle.add_variant(MODEL, "copy", model, recipe="copy")
            handle.add_variant(MODEL, "mirror", model, recipe="copy")
            client.traffic(MODEL, {"baseline": 70, "copy": 30}, shadows=["mirror"])
            for i in range(GOOD_REQUESTS):
                answer = client.infer_full(MODEL, {"x": x[i : i + 1]})
                client.feedback(MODEL, answer.request_id, int(i % 3))
            for _ in range(BAD_REQUESTS):
                with pytest.raises(SlimServeClientError):
                    client.infer(MODEL, {"x": np.zeros((1, 5), np.float32)}, variant="baseline")
            client.rollout_start(MODEL, "copy")  # its state, weight and decision series (the routing turns to a shadow of copy)
        yield ServedServer(handle, f"http://127.0.0.1:{handle.server.metrics_port}/metrics")
    finally:
        handle.stop()
