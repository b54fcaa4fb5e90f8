"""Interleaved A/B: what grpc aio's registered methods cost every call, on the floor server itself.

    python -m bench.bench_grpc_registered [--rounds 10] [--seconds 2] [--methods 39] [--concurrency 16]
    python -m bench.bench_grpc_registered --wait-only [--methods 39]

Two copies of bench/peers/floor_server.py running the digits CNN ("floor + model"), one with `--methods`
never-called methods added through `add_registered_method_handlers` (as protoc's generated
`add_*_to_server` does for every method of every service). grpc aio keeps one pending request-call task per
registered method and `asyncio.wait`s on all of them for each arriving call, so every call pays for the
count. This is why server/grpc/edge.py's CheckedDecoding serves every method through one generic handler.
Closed-loop callers (bench/loadgen.py) load each in turn, round after round; prints medians of req/s and
server CPU µs per request, and the per-round CPU ratio. On a loaded 2-core machine that ratio swings
0.7-1.5 round to round; `--wait-only` measures the mechanism itself in-process instead, as thread CPU time:
the `asyncio.wait(..., FIRST_COMPLETED)` grpc makes (twice per call, by cProfile of both servers) over one
task and over 1 + `--methods` (on this machine, loaded: 12 and 31 µs per wait).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import cpu_seconds, free_port
from bench.loadgen import build_infer_request, run_point
from bench.servers import MODEL, PEERS, ROOT, Server, prepare_model

# Runs floor_server.py with `grpc.aio.server` patched to register N extra methods on the server it makes.
WRAPPER = """
import runpy, sys
import grpc
extra = int(sys.argv.pop(1))
make = grpc.aio.server
def server(*args, **kwargs):
    s = make(*args, **kwargs)
    async def never(request, context):
        return b""
    if extra:
        s.add_registered_method_handlers("bench.Unused", {f"M{i}": grpc.unary_unary_rpc_method_handler(never) for i in range(extra)})
    return s
grpc.aio.server = server
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def wait_cost(methods: int, rounds: int) -> None:
    """µs of thread CPU per `asyncio.wait` over one ready future and `methods` pending tasks, interleaved with none."""
    import asyncio
    import time

    async def measure() -> dict[int, list[float]]:
        loop = asyncio.get_running_loop()
        result: dict[int, list[float]] = {0: [], methods: []}
        for r in range(rounds):
            for extra in (0, methods) if r % 2 == 0 else (methods, 0):
                pending = [loop.create_task(asyncio.sleep(3600)) for _ in range(extra)]
                n = 3000
                start = time.thread_time()
                for _ in range(n):
                    ready = loop.create_future()
                    loop.call_soon(ready.set_result, None)
                    await asyncio.wait([ready, *pending], return_when=asyncio.FIRST_COMPLETED)
                result[extra].append((time.thread_time() - start) / n * 1e6)
                for task in pending:
                    task.cancel()
        return result

    result = asyncio.run(measure())
    for extra, times in result.items():
        print(f"asyncio.wait over 1 + {extra:>2} tasks: {statistics.median(times):6.2f} µs CPU (median of {rounds} interleaved rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--methods", type=int, default=39, help="registered methods in the B server (slimserve had 39 + reflection)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--wait-only", action="store_true", help="measure grpc's per-call asyncio.wait in-process only")
    args = parser.parse_args()
    if args.wait_only:
        wait_cost(args.methods, max(args.rounds, 2))
        return
    files = prepare_model(False)
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / "wrap.py"
        wrapper.write_text(WRAPPER)
        servers: list[tuple[int, Server]] = []
        for extra in (0, args.methods):
            port = free_port()
            argv = [sys.executable, str(wrapper), str(extra), str(PEERS / "floor_server.py"), "--port", str(port)]
            argv += ["--model-name", files.name, "--outputs", "10", "--model-file", str(files.onnx), "--intra-op-threads", "1"]
            servers.append((extra, Server(f"floor-registered-{extra}", argv, port, env={"PYTHONPATH": f"{ROOT}{os.pathsep}{PEERS}"})))
        payload = build_infer_request(MODEL, files.sample)
        cpu: dict[int, list[float]] = {n: [] for n, _ in servers}
        rps: dict[int, list[float]] = {n: [] for n, _ in servers}
        try:
            for _, server in servers:
                server.start()
            for _, server in servers:
                server.wait_ready(MODEL, 120)
            for r in range(args.rounds):
                for extra, server in servers if r % 2 == 0 else servers[::-1]:  # neither always goes first
                    before = cpu_seconds(server.process.pid)
                    point = run_point(str(extra), server.address, payload, args.concurrency, args.seconds, 0.3)
                    cpu[extra].append(1e6 * (cpu_seconds(server.process.pid) - before) / max(point.completed, 1))
                    rps[extra].append(point.throughput)
        finally:
            for _, server in servers:
                server.stop()
    print(f"floor + model, {args.concurrency} callers, median of {args.rounds} interleaved rounds of {args.seconds:g} s")
    for extra in cpu:
        print(
            f"{extra:>3} registered methods: {statistics.median(rps[extra]):7.0f} req/s  server CPU {statistics.median(cpu[extra]):6.0f} µs/req"
        )
    ratios = [b / a for a, b in zip(cpu[0], cpu[args.methods])]
    print(
        f"server CPU per request, {args.methods} / 0 registered, per round: {[round(x, 2) for x in ratios]}; median {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
