"""The job yield: local job workers run on a duty cycle while serving traffic is heavy (`--job-yield`).

Nice +19 / SCHED_IDLE and a thread cap give serving the cores, but not their caches, memory bandwidth or a vCPU's
sibling hardware thread (which of these, not measured here; bench_jobs on the digits CNN: a SCHED_IDLE worker beside
4 busy callers, not stopped, cost serving's p99 1.5-2x). So, while the server's recent load (requests in flight, averaged over the last second, or,
while it answers requests, the cores the server process used over that second, whichever is higher) is at or above
`--job-yield-busy`, the throttle runs each worker for a fraction of every 100 ms slice window and holds it stopped
(SIGSTOP to its process group) for the rest; when traffic falls it resumes it (SIGCONT) at full speed.

`--job-yield auto` adapts the fraction: it compares the mean latency of requests answered while the worker ran, and how
many were answered per second, with the same while it was stopped, halves the fraction when serving lost more than
`TOLERANCE` in either, and raises it again when it did not (between `MIN_RUN` and 1). A number (`0.25`) is a fixed
fraction; `off` never stops a worker.

What it costs the jobs is counted: `paused_s` (job id -> seconds the throttle held its worker stopped, a stop
counted when it ends) and `run_fraction` (the fraction a worker runs now: 1 while serving is not busy), which
`JobManager` exports as `slimserve_job_paused_seconds_total` and `slimserve_job_yield_run_ratio` and shows in
`slimctl jobs --json` (`paused_seconds`).

A worker stopped by someone else (a debugger, `kill -STOP`, the bench's paused windows) is left alone: the throttle
never resumes a stop it did not make. It sees a SIGSTOP that arrived while it held the worker stopped as pending in
/proc/PID/status (ShdPnd) on a stopped worker, and a worker found stopped while the throttle let it run as held from
outside.

Only the local runner is throttled: a Ray task runs on the cluster's nodes, not beside this server's traffic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from slimserve.server.telemetry.recording import ServingLoad

log = logging.getLogger(__name__)

SLICE_S = 0.1  # one slice of the duty cycle
WINDOW = 10  # slices per cycle: a fraction f runs round(f * WINDOW) of every WINDOW slices (at least one)
MIN_RUN = 0.05  # auto never goes below one slice in 20 (a job under constant traffic still ends, slowly)
TOLERANCE = 0.15  # auto: mean latency while the worker runs may exceed the stopped one by this much
LOAD_WINDOW_S = 1.0  # the load is averaged over this long
SIGSTOP_BIT = 1 << (signal.SIGSTOP - 1)


def parse_job_yield(text: str) -> float | None:
    """`auto` -> None (adaptive), `off` -> 1.0 (always run), a fraction in (0, 1] -> that fraction."""
    text = text.strip().lower()
    if text == "auto":
        return None
    if text == "off":
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"--job-yield must be 'auto', 'off' or the fraction of time a job's worker runs while traffic is heavy "
            f"(over 0, at most 1, e.g. 0.25), got {text!r}"
        )
    return value


@dataclass
class Duty:
    """The duty-cycle decision, free of processes and clocks (unit-tested on its own)."""

    fixed: float | None = None  # None: adaptive
    busy_threshold: float = 0.5
    fraction: float = 0.1  # auto's current run fraction while busy: it starts low and rises while serving loses nothing
    run_latency: float | None = None  # auto: smoothed mean latency of requests answered while the worker ran
    stop_latency: float | None = None  # ... and while it was stopped
    run_rate: float | None = None  # auto: smoothed requests answered per second while the worker ran
    stop_rate: float | None = None  # ... and while it was stopped

    def run_fraction(self, load: float) -> float:
        """The fraction of slices a worker runs at this load (requests in flight on average)."""
        if load < self.busy_threshold:
            return 1.0
        return self.fixed if self.fixed is not None else self.fraction

    def observe(self, ran: bool, latency: float | None, rate: float | None = None) -> None:
        """Auto: the mean latency (inside the dataplane) of requests answered in a slice in which the worker ran (or was
        stopped), and how many were answered per second. Both: callers that wait for each answer (closed loop) lose
        throughput where the dataplane sees no slower request (the time lost is in gRPC's threads and the callers'
        turns; the digits CNN under the worker: 0.7x the answers, the same time inside), and requests arriving at a
        fixed rate lose latency, not answers."""
        if self.fixed is not None or latency is None:
            return
        if ran:
            self.run_latency = smoothed(self.run_latency, latency)
            self.run_rate = smoothed(self.run_rate, rate)
        else:
            self.stop_latency = smoothed(self.stop_latency, latency)
            self.stop_rate = smoothed(self.stop_rate, rate)

    def adapt(self) -> None:
        """Auto, once a cycle: lower the fraction while running the worker costs serving more than TOLERANCE (latency up or
        answers down), else raise it."""
        if self.fixed is not None or self.run_latency is None or self.stop_latency is None:
            return
        slower = self.run_latency > self.stop_latency * (1 + TOLERANCE)
        fewer = self.run_rate is not None and self.stop_rate is not None and self.run_rate < self.stop_rate * (1 - TOLERANCE)
        if slower or fewer:
            self.fraction = max(MIN_RUN, self.fraction / 2)
        else:
            self.fraction = min(1.0, self.fraction * 1.25)

    @staticmethod
    def runs(slice_index: int, fraction: float) -> bool:
        """Whether slice `slice_index` runs at `fraction`: the first k of every cycle, k = round(fraction * cycle)."""
        if fraction >= 1.0:
            return True
        cycle = max(WINDOW, round(1 / fraction)) if fraction < 1 / WINDOW else WINDOW
        k = max(1, round(fraction * cycle))
        return slice_index % cycle < k


def smoothed(average: float | None, value: float | None) -> float | None:
    """An exponential moving average that starts at its first value (None: nothing to add)."""
    if value is None:
        return average
    return value if average is None else 0.8 * average + 0.2 * value


def stop_pending(pid: int) -> bool:
    """A SIGSTOP waits on a stopped process: someone else stopped it while we held it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & SIGSTOP_BIT:
                    return True
    except (OSError, ValueError):
        return False
    return False


def stat_fields(path: str) -> list[str]:
    """The fields of a /proc/PID[/task/TID]/stat file after the command name (which may hold spaces and parentheses):
    [0] the state, [11] and [12] utime and stime in clock ticks. OSError when the task has ended."""
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def is_stopped(pid: int) -> bool:
    try:
        return stat_fields(f"/proc/{pid}/stat")[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class Throttle:
    """Runs the duty cycle over the workers a runner reports (`pids()`: job id -> pid), on a thread of its own."""

    def __init__(
        self,
        load: ServingLoad,
        pids: Callable[[], dict[str, int]],
        fixed: float | None,
        busy_threshold: float = 0.5,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.load = load
        self.cpu = cpu  # the serving process's CPU seconds, all its threads (workers are processes of their own)
        self.pids = pids
        self.duty = Duty(fixed=fixed, busy_threshold=busy_threshold)
        self.stopped: set[int] = set()  # pids this throttle holds stopped
        self.outside: set[int] = set()  # pids someone else stopped: left alone until they run again
        self.paused_jobs: dict[str, str] = {}  # job id -> why it is slow, for `slimctl jobs`
        # Called (on the throttle's thread) when a job starts or stops being paused for traffic: (job id, message).
        self.on_change: Callable[[str, str], None] | None = None
        # Called (on the throttle's thread, or the runner's on release) when a stop it made ends: (job id, seconds held).
        self.on_paused: Callable[[str, float], None] | None = None
        self.held: dict[int, tuple[str, float]] = {}  # pid this throttle holds stopped -> (its job id, since when)
        self.paused_s: dict[str, float] = {}  # job id -> seconds its worker was held stopped, over the stops that ended
        self.run_fraction = 1.0  # the fraction of the time a worker runs now (1: serving not busy, or no yield)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._history: list[tuple[float, int, float, float]] = []  # (time, answered, seconds, cpu) samples over LOAD_WINDOW_S

    def start(self) -> None:
        if self.duty.fixed == 1.0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="job-yield", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
        self._resume_all()

    def release(self, pid: int) -> None:
        """A worker is about to be ended or has ended: resume it if we hold it (SIGKILL needs no SIGCONT, SIGTERM does)."""
        if pid in self.stopped:
            self._signal(pid, signal.SIGCONT)
            self.stopped.discard(pid)
        self._held_ended(pid)
        self.outside.discard(pid)

    def paused_seconds(self, job_id: str, now: float | None = None) -> float:
        """Seconds the job's worker has been held stopped so far, the stop in progress included."""
        now = time.monotonic() if now is None else now
        held = sum(now - since for job, since in list(self.held.values()) if job == job_id)
        return self.paused_s.get(job_id, 0.0) + held

    def _held_ended(self, pid: int) -> None:
        """A stop this throttle made has ended (resumed, handed off, or the worker is gone): count its seconds."""
        entry = self.held.pop(pid, None)
        if entry is None:
            return
        job_id, since = entry
        seconds = time.monotonic() - since
        self.paused_s[job_id] = self.paused_s.get(job_id, 0.0) + seconds
        if self.on_paused is not None:
            self.on_paused(job_id, seconds)

    def current_load(self, now: float) -> float:
        """Serving's load over the last LOAD_WINDOW_S: requests in flight on average (counted as they are answered), or,
        while requests are answered, the cores the server process used, whichever is higher. A model of a fraction of a
        millisecond is never half a request in flight inside the dataplane, even with the server's cores saturated by
        its callers (the digits CNN at 2,600 req/s: ~0.4), so the CPU the server spends answering counts too."""
        answered, seconds, cpu = self.load.answered, self.load.seconds, self.cpu()
        self._history.append((now, answered, seconds, cpu))
        while len(self._history) > 2 and now - self._history[1][0] >= LOAD_WINDOW_S:
            self._history.pop(0)
        t0, a0, s0, c0 = self._history[0]
        span = now - t0
        if span <= 0:
            return 0.0
        in_flight = (seconds - s0) / span
        return in_flight if answered == a0 else max(in_flight, (cpu - c0) / span)

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    def _resume_all(self) -> None:
        for pid in list(self.stopped):
            self.release(pid)
        self.paused_jobs.clear()
        self.run_fraction = 1.0

    def _loop(self) -> None:
        index = 0
        last = (self.load.answered, self.load.seconds, time.monotonic())
        ran_last = True
        while not self._halt.wait(SLICE_S):
            try:
                now = time.monotonic()
                answered, seconds = self.load.answered, self.load.seconds
                if answered > last[0] and self.pids() and now > last[2]:
                    self.duty.observe(ran_last, (seconds - last[1]) / (answered - last[0]), (answered - last[0]) / (now - last[2]))
                last = (answered, seconds, now)
                if index % WINDOW == 0:
                    self.duty.adapt()
                fraction = self.duty.run_fraction(self.current_load(now))
                ran_last = self._apply(Duty.runs(index, fraction), fraction)
                index += 1
            except Exception:  # the throttle must never stop serving: log, resume everything, go on
                log.exception("the job yield failed a slice; workers resumed")
                self._resume_all()

    def _apply(self, run: bool, fraction: float) -> bool:
        """Runs or stops every worker for this slice; True when at least one ran."""
        pids = self.pids()
        for gone in (self.stopped | self.outside) - set(pids.values()):
            self.stopped.discard(gone)
            self.outside.discard(gone)
            self._held_ended(gone)
        self.run_fraction = fraction if pids else 1.0
        ran = False
        for job_id, pid in pids.items():
            if pid in self.outside:
                if is_stopped(pid):
                    continue
                self.outside.discard(pid)  # resumed by whoever stopped it: ours again
                # Whoever it was may have resumed the worker alone (`kill -CONT PID`, the bench) where our last stop was
                # its whole group's: a helper it runs (ONNX Runtime's quantizer, a converter) stayed stopped, the worker
                # waited on it, and with traffic gone nothing stopped and resumed the group again: the job hung.
                self._signal(pid, signal.SIGCONT)
            if pid in self.stopped:
                # Stopped from outside while we held it: theirs now. Only a SIGSTOP pending on a worker already stopped
                # is someone else's: one pending on a worker not yet stopped is ours still in flight (a SCHED_IDLE worker
                # on busy cores may wait longer than a slice to be scheduled and take it; counted as theirs, it stopped
                # for good once it did, and nobody resumed it).
                if stop_pending(pid) and is_stopped(pid):
                    self.stopped.discard(pid)
                    self._held_ended(pid)
                    self.outside.add(pid)
                    self.paused_jobs.pop(job_id, None)
                    continue
                if run:
                    self._signal(pid, signal.SIGCONT)
                    self.stopped.discard(pid)
                    self._held_ended(pid)
            elif is_stopped(pid):  # stopped while we let it run: someone else's stop
                self.outside.add(pid)
                self.paused_jobs.pop(job_id, None)
                continue
            elif not run:
                self._signal(pid, signal.SIGSTOP)
                self.stopped.add(pid)
                self.held[pid] = (job_id, time.monotonic())
            ran = ran or run
            if fraction < 1.0:
                message = (
                    f"paused for traffic: runs {fraction:.0%} of the time while serving is busy (--job-yield), full speed once it falls"
                )
                if job_id not in self.paused_jobs:
                    log.info("job %s: worker %d paused for traffic (runs %.0f%% of the time)", job_id, pid, fraction * 100)
                    self._changed(job_id, message)
                self.paused_jobs[job_id] = message
            elif self.paused_jobs.pop(job_id, None) is not None:
                log.info("job %s: worker %d resumed at full speed (traffic fell)", job_id, pid)
                self._changed(job_id, "resumed at full speed: serving is no longer busy")
        return ran

    def _changed(self, job_id: str, message: str) -> None:
        if self.on_change is not None:
            self.on_change(job_id, message)
