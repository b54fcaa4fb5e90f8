"""`--unload-idle-variants-s` gives memory back: unrouted variants start unloaded, and once loaded on demand and idle
again, their memory leaves the process (the heap trimmed after each unload), not only the model's objects."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_lazy_variants import build
from slimserve.client.client import SlimServeClient
from tests.helpers import ServerProcess, wait_until

VARIANTS = 10


@pytest.mark.slow
def test_idle_unrouted_variants_leave_memory_and_come_back_on_demand(tmp_path):
    repo = build(tmp_path, VARIANTS, hidden=1024)
    model_bytes = (tmp_path / "mlp.onnx").stat().st_size
    x = np.random.default_rng(1).normal(size=(2, 256)).astype(np.float32)
    server = ServerProcess(repo, tmp_path / "server.log", "--unload-idle-variants-s", "10")  # long enough to load all ten first
    try:
        with SlimServeClient(server.address) as client:
            _, expected = client.infer("mlp", {"x": x})
            start = server.settled_rss()
            for i in range(VARIANTS):
                variant, outputs = client.infer("mlp", {"x": x}, variant=f"copy{i}")  # loads it: the request waits
                assert variant == f"copy{i}" and np.allclose(outputs["y"], expected["y"], atol=1e-5)
            loaded = server.settled_rss()
            assert loaded - start > 0.8 * VARIANTS * model_bytes  # each loaded copy holds its weights
            wait_until(lambda: server.settled_rss() < loaded - 0.8 * VARIANTS * model_bytes, "idle variants to leave memory", 60)
            variant, outputs = client.infer("mlp", {"x": x}, variant="copy3")  # and back on demand
            assert variant == "copy3" and np.allclose(outputs["y"], expected["y"], atol=1e-5)
    finally:
        server.proc.terminate()
        server.proc.wait(30)
