"""Serving benchmark: the digits CNN in-process, through slimserve, through its variants, and through KServe and MLServer.

    .venv/bin/python -m bench.serving [--seconds 3] [--warmup 1] [--rounds 2] [--concurrency 1,4,16,64]
                                      [--only inprocess,slimserve,stream,variants,peers,floor]
                                      [--variants graph-ort,quantize-static]
                                      [--profile] [--fresh]

What each section measures (one process per server, all on this machine's cores, side by side):

1. inprocess: ONNX Runtime called directly on the model file with the session slimserve's runtime
   builds (server.runtimes, settings from server.settings: threads, graph optimization level), one
   call at a time at batch 1, 2, 4, ..., 32: p50 ms per call, ms per sample and samples/s. One
   more row runs two streams at batch 32 on two sessions of one intra-op thread each. The best
   samples/s of the section is this machine's limit for the model, and the yardstick of the
   "share of ORT" column.
2. slimserve: `slimserve start` as a subprocess on a free 127.0.0.1 port with a fresh metrics-less
   server, the model registered with the client library (routed by model name, no variant pinned);
   closed-loop callers at each concurrency send batch-1 requests: throughput, p50, p99, errors.
3. variants: the same load pinned (model_version) to each optimizer variant made by
   `SlimServeClient.optimize` (default graph-ort and quantize-static).
4. peers: the same load against KServe's Python model server (PyPI `kserve`, its gRPC v2 endpoint)
   and MLServer (PyPI `mlserver`, adaptive batching on, gRPC), each serving the same ONNX file with
   onnxruntime through a small custom runtime in bench/peers/ with slimserve's thread settings.
   Each peer lives in its own virtualenv under bench/.venvs/ (their protobuf/grpc pins conflict
   with ours), created on first use; a peer that cannot be installed is skipped with the reason.
5. stream: slimserve again, the same callers sending over ModelStreamInfer (Triton's streaming
   API): one stream per client process, each caller's next request sent when its answer arrives.
   KServe's v2 gRPC has no streaming method, so there is no peer row to match.
6. floor: bench/peers/floor_server.py, a grpc aio server that parses each request and answers
   fixed bytes, no model. Every server here is built on Python's grpc aio, so its throughput is
   the ceiling any of them can reach on this machine with this client; the targets table shows
   it against KServe for context. "floor + model" is the same server running the model (one ORT
   call on the loop per request, nothing else): the ceiling for serving this model.

The load generator (bench/loadgen.py) sends pre-serialized ModelInferRequest bytes with identity
serializers from separate client processes; each point reports the client's CPU per request.
Servers stay up side by side and points run interleaved, round after round, so a noisy neighbour
hurts all alike: throughput is the median over rounds, p50/p99 come from all rounds' calls.
`--profile` then samples slimserve under 16 callers with py-spy and per-thread CPU from /proc,
and writes bench/results/profile-slimserve.* with a summary of where the time goes.
Prints tables and writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.loadgen import PointResult, build_infer_request, check_response, run_point

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CACHE = RESULTS / "serving-cache"
VENVS = HERE / ".venvs"
PEERS = HERE / "peers"
MODEL = "digits"

# Peers and their pins: the versions the targets were measured with, onnxruntime as ours.
PEER_PACKAGES = {
    "kserve": ["kserve==0.21.0"],
    # uvloop 0.22 made get_event_loop() raise outside a running loop, which kills MLServer 1.7.1's workers.
    "mlserver": ["mlserver==1.7.1", "uvloop==0.21.0"],
}


def ort_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(message: str) -> None:
    print(f"[bench.serving] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelFiles:
    onnx: Path
    data: Path  # evaluation .npz: x, labels
    calibration: Path
    sample: np.ndarray  # float32 [1, 1, 8, 8]
    test_x: np.ndarray


def prepare_model(fresh: bool) -> ModelFiles:
    """Trains and exports the digits CNN once; later runs reuse bench/results/serving-cache/."""
    from optimizer.zoo import load_digits_splits

    train, test = load_digits_splits()
    onnx_path, data, calib = CACHE / "digits.onnx", CACHE / "eval.npz", CACHE / "calibration.npz"
    if fresh or not onnx_path.exists():
        import torch

        from optimizer.zoo import export_onnx, train_digits_cnn

        say("training the digits CNN and exporting it to ONNX")
        CACHE.mkdir(parents=True, exist_ok=True)
        model, accuracy = train_digits_cnn()
        tmp = CACHE / "digits.onnx.tmp"
        export_onnx(model, tmp, torch.from_numpy(test.x[:2]))
        os.replace(tmp, onnx_path)
        say(f"digits CNN test accuracy {accuracy:.3f}")
    if fresh or not data.exists():
        np.savez(data, x=test.x, labels=test.y)
        np.savez(calib, x=train.x[:256])
    return ModelFiles(onnx_path, data, calib, test.x[:1].copy(), test.x)


# ---------------------------------------------------------------------------------------------- in-process


def _time_calls(predict, feed, seconds: float) -> tuple[np.ndarray, float]:
    """Per-call latencies (ms) of `predict(feed)` in a loop for `seconds`, and the elapsed time."""
    for _ in range(20):
        predict(feed)
    lat = []
    start = time.perf_counter()
    stop = start + seconds
    now = start
    while now < stop:
        t0 = time.perf_counter()
        predict(feed)
        now = time.perf_counter()
        lat.append(now - t0)
    return np.array(lat) * 1000.0, now - start


def bench_inprocess(files: ModelFiles, batches: list[int], seconds: float) -> list[dict]:
    from server.runtimes import RuntimeConfig, create_runtime
    from server.settings import Settings

    config = Settings().runtime_config()
    runtime = create_runtime("onnxruntime", files.onnx, config)
    runtime.load()
    x = np.ascontiguousarray(np.resize(files.test_x, (max(batches), *files.test_x.shape[1:])))
    rows = []
    for b in batches:
        lat, elapsed = _time_calls(runtime.predict, {"x": x[:b]}, seconds)
        rows.append({
            "name": f"batch {b}",
            "batch": b,
            "streams": 1,
            "intra_op_threads": config.intra_op_threads,
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "ms_per_sample": float(np.percentile(lat, 50)) / b,
            "samples_per_s": len(lat) * b / elapsed,
        })
    # Two calls at once on one thread each: on a small CPU, often more samples/s than one call on all cores.
    b = max(batches)
    one_thread = RuntimeConfig(intra_op_threads=1, inter_op_threads=1, device=config.device)
    runtimes = []
    for _ in range(2):
        r = create_runtime("onnxruntime", files.onnx, one_thread)
        r.load()
        runtimes.append(r)
    results: list[tuple[np.ndarray, float]] = [None, None]  # type: ignore[list-item]

    def stream(i: int) -> None:
        results[i] = _time_calls(runtimes[i].predict, {"x": x[:b]}, seconds)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.concatenate([r[0] for r in results])
    rows.append({
        "name": f"batch {b}, 2 streams x 1 thread",
        "batch": b,
        "streams": 2,
        "intra_op_threads": 1,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "ms_per_sample": 1000.0 / sum(len(r[0]) * b / r[1] for r in results),
        "samples_per_s": sum(len(r[0]) * b / r[1] for r in results),
    })
    return rows


# ---------------------------------------------------------------------------------------------- servers


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads (and reaped children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds per thread id of a process, with the kernel's thread name."""
    out: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def python_thread_names(pyspy: Path, pid: int) -> dict[int, str]:
    """Python's names of a process's threads (compute_0, MainThread, ...) from one `py-spy dump`."""
    import re

    try:
        dump = subprocess.run([str(pyspy), "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'^Thread (\d+) \((?:active|idle)[^)]*\): "([^"]*)"', dump, re.M)}


def descendants(pid: int) -> list[int]:
    """The process and all its children, grandchildren, ... (MLServer runs its model in a worker process)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in descendants(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def wait_quiet(pid: int, timeout: float, below: float = 0.05, window: float = 1.0) -> bool:
    """Waits until the server's processes use under `below` of a core over `window` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(pid)
        time.sleep(window)
        if (tree_cpu_seconds(pid) - before) / window < below:
            return True
    return False


@dataclass
class Server:
    """A model server subprocess on 127.0.0.1:port, its log in bench/results/logs/."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        logs = RESULTS / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.name}.log"
        log = open(self.log_path, "w")
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, model: str, timeout: float) -> None:
        """Polls ServerReady and ModelReady over gRPC; raises with the log's tail if the server dies or times out."""
        import grpc

        from protos import inference_pb2 as pb
        from protos import inference_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready and (
                        not model or stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1.0).ready
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready on {self.address} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        except ProcessLookupError:
            pass


def start_slimserve(files: ModelFiles, variants: list[str], fresh: bool, extra_flags: tuple[str, ...] = ()) -> tuple[Server, list[str]]:
    """slimserve on a cached repository (bench/results/serving-cache/repository); registers and optimizes what is missing.

    Returns the server and the variants that are ready (a recipe that fails is reported and left out).
    """
    from client.client import SlimServeClient, SlimServeClientError

    repo = CACHE / "repository"
    if fresh and repo.exists():
        shutil.rmtree(repo)
    port = free_port()
    exe = str(Path(sys.executable).with_name("slimserve"))
    server = Server("slimserve", [exe, "start", "--repository", str(repo), "--grpc-port", str(port), "--metrics-port", "-1",
                                  "--log-level", "WARNING", *extra_flags], port)
    server.start()
    server.wait_ready("", 120)
    ready: list[str] = []
    with SlimServeClient(server.address) as client:
        try:
            record = client.model(MODEL)
        except SlimServeClientError as e:
            if e.code != "NOT_FOUND":
                raise
            record = None
        if record is not None and not any(v["name"] == "baseline" and v["status"] == "ready" for v in record["variants"]):
            client.delete(MODEL)
            record = None
        if record is None:
            say("registering the digits CNN with slimserve")
            record = client.register(MODEL, files.onnx, data=files.data, calibration=files.calibration)
        have = {v["name"]: v["status"] for v in record["variants"]}
        for recipe in variants:
            if have.get(recipe) == "ready":
                ready.append(recipe)
                continue
            say(f"slimserve: optimizing with {recipe} (once; the repository is cached)")
            try:
                client.optimize(MODEL, recipe, variant_name=recipe)
                ready.append(recipe)
            except SlimServeClientError as e:
                say(f"variant {recipe} skipped: optimize failed: {e}")
    server.wait_ready(MODEL, 60)
    # Registration measures the baseline in the background: wait for that (or any other work) to end.
    if not wait_quiet(server.process.pid, 180):
        say("slimserve still busy after 180 s; measuring anyway")
    return server, ready


def ensure_venv(name: str, rebuild: bool) -> tuple[Path | None, str]:
    """bench/.venvs/NAME with the peer's pinned packages; (python, '') or (None, why it cannot be had)."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    pins = [*PEER_PACKAGES[name], f"onnxruntime=={ort_version()}"]
    marker = venv / ".installed"
    if not rebuild and marker.exists() and marker.read_text().split() == pins and python.exists():
        return python, ""
    if venv.exists():
        shutil.rmtree(venv)
    say(f"creating {venv} with {' '.join(pins)} (first run only; takes a minute or two)")
    base = getattr(sys, "_base_executable", sys.executable)
    made = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        return None, f"python -m venv {venv} failed: {made.stderr.strip().splitlines()[-1:]}"
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        errors = [ln for ln in pip.stderr.splitlines() if ln.startswith("ERROR")] or pip.stderr.strip().splitlines()[-3:]
        return None, f"pip install {' '.join(pins)} into {venv} failed: {' | '.join(e[:200] for e in errors)}"
    marker.write_text(" ".join(pins) + "\n")
    return python, ""


def start_kserve(python: Path, files: ModelFiles, intra_op: int) -> Server:
    port = free_port()
    argv = [str(python), str(PEERS / "kserve_server.py"), "--model-file", str(files.onnx), "--model-name", MODEL,
            "--intra-op-threads", str(intra_op), "--http_port", str(free_port()), "--grpc_port", str(port),
            "--enable_latency_logging", "false", "--configure_logging", "false"]
    return Server("kserve", argv, port)


def start_floor(files: ModelFiles, with_model: bool = False, intra_op: int = 1) -> Server:
    """bench/peers/floor_server.py in our own virtualenv: parse the request, answer fixed bytes
    (or, `with_model`, run the model on the loop and answer its output)."""
    port = free_port()
    argv = [sys.executable, str(PEERS / "floor_server.py"), "--port", str(port), "--model-name", MODEL, "--outputs", "10"]
    if with_model:
        argv += ["--model-file", str(files.onnx), "--intra-op-threads", str(intra_op)]
    return Server("floor-model" if with_model else "floor", argv, port, env={"PYTHONPATH": f"{ROOT}{os.pathsep}{PEERS}"})


def start_mlserver(python: Path, files: ModelFiles, intra_op: int, batch: int, batch_time_s: float) -> Server:
    port = free_port()
    root = CACHE / "mlserver"
    if root.exists():
        shutil.rmtree(root)
    (root / MODEL).mkdir(parents=True)
    (root / "settings.json").write_text(json.dumps({
        "debug": False,
        "host": "127.0.0.1",
        "http_port": free_port(),
        "grpc_port": port,
        "metrics_port": free_port(),
        "metrics_dir": str(root / ".metrics"),
    }, indent=2))
    (root / MODEL / "model-settings.json").write_text(json.dumps({
        "name": MODEL,
        "implementation": "mlserver_runtime.OnnxRuntimeModel",
        "max_batch_size": batch,
        "max_batch_time": batch_time_s,
        "parameters": {"extra": {"model_file": str(files.onnx), "intra_op_threads": intra_op}},
    }, indent=2))
    argv = [str(python.with_name("mlserver")), "start", str(root)]
    return Server("mlserver", argv, port, env={"PYTHONPATH": str(PEERS)}, cwd=root)


# ---------------------------------------------------------------------------------------------- load


@dataclass
class Target:
    """One row of the serving table: a server and the request bytes sent to it."""

    name: str
    kind: str  # slimserve | variant | peer | floor
    server: Server
    payload: bytes
    note: str = ""
    stream: bool = False  # requests over one ModelStreamInfer stream per client process, not unary calls


def verify(target: Target) -> str | None:
    """One call with a real client stack: None if the answer has logits [1, 10], else why not."""
    import grpc

    with grpc.insecure_channel(target.server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            return check_response(call(target.payload, timeout=30), (1, 10))
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"


def summarize(target: Target, points: list[PointResult]) -> dict:
    lat = np.concatenate([p.latencies_ms for p in points]) if points else np.zeros(0)
    errors: Counter = Counter()
    for p in points:
        errors.update(p.errors)
    completed = sum(p.completed for p in points)
    return {
        "target": target.name,
        "kind": target.kind,
        "concurrency": points[0].concurrency,
        "throughput_rps": statistics.median(p.throughput for p in points),
        "throughput_rps_rounds": [round(p.throughput, 1) for p in points],
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "requests": completed,
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        "client_cpu_us_per_request": 1e6 * sum(p.client_cpu_s for p in points) / completed if completed else None,
        "note": target.note,
    }


def run_load(targets: list[Target], concurrencies: list[int], seconds: float, warmup: float, rounds: int,
             client_processes: int) -> list[dict]:
    points: dict[tuple[str, int], list[PointResult]] = defaultdict(list)
    for r in range(rounds):
        for c in concurrencies:
            for t in targets:
                p = run_point(t.name, t.server.address, t.payload, c, seconds, warmup, processes=client_processes, stream=t.stream)
                points[(t.name, c)].append(p)
                say(f"round {r + 1}/{rounds} {t.name:<28} c={c:<3} {p.throughput:8.0f} req/s  p50 {p.percentile(50):7.3f} ms  "
                    f"p99 {p.percentile(99):7.3f} ms  errors {p.error_count}")
    return [summarize(t, points[(t.name, c)]) for c in concurrencies for t in targets]


# ---------------------------------------------------------------------------------------------- profile


# Where a sample's time goes: the first pattern (in this order) found anywhere in its stack.
CATEGORIES = (
    ("onnxruntime Session.run", ("onnxruntime_inference_collection.py", "libonnxruntime", "onnxruntime_pybind")),
    ("request decode (protobuf -> numpy)", ("decode_request_inputs", "decode_raw", "decode_contents")),
    ("response encode (numpy -> protobuf)", ("infer_response", "fill_output", "encode_raw", "encode_contents")),
    ("batcher (server/batching.py)", ("server/batching.py",)),
    ("routing, stats, feedback", ("server/routing.py", "server/stats.py")),
    ("metrics (prometheus_client)", ("prometheus_client", "server/metrics.py")),
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
        results["point"] = run_point(target.name, target.server.address, target.payload, concurrency, seconds * 2 + 4, 0.0,
                                     processes=client_processes)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(1.5)
    raw, svg = RESULTS / "profile-slimserve.txt", RESULTS / "profile-slimserve.svg"
    common = ["--pid", str(pid), "--duration", str(int(max(1, seconds))), "--rate", "200", "--threads"]
    # Non-blocking sampling barely slows the server; --native must pause it to unwind C stacks.
    common.append("--native" if native else "--nonblocking")
    runs = [subprocess.run([str(pyspy), "record", *common, "--format", "raw", "--output", str(raw)], capture_output=True, text=True),
            subprocess.run([str(pyspy), "record", *common, "--format", "flamegraph", "--output", str(svg)], capture_output=True, text=True)]
    loader.join()
    failed = [r for r in runs if r.returncode != 0]
    if failed:
        out["py_spy"] = f"py-spy failed: {failed[0].stderr.strip()[-400:]}"
        return out
    out["py_spy"] = {"raw": str(raw.relative_to(ROOT)), "flamegraph": str(svg.relative_to(ROOT)), "native": native,
                     "throughput_rps_while_sampled": results["point"].throughput, **summarize_collapsed(raw)}
    return out


# ---------------------------------------------------------------------------------------------- report


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    machine = result["machine"]
    console.print(f"[bold]digits CNN (ONNX), {machine['cpus']} CPUs ({machine['cpu_model']}), onnxruntime {machine['onnxruntime']}, "
                  f"{result['settings']['rounds']} round(s) x {result['settings']['seconds']:g} s per point[/bold]")
    if result.get("inprocess"):
        t = Table(title="(1) in-process ONNX Runtime, one call at a time")
        for col in ("run", "p50 ms/call", "p99 ms/call", "ms/sample", "samples/s"):
            t.add_column(col, justify="right" if col != "run" else "left")
        for r in result["inprocess"]:
            t.add_row(r["name"], f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['ms_per_sample']:.4f}", f"{r['samples_per_s']:,.0f}")
        console.print(t)
    if result.get("serving"):
        best = result.get("inprocess_best_samples_per_s")
        t = Table(title="(2-4) over gRPC, batch-1 requests, closed-loop callers")
        for col in ("server", "callers", "req/s", "p50 ms", "p99 ms", "errors", "share of ORT", "client µs/req"):
            t.add_column(col, justify="left" if col == "server" else "right")
        last_c = None
        for r in result["serving"]:
            if last_c is not None and r["concurrency"] != last_c:
                t.add_section()
            last_c = r["concurrency"]
            f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            share = f"{r['throughput_rps'] / best:.0%}" if best else "-"
            t.add_row(r["target"], str(r["concurrency"]), f"{r['throughput_rps']:,.0f}", f(r["p50_ms"], ".3f"), f(r["p99_ms"], ".3f"),
                      str(r["errors"]) if not r["errors"] else f"[red]{r['errors']} {r['errors_by_code']}[/red]", share,
                      f(r["client_cpu_us_per_request"], ".0f"))
        console.print(t)
        for note in result.get("notes", []):
            console.print(f"  {note}")
    if result.get("targets"):
        t = Table(title="targets (issue 8)")
        for col in ("check", "measured", "target", "met"):
            t.add_column(col, justify="left" if col == "check" else "right")
        for c in result["targets"]:
            met = "-" if c["met"] is None else ("[green]yes[/green]" if c["met"] else "[red]no[/red]")
            t.add_row(c["check"], c["measured"], c["target"], met)
        console.print(t)
    for name, why in result.get("skipped", {}).items():
        console.print(f"[yellow]skipped {name}: {why}[/yellow]")
    profile = result.get("profile")
    if profile:
        console.print(f"[bold]slimserve profile at {profile['concurrency']} callers[/bold]: {profile['throughput_rps']:,.0f} req/s, "
                      f"server {profile['server_cores_busy']:.2f} cores busy, {profile['server_cpu_us_per_request']:.0f} µs server CPU "
                      f"and {profile['client_cpu_us_per_request']:.0f} µs client CPU per request")
        console.print("  cores by thread: " + ", ".join(f"{k} {v:.2f}" for k, v in profile["cores_by_thread"].items()))
        spy = profile.get("py_spy")
        if isinstance(spy, dict):
            console.print(f"py-spy, {spy['samples']} samples of non-idle threads at {spy['throughput_rps_while_sampled']:,.0f} req/s "
                          f"(flame graph: {spy['flamegraph']}, stacks: {spy['raw']})")
            for key, title in (("by_category", "where the samples go"), ("by_thread", "by thread"), ("self", "self time by frame")):
                t = Table(title=title)
                t.add_column("name")
                t.add_column("share", justify="right")
                for r in spy[key][:12]:
                    t.add_row(r["name"][:120], f"{r['share']:.1%}")
                console.print(t)
        elif spy:
            console.print(f"[yellow]{spy}[/yellow]")


def row(rows: list[dict], target: str, c: int) -> dict | None:
    return next((r for r in rows if r["target"] == target and r["concurrency"] == c), None)


def check_targets(result: dict) -> list[dict]:
    """The issue's targets, as ratios measured in this run."""
    rows = result.get("serving", [])
    checks = []
    s16, s1 = row(rows, "slimserve", 16), row(rows, "slimserve", 1)
    k16, k1 = row(rows, "kserve", 16), row(rows, "kserve", 1)
    m16, m1 = row(rows, "mlserver", 16), row(rows, "mlserver", 1)
    best = result.get("inprocess_best_samples_per_s")
    if s16 and k16:
        ratio = s16["throughput_rps"] / k16["throughput_rps"]
        checks.append({"check": "req/s at 16 callers vs KServe", "measured": f"{ratio:.2f}x", "target": ">= 2x", "met": ratio >= 2})
    if s16 and m16:
        ratio = s16["throughput_rps"] / m16["throughput_rps"]
        checks.append({"check": "req/s at 16 callers vs MLServer", "measured": f"{ratio:.2f}x", "target": ">= 3x", "met": ratio >= 3})
    if s1 and k1:
        checks.append({"check": "p50 at 1 caller vs KServe", "measured": f"{s1['p50_ms']:.3f} vs {k1['p50_ms']:.3f} ms",
                       "target": "<=", "met": s1["p50_ms"] <= k1["p50_ms"]})
    if s1 and m1:
        checks.append({"check": "p50 at 1 caller vs MLServer", "measured": f"{s1['p50_ms'] / m1['p50_ms']:.2f}x",
                       "target": "<= 0.5x", "met": s1["p50_ms"] <= 0.5 * m1["p50_ms"]})
    if s16 and best:
        share = s16["throughput_rps"] / best
        checks.append({"check": "req/s at 16 callers vs in-process ORT best", "measured": f"{share:.0%}", "target": ">= 40%",
                       "met": share >= 0.4})
    f16 = row(rows, "floor (no model)", 16)
    if f16 and k16:
        # Context, not a target: what a server that does nothing but parse and answer reaches against KServe.
        ratio = f16["throughput_rps"] / k16["throughput_rps"]
        checks.append({"check": "ceiling: floor server (no model) at 16 callers vs KServe", "measured": f"{ratio:.2f}x",
                       "target": "context", "met": None})
    fm16 = row(rows, "floor + model", 16)
    if fm16 and k16:
        ratio = fm16["throughput_rps"] / k16["throughput_rps"]
        checks.append({"check": "ceiling with the model: floor + model at 16 callers vs KServe", "measured": f"{ratio:.2f}x",
                       "target": "context", "met": None})
    if fm16 and s16:
        share = s16["throughput_rps"] / fm16["throughput_rps"]
        checks.append({"check": "slimserve at 16 callers vs floor + model", "measured": f"{share:.0%}", "target": "context",
                       "met": None})
    t16 = row(rows, "slimserve stream", 16)
    if t16 and k16:
        ratio = t16["throughput_rps"] / k16["throughput_rps"]
        checks.append({"check": "slimserve over ModelStreamInfer at 16 callers vs KServe (unary)", "measured": f"{ratio:.2f}x",
                       "target": "context", "met": None})
    if s16:
        checks.append({"check": "errors at 16 callers", "measured": str(s16["errors"]), "target": "0", "met": s16["errors"] == 0})
    return checks


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_describe() -> str:
    """The commit measured, with '+dirty' when the work tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty.strip() else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all points (interleaved)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="closed-loop callers per point")
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="in-process batch sizes")
    parser.add_argument("--only", default="inprocess,slimserve,stream,variants,peers,floor", help="sections to run")
    parser.add_argument("--variants", default="graph-ort,quantize-static", help="optimizer recipes served as variants")
    parser.add_argument("--peers", default="kserve,mlserver")
    parser.add_argument("--client-processes", type=int, default=2, help="load-generator processes per point (at most one per caller)")
    parser.add_argument("--mlserver-batch-time", type=float, default=0.0005,
                        help="MLServer max_batch_time in seconds (slimserve's default max queue delay is 0.5 ms)")
    parser.add_argument("--slimserve-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for `slimserve start`, repeatable: --slimserve-flag=--intra-op-threads=1")
    parser.add_argument("--profile", action="store_true", help="sample slimserve under load with py-spy and /proc afterwards")
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native (pauses the process while sampling)")
    parser.add_argument("--fresh", action="store_true", help="retrain the model and rebuild the cached slimserve repository")
    parser.add_argument("--rebuild-venvs", action="store_true", help="reinstall the peers' virtualenvs")
    parser.add_argument("--output", type=Path, default=RESULTS / "serving.json")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - {"inprocess", "slimserve", "stream", "variants", "peers", "floor"}
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    recipes = [v.strip() for v in args.variants.split(",") if v.strip()] if "variants" in sections else []
    peers = [p.strip() for p in args.peers.split(",") if p.strip()] if "peers" in sections else []
    for p in peers:
        if p not in PEER_PACKAGES:
            parser.error(f"--peers: unknown peer '{p}' (known: {', '.join(PEER_PACKAGES)})")

    from server.app import protobuf_backend
    from server.settings import Settings

    settings = Settings()
    result: dict = {
        "model": "digits CNN (optimizer.zoo, width 32), ONNX",
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": ort_version(), "protobuf_backend": protobuf_backend(),
                    "load_average_at_start": os.getloadavg()},
        "settings": {**{k: v for k, v in vars(args).items() if k != "output"}, "slimserve_compute_threads": settings.compute_threads,
                     "slimserve_intra_op_threads": settings.runtime_config().intra_op_threads},
        "git": git_describe(),
        "command": " ".join([".venv/bin/python -m bench.serving", *(argv if argv is not None else sys.argv[1:])]),
        "skipped": {},
        "notes": [],
    }
    files = prepare_model(args.fresh)
    if "inprocess" in sections:
        say("in-process ONNX Runtime")
        result["inprocess"] = bench_inprocess(files, batches, max(1.0, args.seconds / 2))
        result["inprocess_best_samples_per_s"] = max(r["samples_per_s"] for r in result["inprocess"])

    servers: list[Server] = []
    targets: list[Target] = []
    try:
        if sections & {"slimserve", "stream", "variants"} or args.profile:
            slim, ready = start_slimserve(files, recipes, args.fresh, tuple(args.slimserve_flag))
            servers.append(slim)
            if "slimserve" in sections or args.profile:
                targets.append(Target("slimserve", "slimserve", slim, build_infer_request(MODEL, files.sample),
                                      note="routed by model name"))
            if "stream" in sections:
                targets.append(Target("slimserve stream", "stream", slim, build_infer_request(MODEL, files.sample),
                                      note="ModelStreamInfer: one stream per client process, callers multiplexed on it", stream=True))
            for v in ready:
                targets.append(Target(f"slimserve:{v}", "variant", slim, build_infer_request(MODEL, files.sample, version=v),
                                      note=f"pinned with model_version={v}"))
            for v in set(recipes) - set(ready):
                result["skipped"][f"variant {v}"] = "optimize failed (see the log above)"
        for peer in peers:
            python, why = ensure_venv(peer, args.rebuild_venvs)
            if python is None:
                result["skipped"][peer] = why
                say(f"skipping {peer}: {why}")
                continue
            if peer == "kserve":
                # The peers get slimserve's own session tuning (threads, no spinning): a fair fight.
                server = start_kserve(python, files, settings.runtime_config().intra_op_threads)
                note = "kserve.Model, sync predict, default ModelServer settings"
            else:
                server = start_mlserver(python, files, settings.runtime_config().intra_op_threads, 32, args.mlserver_batch_time)
                note = f"MLModel, adaptive batching max 32 / {args.mlserver_batch_time * 1000:g} ms, parallel_workers 1 (default)"
            server.start()
            servers.append(server)
            try:
                server.wait_ready(MODEL, 180)
            except RuntimeError as e:
                result["skipped"][peer] = str(e).splitlines()[0] + f" (log: {server.log_path})"
                say(f"skipping {peer}: {e}")
                server.stop()
                continue
            targets.append(Target(peer, "peer", server, build_infer_request(MODEL, files.sample), note=note))
        if "floor" in sections:
            for with_model, name, note in (
                (True, "floor + model", "hand-written grpc aio server: parse, one ORT call on the loop, answer; nothing else"),
                (False, "floor (no model)", "grpc aio server that parses the request and answers fixed bytes: the ceiling"),
            ):
                floor = start_floor(files, with_model, settings.runtime_config().intra_op_threads)
                floor.start()
                servers.append(floor)
                try:
                    floor.wait_ready(MODEL, 60)
                    targets.append(Target(name, "floor", floor, build_infer_request(MODEL, files.sample), note=note))
                except RuntimeError as e:
                    result["skipped"][name] = str(e).splitlines()[0]
        for t in list(targets):
            why = verify(t)
            if why:
                result["skipped"][t.name] = f"a request to {t.server.address} did not answer logits [1, 10]: {why}"
                say(f"skipping {t.name}: {why}")
                targets.remove(t)
        for s in servers:
            wait_quiet(s.process.pid, 30)
        measured = [t for t in targets if "slimserve" in sections or t.kind != "slimserve"]
        if measured:
            result["serving"] = run_load(measured, concurrencies, args.seconds, args.warmup, args.rounds, args.client_processes)
        if args.profile:
            slim_target = next(t for t in targets if t.kind == "slimserve")
            say(f"profiling slimserve at 16 callers for {args.profile_seconds:g} s")
            result["profile"] = profile_slimserve(slim_target, args.profile_seconds, 16, args.client_processes, args.profile_native)
    finally:
        for s in servers:
            s.stop()
    result["notes"].append("share of ORT: req/s (1 sample each) / best in-process samples/s; "
                           "client µs/req: load-generator CPU per request (it shares the cores with the server)")
    result["targets"] = check_targets(result)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    render(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
