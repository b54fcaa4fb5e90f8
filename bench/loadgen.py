"""A lean closed-loop load generator for Open Inference Protocol servers over gRPC.

Each worker process opens its own channel and keeps `callers` calls in flight; every caller sends
pre-serialized ModelInferRequest bytes (identity serializers: no protobuf work on the client), the same
request or, given several (a workload of real sentences), the next one in turn, and sends the next as soon
as the answer arrives. Workers import only grpc and numpy, so
they start fast and spend little CPU; the client's CPU seconds per request are reported with each
point so a reader can see how much of the machine's cores the client took.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass
class PointResult:
    """One load point: completions inside the measured window, their latencies, errors by status code."""

    target: str
    concurrency: int
    seconds: float
    completed: int
    latencies_ms: np.ndarray
    errors: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None  # the server's process tree, inside the measured window
    server_rss_bytes: int | None = None  # the server's process tree at the window's end
    server_own_cpu_s: float | None = None  # the server's process alone (not its children: a job's worker), inside the window

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float16): "FP16"}


def build_infer_request(
    model: str, array: np.ndarray | dict[str, np.ndarray], version: str = "", input_name: str = "x", raw: bool = True
) -> bytes:
    """A serialized ModelInferRequest: one FP32 input `input_name`, or one input per entry of a dict (FP32, INT64 ...),
    raw (as Triton's clients send) or typed (FP32 only)."""
    from slimserve.protos import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, model_version=version)
    inputs = array if isinstance(array, dict) else {input_name: np.asarray(array, np.float32)}
    for name, value in inputs.items():
        value = np.ascontiguousarray(value)
        tensor = request.inputs.add(name=name, datatype=DATATYPES[value.dtype], shape=list(value.shape))
        if raw:
            request.raw_input_contents.append(value.tobytes())
        else:
            tensor.contents.fp32_contents.extend(value.astype(np.float32).reshape(-1).tolist())
    return request.SerializeToString()


def check_response(data: bytes, expect_shape: tuple[int, ...]) -> str | None:
    """None when `data` is a ModelInferResponse whose first output has `expect_shape`; else why not."""
    from slimserve.protos import inference_pb2 as pb

    response = pb.ModelInferResponse.FromString(data)
    if not response.outputs:
        return "the response has no outputs"
    shape = tuple(response.outputs[0].shape)
    if shape != tuple(expect_shape):
        return f"output '{response.outputs[0].name}' has shape {list(shape)}, expected {list(expect_shape)}"
    return None


def run_point(
    target: str,
    address: str,
    payload: bytes | tuple[bytes, ...],
    concurrency: int,
    seconds: float,
    warmup: float,
    processes: int = 2,
    timeout: float = 30.0,
    stream: bool = False,
    server_pid: int | None = None,
) -> PointResult:
    """`concurrency` closed-loop callers spread over up to `processes` client processes.

    `payload`: one request sent by every call, or several sent in turn (each process starts at its own offset; a
    stream sends the first only).

    With `stream`, each process sends its callers' requests over one ModelStreamInfer stream
    (Triton's streaming API) instead of one unary call each. Workers spawn and connect first; the clock then starts for all of them at once, the first
    `warmup` seconds are not counted, and the calls answered inside the window count (whenever they were sent:
    with a model of hundreds of ms and 64 callers, a call can take longer than the window).
    """
    ctx = mp.get_context("spawn")  # the parent holds grpc threads: never fork it
    procs = max(1, min(processes, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start = ctx.Value("d", 0.0, lock=False)
    workers = []
    for share in shares:
        ready = ctx.Event()
        parent, child = ctx.Pipe(duplex=False)
        sent = (payload if isinstance(payload, bytes) else payload[0]) if stream else payload
        p = ctx.Process(
            target=_stream_worker if stream else _worker,
            args=(address, sent, share, start, warmup, seconds, timeout, ready, child),
            daemon=True,
        )
        p.start()
        child.close()
        workers.append((p, ready, parent))

    def kill_all() -> None:
        for p, _, _ in workers:
            if p.is_alive():
                p.kill()

    deadline = time.monotonic() + 60.0
    for p, ready, _ in workers:
        while not ready.wait(0.2):
            if not p.is_alive() or time.monotonic() > deadline:
                kill_all()
                raise RuntimeError(f"load generator for {target} did not start (exit code {p.exitcode})")
    start.value = time.monotonic() + 0.05
    server: dict[str, float] = {}
    watcher = None
    if server_pid is not None:
        watcher = threading.Thread(target=_watch_server, args=(server_pid, start.value + warmup, seconds, server), daemon=True)
        watcher.start()
    results = []
    for p, _, conn in workers:
        if not conn.poll(warmup + seconds + timeout + 30.0):
            kill_all()
            raise RuntimeError(f"load generator for {target} at concurrency {concurrency} did not report")
        results.append(conn.recv())
        p.join(5.0)
    if watcher is not None:
        watcher.join(5.0)
    latencies = np.concatenate([r[0] for r in results]) / 1e6
    errors: Counter = Counter()
    for r in results:
        errors.update(r[1])
    return PointResult(
        target,
        concurrency,
        seconds,
        len(latencies),
        latencies,
        dict(errors),
        float(sum(r[2] for r in results)),
        server.get("cpu_s"),
        int(server["rss"]) if "rss" in server else None,
        server.get("own_cpu_s"),
    )


def _watch_server(pid: int, window_start: float, seconds: float, out: dict[str, float]) -> None:
    """The server tree's CPU seconds between the window's edges (monotonic clock), the server process's alone, and the
    tree's resident memory at the end."""
    from bench.common import cpu_seconds, descendants, rss_bytes, tree_cpu_seconds

    time.sleep(max(0.0, window_start - time.monotonic()))
    before, own = tree_cpu_seconds(pid), cpu_seconds(pid)
    time.sleep(max(0.0, window_start + seconds - time.monotonic()))
    out["cpu_s"], out["own_cpu_s"] = tree_cpu_seconds(pid) - before, cpu_seconds(pid) - own
    rss = 0
    for p in descendants(pid):
        try:
            rss += rss_bytes(p)
        except (OSError, RuntimeError):
            pass
    out["rss"] = rss


def _connect(address: str, payload: bytes, timeout: float, ready, start):
    """Opens the channel and makes one call (so connecting is not measured), sets `ready`, and waits
    for the parent to publish the start time. Returns the channel, its unary ModelInfer call and the start."""
    import grpc

    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    call = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=timeout)
    except grpc.RpcError:
        pass
    ready.set()
    while start.value <= 0:
        time.sleep(0.002)
    return channel, call, start.value


def _worker(
    address: str, payload: bytes | tuple[bytes, ...], callers: int, start, warmup: float, seconds: float, timeout: float, ready, conn
) -> None:
    """One client process: connects, sets `ready`, waits for the parent to publish the start time in
    `start`, keeps `callers` calls in flight in closed loop, and sends back (latencies ns, errors, CPU seconds)."""
    import itertools
    import os

    import grpc

    payloads = (payload,) if isinstance(payload, bytes) else tuple(payload)
    turn = itertools.cycle(payloads[os.getpid() % len(payloads) :] + payloads[: os.getpid() % len(payloads)])
    channel, call, start_at = _connect(address, payloads[0], timeout, ready, start)
    measure_from, stop_at = start_at + warmup, start_at + warmup + seconds
    stop_ns, measure_ns = int(stop_at * 1e9), int(measure_from * 1e9)
    latencies: list[int] = []
    errors: Counter = Counter()
    lock = threading.Lock()
    live = [callers]
    finished = threading.Event()
    clock = time.monotonic_ns

    # Callers are futures, not threads: each answer's callback (on grpc's thread) sends the next
    # request, which costs the client less CPU than a thread per caller blocking in the call.
    def send() -> None:
        sent = clock()
        call.future(next(turn), timeout=timeout).add_done_callback(lambda f: answered(f, sent))

    def answered(future, sent: int) -> None:
        done = clock()
        code = future.code()
        if done <= stop_ns:
            if done >= measure_ns:
                if code == grpc.StatusCode.OK:
                    latencies.append(done - sent)
                else:
                    errors[code.name if code is not None else "UNKNOWN"] += 1
            if code != grpc.StatusCode.OK:
                time.sleep(0.001)  # a failing server must not turn the client into a busy loop
            send()
            return
        with lock:
            live[0] -= 1
            if live[0] == 0:
                finished.set()

    cpu_marks: list[float] = []

    def mark_cpu() -> None:  # the process's CPU time at the window's edges (grpc's own threads included)
        for edge in (measure_from, stop_at):
            delay = edge - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            cpu_marks.append(time.process_time())

    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    marker = threading.Thread(target=mark_cpu, daemon=True)
    marker.start()
    for _ in range(callers):
        send()
    finished.wait()
    marker.join()
    cpu = cpu_marks[1] - cpu_marks[0]
    conn.send((np.array(latencies, dtype=np.int64), dict(errors), cpu))
    conn.close()
    channel.close()


def _stream_worker(address: str, payload: bytes, callers: int, start, warmup: float, seconds: float, timeout: float, ready, conn) -> None:
    """As `_worker`, over one ModelStreamInfer stream: caller i's requests carry id "i", and each
    answer (matched by that id) sends caller i's next request. Answers are parsed: the client's
    CPU per request includes that."""
    import queue

    import grpc

    from slimserve.protos import inference_pb2 as pb

    template = pb.ModelInferRequest.FromString(payload)
    payloads = []
    for slot in range(callers):
        template.id = str(slot)
        payloads.append(template.SerializeToString())
    channel, _, start_at = _connect(address, payload, timeout, ready, start)
    measure_from, stop_at = start_at + warmup, start_at + warmup + seconds
    stop_ns, measure_ns = int(stop_at * 1e9), int(measure_from * 1e9)
    latencies: list[int] = []
    errors: Counter = Counter()
    clock = time.monotonic_ns
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    call = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=pb.ModelStreamInferResponse.FromString)
    responses = call(requests(), timeout=warmup + seconds + timeout)
    sent = [0] * callers
    cpu_marks: list[float] = []
    for slot in range(callers):
        sent[slot] = clock()
        outbox.put(payloads[slot])
    live = callers
    try:
        for response in responses:
            done = clock()
            if not cpu_marks and done >= measure_ns:
                cpu_marks.append(time.process_time())
            slot = int(response.infer_response.id)
            if done <= stop_ns:
                if done >= measure_ns:
                    if response.error_message:
                        errors[response.error_message.split(":", 1)[0]] += 1
                    else:
                        latencies.append(done - sent[slot])
                sent[slot] = clock()
                outbox.put(payloads[slot])
                continue
            if len(cpu_marks) == 1:
                cpu_marks.append(time.process_time())
            live -= 1
            if live == 0:
                break
    except grpc.RpcError as e:
        errors[f"stream {e.code().name}"] += 1
    if len(cpu_marks) == 1:
        cpu_marks.append(time.process_time())
    outbox.put(None)
    responses.cancel()
    cpu = cpu_marks[1] - cpu_marks[0] if len(cpu_marks) > 1 else 0.0
    conn.send((np.array(latencies, dtype=np.int64), dict(errors), cpu))
    conn.close()
    channel.close()
