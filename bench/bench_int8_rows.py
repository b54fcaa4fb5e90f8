"""Dynamic INT8 on MiniLM, row by row: how close each sentence stays to FP32, and what keeping the most INT8-sensitive
nodes in FP32 (quantize-dynamic's keep_fp32) buys and costs.

    .venv/bin/python -m bench.bench_int8_rows [--sentences 160] [--keep 0,4,8,16] [--rounds 3]

MiniLM (bench/zoo, real weights) is made to take any length (graph-dynamic-seq), then quantized by slimserve's
quantize-dynamic pass at each keep_fp32 (nodes ranked on the model's calibration sentences). Real English sentences
(bench.bench_sequence) are run one at a time at their real length, as the server runs them, on one thread: each
variant's cosine to FP32 per sentence (mean, 1st and 5th percentile, worst) and its ms per sentence, all variants
timed in turns, round after round (the best round each), so a busy machine slows all alike. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_int8_rows", description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=160)
    parser.add_argument("--keep", default="0,4,8,16", help="keep_fp32 settings to compare")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bench.bench_sequence import sentences_npz
    from bench.servers import CACHE
    from bench.zoo.build import build
    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass
    from slimserve.optimizer.formats.sequence_axis import kept_length

    folder = build("minilm", CACHE)
    work = Path(tempfile.mkdtemp(prefix="bench-int8-rows-"))
    context = PassContext(workdir=work, datasets={"data": folder / "eval.npz", "calibration": folder / "calibration.npz"})
    fp32 = make_pass("graph-dynamic-seq").run(Artifact(folder / "model.onnx", "onnx"), context)
    variants = {"fp32": fp32.path}
    notes = {}
    for keep in (int(k) for k in args.keep.split(",") if k.strip()):
        out = make_pass("quantize-dynamic", {"keep_fp32": keep}).run(fp32, context)
        variants[f"int8 keep_fp32={keep}"] = out.path
        notes[f"int8 keep_fp32={keep}"] = out.notes.get("kept_fp32", "")

    rows = sentences_npz(args.sentences)
    lengths = rows["attention_mask"].sum(1)
    feeds = [{k: v[i : i + 1, : kept_length(lengths[i : i + 1], v.shape[1])] for k, v in rows.items()} for i in range(len(lengths))]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for name, path in variants.items()}
    outputs = {name: np.concatenate([s.run(None, f)[0] for f in feeds]) for name, s in sessions.items()}
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(args.rounds):
        for name in list(sessions) if r % 2 == 0 else reversed(list(sessions)):
            start = time.perf_counter()
            for f in feeds:
                sessions[name].run(None, f)
            seconds[name].append(time.perf_counter() - start)
    result = {}
    for name in sessions:
        cos = cosine_rows(outputs[name], outputs["fp32"])
        result[name] = {
            "cosine_mean": round(float(cos.mean()), 4),
            "cosine_p1": round(float(np.percentile(cos, 1)), 4),
            "cosine_p5": round(float(np.percentile(cos, 5)), 4),
            "cosine_min": round(float(cos.min()), 4),
            "ms_per_sentence": round(1000 * min(seconds[name]) / len(feeds), 2),
            "kept_fp32": notes.get(name, ""),
        }
    print(f"MiniLM-L6, {len(feeds)} sentences at their real length (mean {lengths.mean():.1f} tokens), 1 thread, best of {args.rounds}")
    print(f"{'variant':<22}{'mean':>8}{'p1':>8}{'p5':>8}{'worst':>8}{'ms/sent':>9}{'vs fp32':>9}")
    base = result["fp32"]["ms_per_sentence"]
    for name, r in result.items():
        print(
            f"{name:<22}{r['cosine_mean']:>8.4f}{r['cosine_p1']:>8.4f}{r['cosine_p5']:>8.4f}{r['cosine_min']:>8.4f}"
            f"{r['ms_per_sentence']:>9.2f}{base / r['ms_per_sentence']:>8.2f}x"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
