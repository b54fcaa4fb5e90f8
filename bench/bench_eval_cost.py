"""What one optimization job costs to evaluate, and whether its speed-up holds: a graph-ort job on a model of ~50 ms per call.

    python -m bench.bench_eval_cost [--target-ms 50] [--samples 64] [--recheck-seconds 20]

Builds an ONNX CNN (3x3 convs with a BatchNorm-style Mul/Add after each, which graph-ort fuses) sized so that one
batch-1 call takes about --target-ms on this CPU, then runs `slimserve.optimizer.pipeline.optimize` with the
graph-ort recipe on evaluation data of --samples rows, on the server's ONNX Runtime runtime (the thread count it
chooses). Prints the job's wall time split into baseline measure, pass and variant measure, the report's speed-up with
its interval, and an independent check: the two files timed again in turns for --recheck-seconds, and the report's
speed-up against it (the issue's target: within 25%). Writes bench/results/eval_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RESULTS_DIR = Path(__file__).parent / "results"


def build_cnn(path: Path, layers: int, channels: int = 32, size: int = 112) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((channels, channels if i else 3, 3, 3)) * 0.1).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.full((1, channels, 1, 1), 0.9, np.float32), f"s{i}"),
            numpy_helper.from_array(np.full((1, channels, 1, 1), 0.01, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [current, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        current = f"r{i}"
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", channels])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-ms", type=float, default=50.0)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--recheck-seconds", type=float, default=20.0)
    parser.add_argument("--verbose", action="store_true", help="print the job's stages as they pass")
    args = parser.parse_args()

    from slimserve.optimizer.base import Artifact, PassContext, ProgressEvent
    from slimserve.optimizer.evaluation.measure import timed_speedup
    from slimserve.optimizer.evaluation.timing import TimingOptions
    from slimserve.optimizer.pipeline import optimize
    from slimserve.optimizer.recipes import parse_recipe
    from slimserve.server.runtimes import RuntimeConfig, create_runtime

    def factory(path: Path, runtime: str):
        r = create_runtime(runtime, path, RuntimeConfig())
        r.load()
        return r

    work = Path(tempfile.mkdtemp(prefix="eval-cost-"))
    x1 = np.random.default_rng(1).standard_normal((1, 3, 112, 112)).astype(np.float32)

    def call_ms(layers: int) -> float:
        predictor = factory(build_cnn(work / f"probe{layers}.onnx", layers), "onnxruntime")
        for _ in range(3):
            predictor.predict({"x": x1})
        times = []
        for _ in range(7):
            started = time.perf_counter()
            predictor.predict({"x": x1})
            times.append(time.perf_counter() - started)
        return float(np.median(times)) * 1000

    first, five = call_ms(1), call_ms(5)
    per_layer = max(0.1, (five - first) / 4)  # a 32 -> 32 conv (the first layer reads 3 channels only)
    layers = max(1, 1 + round((args.target_ms - first) / per_layer))
    print(f"a 32-channel conv layer: {per_layer:.1f} ms per batch-1 call; {layers} layers for ~{args.target_ms:g} ms", flush=True)
    model = build_cnn(work / "cnn.onnx", layers)
    data = work / "eval.npz"
    np.savez(data, x=np.random.default_rng(2).standard_normal((args.samples, 3, 112, 112)).astype(np.float32))

    stages: list[tuple[float, str]] = []
    t0 = time.perf_counter()

    def progress(event: ProgressEvent) -> None:
        stages.append((time.perf_counter() - t0, f"{event.stage}: {event.message}"))
        if args.verbose:
            print(f"  {stages[-1][0]:6.1f} s  {stages[-1][1]}", flush=True)

    context = PassContext(workdir=work / "job", datasets={"data": data}, progress=progress)
    source = Artifact(model, "onnx", input_names=("x",), output_names=("logits",))
    t0 = time.perf_counter()
    result = optimize(source, parse_recipe("graph-ort"), context, factory, "graph-ort")
    job_s = time.perf_counter() - t0
    pass_start = next(t for t, m in stages if m.startswith("graph-ort"))
    variant_start = next(t for t, m in stages if "measuring graph-ort" in m)
    e, b = result.evaluation, result.baseline

    recheck = timed_speedup(
        result.artifact, source, factory, None, TimingOptions(rel_ci=0.005, ratio_seconds=args.recheck_seconds, round_calls=5)
    )
    summary = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "layers": layers,
        "baseline_p50_ms": round(b.latency_p50_ms, 2),
        "variant_p50_ms": round(e.latency_p50_ms, 2),
        "threads": e.threads,
        "job_s": round(job_s, 1),
        "baseline_measure_s": round(pass_start, 1),
        "pass_s": round(variant_start - pass_start, 1),
        "variant_measure_and_timing_s": round(job_s - variant_start, 1),
        "report_speedup_x": round(e.speedup_x, 3),
        "report_speedup_ci": [round(v, 3) for v in e.speedup_ci],
        "report_rounds": e.speedup_rounds,
        "recheck_speedup_x": round(recheck.speedup, 3),
        "recheck_ci": [round(recheck.low, 3), round(recheck.high, 3)],
        "report_vs_recheck_pct": round(100 * (e.speedup_x / recheck.speedup - 1), 1),
        "quality": {n: q["drop"] for n, q in (e.qualities or {}).items()},
    }
    print(f"graph-ort job on a {b.latency_p50_ms:.1f} ms/call CNN ({layers} conv layers, {args.samples} eval rows, {e.threads} threads)")
    print(f"  job wall time        {job_s:7.1f} s  (target: under 120 s)")
    print(f"    baseline measure   {pass_start:7.1f} s")
    print(f"    graph-ort pass     {variant_start - pass_start:7.1f} s")
    print(f"    variant + speed-up {job_s - variant_start:7.1f} s")
    print(f"  report speed-up      {e.speedup_x:7.3f}x  95% [{e.speedup_ci[0]:.3f}, {e.speedup_ci[1]:.3f}] in {e.speedup_rounds} rounds")
    print(f"  re-timed in turns    {recheck.speedup:7.3f}x  95% [{recheck.low:.3f}, {recheck.high:.3f}] ({recheck.rounds} rounds)")
    print(f"  report vs re-timed   {summary['report_vs_recheck_pct']:+.1f}%  (target: within 25%)")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "eval_cost.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
