"""What serving keeps while an optimizer job runs: the same closed-loop load before, during and after a job.

    python -m bench.bench_jobs [--jobs prune-structured,quantize-static] [--seconds 8] [--callers 4] [--flags "..."]
    python -m bench.bench_jobs --jobs prune-structured --finetune-epochs 30 --seconds 12 --rounds 4
    python -m bench.bench_jobs --model minilm --jobs auto --cancel-after-rounds [--repeat 3]

Trains the digits CNN (or, with `--model minilm`, builds all-MiniLM-L6-v2 with its real weights through bench/zoo,
once, into bench/results/serving-cache/; batch-1 requests of 128 tokens), registers it on a `slimserve start` process
(with its evaluation, train and calibration data), and for
each job recipe in turn measures `--callers` closed-loop gRPC callers (batch 1, two client processes): `--seconds`
with no job, then, from the moment the job's worker process exists, `--rounds` pairs of windows with the worker
stopped (SIGSTOP: the same server, the same process tree, the job not computing) and running, interleaved (which
goes first alternates) so that other load on the machine weighs on both alike (a round counts only if the job
still ran at the end of its running window). `--cancel-after-rounds` cancels the job once its rounds are measured
(MiniLM's `auto` trains students for an hour on a small node: what serving keeps is measured in its first minutes);
`--repeat N` runs the list N times on the same server (variant names get the run's number).
Prints p50 / p99 / throughput side by side and the running / paused ratios (targets: p99 <= 1.3x, throughput
>= 0.85x, no errors), as a table and as JSON.
`--flags` passes server flags (e.g. "--job-nice 0 --optimizer-threads 2" to see what the worker's priority buys).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
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


def digits_files(root: Path, calibration_rows: int = 200) -> dict[str, Path]:
    model, _ = train_digits_cnn(epochs=3)
    train, test = load_digits_splits()
    np.savez(root / "data.npz", x=test.x, labels=test.y)
    np.savez(root / "train.npz", x=train.x, labels=train.y)
    rows = np.resize(np.arange(len(train.x)), calibration_rows)  # the train split, repeated past its length
    np.savez(root / "calibration.npz", x=train.x[rows])
    onnx = export_onnx(model, root / "digits.onnx", torch.from_numpy(test.x[:2]))
    return {"onnx": onnx, "data": root / "data.npz", "train": root / "train.npz", "calibration": root / "calibration.npz", "x": test.x[:1]}


def minilm_files() -> dict:
    """all-MiniLM-L6-v2 (real weights) as bench/zoo builds it, once (bench/results/serving-cache/minilm)."""
    from bench.serving_models import CHOICES, prepare

    files = prepare(CHOICES["minilm"], fresh=False)
    return {"onnx": files.onnx, "data": files.data, "train": files.train, "calibration": files.calibration, "x": files.sample}


def row(phase: str, p: PointResult) -> dict:
    return {
        "phase": phase,
        "requests": p.completed,
        "throughput": round(p.throughput, 1),
        "p50_ms": round(p.percentile(50), 3),
        "p99_ms": round(p.percentile(99), 3),
        "max_ms": round(float(p.latencies_ms.max()), 1) if len(p.latencies_ms) else None,
        "errors": p.error_count,
        # The server process alone, and its children (the job's worker): the tree's CPU counted the worker's as serving's.
        "server_cpu_s": None if p.server_own_cpu_s is None else round(p.server_own_cpu_s, 2),
        "worker_cpu_s": None
        if p.server_cpu_s is None or p.server_own_cpu_s is None
        else round(max(0.0, p.server_cpu_s - p.server_own_cpu_s), 2),
    }


def worker_pids(server_pid: int) -> list[int]:
    """The server's job workers (`python -m slimserve.server.management.worker`), from /proc."""
    out = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in map(int, children):
            try:
                if b"slimserve.server.management.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
            except OSError:
                continue
    return out


def merged(phase: str, points: list[PointResult]) -> dict:
    """Windows of one phase pooled: their requests over their seconds, percentiles over all their latencies."""
    pooled = PointResult(
        phase,
        points[0].concurrency,
        sum(p.seconds for p in points),
        sum(p.completed for p in points),
        np.concatenate([p.latencies_ms for p in points]),
        {k: sum(p.errors.get(k, 0) for p in points) for p in points for k in p.errors},
        server_cpu_s=sum(p.server_cpu_s or 0.0 for p in points),
        server_own_cpu_s=sum(p.server_own_cpu_s or 0.0 for p in points),
    )
    return row(phase, pooled)


def one_pass_recipe(workdir: Path, name: str, config: dict) -> str:
    """A recipe file of the one pass `name` with `config` (a job longer than the preset's, to measure inside)."""
    path = workdir / f"{name}.json"
    path.write_text(json.dumps({"version": 1, "name": name, "passes": [{"pass": name, "config": config}]}))
    return str(path)


def ratios(during: dict, before: dict) -> dict:
    return {
        "p50": round(during["p50_ms"] / before["p50_ms"], 2),
        "p99": round(during["p99_ms"] / before["p99_ms"], 2),
        "throughput": round(during["throughput"] / before["throughput"], 2),
    }


def measure_job(server: ServerProcess, client: SlimServeClient, recipe: str, payload: bytes, args, run: int = 0) -> dict:
    def load(phase: str, seconds: float) -> PointResult:
        return run_point(phase, server.address, payload, args.callers, seconds, 1.0, server_pid=server.pid)

    idle = load("no job", args.seconds)
    asked = recipe
    if recipe == "quantize-static" and args.calibration_rows > 256:  # the pass calibrates on 256 rows unless told more
        asked = one_pass_recipe(args.workdir, recipe, {"max_samples": args.calibration_rows, "calibrate_method": args.calibrate_method})
    if recipe == "prune-structured" and args.finetune_epochs:  # more fine-tuning: a job long enough to hold windows of seconds
        asked = one_pass_recipe(args.workdir, recipe, {"finetune": {"epochs": args.finetune_epochs}})
    variant, _ = client.optimize(args.model, asked, variant_name=f"bench-{recipe}-{run}", detach=True)
    job_id = variant["job_id"]

    def state() -> dict:
        return next(j for j in client.jobs(args.model) if j["id"] == job_id)

    started = time.monotonic()
    wait_until(lambda: worker_pids(server.pid) or state()["status"] not in ("queued", "running"), "the job's worker", 300, 0.05)
    worker_up_s = time.monotonic() - started
    if args.pin_worker is not None:  # the worker (its threads, and those it starts later) on one CPU only
        for pid in worker_pids(server.pid):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), {args.pin_worker})
    # Interleaved: the worker stopped (SIGSTOP), then running, round after round, so that the other load on the
    # machine weighs on both alike; a running window counts only if the job still ran when it ended.
    paused, running = [], []

    def measure_paused() -> PointResult | None:
        pids = worker_pids(server.pid)
        if not pids:
            return None
        # The worker's process group: a helper it runs (ONNX Runtime's quantizer) is the job computing too.
        for pid in pids:
            os.killpg(pid, signal.SIGSTOP)
        # Stopped again after a slice of the server's job yield (--job-yield): a stop the yield made and then
        # resumed is replaced by ours, which the yield then leaves alone (it never resumes a stop it did not make).
        time.sleep(0.25)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGSTOP)
        try:
            return load("job paused", args.seconds / args.rounds)
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGCONT)

    for i in range(args.rounds):  # paused first in even rounds, running first in odd ones: neither always goes first
        if state()["status"] != "running":
            break
        first_paused = measure_paused() if i % 2 == 0 else None
        point = load("job running", args.seconds / args.rounds)
        if state()["status"] != "running":
            break
        second_paused = measure_paused() if i % 2 == 1 else None
        if (first_paused or second_paused) is None:
            break
        paused.append(first_paused or second_paused)
        running.append(point)
    if args.cancel_after_rounds and state()["status"] == "running":
        client.cancel_job(job_id)
    end = wait_until(lambda: (s := state())["status"] not in ("queued", "running") and s, f"job {job_id} to end", 1800, 0.5)
    job_s = time.monotonic() - started
    result = {
        "recipe": recipe,
        "run": run,
        "job": {"id": job_id, "status": end["status"], "message": end["message"], "seconds": round(job_s, 1)},
        "worker_started_s": round(worker_up_s, 1),
        "rounds": len(running),
        "phases": [row("no job", idle)],
    }
    if running:
        before, during = merged("job paused", paused), merged("job running", running)
        result["phases"] += [before, during]
        result["ratios"] = ratios(during, before)
        result["ratios_vs_no_job"] = ratios(during, result["phases"][0])  # the "the same load just before"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="prune-structured,quantize-static", help="job recipes, one after the other")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds measured in each phase (split over the rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="paused / running window pairs while the job runs")
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--calibrate-method", default="minmax", help="quantize-static's calibration with --calibration-rows over 256")
    parser.add_argument(
        "--calibration-rows", type=int, default=200, help="calibration samples (more: a longer quantize-static job to measure inside)"
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="prune-structured's fine-tuning epochs (0: the recipe's 3; more: a longer job to measure inside)",
    )
    parser.add_argument("--flags", default="", help="extra `slimserve start` flags")
    parser.add_argument("--model", choices=("digits", "minilm"), default="digits")
    parser.add_argument("--repeat", type=int, default=1, help="run the job list this many times (interleaved: a, b, a, b, ...)")
    parser.add_argument("--cancel-after-rounds", action="store_true", help="cancel each job once its rounds are measured")
    parser.add_argument("--pin-worker", type=int, default=None, help="pin the job's worker to this CPU (sched_setaffinity)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = digits_files(root, args.calibration_rows) if args.model == "digits" else minilm_files()
        args.workdir = root
        server = ServerProcess(root / "repo", root / "server.log", *shlex.split(args.flags))
        try:
            with server.client() as c:
                c.register(args.model, files["onnx"], data=files["data"], train=files["train"], calibration=files["calibration"])
                registered = time.monotonic()
                wait_until(lambda: c.model(args.model)["variants"][0]["latency_p50_ms"] is not None, "the baseline's measure", 600, 0.2)
                baseline_measure_s = round(time.monotonic() - registered, 1)  # the measure after a registration
                payload = build_infer_request(args.model, files["x"])
                recipes = args.jobs.split(",")
                results = [measure_job(server, c, recipe, payload, args, run) for run in range(args.repeat) for recipe in recipes]
        finally:
            server.stop()
    out = {
        "model": args.model,
        "baseline_measure_s": baseline_measure_s,
        "cores": os.cpu_count(),
        "callers": args.callers,
        "seconds": args.seconds,
        "flags": args.flags,
        "pin_worker": args.pin_worker,
        "results": results,
    }
    for r in results:
        print(
            f"\n{r['recipe']} (run {r['run']}): job {r['job']['status']} in {r['job']['seconds']} s; {r['rounds']} paused / running round(s)"
        )
        print(
            f"{'phase':12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6} {'server cpu s':>12} {'worker cpu s':>12}"
        )
        for p in r["phases"]:
            print(
                f"{p['phase']:12} {p['throughput']:>8} {p['p50_ms']:>8} {p['p99_ms']:>8} {p['max_ms']:>8} {p['errors']:>6} "
                f"{p['server_cpu_s']!s:>12} {p['worker_cpu_s']!s:>12}"
            )
        if "ratios" in r:
            for against, key in (("paused", "ratios"), ("no job before", "ratios_vs_no_job")):
                got = r[key]
                print(f"running / {against}: p50 {got['p50']}x, p99 {got['p99']}x, throughput {got['throughput']}x")
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
