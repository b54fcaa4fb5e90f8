"""bench.serving's in-process section: ONNX Runtime called directly on a model file with the session slimserve's
runtime builds, one call at a time at each batch size, and two streams of one thread each: the machine's limit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np


def _time_calls(predict, feed, seconds: float) -> tuple[np.ndarray, float]:
    """Per-call latencies (ms) of `predict(feed)` in a loop for `seconds`, and the elapsed time."""
    for _ in range(3):
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


def _row(name: str, batch: int, streams: int, threads: int, lat: np.ndarray, samples_per_s: float) -> dict:
    return {
        "name": name,
        "batch": batch,
        "streams": streams,
        "intra_op_threads": threads,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "ms_per_sample": 1000.0 / samples_per_s,
        "samples_per_s": samples_per_s,
    }


def bench_inprocess(onnx: Path, pool: dict[str, np.ndarray], batches: list[int], seconds: float, label: str = "") -> list[dict]:
    """One row per batch size (one call at a time, slimserve's session settings), then two streams of one thread each at
    the batch that did best: on a small CPU often more samples/s than one call on all cores."""
    from slimserve.server.runtimes import RuntimeConfig, create_runtime
    from slimserve.server.settings import Settings

    config = Settings().runtime_config()
    runtime = create_runtime("onnxruntime", onnx, config)
    runtime.load()
    big = max(batches)
    rows_of = {k: np.ascontiguousarray(np.resize(v, (big, *v.shape[1:]))) for k, v in pool.items()}
    prefix = f"{label}: " if label else ""
    rows = []
    for b in batches:
        feed = {k: v[:b] for k, v in rows_of.items()}
        lat, elapsed = _time_calls(runtime.predict, feed, seconds)
        rows.append(_row(f"{prefix}batch {b}", b, 1, runtime.intra_op_threads, lat, len(lat) * b / elapsed))
    b = max(rows, key=lambda r: r["samples_per_s"])["batch"]
    feed = {k: v[:b] for k, v in rows_of.items()}
    one_thread = RuntimeConfig(intra_op_threads=1, inter_op_threads=1, device=config.device)
    runtimes = []
    for _ in range(2):
        r = create_runtime("onnxruntime", onnx, one_thread)
        r.load()
        runtimes.append(r)
    results: list[tuple[np.ndarray, float]] = [None, None]  # type: ignore[list-item]

    def stream(i: int) -> None:
        results[i] = _time_calls(runtimes[i].predict, feed, seconds)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.concatenate([r[0] for r in results])
    rows.append(_row(f"{prefix}batch {b}, 2 streams x 1 thread", b, 2, 1, lat, sum(len(r[0]) * b / r[1] for r in results)))
    return rows


def limits(rows: list[dict]) -> dict:
    """Samples/s at batch 1 (one call at a time) and the best of the section, with the batch that gave it."""
    one = next((r for r in rows if r["batch"] == 1 and r["streams"] == 1), None)
    best = max(rows, key=lambda r: r["samples_per_s"])
    return {
        "batch1_samples_per_s": one["samples_per_s"] if one else None,
        "best_samples_per_s": best["samples_per_s"],
        "best_run": best["name"],
    }
