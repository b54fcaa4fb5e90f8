"""Shared fixtures: small real models (digits CNN as ONNX and .pt2), datasets, and an in-process server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from slimserve.client.datatypes import DATATYPE_TO_NUMPY
from slimserve.optimizer.zoo import export_onnx, export_pt2, load_digits_splits, train_digits_cnn
from tests.helpers import free_port


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class DigitsFiles:
    onnx: Path
    pt2: Path
    data: Path  # test split: x, labels
    train: Path  # train split: x, labels
    calibration: Path
    accuracy: float
    x_test: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> DigitsFiles:
    root = tmp_path_factory.mktemp("digits")
    model, accuracy = train_digits_cnn(epochs=3)
    train, test = load_digits_splits()
    example = torch.from_numpy(test.x[:2])
    np.savez(root / "data.npz", x=test.x, labels=test.y)
    np.savez(root / "train.npz", x=train.x, labels=train.y)
    np.savez(root / "calibration.npz", x=train.x[:200])
    return DigitsFiles(
        onnx=export_onnx(model, root / "digits.onnx", example),
        pt2=export_pt2(model, root / "digits.pt2", example),
        data=root / "data.npz",
        train=root / "train.npz",
        calibration=root / "calibration.npz",
        accuracy=accuracy,
        x_test=test.x,
        y_test=test.y,
    )


# Every datatype of the protocol with its ONNX element type (from the one datatype table); the model echoes each input.
ECHO_TYPES = {
    name: TensorProto.STRING if name == "BYTES" else helper.np_dtype_to_tensor_dtype(dtype) for name, dtype in DATATYPE_TO_NUMPY.items()
}


def make_echo_onnx(path: Path, types: list[str]) -> Path:
    """An ONNX model with one input and one output per datatype: out_t = Identity(in_t)."""
    inputs, outputs, nodes = [], [], []
    for name in types:
        elem = ECHO_TYPES[name]
        t = name.lower()
        inputs.append(helper.make_tensor_value_info(f"in_{t}", elem, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{t}", elem, ["batch", 3]))
        nodes.append(helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]))
    graph = helper.make_graph(nodes, "echo", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def echo_onnx(tmp_path_factory) -> Path:
    """Echoes every datatype of the protocol."""
    return make_echo_onnx(tmp_path_factory.mktemp("echo") / "echo.onnx", list(ECHO_TYPES))


@pytest.fixture(scope="session")
def echo_typed_onnx(tmp_path_factory) -> Path:
    """Echoes every datatype that has a typed contents field (all but FP16)."""
    return make_echo_onnx(tmp_path_factory.mktemp("echo") / "echo_typed.onnx", [t for t in ECHO_TYPES if t != "FP16"])


def echo_arrays(batch: int = 2, types: list[str] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name in types or ECHO_TYPES:
        key = f"in_{name.lower()}"
        if name == "BOOL":
            out[key] = rng.integers(0, 2, (batch, 3)).astype(bool)
        elif name == "BYTES":
            out[key] = np.array([[b"a", b"bc", "\u00e9".encode()]] * batch, dtype=object)
        elif name.startswith("FP"):
            out[key] = rng.normal(size=(batch, 3)).astype({"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[name])
        else:
            dtype = np.dtype(name.lower())
            info = np.iinfo(dtype)
            out[key] = rng.integers(max(info.min, -100), min(info.max, 100), (batch, 3)).astype(dtype)
    return out


class ServerHandle:
    """A slimserve running on its own event loop thread, on free loopback ports."""

    def __init__(self, repository: Path, **overrides) -> None:
        from slimserve.server.app import SlimServer
        from slimserve.server.settings import Settings

        # The job yield off and jobs at nice 0 unless a test asks (tests/server/test_throttle.py, test_jobs.py,
        # test_starvation.py do): in here the server's process is pytest's, the test's own callers included, so the
        # yield counted their CPU as serving load and held a job to 1 slice in 20 (test_cli_rollout_wait: 42 s, 7 s
        # with the yield off), and a SCHED_IDLE worker (--job-nice 19) got no core while the test's traffic thread used
        # its group's share (the same test, beside a CPU burner in another autogroup: not done in 300 s).
        defaults = {"http_port": 0, "job_yield": "off", "job_nice": 0}
        self.settings = Settings(repository=repository, grpc_port=free_port(), metrics_port=0, **{**defaults, **overrides})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = SlimServer(self.settings)
        self.metrics = self.server.metrics
        self.call(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.http_address = f"127.0.0.1:{self.server.http_port}" if self.server.http_port is not None else None

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_variant(self, model: str, name: str, source: Path, recipe: str = "test") -> None:
        """Stores `source` (ONNX) as a ready variant and loads it live, as a finished optimizer job would."""
        from slimserve.server.store.manifest import VariantInfo

        repository = self.server.repository
        with repository.staging() as staged:
            target = staged / name
            target.mkdir()
            (target / "model.onnx").write_bytes(source.read_bytes())
            info = VariantInfo(
                name,
                recipe=recipe,
                parent="baseline",
                runtime="onnxruntime",
                format="onnx",
                file="model.onnx",
                size_bytes=source.stat().st_size,
            )
            repository.add_variant(model, target, info)
        self.call(self.server.dataplane.refresh(model))

    def stop(self, grace: float = 1.0) -> None:
        if self.loop.is_closed():
            return
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def server_factory(tmp_path) -> Iterator:
    started: list[ServerHandle] = []

    def start(repository: Path | None = None, **overrides) -> ServerHandle:
        handle = ServerHandle(repository or tmp_path / "repository", **overrides)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        try:
            handle.stop()
        except Exception:
            pass


@pytest.fixture
def server(server_factory) -> ServerHandle:
    return server_factory()


@pytest.fixture
def client(server):
    from slimserve.client.client import SlimServeClient

    with SlimServeClient(server.address) as c:
        yield c
