"""Soak: minutes of closed-loop load on one slimserve process, counting errors and watching its memory.

    python -m bench.bench_soak [--duration 180] [--callers 32] [--procs 4] [--sample-every 5] [--warmup 10]
    python -m bench.bench_soak --server HOST:PORT --pid PID --model NAME   # an already running server

By default it trains the digits CNN, starts `slimserve start` on a free port with a fresh repository
and registers the model. `--callers` callers, spread over `--procs` client processes, each keep one
call in flight, sending pre-serialized ModelInferRequests (identity serializers: no protobuf work in
the clients) of 1 to 8 samples. The server's resident memory (VmRSS from /proc) is sampled every
`--sample-every` seconds; growth is measured from the first sample after the warm-up.
Targets: 0 errors, memory growth < 10%. Prints a summary and writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import RESULTS as RESULTS_DIR
from bench.common import ROOT, free_port, rss_bytes, slimserve_command, wait_until

RESULTS = RESULTS_DIR / "soak.json"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def build_requests(model: str, x: np.ndarray, kinds: int = 16) -> list[bytes]:
    from slimserve.client import codec
    from slimserve.protos import inference_pb2 as pb

    rng = np.random.default_rng(0)
    out = []
    for i in range(kinds):
        rows = int(rng.integers(1, 9))
        start = int(rng.integers(0, len(x) - rows))
        request = pb.ModelInferRequest(model_name=model, id=f"soak-{i}")
        codec.fill_input(request, "x", np.ascontiguousarray(x[start : start + rows]))
        out.append(request.SerializeToString())
    return out


def worker(address: str, requests: list[bytes], callers: int, seconds: float, warmup: float, results) -> None:
    """One client process: `callers` threads, each with one call in flight, until the time is up."""
    import grpc

    def identity(b: bytes) -> bytes:
        return b

    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    channel = grpc.insecure_channel(address, options=options)
    call = channel.unary_unary(INFER, request_serializer=identity, response_deserializer=identity)
    start = time.monotonic()
    measure_from, end = start + warmup, start + warmup + seconds
    lock = threading.Lock()
    codes: Counter[str] = Counter()
    messages: dict[str, str] = {}
    latencies: list[float] = []

    def loop(index: int) -> None:
        local_codes: Counter[str] = Counter()
        local_lat: list[float] = []
        i = index
        while True:
            now = time.monotonic()
            if now >= end:
                break
            payload = requests[i % len(requests)]
            i += 1
            try:
                call(payload, timeout=30)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name if e.code() else "UNKNOWN"
                with lock:
                    messages.setdefault(code, e.details() or "")
            done = time.monotonic()
            if now >= measure_from:
                local_codes[code] += 1
                if code == "OK":
                    local_lat.append(done - now)
        with lock:
            codes.update(local_codes)
            latencies.extend(local_lat)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    cpu = os.times()
    results.put({"codes": dict(codes), "messages": messages, "latencies": latencies, "cpu_s": cpu.user + cpu.system})


def prepare_model(workdir: Path) -> tuple[Path, np.ndarray]:
    import torch

    from slimserve.optimizer.zoo import export_onnx, load_digits_splits, train_digits_cnn

    model, _ = train_digits_cnn(epochs=2)
    _, test = load_digits_splits()
    path = export_onnx(model, workdir / "digits.onnx", torch.from_numpy(test.x[:2]))
    return path, test.x


def start_server(workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    from slimserve.client.client import SlimServeClient, SlimServeClientError

    port = free_port()
    log = open(workdir / "server.log", "ab")  # noqa: SIM115  the server process writes it until it stops
    command = slimserve_command(workdir / "repository", port, *extra)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    address = f"127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"slimserve exited {proc.returncode}; see {workdir / 'server.log'}")
        with SlimServeClient(address) as c:
            return c.server_ready()

    try:
        wait_until(ready, "slimserve to be ready", 120, interval=0.2, ignore=(SlimServeClientError,))
    except TimeoutError:
        raise SystemExit("slimserve did not become ready") from None
    return proc, address


def soak(address: str, pid: int, requests: list[bytes], args) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    per_proc = [args.callers // args.procs + (1 if i < args.callers % args.procs else 0) for i in range(args.procs)]
    procs = [ctx.Process(target=worker, args=(address, requests, n, args.duration, args.warmup, results)) for n in per_proc if n]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    samples: list[tuple[float, int]] = []
    total = args.warmup + args.duration
    while time.monotonic() - t0 < total:
        samples.append((round(time.monotonic() - t0, 1), rss_bytes(pid)))
        remaining = total - (time.monotonic() - t0)
        if remaining > 0:
            time.sleep(min(args.sample_every, remaining))
    outs = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    samples.append((round(time.monotonic() - t0, 1), rss_bytes(pid)))

    codes: Counter[str] = Counter()
    messages: dict[str, str] = {}
    latencies: list[float] = []
    for out in outs:
        codes.update(out["codes"])
        messages.update(out["messages"])
        latencies.extend(out["latencies"])
    measured = [(t, r) for t, r in samples if t >= args.warmup]
    base = measured[0][1]
    last = measured[-1][1]
    peak = max(r for _, r in measured)
    lat = np.array(latencies) * 1000
    ok = codes.get("OK", 0)
    errors = sum(n for c, n in codes.items() if c != "OK")
    return {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "callers": args.callers,
        "client_processes": len(procs),
        "requests": ok + errors,
        "ok": ok,
        "errors": errors,
        "errors_by_code": {c: n for c, n in codes.items() if c != "OK"},
        "error_examples": messages,
        "throughput_rps": ok / args.duration,
        "latency_ms": {q: float(np.percentile(lat, int(q[1:]))) if len(lat) else None for q in ("p50", "p90", "p99")},
        "latency_max_ms": float(lat.max()) if len(lat) else None,
        "client_cpu_s": sum(o["cpu_s"] for o in outs),
        "rss_mib": {"start": base / 2**20, "end": last / 2**20, "peak": peak / 2**20},
        "rss_growth": (last - base) / base,
        "rss_peak_growth": (peak - base) / base,
        "rss_samples": [(t, round(r / 2**20, 1)) for t, r in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of measured load")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before measuring")
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--procs", type=int, default=4, help="client processes the callers are spread over")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--server", help="HOST:PORT of a running server (with --pid and --model)")
    parser.add_argument("--pid", type=int, help="process id of that server, for its memory")
    parser.add_argument("--model", default="digits", help="model to call on a running server (input 'x', [-1,1,8,8] FP32)")
    parser.add_argument("--server-flag", action="append", default=[], help="extra flag for `slimserve start` (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="slimserve-soak-") as tmp:
        workdir = Path(tmp)
        proc = None
        if args.server:
            if args.pid is None:
                parser.error("--server needs --pid (the server's process, whose memory is sampled)")
            from slimserve.optimizer.zoo import load_digits_splits

            address, pid, x = args.server, args.pid, load_digits_splits()[1].x
        else:
            from slimserve.client.client import SlimServeClient

            model_path, x = prepare_model(workdir)
            proc, address = start_server(workdir, args.server_flag)
            pid = proc.pid
            with SlimServeClient(address) as c:
                c.register(args.model, model_path)
                # The baseline's background evaluation would compete with the load: let it finish first.
                try:
                    wait_until(
                        lambda: c.model(args.model)["variants"][0]["latency_p50_ms"] is not None,
                        "the baseline's evaluation",
                        120,
                        interval=0.5,
                    )
                except TimeoutError:
                    pass  # measured anyway, as before: the evaluation only competes for the cores
        try:
            print(
                f"soak: {args.callers} callers in {args.procs} processes against {address} (pid {pid}) for "
                f"{args.warmup:.0f} s warm-up + {args.duration:.0f} s",
                flush=True,
            )
            result = soak(address, pid, build_requests(args.model, x), args)
            if proc is not None:
                from slimserve.client.client import SlimServeClient

                with SlimServeClient(address) as c:  # still correct at the end
                    _, outputs = c.infer(args.model, {"x": x[:4]})
                    result["answers_after"] = list(outputs["logits"].argmax(1).tolist())
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    result_code = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    result_code = None
        if proc is not None:
            result["server_exit_code"] = result_code
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    lat = result["latency_ms"]
    print(f"requests {result['requests']:,}  ok {result['ok']:,}  errors {result['errors']} {result['errors_by_code'] or ''}  (target 0)")
    print(
        f"throughput {result['throughput_rps']:,.0f} req/s  latency p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  "
        f"p99 {lat['p99']:.2f} ms  max {result['latency_max_ms']:.1f} ms"
    )
    rss = result["rss_mib"]
    print(
        f"server RSS {rss['start']:.1f} MiB after warm-up -> {rss['end']:.1f} MiB at the end ({result['rss_growth']:+.1%}, "
        f"target < 10%); peak {rss['peak']:.1f} MiB ({result['rss_peak_growth']:+.1%})"
    )
    print(f"wrote {args.out}")
    ok = result["errors"] == 0 and result["rss_growth"] < 0.10
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
