"""Interleaved A/B of slimserve's per-request path between two git revisions, against the floor server's path.

    python -m bench.bench_hotpath [--base REV] [--rounds 7] [--requests 20000]
    python -m bench.bench_hotpath --grpc [--base REV] [--rounds 5] [--seconds 3] [--concurrency 16]

The tree at REV (default: the branch's merge base with main) is extracted with `git archive` into
a temporary folder; one worker process runs on it and one on this working tree, each building the
same server in-process with that tree's code: a DataPlane over a model whose runtime answers at
once (an FP32 [1, 10] result), with two variants split 70/30 by the router, Prometheus metrics,
statistics and feedback on -- every feature a routed request pays for. A timed request is what a
gRPC ModelInfer costs in Python above grpc itself: request bytes parsed by the servicer's
checked deserializer, the @grpc_errors method, decode, route, check, batcher, record, encode,
and the response serialized. The "floor" path, timed in the same worker, is what
bench/peers/floor_server.py does per request (parse, frombuffer, the same model call, build and
serialize the answer): the per-request Python work no server can skip. Workers take turns, path
after path, round after round, so load from elsewhere on the machine falls on all alike; the
table gives medians of the rounds (CPU µs per request, the worker thread's), the ratio new / base, and each tree's
overhead above the floor.

With --grpc the same comparison runs over the wire, as bench.serving measures: `slimserve start`
from each tree on its own copy of bench.serving's cached repository (the digits CNN, routed by
name, metrics and statistics on), and bench/peers/floor_server.py running the model ("floor +
model"), driven in turn by bench/loadgen.py's closed-loop callers; medians of the rounds'
throughput and each server's share of the floor's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------- the worker (runs on either tree)


async def _build_worker():
    """The served model and the two timed paths; imports only what both trees have (server, protos)."""
    import numpy as np
    from grpc import unary_unary_rpc_method_handler

    from slimserve.protos import inference_pb2 as pb
    from slimserve.server.grpc.edge import checked_handler
    from slimserve.server.grpc.servicers.inference import InferenceServicer
    from slimserve.server.inference.dataplane import DataPlane
    from slimserve.server.runtimes import Runtime, RuntimeConfig, TensorSpec
    from slimserve.server.store.manifest import ModelInfo, VariantInfo
    from slimserve.server.store.repository import Repository
    from slimserve.server.store.traffic import TrafficPolicy
    from slimserve.server.telemetry.metrics import Metrics

    answer = {"logits": np.zeros((1, 10), np.float32)}

    class InstantRuntime(Runtime):
        name = "instant"
        inline_safe = True  # as ORT on the CPU: short calls run on the loop thread

        def load(self) -> None:
            self.inputs = [TensorSpec("x", "FP32", [-1, 1, 8, 8])]
            self.outputs = [TensorSpec("logits", "FP32", [-1, 10])]

        def predict(self, inputs, outputs=None):
            return answer

    def instant(*_args) -> Runtime:
        runtime = InstantRuntime(Path("."))
        runtime.load()
        return runtime

    root = Path(tempfile.mkdtemp(prefix="hotpath-"))
    spec_in, spec_out = [TensorSpec("x", "FP32", [-1, 1, 8, 8])], [TensorSpec("logits", "FP32", [-1, 10])]
    variants = {n: VariantInfo(n, "", "", "instant", "onnx", file="model.onnx") for n in ("baseline", "b")}
    info = ModelInfo("digits", "onnx", "", "now", spec_in, spec_out, [], variants, TrafficPolicy({"baseline": 0.7, "b": 0.3}))
    (root / "models" / "digits").mkdir(parents=True)
    (root / "models" / "digits" / "manifest.json").write_text(json.dumps(info.to_dict()))
    plane = DataPlane(Repository(root), RuntimeConfig(), Metrics(), compute_threads=1)
    plane.loader.load_runtime = instant  # the runtime is not what is measured
    await plane.load_model("digits")

    handler = checked_handler(
        unary_unary_rpc_method_handler(
            InferenceServicer(plane, None).ModelInfer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        )
    )
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(np.zeros((1, 1, 8, 8), np.float32).tobytes())
    data = request.SerializeToString()
    deserialize, method, serialize = handler.request_deserializer, handler.unary_unary, handler.response_serializer
    model = instant()

    class Context:  # what ModelInfer reads of a grpc.aio context on the success path: a call without deadline or metadata
        def time_remaining(self):
            return None

        def invocation_metadata(self):
            return ()

    context = Context()

    async def slimserve() -> bytes:
        return serialize(await method(deserialize(data), context))

    async def floor() -> bytes:  # bench/peers/floor_server.py's infer with --model-file, the model being the same call
        parsed = pb.ModelInferRequest.FromString(data)
        x = np.frombuffer(parsed.raw_input_contents[0], np.float32).reshape(tuple(parsed.inputs[0].shape))
        y = model.predict({"x": x})["logits"]
        response = pb.ModelInferResponse(model_name=parsed.model_name, model_version="1", id=parsed.id)
        response.outputs.add(name="logits", datatype="FP32", shape=y.shape)
        response.raw_output_contents.append(y.tobytes())
        return response.SerializeToString()

    return {"slimserve": slimserve, "floor": floor}


async def _time(path, n: int) -> float:
    # The thread's CPU time, not the wall clock: on a shared machine the wall clock also counts the time this
    # worker waited for a core, which swung same-code rounds by 10-30% here; CPU time moved by a few percent.
    start = time.thread_time()
    for _ in range(n):
        await path()
    return (time.thread_time() - start) / n * 1e6


async def _worker_loop() -> None:
    """Answers 'PATH N' lines on stdin with µs per request on stdout, until stdin closes."""
    paths = await _build_worker()
    for path in paths.values():
        await _time(path, 2000)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        name, n = line.split()
        print(f"{await _time(paths[name], int(n)):.4f}", flush=True)


# ---------------------------------------------------------------------- the driver


class Worker:
    def __init__(self, label: str, tree: Path) -> None:
        self.label = label
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {label} worker did not start (its tree: {tree})")

    def time(self, path: str, n: int) -> float:
        self.process.stdin.write(f"{path} {n}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


def default_base() -> str:
    return subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def extract(rev: str, into: Path) -> Path:
    archive = into / "tree.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "archive", rev], cwd=ROOT, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    tree = into / "tree"
    # Imported as `slimserve` through PYTHONPATH=tree: its folders linked as the package's portions, as pyproject's
    # package-dir maps them. Without the links every `slimserve.*` import fell through to the editable install (this
    # checkout), and the "base" worker and server ran this tree's code too.
    package = tree / "slimserve"
    package.mkdir(exist_ok=True)
    for part in ("server", "client", "optimizer", "protos"):
        if (tree / part).is_dir():
            (package / part).symlink_to(tree / part, target_is_directory=True)
    return tree


def grpc_ab(base_tree: Path, base_label: str, rounds: int, seconds: float, concurrency: int, tmp: Path) -> None:
    """Base slimserve, this tree's slimserve and the floor with the model, loaded in turn at `concurrency` callers."""
    import shutil

    from bench.common import cpu_seconds, free_port, slimserve_command
    from bench.loadgen import build_infer_request, run_point
    from bench.servers import CACHE, MODEL, Server, prepare_model, start_floor

    files = prepare_model(False)
    if not (CACHE / "repository" / "models" / MODEL).exists():
        raise SystemExit("no cached repository with the digits CNN: run `python -m bench.serving --only slimserve` once first")
    servers = []
    for tree in (base_tree, ROOT):
        repo = tmp / f"repository-{len(servers)}"
        shutil.copytree(CACHE / "repository", repo)
        port = free_port()
        servers.append(Server(f"slimserve-{len(servers)}", slimserve_command(repo, port), port, env={"PYTHONPATH": str(tree)}, cwd=tree))
    servers.append(start_floor(files, with_model=True))
    labels = [base_label, "this tree", "floor + model"]
    payload = build_infer_request(MODEL, files.sample)
    rps: dict[str, list[float]] = {label: [] for label in labels}
    p50: dict[str, list[float]] = {label: [] for label in labels}
    cpu: dict[str, list[float]] = {label: [] for label in labels}  # server CPU µs per request: less moved by neighbours than req/s
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(MODEL, 120)
        for r in range(rounds):
            order = list(zip(labels, servers))
            order = order[r % 3 :] + order[: r % 3]  # each server goes first in turn
            for label, server in order:
                before = cpu_seconds(server.process.pid)
                point = run_point(label, server.address, payload, concurrency, seconds, 0.5)
                cpu[label].append(1e6 * (cpu_seconds(server.process.pid) - before) / max(point.completed, 1))
                if point.errors:
                    raise SystemExit(f"{label}: errors {point.errors}")
                rps[label].append(point.throughput)
                p50[label].append(point.percentile(50))
    finally:
        for server in servers:
            server.stop()
    floor = statistics.median(rps["floor + model"])
    print(f"gRPC ModelInfer, {concurrency} callers, median of {rounds} interleaved rounds of {seconds:g} s")
    print(f"{'server':<24}{'req/s':>10}{'p50 ms':>10}{'of floor + model':>20}{'server CPU µs/req':>20}")
    for label in labels:
        median = statistics.median(rps[label])
        row = f"{label:<24}{median:>10.0f}{statistics.median(p50[label]):>10.3f}{median / floor:>20.1%}"
        print(f"{row}{statistics.median(cpu[label]):>20.0f}")
    print("(server CPU counts the warm-up too: it is the process's CPU over the point, per request answered in its window)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="git revision to compare against (default: merge base with main)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20000, help="requests per path per round")
    parser.add_argument("--grpc", action="store_true", help="compare the servers over gRPC under load instead")
    parser.add_argument("--seconds", type=float, default=3.0, help="--grpc: seconds per point")
    parser.add_argument("--concurrency", type=int, default=16, help="--grpc: closed-loop callers")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_worker_loop())
        return
    base = args.base or default_base()
    if args.grpc:
        with tempfile.TemporaryDirectory() as tmp:
            grpc_ab(extract(base, Path(tmp)), f"base {base[:10]}", args.rounds, args.seconds, args.concurrency, Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workers = [Worker(f"base {base[:10]}", extract(base, Path(tmp))), Worker("this tree", ROOT)]
        times: dict[tuple[str, str], list[float]] = {(w.label, p): [] for w in workers for p in ("floor", "slimserve")}
        for r in range(args.rounds):
            order = workers if r % 2 == 0 else workers[::-1]  # neither tree always goes first
            for path in ("slimserve", "floor"):
                for w in order:
                    times[(w.label, path)].append(w.time(path, args.requests))
        for w in workers:
            w.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    old, new = workers[0].label, workers[1].label
    print(f"µs per request, median of {args.rounds} interleaved rounds of {args.requests} requests")
    print(f"{'path':<34}{old:>18}{new:>14}{'new / base':>12}")
    for path in ("slimserve", "floor"):
        print(f"{path:<34}{median[(old, path)]:>18.2f}{median[(new, path)]:>14.2f}{median[(new, path)] / median[(old, path)]:>12.3f}")
    above = {w: median[(w, "slimserve")] - median[(w, "floor")] for w in (old, new)}
    print(f"{'slimserve above the floor':<34}{above[old]:>18.2f}{above[new]:>14.2f}{above[new] / above[old]:>12.3f}")


if __name__ == "__main__":
    main()
