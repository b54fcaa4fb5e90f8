"""What the feedback store's memory of answers costs: bytes per remembered answer and MiB per model when full.

    python -m bench.bench_feedback_memory [--answers 20000] [--rows 1,8,64]

Each model keeps the answers of its last `--feedback-ids` requests (default 100 000) so that a label sent later
(`slimctl feedback`) can be scored. The store grows with the requests served until it is full, so this is memory a
busy server's RSS shows after its first `--feedback-ids` requests. Measured with tracemalloc (Python objects and
numpy's buffers), request ids like the server's own. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import tracemalloc

import numpy as np

from slimserve.server.telemetry.statistics import DEFAULT_FEEDBACK_IDS, FeedbackStore


def bytes_per_answer(answers: int, rows: int) -> float:
    store = FeedbackStore(capacity=answers)
    predicted = np.arange(rows, dtype=np.int64) % 10
    tracemalloc.start()
    try:
        for i in range(answers):
            if rows == 1:
                store.record_prediction(f"5f1d3c2a-{i}", "baseline", 3)
            else:
                store.record_rows(f"5f1d3c2a-{i}", "baseline", predicted)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return used / answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=20_000)
    parser.add_argument("--rows", default="1,8,64", help="rows per request, comma-separated")
    args = parser.parse_args()
    out = []
    for rows in (int(r) for r in args.rows.split(",")):
        per = bytes_per_answer(args.answers, rows)
        out.append({"rows": rows, "bytes_per_answer": round(per), "mib_when_full": round(per * DEFAULT_FEEDBACK_IDS / 2**20, 1)})
    print(f"{'rows':>5} {'B/answer':>9} {'MiB at ' + str(DEFAULT_FEEDBACK_IDS):>14}")
    for r in out:
        print(f"{r['rows']:>5} {r['bytes_per_answer']:>9} {r['mib_when_full']:>14}")
    print(json.dumps({"feedback_ids": DEFAULT_FEEDBACK_IDS, "results": out}))


if __name__ == "__main__":
    main()
