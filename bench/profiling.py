"""Where slimserve's time goes under load: per-thread CPU from /proc and py-spy samples summarized by category."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench.common import RESULTS, ROOT, cpu_seconds, thread_cpu
from bench.loadgen import run_point
from bench.servers import Target


def python_thread_names(pyspy: Path, pid: int) -> dict[int, str]:
    """Python's names of a process's threads (compute_0, MainThread, ...) from one `py-spy dump`."""
    import re

    try:
        dump = subprocess.run([str(pyspy), "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'^Thread (\d+) \((?:active|idle)[^)]*\): "([^"]*)"', dump, re.M)}


# Where a sample's time goes: the first pattern (in this order) found anywhere in its stack.
CATEGORIES = (
    ("onnxruntime Session.run", ("onnxruntime_inference_collection.py", "libonnxruntime", "onnxruntime_pybind")),
    ("request decode (protobuf -> numpy)", ("decode_request_inputs", "decode_raw", "decode_contents")),
    ("response encode (numpy -> protobuf)", ("infer_response", "fill_output", "encode_raw", "encode_contents")),
    ("batcher (server/batching/batcher.py)", ("server/batching/batcher.py",)),
    ("routing, stats, feedback", ("server/store/traffic.py", "server/telemetry/statistics.py")),
    ("metrics (prometheus_client)", ("prometheus_client", "server/telemetry/metrics.py")),
    ("servicer and data plane (server/)", ("server/",)),
    ("grpc (cython, aio server)", ("grpc/", "cygrpc", "_cython")),
    # Cython (grpc aio) and C (protobuf upb parse / serialize) code has no Python frame of its own: without
    # --native its time is charged to the asyncio callback that ran it (Handle._run).
    ("grpc aio + protobuf C code under asyncio callbacks", ("Handle._run (asyncio/events.py",)),
    ("asyncio event loop (select, scheduling)", ("asyncio/", "selectors.py", "_asynciomodule")),
    ("compute thread-pool hand-off (wake, queue, futures)", ("concurrent/futures", "threading.py")),
)


def category_of(frames: list[str], thread: str = "") -> str:
    if "_poll_wrapper" in thread:  # grpc aio's completion-queue poller: cython under Thread.run
        return "grpc aio poller thread (cython)"
    for name, patterns in CATEGORIES:
        if any(p in f for f in frames for p in patterns):
            return name
    return "other"


def summarize_collapsed(path: Path, top: int = 25) -> dict:
    """Shares of py-spy's raw (collapsed stack) samples: by category, by thread, and by leaf frame (self time)."""
    self_counts: Counter = Counter()
    categories: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        thread = next((f.split(": ", 1)[-1] for f in frames if f.startswith("thread (")), "?")
        # The main thread's root frames (the CLI that started the loop) say nothing about the work.
        frames = [f for f in frames if not f.startswith("thread (") and "server/cli.py" not in f]
        total += n
        threads[thread] += n
        self_counts[frames[-1] if frames else "?"] += n
        categories[category_of(frames, thread)] += n
    share = lambda c: [{"name": k, "share": n / total} for k, n in c.most_common(top)]  # noqa: E731
    return {"samples": total, "by_category": share(categories), "by_thread": share(threads), "self": share(self_counts)}


def profile_slimserve(target: Target, seconds: float, concurrency: int, client_processes: int, native: bool) -> dict:
    """Per-thread CPU under load from /proc, then py-spy samples (collapsed stacks and a flame graph)."""
    pid = target.server.process.pid
    pyspy = Path(sys.executable).with_name("py-spy")
    names = python_thread_names(pyspy, pid) if pyspy.exists() else {}
    out: dict = {"concurrency": concurrency}
    before, cpu0 = thread_cpu(pid), cpu_seconds(pid)
    point = run_point(target.name, target.server.address, target.payload, concurrency, seconds, 0.0, processes=client_processes)
    after, cpu1 = thread_cpu(pid), cpu_seconds(pid)
    wall = seconds + 0.05
    per_thread: Counter = Counter()
    for tid, (comm, cpu) in after.items():
        label = names.get(tid) or f"{comm} (native)"
        per_thread[label] += cpu - before.get(tid, (comm, 0.0))[1]
    out["throughput_rps"] = point.throughput
    out["server_cores_busy"] = (cpu1 - cpu0) / wall
    out["server_cpu_us_per_request"] = 1e6 * (cpu1 - cpu0) / max(point.completed, 1)
    out["client_cpu_us_per_request"] = 1e6 * point.client_cpu_s / max(point.completed, 1)
    out["cores_by_thread"] = {k: round(v / wall, 3) for k, v in per_thread.most_common() if v > 0}
    if not pyspy.exists():
        out["py_spy"] = "py-spy is not installed in this virtualenv: pip install py-spy (it is in the bench extra)"
        return out
    results = {}

    def load() -> None:
        results["point"] = run_point(
            target.name, target.server.address, target.payload, concurrency, seconds * 2 + 4, 0.0, processes=client_processes
        )

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(1.5)
    raw, svg = RESULTS / "profile-slimserve.txt", RESULTS / "profile-slimserve.svg"
    common = ["--pid", str(pid), "--duration", str(int(max(1, seconds))), "--rate", "200", "--threads"]
    # Non-blocking sampling barely slows the server; --native must pause it to unwind C stacks.
    common.append("--native" if native else "--nonblocking")
    runs = [
        subprocess.run([str(pyspy), "record", *common, "--format", "raw", "--output", str(raw)], capture_output=True, text=True),
        subprocess.run([str(pyspy), "record", *common, "--format", "flamegraph", "--output", str(svg)], capture_output=True, text=True),
    ]
    loader.join()
    failed = [r for r in runs if r.returncode != 0]
    if failed:
        out["py_spy"] = f"py-spy failed: {failed[0].stderr.strip()[-400:]}"
        return out
    out["py_spy"] = {
        "raw": str(raw.relative_to(ROOT)),
        "flamegraph": str(svg.relative_to(ROOT)),
        "native": native,
        "throughput_rps_while_sampled": results["point"].throughput,
        **summarize_collapsed(raw),
    }
    return out
