"""How reliably a job's Ray driver joins a loopback Ray head, and how long it takes, by way in.

    python -m bench.bench_ray_connect [--tries 5]

Starts `ray start --head --block` on 127.0.0.1 (its own process group, ended at the end), then for each way in
(`ray://` through Ray Client, `ray+gcs://` through the GCS) joins it `--tries` times:
- `slimserve driver`: the server's own path, `RayRunner._probe` (a `management/ray_driver.py` process: Ray Client
  tried up to 3 times, the token sent as Ray's head decides it);
- `plain ray.init`: one `ray.init(address)` in a fresh Python with RAY_AUTH_MODE unset, as a Ray user's script runs
  (the way the Ray runner joined before, in the server).
Ray 2.59+ turns token authentication on for `ray start --head` once ~/.ray/auth_token exists; a plain driver does not
send it and is refused. Needs the `ray` extra. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from bench.ray_head import head_at, short_dir


@contextlib.contextmanager
def loopback_head() -> Iterator[tuple[str, str]]:
    """(client address, GCS address) of a one-CPU head on 127.0.0.1, in a short /tmp directory (Ray's socket paths)."""
    with short_dir() as temp, head_at(temp) as (client, gcs, _):
        yield client, gcs


def through_driver(address: str) -> tuple[bool, str]:
    from slimserve.server.management.runners import RayRunner
    from slimserve.server.management.worker import WorkLimits

    outcome = RayRunner(address, WorkLimits())._probe()
    return outcome[0] == "done", outcome[1] if outcome[0] == "done" else outcome[2]


def plain_init(address: str) -> tuple[bool, str]:
    target = address.replace("ray+gcs://", "")  # ray.init takes a GCS address as HOST:PORT
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    script = f"import ray; ray.init({target!r}, log_to_driver=False); print('ok', ray.cluster_resources().get('CPU')); ray.shutdown()"
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=150, env=env)
    except subprocess.TimeoutExpired:
        return False, "no answer within 150 s"
    if out.returncode == 0:
        return True, out.stdout.strip()
    last = [line for line in out.stderr.strip().splitlines() if line and not line.startswith(" ")]
    return False, last[-1][:200] if last else f"exit {out.returncode}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with loopback_head() as addresses:
        for address in addresses:
            for name, join in (("slimserve driver", through_driver), ("plain ray.init", plain_init)):
                seconds, ok, last = [], 0, ""
                for _ in range(args.tries):
                    start = time.monotonic()
                    good, text = join(address)
                    seconds.append(time.monotonic() - start)
                    ok += good
                    last = text if not good else last
                way = "ray://" if address.startswith("ray://") else "ray+gcs://"
                rows.append(
                    {
                        "way": way,
                        "join": name,
                        "tries": args.tries,
                        "ok": ok,
                        "median_s": round(statistics.median(seconds), 1),
                        "last_error": last,
                    }
                )
    print(f"{'way':<11} {'join':<17} {'ok':>6} {'median s':>9}  last error")
    for r in rows:
        print(f"{r['way']:<11} {r['join']:<17} {r['ok']:>3}/{r['tries']:<2} {r['median_s']:>9}  {r['last_error'][:110]}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
