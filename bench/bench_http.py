"""What the REST port costs per request against gRPC, on the digits CNN at 1 and 16 callers.

    python -m bench.bench_http [--seconds 5] [--callers 1,16]

One `slimserve start` process serves both ports; closed-loop callers (threads, one persistent connection
or channel each) send the same 1x1x8x8 FP32 request over gRPC (raw tensors), HTTP with the binary tensor
extension, and HTTP with JSON tensors. Prints req/s, p50 / p99 latency and the server's CPU per request
(from /proc: what the protocol costs the server, whatever the Python callers cost the client).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from bench.common import cpu_seconds, free_port, say, slimserve_command, wait_until
from bench.loadgen import build_infer_request

Send = Callable[[], None]


def grpc_caller(address: str, payload: bytes) -> tuple[Send, Callable[[], None]]:
    channel = grpc.insecure_channel(address)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    return lambda: call(payload, timeout=30), channel.close


def http_caller(address: str, body: bytes, headers: dict[str, str]) -> tuple[Send, Callable[[], None]]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def send() -> None:
        conn.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")

    return send, conn.close


def run_point(make: Callable[[], tuple[Send, Callable[[], None]]], callers: int, seconds: float, pid: int) -> dict[str, float]:
    latencies: list[list[float]] = [[] for _ in range(callers)]
    start, stop = threading.Event(), threading.Event()

    def worker(i: int) -> None:
        send, close = make()
        send()  # connect and warm up before the window
        start.wait()
        own = latencies[i]
        while not stop.is_set():
            t0 = time.perf_counter()
            send()
            own.append(time.perf_counter() - t0)
        close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    start.set()
    time.sleep(seconds)
    stop.set()
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    for t in threads:
        t.join()
    all_latencies = sorted(x for own in latencies for x in own)
    count = len(all_latencies)
    return {
        "rps": count / elapsed,
        "p50_ms": statistics.median(all_latencies) * 1e3,
        "p99_ms": all_latencies[int(0.99 * (count - 1))] * 1e3,
        "server_cpu_us": cpu / count * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--callers", default="1,16")
    args = parser.parse_args()
    from slimserve.client.client import SlimServeClient
    from slimserve.optimizer.zoo import export_onnx, train_digits_cnn

    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    model, _ = train_digits_cnn(epochs=1)
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    import torch

    onnx_path = export_onnx(model, work / "digits.onnx", torch.from_numpy(x))
    grpc_port, http_port = free_port(), free_port()
    command = slimserve_command(work / "repository", grpc_port, http_port=http_port)
    server = subprocess.Popen(command)
    grpc_address, http_address = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    try:
        with SlimServeClient(grpc_address) as client:
            wait_until(lambda: client.models() is not None, "the server", 60, ignore=(Exception,))
            client.register("digits", onnx_path)
        payload = build_infer_request("digits", x)
        head = json.dumps(
            {
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8], "parameters": {"binary_data_size": x.nbytes}}],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        binary = (head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
        as_json = (
            json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.reshape(-1).tolist()}]}).encode(),
            {"Content-Type": "application/json"},
        )
        protocols = {
            "gRPC (raw)": lambda: grpc_caller(grpc_address, payload),
            "HTTP binary": lambda: http_caller(http_address, *binary),
            "HTTP JSON": lambda: http_caller(http_address, *as_json),
        }
        rows = []
        for callers in (int(c) for c in args.callers.split(",")):
            for name, make in protocols.items():
                say(f"{name} at {callers} callers", "bench.http")
                rows.append((name, callers, run_point(make, callers, args.seconds, server.pid)))
        print(f"{'protocol':<12} {'callers':>7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'server CPU µs/req':>18}")
        for name, callers, r in rows:
            print(f"{name:<12} {callers:>7} {r['rps']:>8.0f} {r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['server_cpu_us']:>18.0f}")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
