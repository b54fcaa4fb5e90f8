"""Pruning and distillation of the digits CNN against the issue's targets.

    python -m bench.bench_prune [--epochs 8] [--rounds 5]

Trains the baseline as slimserve.optimizer.zoo does (8 epochs), registers it as a .pt2 with the digits
train / test splits, runs prune-structured, prune-weight, prune-gradual, distill-soft and
distill-feature with their default settings, and measures every variant with
slimserve.optimizer.evaluation.measure.evaluate on onnxruntime (the runtime that serves them): parameters,
non-zero parameters, FLOPs, p50 at batch 1, accuracy. Because two shared cores drift, p50 is
also taken in interleaved rounds (single-threaded sessions, variant after variant, best median
per variant) and the speed ratios use those. Prints the table with each target met or missed
and writes bench/results/prune.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "prune.json"

# pass -> (what is checked, test on the row)
TARGETS = {
    "prune-structured": (
        "FLOPs <= 60%, params <= 70%, p50 <= 0.9x, <= 1 pt lost",
        lambda r: r["flops_pct"] <= 60 and r["params_pct"] <= 70 and r["p50_ratio"] <= 0.9 and r["delta_pt"] >= -1,
    ),
    "prune-weight": (">= 30% of weights zeroed, <= 1 pt lost", lambda r: r["zeroed_pct"] >= 30 and r["delta_pt"] >= -1),
    "prune-gradual": (">= 35% of weights zeroed, <= 1 pt lost", lambda r: r["zeroed_pct"] >= 35 and r["delta_pt"] >= -1),
    "distill-soft": (
        "params <= 30%, FLOPs <= 50%, <= 2 pt lost",
        lambda r: r["params_pct"] <= 30 and r["flops_pct"] <= 50 and r["delta_pt"] >= -2,
    ),
    "distill-feature": (
        "params <= 30%, FLOPs <= 50%, <= 2 pt lost",
        lambda r: r["params_pct"] <= 30 and r["flops_pct"] <= 50 and r["delta_pt"] >= -2,
    ),
}


def interleaved_p50(paths: dict[str, Path], x: np.ndarray, rounds: int, iterations: int = 400) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    sessions = {n: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for n, p in paths.items()}
    feed = {"x": x[:1]}
    best: dict[str, float] = {n: float("inf") for n in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for _ in range(100):
                session.run(None, feed)
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], float(np.median(times)) * 1e3)
    return best


def weight_zeroed(path: Path) -> float:
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if len(i.dims) >= 2]
    return 100.0 * sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="baseline training epochs (as slimserve.optimizer.zoo)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch

    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass
    from slimserve.optimizer.evaluation.measure import evaluate
    from slimserve.optimizer.formats.export import to_onnx
    from slimserve.optimizer.zoo import export_pt2, load_digits_splits, train_digits_cnn
    from slimserve.server.runtimes import create_runtime

    def factory(path, runtime):
        r = create_runtime(runtime, path)
        r.load()
        return r

    torch.set_num_threads(2)
    started = time.perf_counter()
    model, _ = train_digits_cnn(epochs=args.epochs)
    train, test = load_digits_splits()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        np.savez(root / "train.npz", x=train.x, labels=train.y)
        np.savez(root / "data.npz", x=test.x, labels=test.y)
        source = Artifact(
            export_pt2(model, root / "digits.pt2", torch.from_numpy(test.x[:2])), "pt2", input_names=("x",), output_names=("logits",)
        )
        context = PassContext(workdir=root / "work", datasets={"train": root / "train.npz", "data": root / "data.npz"})
        data = {"x": test.x, "labels": test.y}
        baseline_onnx = to_onnx(source, context)
        baseline, outputs = evaluate(baseline_onnx, factory, data)
        variants, seconds, evaluations = {"baseline": baseline_onnx.path}, {}, {"baseline": baseline}
        for name in TARGETS:
            t0 = time.perf_counter()
            result = make_pass(name).run(source, context)
            seconds[name] = time.perf_counter() - t0
            evaluations[name], _ = evaluate(result, factory, data, baseline=baseline, baseline_outputs=outputs)
            variants[name] = result.path
            print(f"{name}: {seconds[name]:.1f} s", flush=True)
        p50 = interleaved_p50(variants, test.x, args.rounds)
        rows = []
        for name, e in evaluations.items():
            row = {
                "variant": name,
                "params": e.params,
                "nonzero_params": e.nonzero_params,
                "flops": e.flops,
                "params_pct": 100.0 * e.params / baseline.params,
                "flops_pct": 100.0 * e.flops / baseline.flops,
                "zeroed_pct": weight_zeroed(variants[name]),
                "nonzero_pct_of_params": 100.0 * e.nonzero_params / e.params,
                "p50_ms_evaluate": e.latency_p50_ms,
                "p50_ms_interleaved": p50[name],
                "p50_ratio": p50[name] / p50["baseline"],
                "accuracy_pct": 100.0 * e.accuracy,
                "delta_pt": 0.0 if name == "baseline" else e.accuracy_delta,
                "seconds": seconds.get(name),
            }
            if name in TARGETS:
                row["target"], check = TARGETS[name]
                row["met"] = bool(check(row))
            rows.append(row)

    header = f"{'variant':18} {'params':>7} {'%':>6} {'zeroed%':>8} {'MFLOPs':>7} {'%':>6} {'p50 ms':>7} {'x':>5} {'acc %':>6} {'Δ pt':>6} {'s':>5}  target"
    print(header)
    for r in rows:
        verdict = "" if "met" not in r else ("MET    " if r["met"] else "MISSED ") + r["target"]
        print(
            f"{r['variant']:18} {r['params']:>7} {r['params_pct']:>6.1f} {r['zeroed_pct']:>8.1f} {r['flops'] / 1e6:>7.3f} {r['flops_pct']:>6.1f} "
            f"{r['p50_ms_interleaved']:>7.4f} {r['p50_ratio']:>5.2f} {r['accuracy_pct']:>6.2f} {r['delta_pt']:>+6.2f} "
            f"{(r['seconds'] or 0):>5.1f}  {verdict}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "processor": platform.processor(),
                "baseline_epochs": args.epochs,
                "total_seconds": time.perf_counter() - started,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
