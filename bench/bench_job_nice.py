"""What `--job-nice` costs a job on a node shared with other work: one job timed at each niceness beside CPU burners
in the server's own CPU group (this bench's session, hence its autogroup; or the container's cgroup).

    python -m bench.bench_job_nice [--burners 2] [--nice 0,10,19] [--recipe graph-ort] [--timeout 120]

Per niceness: a fresh `slimserve start --job-nice N --job-yield off` (priority alone acts: no traffic is served), the
digits CNN registered and its baseline measured with the cores free, then `--burners` processes spinning at nice 0 and
one job timed from the call to its end. A job not done by `--timeout` is cancelled and reported so. The `waiting for a
core` reports the job streamed (management/runners.StarvationWatch, one per 30 s window of starvation) are counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.bench_jobs import digits_files
from bench.common import wait_until
from tests.helpers import ServerProcess


def time_job(root: Path, files: dict, nice: int, burners: int, recipe: str, timeout: float) -> dict:
    server = ServerProcess(root / f"repo-{nice}", root / f"server-{nice}.log", "--job-nice", str(nice), "--job-yield", "off")
    spinning: list[subprocess.Popen] = []
    try:
        with server.client() as c:
            c.register("digits", files["onnx"], data=files["data"], train=files["train"])
            wait_until(lambda: c.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's measure", 300, 0.2)
            spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)]
            reports: list[str] = []
            outcome: dict = {}

            def run() -> None:
                try:
                    c.optimize("digits", recipe, variant_name="timed", on_progress=lambda p: reports.append(p.message))
                    outcome["status"] = "succeeded"
                except Exception as e:  # cancelled at the timeout, or failed: reported as such
                    outcome["status"] = f"{type(e).__name__}: {str(e)[:120]}"

            started = time.monotonic()
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            thread.join(timeout)
            seconds = time.monotonic() - started
            if thread.is_alive():
                for job in c.jobs("digits"):
                    if job["status"] in ("queued", "running"):
                        c.cancel_job(job["id"])
                thread.join(30)
                outcome["status"] = f"not done in {timeout:.0f} s (cancelled)"
            waits = [m for m in reports if m.startswith("waiting for a core")]
            return {
                "nice": nice,
                "burners": burners,
                "recipe": recipe,
                "seconds": round(seconds, 1),
                **outcome,
                "waiting_reports": len(waits),
            }
    finally:
        for p in spinning:
            p.kill()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burners", type=int, default=2, help="processes spinning at nice 0 beside the server")
    parser.add_argument("--nice", default="0,10,19", help="comma-separated --job-nice values")
    parser.add_argument("--recipe", default="graph-ort")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a job may take before it is cancelled")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = digits_files(root)
        rows = [time_job(root, files, int(n), args.burners, args.recipe, args.timeout) for n in args.nice.split(",")]
    table = Table(title=f"one {args.recipe} job on the digits CNN beside {args.burners} CPU burner(s) in the server's CPU group")
    for column in ("--job-nice", "job s", "outcome", "'waiting for a core' reports"):
        table.add_column(column, justify="right" if column != "outcome" else "left")
    for r in rows:
        table.add_row(str(r["nice"]), f"{r['seconds']:.1f}", r["status"], str(r["waiting_reports"]))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
