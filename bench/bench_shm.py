"""What system shared memory saves on a large input: a batch of 224x224x3 FP32 images over the wire vs by region.

    python -m bench.bench_shm [--batch 4] [--requests 50]

Starts `slimserve start` as a child process with a model that only averages each image's channels (so the
serving path, not the model, is timed), then sends the same batch with tritonclient.grpc: in the message
(raw_input_contents), and from a registered POSIX shared-memory region (the client writes the batch into the
region once per request, as a producer on the same host would). Prints the median latency of each.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper

from bench.common import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def channel_mean_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 224, 224, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, 2], keepdims=0)
    model = helper.make_model(helper.make_graph([node], "mean", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def median_ms(fn, requests: int) -> float:
    fn()  # warm
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    batch = np.random.default_rng(0).random((args.batch, 224, 224, 3), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        address = f"127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "slimserve.server.cli",
                "start",
                "--repository",
                f"{tmp}/repo",
                "--grpc-port",
                str(port),
                "--metrics-port",
                "-1",
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
        )
        try:
            client = grpcclient.InferenceServerClient(url=address)
            wait_until(lambda: client.is_server_ready(), "slimserve to be ready", 120, interval=0.2, ignore=(Exception,))
            model = channel_mean_model(Path(tmp) / "mean.onnx")
            subprocess.run(
                [sys.executable, "-m", "slimserve.client.cli", "--server", address, "register", "mean", str(model)],
                check=True,
                cwd=ROOT,
                capture_output=True,
            )
            expected = batch.mean(axis=(1, 2))

            wire = grpcclient.InferInput("x", list(batch.shape), "FP32")

            def over_the_wire():
                wire.set_data_from_numpy(batch)
                out = client.infer("mean", [wire]).as_numpy("y")
                assert np.allclose(out, expected, atol=1e-4)

            handle = shm.create_shared_memory_region("bench_in", "/slimserve_bench_in", batch.nbytes)
            out_handle = shm.create_shared_memory_region("bench_out", "/slimserve_bench_out", expected.nbytes)
            try:
                client.register_system_shared_memory("bench_in", "/slimserve_bench_in", batch.nbytes)
                client.register_system_shared_memory("bench_out", "/slimserve_bench_out", expected.nbytes)
                region = grpcclient.InferInput("x", list(batch.shape), "FP32")
                region.set_shared_memory("bench_in", batch.nbytes)
                requested = grpcclient.InferRequestedOutput("y")
                requested.set_shared_memory("bench_out", expected.nbytes)

                def by_region():
                    shm.set_shared_memory_region(handle, [batch])
                    client.infer("mean", [region], outputs=[requested])
                    assert np.allclose(shm.get_contents_as_numpy(out_handle, np.float32, expected.shape), expected, atol=1e-4)

                wire_ms = median_ms(over_the_wire, args.requests)
                shm_ms = median_ms(by_region, args.requests)
            finally:
                client.unregister_system_shared_memory()
                shm.destroy_shared_memory_region(handle)
                shm.destroy_shared_memory_region(out_handle)
            mb = batch.nbytes / 1e6
            print(f"batch {args.batch} x 224x224x3 FP32 ({mb:.1f} MB), median of {args.requests} requests:")
            print(f"  over the wire      {wire_ms:8.2f} ms")
            print(f"  shared memory      {shm_ms:8.2f} ms  ({wire_ms / shm_ms:.1f}x; saves {wire_ms - shm_ms:.2f} ms)")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
