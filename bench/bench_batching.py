"""Dynamic batching (ONNX Runtime): throughput and latency with batching off and on, on the digits CNN or a real model.

    python -m bench.bench_batching [--model digits|minilm|effnet] [--seconds 2] [--rounds 3] [--callers 16]

With --model minilm or effnet (bench/serving_models.py builds them), the scenarios compare batching off
(`--no-batching`: each request its own call, up to the compute pool's threads at once) with the
batcher's measured policy (server/batching/sizing.py) and, for reference, the fixed rule it replaced
("take all that waits, wait for the delay whenever a slot is free"), with one and two calls in flight.

Closed-loop asyncio callers each send one sample at a time to a DynamicBatcher, as the gRPC servicer
does after decoding; batching off is today's path (one predict per request on the compute pool).
Scenarios run interleaved, round after round, so that a noisy neighbour on a small machine hurts all
of them alike: throughput is the median over rounds, the speed-up the median of per-round ratios.
A second table offers Poisson (open-loop) traffic to compare queue delays with two calls in flight.
Prints both tables and writes bench/results/batching.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.batching.batcher import DynamicBatcher
from slimserve.server.batching.sizing import BatchSizer
from slimserve.server.errors import ResourceExhausted

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Scenario:
    name: str
    config: BatchingConfig
    callers: int
    max_concurrency: int = 1
    fixed_rule: bool = False  # the rule before measured sizing: take all that waits, wait whenever a slot is free


class FixedRule(BatchSizer):
    """The batcher's rule before batch_sizing.py, for the A/B: every cut takes what waits, a free slot always waits."""

    def cut(self, available: int) -> int:
        return max(1, min(available, self.max_batch_size))

    def worth_waiting(self, available: int) -> bool:
        return available < self.max_batch_size


@dataclass
class Run:
    completed: int
    seconds: float
    latencies_ms: list[float]
    batch_sizes: list[int]
    rejected: int = 0  # RESOURCE_EXHAUSTED answers (queue full)


def make_batcher(
    predict, executor: Executor, config: BatchingConfig, max_concurrency: int, sizes: list[int], fixed_rule: bool = False
) -> DynamicBatcher:
    batcher = DynamicBatcher(
        predict,
        executor,
        config,
        model="digits",
        variant="baseline",
        max_concurrency=max_concurrency,
        on_batch=lambda size, queue, compute: sizes.append(size),
    )
    if fixed_rule:
        batcher.sizer = FixedRule(config.max_batch_size)
    return batcher


def rows_of(pool: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i : i + 1] for k, v in pool.items()}


async def closed_loop(predict, executor: Executor, scenario: Scenario, x: dict[str, np.ndarray], seconds: float, warmup: float) -> Run:
    """`callers` clients, each sending its next sample as soon as the previous answer arrives."""
    sizes: list[int] = []
    batcher = make_batcher(predict, executor, scenario.config, scenario.max_concurrency, sizes, scenario.fixed_rule)
    n = len(next(iter(x.values())))
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def caller(i: int) -> None:
        while True:
            sent = time.perf_counter()
            await batcher.submit(rows_of(x, i), None)
            done = time.perf_counter()
            if done >= stop_at:
                return
            if done >= measure_from:
                latencies.append((done - sent) * 1000.0)
            i = (i + scenario.callers) % n

    tasks = [asyncio.create_task(caller(c % n)) for c in range(scenario.callers)]
    await asyncio.sleep(warmup)
    first_call = len(sizes)
    await asyncio.gather(*tasks)
    await batcher.close()
    return Run(len(latencies), seconds, latencies, sizes[first_call:])


async def open_loop(
    predict, executor: Executor, config: BatchingConfig, max_concurrency: int, x: dict[str, np.ndarray], rate: float, seconds: float
) -> Run:
    """Poisson arrivals at `rate` per second, whatever the answers do (released each loop tick, as a server sees them)."""
    sizes: list[int] = []
    batcher = make_batcher(predict, executor, config, max_concurrency, sizes)
    latencies: list[float] = []
    pending: set[asyncio.Task] = set()
    rejected = 0

    async def one(i: int) -> None:
        nonlocal rejected
        sent = time.perf_counter()
        try:
            await batcher.submit(rows_of(x, i), None)
        except ResourceExhausted:
            rejected += 1
            return
        latencies.append((time.perf_counter() - sent) * 1000.0)

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    due, i = 0.0, 0
    while (now := time.perf_counter() - start) < seconds:
        while due <= now:
            task = asyncio.create_task(one(i % len(x["x"])))
            pending.add(task)
            task.add_done_callback(pending.discard)
            due += rng.exponential(1.0 / rate)
            i += 1
        await asyncio.sleep(0.0005)
    await asyncio.gather(*pending)
    await batcher.close()
    return Run(len(latencies), seconds, latencies, sizes, rejected)


def build_model(root: Path):
    import torch

    from slimserve.optimizer.zoo import export_onnx, load_digits_splits, train_digits_cnn
    from slimserve.server.runtimes import create_runtime

    model, accuracy = train_digits_cnn(epochs=2)
    _, test = load_digits_splits()
    path = export_onnx(model, root / "digits.onnx", torch.from_numpy(test.x[:2]))
    runtime = create_runtime("onnxruntime", path)
    runtime.load()
    return runtime, test.x, accuracy


def build_real(key: str):
    """A real model's runtime with slimserve's session settings, its input rows, and its title."""
    from bench.serving_models import CHOICES, prepare
    from slimserve.server.runtimes import create_runtime
    from slimserve.server.settings import Settings

    files = prepare(CHOICES[key], fresh=False)
    runtime = create_runtime("onnxruntime", files.onnx, Settings().runtime_config())
    runtime.load()
    return runtime, files.pool, files.title


def per_call_ms(runtime, x: dict[str, np.ndarray], sizes=(1, 8, 16, 32), seconds: float = 0.3) -> dict[int, float]:
    out = {}
    for b in sizes:
        feed = {k: np.resize(v, (b, *v.shape[1:])) for k, v in x.items()}
        for _ in range(2):
            runtime.predict(feed)
        n = max(3, int(seconds / max(1e-6, _once(runtime, feed))))
        start = time.perf_counter()
        for _ in range(n):
            runtime.predict(feed)
        out[b] = (time.perf_counter() - start) / n * 1000.0
    return out


def _once(runtime, feed) -> float:
    start = time.perf_counter()
    runtime.predict(feed)
    return time.perf_counter() - start


def summarize(name: str, runs: list[Run]) -> dict:
    latencies = np.array([v for r in runs for v in r.latencies_ms])
    sizes = [s for r in runs for s in r.batch_sizes]
    return {
        "scenario": name,
        "throughput_rps": statistics.median(r.completed / r.seconds for r in runs),
        "throughput_rps_rounds": [round(r.completed / r.seconds) for r in runs],
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
        "calls": len(sizes),
        "rejected": sum(r.rejected for r in runs),
    }


def line(r: dict, middle: str) -> str:
    return f"{r['scenario']:<44} {r['throughput_rps']:>8.0f} {middle:>6} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['mean_batch']:>11.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("digits", "minilm", "effnet"), default="digits")
    parser.add_argument("--seconds", type=float, help="measured seconds per scenario and round (digits 2, the real models 6)")
    parser.add_argument("--warmup", type=float, help="digits 0.5, the real models 2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered requests per second of the open-loop table (default: 40%% of the batched closed-loop throughput)",
    )
    parser.add_argument("--compute-threads", type=int, default=2, help="workers of the compute pool (the server's default)")
    args = parser.parse_args()
    real = args.model != "digits"
    args.seconds = args.seconds or (6.0 if real else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if real else 0.5)

    if real:
        runtime, x, title = build_real(args.model)
        accuracy = None
        model_ms = per_call_ms(runtime, x, (1, 2, 4, 8), seconds=1.0)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            runtime, test_x, accuracy = build_model(Path(tmp))
        x, title = {"x": test_x}, "digits CNN (slimserve.optimizer.zoo, 2 epochs)"
        model_ms = per_call_ms(runtime, x)
    n = args.callers
    off, on = BatchingConfig(enabled=False), BatchingConfig()
    scenarios = [
        Scenario("off, 1 caller", off, 1),
        Scenario("on, 1 caller", on, 1),
        Scenario(f"off, {n} callers", off, n),
        Scenario(f"on, {n} callers", on, n),
        Scenario(f"on, {n} callers, 2 calls in flight", on, n, max_concurrency=2),
    ]
    if real:
        scenarios += [
            Scenario(f"on, {n} callers, fixed rule (before)", on, n, fixed_rule=True),
            Scenario(f"on, {n} callers, 2 in flight, fixed rule (before)", on, n, max_concurrency=2, fixed_rule=True),
        ]
    else:
        scenarios.append(Scenario(f"on, {n} callers, preferred 8,16", BatchingConfig(preferred_batch_sizes=(8, 16)), n))
    delays = () if real else (0.0, 0.5, 1.0, 2.0)
    runs: dict[str, list[Run]] = {s.name: [] for s in scenarios}
    sweep: dict[float, list[Run]] = {d: [] for d in delays}
    with ThreadPoolExecutor(max_workers=args.compute_threads, thread_name_prefix="compute") as executor:
        for _ in range(args.rounds):
            for s in scenarios:
                runs[s.name].append(asyncio.run(closed_loop(runtime.predict, executor, s, x, args.seconds, args.warmup)))
        # Below capacity (each arrival is a new task here, dearer than a closed-loop caller) so the delay, not a backlog, sets latency.
        rate = args.rate or 0.4 * statistics.median(r.completed / r.seconds for r in runs[f"on, {n} callers"])
        for _ in range(args.rounds):
            for d in delays:
                config = BatchingConfig(max_queue_delay_ms=d)
                sweep[d].append(asyncio.run(open_loop(runtime.predict, executor, config, 2, x, rate, args.seconds / 2)))

    rows = [summarize(s.name, runs[s.name]) for s in scenarios]
    base_runs = runs[f"off, {n} callers"]
    for s, row in zip(scenarios, rows):
        row.update(callers=s.callers, max_concurrency=s.max_concurrency, config=s.config.to_dict())
        row["speedup_vs_off"] = (
            statistics.median(r.completed / b.completed for r, b in zip(runs[s.name], base_runs)) if s.callers == n else None
        )
    sweep_rows = []
    for d in delays:
        row = summarize(f"Poisson {rate:.0f}/s, 2 in flight, delay {d:g} ms", sweep[d])
        row.update(max_queue_delay_ms=d, offered_rps=rate)
        sweep_rows.append(row)

    print(
        f"{title}, onnxruntime CPU, {os.cpu_count()} cores, compute pool {args.compute_threads} threads, "
        f"{args.rounds} rounds x {args.seconds:g} s"
    )
    print("model alone: " + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in model_ms.items()))
    header = f"{'scenario':<44} {'req/s':>8} {'x off':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11}"
    print(header)
    for r in rows:
        speed = f"{r['speedup_vs_off']:.2f}" if r["speedup_vs_off"] else "-"
        print(line(r, speed))
    added = rows[1]["p50_ms"] - rows[0]["p50_ms"]
    print(f"added latency of batching for a lone caller (p50 on - off): {added:+.3f} ms")
    if sweep_rows:
        print(header.replace("x off", "reject"))
    for r in sweep_rows:
        print(line(r, str(r["rejected"])))

    results = RESULTS_DIR / ("batching.json" if not real else f"batching-{args.model}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps(
            {
                "model": f"{title}, onnxruntime",
                "accuracy": accuracy,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
                "compute_threads": args.compute_threads,
                "rounds": args.rounds,
                "seconds": args.seconds,
                "model_ms_per_call": model_ms,
                "added_latency_lone_caller_ms": added,
                "closed_loop": rows,
                "open_loop_delay_sweep": sweep_rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
