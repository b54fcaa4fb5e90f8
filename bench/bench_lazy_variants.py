"""What `--unload-idle-variants-s` saves: the server's resident memory with many unrouted variants of one model.

    python -m bench.bench_lazy_variants [--variants 20] [--hidden 1024] [--idle-s 5]

Registers an MLP (ONNX, about 2.4 M FP32 parameters at --hidden 1024) and stores `--variants` copies of it as
variants that no route serves, then starts `slimserve start` twice on that repository: as it is (every ready
variant loaded) and with `--unload-idle-variants-s`. Prints the RSS after start, with the lazy server also after
a request pinned every variant (all loaded) and once they were idle; and the latency of a pinned request that
loads its variant against one that finds it loaded.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from bench.common import rss_bytes, wait_quiet
from slimserve.client.client import SlimServeClient
from tests.helpers import ServerProcess


def mlp(path: Path, hidden: int) -> Path:
    rng = np.random.default_rng(0)
    sizes = [256, hidden, hidden, hidden, 10]
    nodes, weights, x = [], [], "x"
    layers = list(itertools.pairwise(sizes))
    for i, (n_in, n_out) in enumerate(layers):
        weights += [
            helper.make_tensor(f"w{i}", TensorProto.FLOAT, [n_in, n_out], rng.normal(0, 0.05, n_in * n_out).astype(np.float32)),
            helper.make_tensor(f"b{i}", TensorProto.FLOAT, [n_out], np.zeros(n_out, np.float32)),
        ]
        last = i == len(layers) - 1
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], ["y" if last else f"g{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [f"h{i}"]))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def build(root: Path, variants: int, hidden: int) -> Path:
    """A repository with the MLP and `variants` unrouted copies of it, as finished optimizer jobs would leave them."""
    from slimserve.server.store.manifest import VariantInfo
    from slimserve.server.store.repository import Repository

    model = mlp(root / "mlp.onnx", hidden)
    server = ServerProcess(root / "repo", root / "build.log")
    try:
        with SlimServeClient(server.address) as client:
            client.register("mlp", model)
    finally:
        server.proc.terminate()
        server.proc.wait(30)
    repository = Repository(root / "repo")
    try:
        for i in range(variants):
            name = f"copy{i}"
            with repository.staging() as staged:
                (staged / name).mkdir()
                (staged / name / "model.onnx").write_bytes(model.read_bytes())
                info = VariantInfo(name, recipe="copy", parent="baseline", runtime="onnxruntime", format="onnx", file="model.onnx")
                repository.add_variant("mlp", staged / name, info)
    finally:
        repository.close()
    return root / "repo"


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--idle-s", type=float, default=5.0)
    args = parser.parse_args()
    x = np.random.default_rng(1).normal(size=(1, 256)).astype(np.float32)
    names = [f"copy{i}" for i in range(args.variants)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = build(root, args.variants, args.hidden)
        size = (root / "mlp.onnx").stat().st_size
        print(f"model: {mib(size)} on disk; {args.variants} unrouted variants besides the baseline")
        for label, flags in (
            ("every variant loaded", ()),
            (f"--unload-idle-variants-s {args.idle_s:g}", ("--unload-idle-variants-s", str(args.idle_s))),
        ):
            server = ServerProcess(repo, root / "server.log", *flags)
            try:
                wait_quiet(server.pid, 10)
                print(f"{label}: RSS after start {mib(rss_bytes(server.pid))}")
                if not flags:
                    continue
                with SlimServeClient(server.address) as client:
                    cold, warm = [], []
                    for name in names:  # the first pinned request loads its variant, the next finds it loaded
                        for times in (cold, warm):
                            start = time.perf_counter()
                            client.infer("mlp", {"x": x}, variant=name)
                            times.append(time.perf_counter() - start)
                    print(f"{label}: RSS with all {args.variants} pinned (loaded on demand) {mib(rss_bytes(server.pid))}")
                    print(
                        f"{label}: pinned request p50 {statistics.median(cold) * 1e3:.1f} ms when it loads the variant, "
                        f"{statistics.median(warm) * 1e3:.2f} ms when loaded"
                    )
                    time.sleep(args.idle_s * 2 + 1.5)  # idle: every copy goes
                    wait_quiet(server.pid, 10)
                    print(f"{label}: RSS after {args.idle_s * 2 + 1.5:g} s idle {mib(rss_bytes(server.pid))}")
            finally:
                server.proc.terminate()
                server.proc.wait(30)


if __name__ == "__main__":
    main()
