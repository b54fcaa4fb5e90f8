"""`make demo`: the whole story on the bundled digits data.

Train a small CNN, serve it, query it with slimctl and Triton's own client, optimize it into INT8
variants, split live traffic between them with a shadow, drive load with ground-truth feedback,
print `slimctl compare`: which variant is faster, cheaper and as accurate, then let the rollout
controller promote a good variant and roll back a damaged one by itself.

Everything runs on this machine: the data ships inside scikit-learn, the server listens on loopback.
"""

from __future__ import annotations

import json
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


def drive_load(address: str, x: np.ndarray, labels: np.ndarray, requests: int, callers: int) -> None:
    """Single-sample requests from several callers, each answered request labelled with its ground truth."""
    import threading

    from slimserve.client.client import SlimServeClient

    per_caller = requests // callers
    errors: list[str] = []
    start = time.perf_counter()

    def caller(k: int) -> None:
        with SlimServeClient(address) as client:
            for i in range(per_caller):
                j = (k * per_caller + i) % len(x)
                try:
                    answer = client.infer_full("digits", {"x": x[j : j + 1]})
                    client.feedback("digits", answer.request_id, int(labels[j]))
                except Exception as e:  # reported below; the demo goes on
                    errors.append(str(e))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    print(f"{per_caller * callers} requests from {callers} callers in {elapsed:.1f} s, each followed by its label; errors: {len(errors)}")
    for e in errors[:3]:
        print(f"  {e}")


# A short plan for the demo's traffic (the defaults want thousands of requests a stage): one canary step at 50%.
DEMO_PLAN = {
    "steps": [50],
    "min_requests": 150,
    "max_stage_s": 120,
    "gates": {"error": 0.05, "latency_p50": 3.0, "latency_p99": None, "accuracy": 0.05, "agreement": 0.9, "cost": 5.0},
}
# Hard pruning with next to no fine-tuning: a variant that still runs but answers wrong, for the controller to catch.
DAMAGE_RECIPE = {
    "version": 1,
    "name": "damage",
    "passes": [{"pass": "prune-weight", "config": {"sparsity": 0.99, "finetune": {"epochs": 1, "lr": 1e-7, "max_samples": 32}}}],
}


def follow_rollout(address: str, x: np.ndarray, labels: np.ndarray, timeout: float = 180.0) -> dict:
    """Drives labelled traffic until the rollout ends (the controller looks every second), then returns its status."""
    from slimserve.client.client import SlimServeClient

    deadline = time.monotonic() + timeout
    with SlimServeClient(address) as client:
        status = client.rollout_status("digits")
        while status["state"] in ("shadow", "canary") and time.monotonic() < deadline:
            drive_load(address, x, labels, requests=200, callers=4)
            status = client.rollout_status("digits")
            print(f"rollout of '{status['variant']}': {status['state']}")
    return status


def main() -> None:
    import torch

    from slimserve.optimizer.zoo import export_onnx, export_pt2, load_digits_splits, train_digits_cnn

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
    log = open(WORK / "server.log", "w")  # noqa: SIM115  the server process writes it until it stops
    server = subprocess.Popen(
        [
            str(BIN / "slimserve"),
            "start",
            "--repository",
            str(WORK / "repository"),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
            "--rollout-interval-s",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([str(BIN / "slimctl"), "models"], env=env, capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"slimserve did not start; see {WORK / 'server.log'}")
            time.sleep(0.3)

        step("3. register the model (ONNX) and its torch.export twin (.pt2)")
        slimctl = BIN / "slimctl"
        sh(
            slimctl,
            "register",
            "digits",
            WORK / "digits.onnx",
            "--data",
            WORK / "data.npz",
            "--train",
            WORK / "train.npz",
            "--calibration",
            WORK / "calibration.npz",
            env=env,
        )
        sh(slimctl, "register", "digits-torch", WORK / "digits.pt2", "--data", WORK / "data.npz", env=env)
        sh(slimctl, "models", env=env)

        step("4. query with slimctl and with Triton's own client")
        sh(slimctl, "infer", "digits", WORK / "data.npz", env=env)
        sh(slimctl, "infer", "digits-torch", WORK / "data.npz", "--variant", "baseline", env=env)
        # In its own process: tritonclient's generated protos and ours both define package `inference`.
        subprocess.run([sys.executable, "-m", "examples.demo", "triton", f"127.0.0.1:{grpc_port}", str(WORK / "data.npz")], check=True)

        step("5. optimize: static INT8 (calibrated QDQ) and dynamic INT8, each measured against the baseline")
        sh(slimctl, "optimize", "digits", "--recipe", "quantize-static", "--name", "int8", env=env)
        sh(slimctl, "optimize", "digits", "--recipe", "quantize-dynamic", "--name", "int8-dynamic", env=env)
        sh(slimctl, "variants", "digits", env=env)

        step("6. live A/B: baseline 50% / int8 50%, int8-dynamic as a shadow")
        sh(slimctl, "traffic", "digits", "baseline=50", "int8=50", "--shadow", "int8-dynamic", env=env)
        drive_load(f"127.0.0.1:{grpc_port}", test.x, test.y, requests=3000, callers=8)
        sh(slimctl, "compare", "digits", env=env)

        step("7. promote the winner, and roll back")
        sh(slimctl, "promote", "digits", "int8", env=env)
        sh(slimctl, "rollback", "digits", env=env)

        step("8. rollouts by themselves: int8 shadowed, canaried and promoted by its gates; a damaged variant rolled back")
        (WORK / "plan.json").write_text(json.dumps(DEMO_PLAN))
        (WORK / "damage.json").write_text(json.dumps(DAMAGE_RECIPE))
        sh(slimctl, "optimize", "digits", "--recipe", WORK / "damage.json", "--name", "damaged", "--keep-over-budget", env=env)
        for variant in ("int8", "damaged"):
            sh(slimctl, "rollout", "start", "digits", variant, "--plan", WORK / "plan.json", env=env)
            follow_rollout(f"127.0.0.1:{grpc_port}", test.x, test.y)
            sh(slimctl, "rollout", "status", "digits", env=env)

        step("9. what Prometheus scrapes (a few of the series)")
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        for line in body.splitlines():
            if (
                line.startswith(
                    (
                        "slimserve_requests_total",
                        "slimserve_inference_cost_dollars_total",
                        "slimserve_traffic_weight_ratio",
                        "slimserve_online_accuracy_ratio",
                        "slimserve_shadow_agreements_total",
                        "slimserve_rollout_decisions_total",
                    )
                )
                and 'model="digits"' in line
                and not (line.startswith("slimserve_rollout_decisions_total") and line.endswith(" 0.0"))  # decisions taken only
            ):
                print(line)
    finally:
        step("10. graceful shutdown (SIGTERM)")
        server.send_signal(signal.SIGTERM)
        print(f"slimserve exited with status {server.wait(60)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["triton"]:
        with np.load(sys.argv[3]) as data:
            triton_query(sys.argv[2], data["x"], data["labels"])
    else:
        main()
