"""What routing, metrics and live statistics add to one request at batch 1, measured in the server's own path.

    python -m bench.bench_overhead [--requests 20000] [--rounds 5]

A DataPlane serves a model whose runtime returns at once (an [1, 10] float answer), so only the
serving layer is timed. Three ways through it, interleaved round after round:
  batcher  the DynamicBatcher alone (submit -> compute pool -> answer): the floor;
  routed   DataPlane.serve of decoded inputs: router (70/30 split, sticky off), Prometheus counts,
           latency window, request id, input checks, top-1 and feedback record, then the same batcher;
  shadowed the same with a shadow variant mirroring every request.
"added" is routed minus batcher: the cost of router + metrics + statistics per request
(the issue's budget: 50 µs). Prints a table and writes bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from slimserve.server.runtimes import Runtime, RuntimeConfig, TensorSpec
from slimserve.server.store.manifest import ModelInfo, VariantInfo
from slimserve.server.store.repository import Repository
from slimserve.server.store.traffic import TrafficPolicy
from slimserve.server.telemetry.metrics import Metrics

RESULTS = Path(__file__).parent / "results" / "overhead.json"
ANSWER = {"logits": np.zeros((1, 10), np.float32)}


class InstantRuntime(Runtime):
    name = "instant"
    inline_safe = True  # as ORT on the CPU: short calls run on the loop thread

    def load(self) -> None:
        self.inputs = [TensorSpec("x", "FP32", [-1, 4])]
        self.outputs = [TensorSpec("logits", "FP32", [-1, 10])]

    def predict(self, inputs, outputs=None):
        return ANSWER


async def build(root: Path, shadow: bool):
    from slimserve.server.inference import dataplane as dp_module

    repository = Repository(root)
    spec_in, spec_out = [TensorSpec("x", "FP32", [-1, 4])], [TensorSpec("logits", "FP32", [-1, 10])]
    variants = {n: VariantInfo(n, "", "", "instant", "onnx", file="model.onnx") for n in ("baseline", "b", "c")}
    traffic = TrafficPolicy({"baseline": 0.7, "b": 0.3}, ("c",) if shadow else ())
    info = ModelInfo("m", "onnx", "", "now", spec_in, spec_out, [], variants, traffic)
    (root / "models" / "m").mkdir(parents=True)
    (root / "models" / "m" / "manifest.json").write_text(json.dumps(info.to_dict()))
    plane = dp_module.DataPlane(repository, RuntimeConfig(), Metrics(), compute_threads=1)
    plane.loader.load_runtime = lambda info, variant: _instant()  # the runtime is the point of the bench
    await plane.load_model("m")
    return plane


def _instant() -> Runtime:
    r = InstantRuntime(Path("."))
    r.load()
    return r


async def time_batcher(plane, n: int) -> float:
    batcher = plane.models["m"].variants["baseline"].batcher
    x = {"x": np.zeros((1, 4), np.float32)}
    start = time.perf_counter()
    for _ in range(n):
        await batcher.submit(x, None)
    return (time.perf_counter() - start) / n * 1e6


async def time_routed(plane, n: int) -> float:
    from slimserve.server.inference.dataplane import InferRequest

    x = np.zeros((1, 4), np.float32)
    request = InferRequest("m", "", "", lambda: {"x": x})
    start = time.perf_counter()
    for _ in range(n):
        await plane.serve(request)
    return (time.perf_counter() - start) / n * 1e6


async def main_async(requests: int, rounds: int) -> dict:
    results: dict[str, list[float]] = {"batcher": [], "routed": [], "shadowed": []}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        plain, mirrored = await build(Path(a), False), await build(Path(b), True)
        for plane in (plain, mirrored):  # warm-up
            await time_routed(plane, 1000)
        for _ in range(rounds):
            results["batcher"].append(await time_batcher(plain, requests))
            results["routed"].append(await time_routed(plain, requests))
            results["shadowed"].append(await time_routed(mirrored, requests))
            await asyncio.sleep(0.05)  # let mirrored calls finish
        await plain.stop()
        await mirrored.stop()
    median = {k: statistics.median(v) for k, v in results.items()}
    return {
        "us_per_request": median,
        "added_us": median["routed"] - median["batcher"],
        "added_with_shadow_us": median["shadowed"] - median["batcher"],
        "requests": requests,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = asyncio.run(main_async(args.requests, args.rounds))
    table = Table("path", "µs / request (median of rounds)", title="serving-layer cost per request at batch 1 (instant model)")
    for name, value in result["us_per_request"].items():
        table.add_row(name, f"{value:.1f}")
    table.add_row("added by router + metrics + stats", f"{result['added_us']:.1f}")
    table.add_row("added with one shadow", f"{result['added_with_shadow_us']:.1f}")
    Console().print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
