"""Per-request cost of routing and live bookkeeping: Router.choose, LatencyWindow.record, FeedbackStore.record_prediction.

    python -m bench.bench_router [--calls 100000] [--repeat 5]

The issue's budget is 50 µs per request at batch 1 for router + metrics together; these are the
domain parts of it (Prometheus observations are measured elsewhere). Each line is the best of
`repeat` timeit runs of `calls` calls, in µs per call. Prints a table and writes bench/results/router.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import timeit
from pathlib import Path

from slimserve.server.inference.router import Router
from slimserve.server.store.traffic import TrafficPolicy
from slimserve.server.telemetry.statistics import DEFAULT_WINDOW, FeedbackStore, LatencyWindow, VariantStats, compare_rows

RESULTS = Path(__file__).parent / "results" / "router.json"


def per_call_us(stmt, calls: int, repeat: int) -> float:
    return min(timeit.repeat(stmt, number=calls, repeat=repeat)) / calls * 1e6


def compare_cost_ms() -> float:
    """One compare over full windows: percentiles, two Mann-Whitney tests, Wilson intervals."""
    rng = random.Random(0)
    variants = ["baseline", "int8", "pruned"]
    stats = {v: VariantStats(device_seconds=10.0) for v in variants}
    store = FeedbackStore()
    for v, scale in zip(variants, (1.0, 0.6, 0.8)):
        for _ in range(DEFAULT_WINDOW):
            stats[v].answered(rng.lognormvariate(-6, 0.3) * scale)
    for i in range(10_000):
        store.record_prediction(str(i), variants[i % 3], i % 10)
        store.feedback(str(i), i % 10 if i % 7 else 0)
    kwargs = {
        "weights": {"baseline": 0.5, "int8": 0.3, "pruned": 0.2},
        "stats": stats,
        "price_per_hour": 0.1,
        "offline_accuracy": {},
        "feedback": store,
    }
    return min(timeit.repeat(lambda: compare_rows(variants, **kwargs), number=5, repeat=3)) / 5 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    calls, repeat = args.calls, args.repeat

    single = Router(TrafficPolicy.single())
    split = Router(TrafficPolicy({"baseline": 0.7, "int8": 0.3}), seed=0)
    four = Router(TrafficPolicy({"baseline": 0.4, "int8": 0.3, "pruned": 0.2, "distilled": 0.1}), seed=0)
    sticky = Router(TrafficPolicy({"baseline": 0.7, "int8": 0.3}, sticky_parameter="user_id"), seed=0)
    params = {"user_id": "user-12345", "other": "x"}
    window = LatencyWindow()
    store = FeedbackStore()
    ids = iter(range(10**12))
    shadows = {"int8": 3}

    cases = {
        "choose, one variant": lambda: single.choose(),
        "choose, 70/30": lambda: split.choose(),
        "choose, 4 variants": lambda: four.choose(),
        "choose, sticky value (blake2b)": lambda: sticky.choose("user-12345"),
        "choose_for, request parameters": lambda: sticky.choose_for(params),
        "LatencyWindow.record": lambda: window.record(0.0012),
        "FeedbackStore.record_prediction": lambda: store.record_prediction(str(next(ids)), "baseline", 3),
        "FeedbackStore.record_prediction + shadow": lambda: store.record_prediction(str(next(ids)), "baseline", 3, shadows),
    }
    results = {name: per_call_us(fn, calls, repeat) for name, fn in cases.items()}
    per_request = (
        results["choose_for, request parameters"] + results["LatencyWindow.record"] + results["FeedbackStore.record_prediction + shadow"]
    )

    total_label = "per request: sticky route + window + feedback with shadow"
    width = max(len(total_label), *map(len, results))
    print(f"{'operation':<{width}}  µs/call")
    for name, us in results.items():
        print(f"{name:<{width}}  {us:7.3f}")
    print(f"{total_label:<{width}}  {per_request:7.3f}  (budget: 50 µs with the Prometheus metrics)")
    compare_ms = compare_cost_ms()
    print(
        f"compare_rows, 3 variants x {DEFAULT_WINDOW} latencies, 10k labels: {compare_ms:.1f} ms (control plane, once per slimctl compare)"
    )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
                "calls": calls,
                "repeat": repeat,
                "us_per_call": results,
                "us_per_request_domain": per_request,
                "compare_rows_ms": compare_ms,
                "budget_us_with_metrics": 50,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
