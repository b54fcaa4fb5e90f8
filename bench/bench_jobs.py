"""What serving keeps while an optimizer job runs: the same closed-loop load before, during and after a job.

    python -m bench.bench_jobs [--jobs prune-structured,quantize-static] [--seconds 8] [--callers 4] [--flags "..."]

Trains the digits CNN, registers it on a `slimserve start` process (with its train and calibration data), and for
each job recipe in turn measures `--callers` closed-loop gRPC callers (batch 1, two client processes) for
`--seconds`: before the job, while it runs in its worker (the window starts once the worker reports its own
progress, and the job must still be running when it ends), and after it. Prints p50 / p99 / throughput side by side
and the during / before ratios (targets: p99 <= 1.3x, throughput >= 0.85x, no errors), as a table and as JSON.
`--flags` passes server flags (e.g. "--job-nice 0 --optimizer-threads 2" to see what the worker's priority buys).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import wait_until
from bench.loadgen import PointResult, build_infer_request, run_point
from slimserve.client.client import SlimServeClient
from slimserve.optimizer.zoo import export_onnx, load_digits_splits, train_digits_cnn
from tests.helpers import ServerProcess


def digits_files(root: Path) -> dict[str, Path]:
    model, _ = train_digits_cnn(epochs=3)
    train, test = load_digits_splits()
    np.savez(root / "data.npz", x=test.x, labels=test.y)
    np.savez(root / "train.npz", x=train.x, labels=train.y)
    np.savez(root / "calibration.npz", x=train.x[:200])
    onnx = export_onnx(model, root / "digits.onnx", torch.from_numpy(test.x[:2]))
    return {"onnx": onnx, "data": root / "data.npz", "train": root / "train.npz", "calibration": root / "calibration.npz", "x": test.x[:1]}


def row(phase: str, p: PointResult) -> dict:
    return {
        "phase": phase,
        "requests": p.completed,
        "throughput": round(p.throughput, 1),
        "p50_ms": round(p.percentile(50), 3),
        "p99_ms": round(p.percentile(99), 3),
        "max_ms": round(float(p.latencies_ms.max()), 1) if len(p.latencies_ms) else None,
        "errors": p.error_count,
        "server_cpu_s": None if p.server_cpu_s is None else round(p.server_cpu_s, 2),
    }


def measure_job(server: ServerProcess, client: SlimServeClient, recipe: str, payload: bytes, args) -> dict:
    def load(phase: str) -> dict:
        return row(phase, run_point(phase, server.address, payload, args.callers, args.seconds, 1.0, server_pid=server.pid))

    before = load("before")
    variant, _ = client.optimize("digits", recipe, variant_name=f"bench-{recipe}", detach=True)
    job_id = variant["job_id"]

    def state() -> dict:
        return next(j for j in client.jobs("digits") if j["id"] == job_id)

    started = time.monotonic()
    wait_until(
        lambda: state()["stage"] not in ("", "queued", "running") or state()["status"] != "running", "the worker's progress", 300, 0.1
    )
    worker_up_s = time.monotonic() - started
    during = load("during")
    still_running = state()["status"] == "running"
    end = wait_until(lambda: (s := state())["status"] not in ("queued", "running") and s, f"job {job_id} to end", 1800, 0.5)
    job_s = time.monotonic() - started
    after = load("after")
    return {
        "recipe": recipe,
        "job": {"id": job_id, "status": end["status"], "message": end["message"], "seconds": round(job_s, 1)},
        "worker_first_progress_s": round(worker_up_s, 1),
        "window_inside_job": still_running,
        "phases": [before, during, after],
        "ratios": {
            "p50": round(during["p50_ms"] / before["p50_ms"], 2),
            "p99": round(during["p99_ms"] / before["p99_ms"], 2),
            "throughput": round(during["throughput"] / before["throughput"], 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="prune-structured,quantize-static", help="job recipes, one after the other")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured window")
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--flags", default="", help="extra `slimserve start` flags")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = digits_files(root)
        server = ServerProcess(root / "repo", root / "server.log", *shlex.split(args.flags))
        try:
            with server.client() as c:
                c.register("digits", files["onnx"], data=files["data"], train=files["train"], calibration=files["calibration"])
                wait_until(lambda: c.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's measure", 120, 0.2)
                payload = build_infer_request("digits", files["x"])
                results = [measure_job(server, c, recipe, payload, args) for recipe in args.jobs.split(",")]
        finally:
            server.stop()
    out = {"cores": os.cpu_count(), "callers": args.callers, "seconds": args.seconds, "flags": args.flags, "results": results}
    for r in results:
        print(f"\n{r['recipe']}: job {r['job']['status']} in {r['job']['seconds']} s; window inside the job: {r['window_inside_job']}")
        print(f"{'phase':8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6} {'server cpu s':>12}")
        for p in r["phases"]:
            print(
                f"{p['phase']:8} {p['throughput']:>8} {p['p50_ms']:>8} {p['p99_ms']:>8} {p['max_ms']:>8} {p['errors']:>6} {p['server_cpu_s']!s:>12}"
            )
        ratios = r["ratios"]
        print(f"during / before: p50 {ratios['p50']}x, p99 {ratios['p99']}x, throughput {ratios['throughput']}x")
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
