"""ONNX Runtime thread configurations of a served variant, in-process: which one gives the lowest p50 for one caller
without losing throughput when callers pile up (the choice server/runtimes/onnx.py makes at load).

    python -m bench.bench_threads [--model digits,minilm,minilm-auto,effnet] [--seconds 2] [--rounds 3]

Each configuration is a server-like setup on this machine's cores: the dispatcher lets two calls of a variant run at
once (`--max-concurrent-calls` 2), so

- `1 thread`: one session, one intra-op thread, shared by the two calls in flight (the default before issue 15);
- `all cores`: one session, intra-op = cores, shared by the two calls (does the shared pool oversubscribe?);
- `all cores+spin`: the same with ORT's idle workers spinning (ORT's own default; the server turns spinning off);
- `2 sessions x 1`: one session per call slot, one thread each (twice the memory);
- `auto`: the runtime's own choice (RuntimeConfig with intra_op_threads 0): it times batch-1 calls at load.

Columns: p50 of back-to-back batch-1 calls from one caller; batch-1 requests/s with 16 caller threads behind a gate of
two calls in flight (the server with `--no-batching`); samples/s of two streams of batch-8 calls (the server batching
under load); process CPU ms per batch-1 request at 16 callers. Configurations run interleaved, round after round, so
a noisy neighbour hurts all alike: each cell is the median over rounds. Writes bench/results/threads.json.

Models come from bench/serving_models.py (built once into bench/results/serving-cache/, reused by bench.serving).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import RESULTS, say

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
IN_FLIGHT = 2  # the server's default --max-concurrent-calls


@dataclass(frozen=True)
class Config:
    name: str
    threads: int  # intra-op threads per session; 0: the runtime's choice
    sessions: int = 1  # 2: one session per call slot
    spinning: bool = False
    dynamic_block_base: int = 0  # ORT's session.dynamic_block_base: smaller blocks handed out as threads free up
    adaptive: bool = False  # two sessions: all cores for a call that runs alone, one thread for one that overlaps another


CONFIGS = (
    Config("1 thread", 1),
    Config("all cores", CORES),
    Config("all cores+spin", CORES, spinning=True),
    Config("all cores+dyn4", CORES, dynamic_block_base=4),
    Config("2 sessions x 1", 1, sessions=2),
    Config("wide alone", CORES, adaptive=True),
    Config("auto", 0),
)


def sessions_for(path: Path, config: Config) -> tuple[list[Callable], int]:
    """The predict callables (one per call slot; the same session twice unless `sessions` is 2) and the thread count."""
    from slimserve.server.runtimes import RuntimeConfig, create_runtime

    if config.threads == 0:
        runtime = create_runtime("onnxruntime", path, RuntimeConfig(intra_op_threads=0, device="cpu"))
        runtime.load()
        return [runtime.predict] * IN_FLIGHT, runtime.intra_op_threads
    made = []
    for i in range(2 if config.adaptive else config.sessions):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1 if config.adaptive and i == 1 else config.threads
        if config.dynamic_block_base:
            options.add_session_config_entry("session.dynamic_block_base", str(config.dynamic_block_base))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        spin = "1" if config.spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        made.append(lambda feed, s=session: s.run(None, feed))
    if config.adaptive:
        return [adaptive(made[0], made[1])] * IN_FLIGHT, config.threads
    return [made[i % len(made)] for i in range(IN_FLIGHT)], config.threads


def adaptive(wide: Callable, narrow: Callable) -> Callable:
    """A call runs on the wide session when no other call is in flight, else on the narrow one."""
    lock = threading.Lock()
    in_flight = [0]

    def run(feed: dict) -> object:
        with lock:
            alone = in_flight[0] == 0
            in_flight[0] += 1
        try:
            return (wide if alone else narrow)(feed)
        finally:
            with lock:
                in_flight[0] -= 1

    return run


def p50_one_caller(predict: Callable, feed: dict, seconds: float) -> float:
    for _ in range(3):
        predict(feed)
    lat = []
    stop = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < stop:
        predict(feed)
        lat.append(time.perf_counter() - t0)
    return float(np.percentile(lat, 50)) * 1000.0


def under_load(slots: list[Callable], feed: dict, seconds: float, callers: int) -> tuple[float, float]:
    """Calls/s and process CPU ms per call with `callers` threads, at most len(slots) calls in flight (each on its slot)."""
    free = list(range(len(slots)))
    lock = threading.Lock()
    gate = threading.Semaphore(len(slots))
    counts = [0] * callers
    stop = threading.Event()

    def caller(i: int) -> None:
        while not stop.is_set():
            with gate:
                with lock:
                    slot = free.pop()
                try:
                    slots[slot](feed)
                finally:
                    with lock:
                        free.append(slot)
            counts[i] += 1

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    time.sleep(min(0.5, seconds / 4))  # warm-up
    c0, cpu0, t0 = sum(counts), time.process_time(), time.perf_counter()
    time.sleep(seconds)
    c1, cpu1, t1 = sum(counts), time.process_time(), time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    calls = max(1, c1 - c0)
    return calls / (t1 - t0), (cpu1 - cpu0) * 1000.0 / calls


def streams(slots: list[Callable], feed: dict, seconds: float) -> float:
    """Calls/s of one stream per slot, each calling back to back: the sum of each stream's calls over its busy time (a
    count of calls finished in a window would be coarse where a call takes a good part of a second)."""
    rates = [0.0] * len(slots)

    def stream(i: int) -> None:
        slots[i](feed)  # warm-up
        busy, calls = 0.0, 0
        stop = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < stop or calls < 2:
            slots[i](feed)
            busy += time.perf_counter() - t0
            calls += 1
        rates[i] = calls / busy

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(slots))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates)


def measure(path: Path, pool: dict[str, np.ndarray], seconds: float, rounds: int, configs: tuple[Config, ...]) -> list[dict]:
    one = {k: np.ascontiguousarray(v[:1]) for k, v in pool.items()}
    eight = {k: np.ascontiguousarray(np.resize(v, (8, *v.shape[1:]))) for k, v in pool.items()}
    cells: dict[str, dict[str, list[float]]] = {c.name: {"p50": [], "rps16": [], "cpu16": [], "sps8": []} for c in configs}
    threads_of: dict[str, int] = {}
    built = {c.name: sessions_for(path, c) for c in configs}
    for name, (_, threads) in built.items():
        threads_of[name] = threads
    for r in range(rounds):
        for c in configs if r % 2 == 0 else tuple(reversed(configs)):
            slots, _ = built[c.name]
            cells[c.name]["p50"].append(p50_one_caller(slots[0], one, seconds))
            rps, cpu = under_load(slots, one, seconds, callers=16)
            cells[c.name]["rps16"].append(rps)
            cells[c.name]["cpu16"].append(cpu)
            cells[c.name]["sps8"].append(streams(slots, eight, seconds) * 8)
    return [
        {
            "config": c.name,
            "intra_op_threads": threads_of[c.name],
            "sessions": c.sessions,
            "p50_1_caller_ms": statistics.median(cells[c.name]["p50"]),
            "rps_16_callers_batch1": statistics.median(cells[c.name]["rps16"]),
            "cpu_ms_per_request_16": statistics.median(cells[c.name]["cpu16"]),
            "samples_per_s_2x_batch8": statistics.median(cells[c.name]["sps8"]),
        }
        for c in configs
    ]


def model_files(key: str) -> tuple[Path, dict[str, np.ndarray], str]:
    """(ONNX file, input pool, title) of a bench.serving model; `<model>-auto` is the variant `--recipe auto` picks."""
    from bench.serving_models import CHOICES, auto_variant, prepare

    base = key.removesuffix("-auto")
    files = prepare(CHOICES[base], fresh=False)
    if key.endswith("-auto"):
        auto, why = auto_variant(files, budget=1.0, timeout_s=3600)
        if auto is None:
            raise SystemExit(f"bench.bench_threads: no auto variant of {base}: {why.get('why')}")
        files = auto
    return files.onnx, files.pool, files.title


def render(model: str, rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        f"\n{model} ({CORES} cores, {IN_FLIGHT} calls in flight)",
        f"{'config':<18}{'threads':>8}{'p50@1 ms':>10}{'x 1thr':>8}{'req/s@16':>10}{'x 1thr':>8}{'cpu ms/req':>11}"
        f"{'smp/s 2xb8':>11}{'x 1thr':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r['config']:<18}{r['intra_op_threads']:>8}{r['p50_1_caller_ms']:>10.3f}{r['p50_1_caller_ms'] / base['p50_1_caller_ms']:>8.2f}"
            f"{r['rps_16_callers_batch1']:>10.1f}{r['rps_16_callers_batch1'] / base['rps_16_callers_batch1']:>8.2f}"
            f"{r['cpu_ms_per_request_16']:>11.3f}{r['samples_per_s_2x_batch8']:>11.1f}"
            f"{r['samples_per_s_2x_batch8'] / base['samples_per_s_2x_batch8']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits,minilm,minilm-auto,effnet", help="comma-separated: digits, minilm, minilm-auto, effnet")
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(c.name for c in CONFIGS), help="comma-separated config names")
    args = parser.parse_args(argv)
    wanted = [n.strip() for n in args.configs.split(",") if n.strip()]
    known = {c.name: c for c in CONFIGS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        parser.error(f"--configs: unknown {unknown} (known: {list(known)})")
    configs = tuple(known[n] for n in wanted)
    result = {"cores": CORES, "in_flight": IN_FLIGHT, "onnxruntime": ort.__version__, "load_average": os.getloadavg(), "models": {}}
    for key in [m.strip() for m in args.model.split(",") if m.strip()]:
        path, pool, title = model_files(key)
        say(f"{key}: {path}", "bench.bench_threads")
        rows = measure(path, pool, args.seconds, args.rounds, configs)
        result["models"][key] = {"title": title, "rows": rows}
        print(render(f"{key}: {title}", rows), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
