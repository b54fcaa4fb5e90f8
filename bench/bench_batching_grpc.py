"""Dynamic batching over gRPC: slimserve with batching on and off, 16 single-sample callers, the digits CNN.

    python -m bench.bench_batching_grpc [--rounds 3] [--seconds 4] [--callers 16]

Each round starts slimserve twice on the cached digits repository of bench.serving (once with
`--batching`, once with `--no-batching`) and drives it with bench.loadgen's pre-serialized batch-1
requests from separate processes. Reports throughput, p50, errors and the mean executed batch
(samples per model call, from the server's own `compare`). Prints a table and writes
bench/results/batching_grpc.json. bench.bench_batching measures the batcher without gRPC.
"""

from __future__ import annotations

import argparse
import json
import statistics

from rich.console import Console
from rich.table import Table

from bench.loadgen import build_infer_request, run_point
from bench.serving import MODEL, RESULTS as RESULTS_DIR, prepare_model, start_slimserve

RESULTS = RESULTS_DIR / "batching_grpc.json"
MODES = ("--batching", "--no-batching")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--callers", type=int, default=16)
    args = parser.parse_args()

    from client.client import SlimServeClient

    files = prepare_model(fresh=False)
    payload = build_infer_request(MODEL, files.sample)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            server, _ = start_slimserve(files, [], fresh=False, extra_flags=(mode,))
            try:
                point = run_point(f"slimserve {mode}", server.address, payload, args.callers, args.seconds, 1.0)
                with SlimServeClient(server.address) as client:
                    baseline = next(r for r in client.compare(MODEL)["variants"] if r["variant"] == "baseline")
            finally:
                server.stop()
            runs[mode].append({"req_per_s": point.throughput, "p50_ms": point.percentile(50), "errors": point.error_count,
                               "mean_batch": baseline["mean_batch"]})
    table = Table("batching", "req/s (each round)", "median req/s", "p50 ms (median)", "mean executed batch", "errors",
                  title=f"slimserve, {args.callers} callers, batch-1 requests, digits CNN")
    for mode, rows in runs.items():
        table.add_row(mode, " / ".join(f"{r['req_per_s']:,.0f}" for r in rows), f"{statistics.median(r['req_per_s'] for r in rows):,.0f}",
                      f"{statistics.median(r['p50_ms'] for r in rows):.2f}", " / ".join(f"{r['mean_batch']:.2f}" for r in rows),
                      str(sum(r["errors"] for r in rows)))
    Console().print(table)
    on, off = (statistics.median(r["req_per_s"] for r in runs[m]) for m in MODES)
    print(f"batching on / off at the median: {on / off:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"callers": args.callers, "seconds": args.seconds, "runs": runs, "speedup_median": on / off}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
