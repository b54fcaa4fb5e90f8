"""Dynamic batching over gRPC: slimserve with batching on and off, 16 single-sample callers, the digits CNN.

    python -m bench.bench_batching_grpc [--rounds 3] [--seconds 4] [--callers 16]

Each round starts slimserve twice on the cached digits repository of bench.serving (once with
`--batching`, once with `--no-batching`) and drives it with bench.loadgen's pre-serialized batch-1
requests from separate processes. Reports throughput, p50, errors and the mean executed batch
(samples per model call, from the server's own `compare`). Two more rows per round, for context:
batching on with the callers' requests sent over ModelStreamInfer (one stream per client
process), and bench.serving's floor server (a grpc aio server that parses each request and
answers fixed bytes, no model): the most any server on Python's grpc aio reaches here, so
"floor / batching off" bounds what batching can gain over unary gRPC on this machine.
Prints a table and writes bench/results/batching_grpc.json. bench.bench_batching measures the
batcher without gRPC.
"""

from __future__ import annotations

import argparse
import json
import statistics

from rich.console import Console
from rich.table import Table

from bench.common import RESULTS as RESULTS_DIR
from bench.loadgen import build_infer_request, run_point
from bench.servers import MODEL, prepare_model, start_floor, start_slimserve

RESULTS = RESULTS_DIR / "batching_grpc.json"
MODES = ("--batching", "--no-batching", "--batching, stream", "floor (no model)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--callers", type=int, default=16)
    args = parser.parse_args()

    from slimserve.client.client import SlimServeClient

    files = prepare_model(fresh=False)
    payload = build_infer_request(MODEL, files.sample)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            if mode.startswith("floor"):
                server = start_floor(files)
                server.start()
                server.wait_ready(MODEL, 60)
            else:
                server, _ = start_slimserve(files, [], fresh=False, extra_flags=(mode.split(",")[0],))
            try:
                point = run_point(f"slimserve {mode}", server.address, payload, args.callers, args.seconds, 1.0, stream="stream" in mode)
                mean_batch = None
                if not mode.startswith("floor"):
                    with SlimServeClient(server.address) as client:
                        mean_batch = next(r for r in client.compare(MODEL)["variants"] if r["variant"] == "baseline")["mean_batch"]
            finally:
                server.stop()
            runs[mode].append(
                {"req_per_s": point.throughput, "p50_ms": point.percentile(50), "errors": point.error_count, "mean_batch": mean_batch}
            )
    table = Table(
        "batching",
        "req/s (each round)",
        "median req/s",
        "p50 ms (median)",
        "mean executed batch",
        "errors",
        title=f"slimserve, {args.callers} callers, batch-1 requests, digits CNN",
    )
    for mode, rows in runs.items():
        table.add_row(
            mode,
            " / ".join(f"{r['req_per_s']:,.0f}" for r in rows),
            f"{statistics.median(r['req_per_s'] for r in rows):,.0f}",
            f"{statistics.median(r['p50_ms'] for r in rows):.2f}",
            " / ".join("-" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}" for r in rows),
            str(sum(r["errors"] for r in rows)),
        )
    Console(width=max(Console().width, 140)).print(table)
    on, off, stream, floor = (statistics.median(r["req_per_s"] for r in runs[m]) for m in MODES)
    print(
        f"batching on / off at the median: {on / off:.2f}x (over ModelStreamInfer: {stream / off:.2f}x; "
        f"the floor server, no model: {floor / off:.2f}x)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "callers": args.callers,
                "seconds": args.seconds,
                "runs": runs,
                "speedup_median": on / off,
                "stream_speedup_median": stream / off,
                "floor_over_off_median": floor / off,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
