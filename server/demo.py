"""`make demo`: train a digits CNN, serve it with slimserve, and query it with slimctl and Triton's client.

Everything runs on this machine: the data ships inside scikit-learn, the server listens on loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def sh(*args: str, env: dict[str, str]) -> None:
    print("$ " + " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, env=env)


def triton_query(address: str, x: np.ndarray, labels: np.ndarray) -> None:
    """An unmodified tritonclient.grpc, as any Triton user would call it."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=address)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("logits")])
    logits = result.as_numpy("logits")
    accuracy = (logits.argmax(1) == labels).mean() * 100
    print(f"tritonclient.grpc: {len(x)} digits, served by variant '{result.get_response().model_version}', accuracy {accuracy:.2f}%")


def main() -> None:
    import torch

    from optimizer.zoo import export_onnx, export_pt2, load_digits_splits, train_digits_cnn

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    step("1. train a small CNN on scikit-learn's digits (8x8 images, 10 classes)")
    model, accuracy = train_digits_cnn(epochs=8)
    train, test = load_digits_splits()
    example = torch.from_numpy(test.x[:2])
    export_onnx(model, WORK / "digits.onnx", example)
    export_pt2(model, WORK / "digits.pt2", example)
    np.savez(WORK / "data.npz", x=test.x, labels=test.y)
    np.savez(WORK / "train.npz", x=train.x, labels=train.y)
    np.savez(WORK / "calibration.npz", x=train.x[:256])
    print(f"test accuracy {accuracy * 100:.2f}%; exported {WORK / 'digits.onnx'} and {WORK / 'digits.pt2'}")

    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "SLIMSERVE_SERVER": f"127.0.0.1:{grpc_port}"}
    step(f"2. start slimserve (gRPC 127.0.0.1:{grpc_port}, metrics :{metrics_port})")
    log = open(WORK / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "slimserve"), "start", "--repository", str(WORK / "repository"), "--grpc-port", str(grpc_port),
         "--metrics-port", str(metrics_port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([str(BIN / "slimctl"), "models"], env=env, capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"slimserve did not start; see {WORK / 'server.log'}")
            time.sleep(0.3)

        step("3. register the model (ONNX) and its torch.export twin (.pt2)")
        slimctl = BIN / "slimctl"
        sh(slimctl, "register", "digits", WORK / "digits.onnx", "--data", WORK / "data.npz", "--train", WORK / "train.npz",
           "--calibration", WORK / "calibration.npz", env=env)
        sh(slimctl, "register", "digits-torch", WORK / "digits.pt2", "--data", WORK / "data.npz", env=env)
        sh(slimctl, "models", env=env)

        step("4. query with slimctl and with Triton's own client")
        sh(slimctl, "infer", "digits", WORK / "data.npz", env=env)
        sh(slimctl, "infer", "digits-torch", WORK / "data.npz", "--variant", "baseline", env=env)
        triton_query(f"127.0.0.1:{grpc_port}", test.x, test.y)

        step("5. what Prometheus scrapes")
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        for line in body.splitlines():
            if line.startswith(("slimserve_requests_total", "slimserve_model_size_bytes")):
                print(line)
    finally:
        step("6. graceful shutdown (SIGTERM)")
        server.send_signal(signal.SIGTERM)
        print(f"slimserve exited with status {server.wait(60)}")


if __name__ == "__main__":
    main()
