"""Padding-free batching of MiniLM on real sentences: the BatchSizer per length bucket against one for all lengths.

    .venv/bin/python -m bench.bench_length_sizer [--callers 16] [--seconds 6] [--rounds 4] [--int8]

MiniLM (bench/zoo, real weights) on slimserve's ONNX runtime (the fixed-length export made to take any length at load),
behind a DynamicBatcher with its padding-free plan (server/batching/sequence.py), as the server builds it: two calls
in flight on a two-thread compute pool. Closed-loop asyncio callers each send the next of 200 real sentences padded to
128. The two scenarios differ only in `sizer_per_length`: one BatchSizer per length bucket (what merging saves depends
on the length) or one for the variant. They run interleaved, round after round (order reversed each round), so that a
noisy neighbour hurts both alike: req/s is the median over rounds, p50 / p99 over all rounds' calls. `--int8` serves
the dynamic INT8 of the any-length graph instead. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


async def closed_loop(batcher, rows: dict[str, np.ndarray], callers: int, seconds: float, warmup: float) -> tuple[int, list[float]]:
    n = len(rows["input_ids"])
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def caller(i: int) -> None:
        while True:
            sent = time.perf_counter()
            await batcher.submit({k: v[i : i + 1] for k, v in rows.items()}, None)
            done = time.perf_counter()
            if done >= stop_at:
                return
            if done >= measure_from:
                latencies.append((done - sent) * 1000.0)
            i = (i + callers) % n

    await asyncio.gather(*(caller(c % n) for c in range(callers)))
    await batcher.close()
    return len(latencies), latencies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_length_sizer", description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--int8", action="store_true", help="serve the dynamic INT8 of the any-length graph")
    args = parser.parse_args(argv)

    from bench.bench_sequence import sentences_npz
    from bench.servers import CACHE
    from bench.zoo.build import build
    from slimserve.server.batching.assembly import BatchingConfig
    from slimserve.server.batching.batcher import DynamicBatcher
    from slimserve.server.batching.sequence import plan_for
    from slimserve.server.runtimes import RuntimeConfig, create_runtime

    folder = build("minilm", CACHE)
    path = folder / "model.onnx"
    if args.int8:
        from slimserve.optimizer.base import Artifact, PassContext
        from slimserve.optimizer.catalog import make_pass

        context = PassContext(workdir=Path(tempfile.mkdtemp(prefix="bench-length-sizer-")), datasets={"data": folder / "eval.npz"})
        path = make_pass("quantize-dynamic").run(make_pass("graph-dynamic-seq").run(Artifact(path, "onnx"), context), context).path
    runtime = create_runtime("onnxruntime", path, RuntimeConfig())
    runtime.load()
    plan = plan_for(runtime.inputs, runtime.outputs)
    if plan is None:
        raise SystemExit(f"{path.name} is not served padding-free here; nothing to compare")
    rows = sentences_npz(200)
    pool = ThreadPoolExecutor(2)
    config = BatchingConfig()  # the server's defaults: up to 32, 0.5 ms
    scenarios = {"sizer per length bucket": True, "one sizer for all lengths": False}
    done: dict[str, list[float]] = {name: [] for name in scenarios}
    latencies: dict[str, list[float]] = {name: [] for name in scenarios}
    sizes: dict[str, list[int]] = {name: [] for name in scenarios}
    for r in range(args.rounds):
        for name in list(scenarios) if r % 2 == 0 else reversed(list(scenarios)):
            batcher = DynamicBatcher(
                runtime.predict,
                pool,
                config,
                model="minilm",
                variant="bench",
                max_concurrency=2,
                on_batch=lambda size, queue, compute, name=name: sizes[name].append(size),
                sequence=plan,
                sizer_per_length=scenarios[name],
            )
            count, lat = asyncio.run(closed_loop(batcher, rows, args.callers, args.seconds, args.warmup))
            done[name].append(count / args.seconds)
            latencies[name].extend(lat)
    runtime.unload()
    result = {}
    for name in scenarios:
        lat = np.asarray(latencies[name])
        result[name] = {
            "req_per_s": round(statistics.median(done[name]), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_batch": round(float(np.mean(sizes[name])), 2),
            "rounds_req_per_s": [round(x, 1) for x in done[name]],
        }
    variant = "dynamic INT8, any length" if args.int8 else "FP32 file, made any length at load"
    print(f"MiniLM-L6 ({variant}), {args.callers} callers, 200 real sentences padded to 128, {args.rounds} rounds x {args.seconds:g} s")
    print(f"{'scenario':<28}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>12}")
    for name, r in result.items():
        print(f"{name:<28}{r['req_per_s']:>8.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['mean_batch']:>12.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
