"""Inline compute: batched ONNX Runtime calls on the event-loop thread vs handed to a compute thread.

    python -m bench.bench_inline [--rounds 6] [--seconds 2] [--callers 4,16]

Starts slimserve twice on bench.serving's cached digits repository, side by side (the second as a
read-only replica of the first): one with the default `--inline-compute-ms` (calls whose recent
mean compute is under 0.5 ms run on the loop thread), one with `--inline-compute-ms 0` (every
call goes to the compute pool). Points run interleaved, round after round, so drift on a shared
machine hits both alike. Reports median throughput, p50 and the server's CPU per request (from
/proc: less noisy than throughput), and each server's mean executed batch over the run. Prints a table and writes bench/results/inline.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from rich.console import Console
from rich.table import Table

from bench.common import RESULTS as RESULTS_DIR
from bench.common import free_port, slimserve_command, tree_cpu_seconds, wait_quiet
from bench.loadgen import build_infer_request, run_point
from bench.servers import CACHE, MODEL, Server, prepare_model, start_slimserve

RESULTS = RESULTS_DIR / "inline.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--callers", default="4,16")
    args = parser.parse_args()
    callers = [int(c) for c in args.callers.split(",")]

    files = prepare_model(fresh=False)
    payload = build_infer_request(MODEL, files.sample)
    inline, _ = start_slimserve(files, [], fresh=False)  # the writer; default --inline-compute-ms
    port = free_port()
    handoff = Server("slimserve-handoff", slimserve_command(CACHE / "repository", port, "--read-only", "--inline-compute-ms", "0"), port)
    servers = {"inline (default 0.5 ms)": inline, "hand-off (--inline-compute-ms 0)": handoff}
    points: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        handoff.start()
        handoff.wait_ready(MODEL, 120)
        for s in servers.values():
            wait_quiet(s.process.pid, 30)
        for r in range(args.rounds):
            for c in callers:
                for name, server in servers.items():
                    cpu0 = tree_cpu_seconds(server.process.pid)
                    p = run_point(name, server.address, payload, c, args.seconds, 0.5)
                    # The server's CPU over warm-up and window, per request answered inside the window (both modes alike).
                    cpu = (tree_cpu_seconds(server.process.pid) - cpu0) / max(1, p.completed) * (args.seconds / (args.seconds + 0.5))
                    points.setdefault((name, c), []).append((p.throughput, p.percentile(50), cpu * 1e6))
                    print(
                        f"round {r + 1}/{args.rounds} {name:<34} c={c:<3} {p.throughput:7.0f} req/s  p50 {p.percentile(50):6.2f} ms  "
                        f"server {cpu * 1e6:5.0f} µs/req  errors {p.error_count}",
                        file=sys.stderr,
                        flush=True,
                    )
        from slimserve.client.client import SlimServeClient

        mean_batch = {}
        for name, server in servers.items():  # over the whole run, both caller counts
            with SlimServeClient(server.address) as client:
                mean_batch[name] = next(r for r in client.compare(MODEL)["variants"] if r["variant"] == "baseline")["mean_batch"]
    finally:
        for s in servers.values():
            s.stop()
    table = Table(
        "mode",
        "callers",
        "median req/s",
        "median p50 ms",
        "median server µs/req",
        "mean executed batch (run)",
        title="digits CNN, batch-1 requests, batching on",
    )
    rows = []
    for (name, c), values in sorted(points.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {
            "mode": name,
            "callers": c,
            "req_per_s": statistics.median(v[0] for v in values),
            "p50_ms": statistics.median(v[1] for v in values),
            "server_us_per_request": statistics.median(v[2] for v in values),
            "rounds": [[round(x, 2) for x in v] for v in values],
            "mean_batch_whole_run": mean_batch[name],
        }
        rows.append(row)
        table.add_row(
            name,
            str(c),
            f"{row['req_per_s']:,.0f}",
            f"{row['p50_ms']:.2f}",
            f"{row['server_us_per_request']:.0f}",
            f"{mean_batch[name]:.2f}",
        )
    Console(width=max(Console().width, 120)).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"seconds": args.seconds, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
