"""`make bench`: runs the benchmark suites one after another, each in its own process.

    .venv/bin/python -m bench.run [--suites serving,router,batching] [--quick] [-- ARGS FOR bench.serving]

Suites:
  serving   bench/serving.py: in-process ORT, slimserve over gRPC, its variants, KServe and MLServer (several minutes;
            the first run also trains the model and installs the peers' virtualenvs)
  router    bench/bench_router.py: per-request cost of routing and live bookkeeping (seconds)
  batching  bench/bench_batching.py: the dynamic batcher in-process, off vs on (about a minute)
  batching-grpc  bench/bench_batching_grpc.py: slimserve over gRPC with batching on vs off (about 3 minutes)
  overhead  bench/bench_overhead.py: what routing, metrics and statistics add per request (seconds)
  inline    bench/bench_inline.py: tiny calls on the event-loop thread vs handed to a compute thread (about a minute)
  prune     bench/bench_prune.py: pruning and distillation of the digits CNN (minutes; not run by default)
  soak      bench/bench_soak.py: 32 callers for 180 s with memory sampled (not run by default)
  quantize  bench/bench_quantize.py: INT8 variants of the digits CNN and MiniLM (many minutes; not run by default)
`--quick` shortens every suite for a smoke run (numbers from it are not worth quoting).
Each suite prints its table and writes its JSON to bench/results/; a failing suite is reported and the
others still run; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

SUITES = {
    "serving": ("bench.serving", [], ["--seconds", "1", "--warmup", "0.5", "--rounds", "1"]),
    "router": ("bench.bench_router", [], ["--calls", "20000", "--repeat", "2"]),
    "batching": ("bench.bench_batching", [], ["--seconds", "0.5", "--rounds", "1"]),
    "batching-grpc": ("bench.bench_batching_grpc", [], ["--rounds", "1", "--seconds", "1"]),
    "overhead": ("bench.bench_overhead", [], ["--requests", "2000", "--rounds", "1"]),
    "inline": ("bench.bench_inline", [], ["--rounds", "1", "--seconds", "1"]),
    "quantize": ("bench.bench_quantize", [], ["--rounds", "2", "--iterations", "500", "--skip-minilm", "--skip-widths"]),
    "prune": ("bench.bench_prune", [], []),
    "soak": ("bench.bench_soak", [], ["--duration", "20"]),
}
DEFAULT = "serving,router,batching,batching-grpc,overhead,inline"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default=DEFAULT, help=f"comma-separated, from {', '.join(SUITES)} [default {DEFAULT}]")
    parser.add_argument("--quick", action="store_true", help="short runs, for checking that the suites work")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
    failed = []
    for name in names:
        module, normal, quick = SUITES[name]
        cmd = [sys.executable, "-m", module, *(quick if args.quick else normal), *(extra if name == "serving" else [])]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        code = subprocess.call(cmd)
        print(f"=== {name}: {'ok' if code == 0 else f'failed (exit {code})'} in {time.monotonic() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
