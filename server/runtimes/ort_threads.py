"""The intra-op thread count of an ONNX Runtime CPU session, measured at load: all cores where one call is long enough
and parallel enough to gain from them, else one thread (a tiny model's call costs more to fan out than to run).

Where all cores pay, the runtime keeps a one-thread session beside the wide one and each call follows the load
(`CallLoad`): a call alone, under a light measured load, runs on all cores; a call that overlaps others, or starts
while the load has been high, runs on one core, so that concurrent calls do not oversubscribe the cores."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from slimserve.client.datatypes import DATATYPE_TO_NUMPY
from slimserve.optimizer.formats.onnx_files import KEPT_THREADS_SUFFIX

log = logging.getLogger(__name__)

# A call shorter than this gains nothing from more threads: waking and joining workers costs tens of µs a call.
MIN_PARALLEL_MS = 1.0
# All cores must make a batch-1 call at least this much faster, else one thread each (two calls in flight use the
# cores as well, without the pool's fan-out and join, and leave the other core to the event loop at low load).
MIN_SPEEDUP = 1.3
# Timing stops after this long per session, at 9 calls, or after one call of a model slower than that (a model whose
# call takes seconds adds its warm-up and one timed call per session to its load, no more).
PROBE_BUDGET_S = 0.6
# The length a free sequence axis is timed at: a sentence (the MiniLM workload averages 23 tokens), since padding-free
# serving runs each request at its real length (server/batching/sequence.py).
PROBE_TOKENS = 32


def node_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op threads a session got, and why: the timings behind a measured choice, for the log and the tests.

    `one_thread_ms`: CPU ms of a batch-1 call on one thread; `all_cores_ms`: the calling thread's CPU ms of the same call
    with all cores (the rest ran on the pool's workers)."""

    threads: int
    reason: str
    one_thread_ms: float | None = None
    all_cores_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        if self.one_thread_ms is None or not self.all_cores_ms:
            return None
        return self.one_thread_ms / self.all_cores_ms


def decide(one_thread_ms: float, all_cores_ms: float | None, cores: int) -> ThreadChoice:
    """The rule, apart from the timing: all cores when a batch-1 call is long and all cores speed it up enough."""
    if cores <= 1:
        return ThreadChoice(1, "one core", one_thread_ms, all_cores_ms)
    if one_thread_ms < MIN_PARALLEL_MS or all_cores_ms is None:
        return ThreadChoice(1, f"a batch-1 call is {one_thread_ms:.3f} ms of CPU (< {MIN_PARALLEL_MS:g} ms)", one_thread_ms)
    speedup = one_thread_ms / all_cores_ms
    said = f"{cores} threads take a batch-1 call's critical path from {one_thread_ms:.2f} to {all_cores_ms:.2f} ms of CPU ({speedup:.2f}x"
    if speedup < MIN_SPEEDUP:
        return ThreadChoice(1, f"{said} < {MIN_SPEEDUP:g}x)", one_thread_ms, all_cores_ms)
    return ThreadChoice(cores, f"{said})", one_thread_ms, all_cores_ms)


def kept_path(model: Path) -> Path:
    """Where the thread count measured for `model` is kept: `<file>.threads.json` beside it."""
    return model.with_name(model.name + KEPT_THREADS_SUFFIX)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_kept(model: Path, cores: int) -> ThreadChoice | None:
    """The choice kept beside `model` for `cores` cores, or None: none kept, or kept for another file.

    It holds while the file has the size it was timed at and either the same modification time or (a copy: another
    replica, a job's variant moved into the repository) the same SHA-256; a changed file is timed again."""
    path = kept_path(model)
    try:
        kept = json.loads(path.read_text())
        entry = kept["choices"].get(str(cores))
        about = kept["file"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: ignored (%s: %s); the thread count is timed again", path, type(e).__name__, e)
        return None
    stat = model.stat()
    if not isinstance(entry, dict) or about.get("size") != stat.st_size:
        return None
    threads = entry.get("threads")
    if not isinstance(threads, int) or not 1 <= threads <= cores:
        log.warning("%s: ignored (threads %r is not 1..%d); the thread count is timed again", path, threads, cores)
        return None
    choice = ThreadChoice(threads, str(entry.get("reason", "")), entry.get("one_thread_ms"), entry.get("all_cores_ms"))
    if about.get("mtime_ns") != stat.st_mtime_ns:
        if about.get("sha256") != file_digest(model):
            return None
        about["mtime_ns"] = stat.st_mtime_ns  # a copy: kept with its own time, so the next load reads no digest
        keep(model, cores, choice, kept)
    return choice


def keep(model: Path, cores: int, choice: ThreadChoice, kept: dict | None = None) -> bool:
    """Writes `choice` beside `model` (atomically: a temporary file renamed over it) for a restart or another replica to
    reuse; choices for other core counts of the same file stay. False, logged, where the directory is not writable."""
    path = kept_path(model)
    try:
        stat = model.stat()
        if kept is None:
            try:
                kept = json.loads(path.read_text())
            except (OSError, ValueError):
                kept = None
        about = kept.get("file", {}) if isinstance(kept, dict) else {}
        same = about.get("size") == stat.st_size and about.get("mtime_ns") == stat.st_mtime_ns and about.get("sha256")
        choices = kept.get("choices", {}) if same and isinstance(kept, dict) and isinstance(kept.get("choices"), dict) else {}
        digest = about["sha256"] if same else file_digest(model)
        entry = {"threads": choice.threads, "reason": choice.reason}
        entry.update({k: v for k, v in (("one_thread_ms", choice.one_thread_ms), ("all_cores_ms", choice.all_cores_ms)) if v is not None})
        choices = {**choices, str(cores): entry}
        text = json.dumps({"file": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}, "choices": choices}, indent=2)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # replicas sharing the directory never collide
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        log.info("%s: the thread count is not kept (%s); it is timed again at the next start", path, e)
        return False
    return True


def probe_feed(session: ort.InferenceSession, type_to_datatype: dict[str, str]) -> dict[str, np.ndarray] | None:
    """Batch-1 inputs of the session's shapes (free dimensions 1; a free sequence of integer [batch, seq] tokens
    `PROBE_TOKENS` long, a sentence's length rather than one token), or None when one cannot be made up (text inputs)."""
    rng = np.random.default_rng(0)
    feed = {}
    for node in session.get_inputs():
        datatype = type_to_datatype.get(node.type)
        if datatype is None or datatype == "BYTES":
            return None
        dtype = DATATYPE_TO_NUMPY[datatype]
        tokens = len(node.shape) == 2 and np.issubdtype(dtype, np.integer)
        shape = tuple(d if isinstance(d, int) and d > 0 else (PROBE_TOKENS if tokens and i == 1 else 1) for i, d in enumerate(node.shape))
        if np.issubdtype(dtype, np.floating):
            feed[node.name] = rng.standard_normal(shape).astype(dtype)
        else:  # ids, masks, flags: zeros are valid values for all of them
            feed[node.name] = np.zeros(shape, dtype=dtype)
    return feed


@dataclass(frozen=True)
class Timing:
    """A session's batch-1 calls: median wall ms, and the calling thread's CPU ms (median and least), over `calls` calls."""

    wall_ms: float
    cpu_ms: float
    least_cpu_ms: float
    calls: int


def time_calls(runs: list[Callable[[], object]]) -> list[Timing]:
    """Each callable's batch-1 cost, the callables called in turn (so that a noisy neighbour slows all alike).

    The calling thread's CPU time is what the rule reads: unlike the wall time it does not grow when other processes
    take the cores, and in a wide session it is the share of the work the pool's workers did not take off the caller.
    """
    for run in runs:
        run()  # the first call allocates and prepacks: not part of the cost
    wall: list[list[float]] = [[] for _ in runs]
    cpu: list[list[float]] = [[] for _ in runs]
    deadline = time.perf_counter() + PROBE_BUDGET_S * len(runs)
    while not wall[0] or (len(wall[0]) < 9 and time.perf_counter() < deadline):
        for i, run in enumerate(runs):
            w0, c0 = time.perf_counter(), time.thread_time()
            run()
            cpu[i].append((time.thread_time() - c0) * 1000.0)
            wall[i].append((time.perf_counter() - w0) * 1000.0)
    return [Timing(statistics.median(w), statistics.median(c), min(c), len(c)) for w, c in zip(wall, cpu)]


def choose(
    make_session: Callable[[int], ort.InferenceSession],
    feed_of: Callable[[ort.InferenceSession], dict[str, np.ndarray] | None],
    cores: int,
    keep_narrow: list[ort.InferenceSession] | None = None,
) -> tuple[ort.InferenceSession, ThreadChoice]:
    """A session and its thread choice: one thread unless timing batch-1 calls shows that all cores pay.

    The second session (all cores) is built only for a model whose one-thread call is long enough to gain from it.
    With `keep_narrow`, a wide choice keeps the one-thread session there too (calls then follow the load, `CallLoad`).
    """
    single = make_session(1)
    if cores <= 1:
        return single, ThreadChoice(1, "one core")
    feed = feed_of(single)
    if feed is None:
        return single, ThreadChoice(1, "no batch-1 input to time (text inputs): one thread")
    try:
        (one,) = time_calls([partial(single.run, None, feed)])
    except Exception as e:  # a model that needs real values (dims that must agree) is served, untimed
        return single, ThreadChoice(1, f"made-up batch-1 inputs failed ({type(e).__name__}): one thread")
    if one.cpu_ms < MIN_PARALLEL_MS:
        return single, decide(one.cpu_ms, None, cores)
    wide = make_session(cores)
    one, spread = time_calls([partial(single.run, None, feed), partial(wide.run, None, feed)])
    # The least caller CPU of the wide calls: the call where the workers were free to take their share (on a busy
    # node they often are not, and the caller runs their blocks itself: that says nothing about the model).
    choice = decide(one.cpu_ms, spread.least_cpu_ms, cores)
    log.debug("thread probe: 1 thread %.2f ms wall, %d threads %.2f ms wall", one.wall_ms, cores, spread.wall_ms)
    kept = wide if choice.threads > 1 else single
    if keep_narrow is not None and choice.threads > 1:
        keep_narrow.append(single)
    del single, wide  # the dropped session is freed here: nothing else holds it
    release_freed_memory()
    return kept, choice


# A call runs wide only while the load measured at call starts (a moving average of the other calls in flight) is below
# this: one caller's calls each get all cores, 16 callers' calls one core each, even in the instant one runs alone.
WIDE_BELOW = 0.5
LOAD_WEIGHT = 0.1  # the moving average's weight of the newest call: about the last 10 calls


class CallLoad:
    """The ORT CPU calls in flight in this process, shared by every session that follows the load (the cores are
    shared by every variant): `enter` says whether a starting call may take all cores, `leave` ends it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.load = 0.0  # moving average of the other calls in flight when a call starts

    def enter(self) -> bool:
        with self._lock:
            others = self.in_flight
            self.in_flight += 1
            self.load += LOAD_WEIGHT * (others - self.load)
            return others == 0 and self.load < WIDE_BELOW

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


CALL_LOAD = CallLoad()


def release_freed_memory() -> None:
    """Hands the dropped session's memory back to the OS: glibc keeps freed blocks in the process otherwise (measured on
    MiniLM: 227 MB resident after the probe against 169 MB for one session; with this, as one session)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim, the memory is reused by the next allocations
        return
    libc.malloc_trim(0)
