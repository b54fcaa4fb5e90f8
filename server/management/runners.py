"""Where optimizer jobs run: `LocalRunner` (a worker process per job on this node, the default) or `RayRunner`
(a task per job on a Ray cluster, `--job-runner ray://HOST:PORT` or `ray+gcs://HOST:PORT`, driven from a Ray driver
process per job: `management/ray_driver.py`).

Both take a `WorkSpec` and return the `WorkResult` of a worker that succeeded, with the variant's files in the
job's staging directory on this node, or raise `WorkFailed` saying why the job failed. Cancelling the awaiting
task ends the worker (the process is killed, the Ray task cancelled) before the coroutine returns, so the caller
may remove the staging directory at once. Neither registers anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from importlib import util as importlib_util
from multiprocessing.connection import Connection

from slimserve.optimizer.base import ProgressEvent
from slimserve.server.errors import ErrorKind, FailedPrecondition, InvalidArgument, SlimServeError, Unavailable
from slimserve.server.management.ray_driver import AGAIN, RayOrder, answers, parse_ray_address
from slimserve.server.management.throttle import Throttle, stat_fields
from slimserve.server.management.worker import THREAD_ENV, WorkFailed, WorkLimits, WorkResult, WorkSpec

log = logging.getLogger(__name__)

Progress = Callable[[ProgressEvent], None]
# How often a local worker's resident memory is checked against its cap, in seconds.
WATCH_INTERVAL_S = 0.2
# A worker ready to run most of this long and given under 5% of a core is reported as waiting for a core (seconds).
STARVED_WINDOW_S = 30.0


def retrieved(future: asyncio.Future) -> None:
    """Marks a shielded future's exception as seen: once its awaiter is cancelled, asyncio would otherwise log it when
    the future is collected, formatting a traceback inside whatever the collector interrupted."""
    if not future.cancelled():
        future.exception()


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (a pass may start helper processes); those that ended are left out."""
    found, stack, seen = [], [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            children = []
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    children.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
        found.append(p)
        stack.extend(children)
    return found


def resident_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{p}/statm") as f:
            total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total / 2**20


def cpu_and_runnable(pid: int) -> tuple[float, bool]:
    """CPU seconds a process and its descendants have used, and whether any of their threads is runnable now (state R:
    on a core, or waiting in its run queue). A stopped (T) or sleeping thread is not."""
    ticks, runnable = 0, False
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat_fields(f"/proc/{p}/stat")
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: every thread's
            if not runnable:
                for task in os.listdir(f"/proc/{p}/task"):
                    with contextlib.suppress(OSError, IndexError):
                        if stat_fields(f"/proc/{p}/task/{task}/stat")[0] == "R":
                            runnable = True
                            break
    return ticks / os.sysconf("SC_CLK_TCK"), runnable


class StarvationWatch:
    """Says when a worker wants a core and does not get one: runnable in most samples of the last `window_s` yet given
    under `STARVED_CPU` of a core. At `--job-nice 19` (SCHED_IDLE) a worker runs only in time the tasks of the server's
    CPU group (the server's cgroup, or its autogroup) leave idle, so other busy processes there hold a job still for as
    long as they run (a digits graph-ort job beside two CPU burners, `python -m bench.bench_job_nice`: 2.7 s at
    --job-nice 0, 18 s at 10, not done in 120 s at 19). Stops of the job yield are not starvation: a stopped worker is not runnable.

    `check()` samples 30 times a window at most and returns a message once per window of starvation, None otherwise."""

    STARVED_CPU = 0.05  # of one core
    STARVED_RUNNABLE = 0.8  # of the window's samples

    def __init__(self, pid: int, nice: int, window_s: float | None = None, clock=time.monotonic) -> None:
        self.pid, self.nice, self.clock = pid, nice, clock
        self.window_s = STARVED_WINDOW_S if window_s is None else window_s
        self.sample_s = self.window_s / 30
        self.samples: list[tuple[float, float, bool, float]] = []  # (time, worker CPU s, runnable, server CPU s)

    def check(self) -> str | None:
        now = self.clock()
        if self.samples and now - self.samples[-1][0] < self.sample_s:
            return None
        cpu, runnable = cpu_and_runnable(self.pid)
        self.samples.append((now, cpu, runnable, time.process_time()))
        while now - self.samples[0][0] > self.window_s:
            self.samples.pop(0)
        start, first_cpu, _, first_server = self.samples[0]
        wall = now - start
        if wall < self.window_s * 0.9:
            return None
        share = (cpu - first_cpu) / wall
        wanted = sum(s[2] for s in self.samples) / len(self.samples)
        if share >= self.STARVED_CPU or wanted < self.STARVED_RUNNABLE:
            return None
        self.samples = self.samples[-1:]  # the next message at least a window later
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        served = (time.process_time() - first_server) / wall
        if served >= 0.8 * cores:  # serving has the cores, as --job-nice asks: the job goes on when traffic falls
            taken, hint = f"serving used {served:.1f} of the {cores} core(s)", "; it runs when traffic leaves a core idle"
        else:
            taken = f"this server used {served:.1f} of the {cores} core(s), other processes the rest"
            hint = (
                f"; at --job-nice {self.nice} it runs only in time the server's CPU group leaves idle: "
                "a lower --job-nice (e.g. 10) lets it share the cores with the other work, serving's included"
                if self.nice > 0
                else ""
            )
        return f"waiting for a core: the worker was ready to run {wanted:.0%} of the last {wall:.0f} s and got {share:.1%} of one ({taken}){hint}"


def death_reason(returncode: int) -> str:
    """Why a worker ended without a result, from its exit status."""
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
            return f"the worker crashed in native code ({sig.name}); the server's log has its last words"
        if sig == signal.SIGKILL:
            return "the worker was killed (SIGKILL: the kernel's out-of-memory killer, or a kill -9)"
        return f"the worker was ended by signal {sig.name}"
    return f"the worker exited with status {returncode} without a result; the server's log has its traceback"


class ProcessRunner:
    """A process per job (`python -m MODULE FD`), fed a pickled order on stdin, reporting on the pipe FD:
    ("progress", event)..., then ("done", WorkResult) or ("failed", kind, message). The base of both runners."""

    name = ""
    module = ""
    watch_memory = False  # end the process once its resident memory passes limits.memory_mb

    def __init__(self, limits: WorkLimits) -> None:
        self.limits = limits
        self.pids: dict[str, int] = {}  # job id -> pid of its running process
        self.throttle: Throttle | None = None  # the job yield (--job-yield), set by the JobManager for local workers

    def describe(self) -> str:
        raise NotImplementedError

    def _payload(self, spec: WorkSpec) -> bytes:
        return pickle.dumps(spec)

    def _death_reason(self, returncode: int) -> str:
        return death_reason(returncode)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(self, spec: WorkSpec, progress: Progress) -> WorkResult:
        spec = replace(spec, limits=self.limits)
        proc, conn = self._spawn()
        self.pids[spec.job_id] = proc.pid
        loop = asyncio.get_running_loop()
        done: asyncio.Future[WorkResult] = loop.create_future()
        done.add_done_callback(retrieved)  # after a cancel nobody awaits it: its failure must not be logged at GC

        def settle(result: WorkResult | None, error: BaseException | None) -> None:
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(result)  # type: ignore[arg-type]

        def drive() -> None:
            try:
                result = self._drive(spec, proc, conn, lambda e: loop.call_soon_threadsafe(progress, e))
                loop.call_soon_threadsafe(settle, result, None)
            except BaseException as e:
                loop.call_soon_threadsafe(settle, None, e)

        thread = threading.Thread(target=drive, name=f"job-{spec.job_id}", daemon=True)
        thread.start()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            self._end(proc)
            await loop.run_in_executor(None, thread.join, 10)
            raise
        finally:
            self.pids.pop(spec.job_id, None)
            if self.throttle is not None:
                self.throttle.release(proc.pid)

    def _spawn(self) -> tuple[subprocess.Popen, Connection]:
        """Starts the job's process (milliseconds: it imports torch later, on its own time) and the pipe it reports on."""
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, **dict.fromkeys(THREAD_ENV, str(self.limits.threads)))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module, str(write_fd)],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                env=env,
                close_fds=True,
                # Its own process group (ending it ends the helpers it started too), but the server's session: with
                # Linux's autogroup scheduling (on by default) a new session is a new CPU group with a fair share of
                # its own, where the worker's nice +19 weighs only against its own threads (bench_jobs on the digits
                # CNN, the job yield not engaged: serving kept 0.62x its throughput so, 0.73-0.77x in the server's).
                process_group=0,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return proc, Connection(read_fd, writable=False)

    def _end(self, proc: subprocess.Popen) -> None:
        """Ends a worker and its helpers now: SIGKILL to its process group (it holds nothing the server needs; its
        staging directory is the caller's to remove)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGCONT)  # SIGKILL ends a stopped worker too; a helper that ignored it must not stay stopped
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    def _drive(self, spec: WorkSpec, proc: subprocess.Popen, conn, progress: Progress) -> WorkResult:
        """On a thread of its own: feeds the spec, relays progress, watches memory, and reads the outcome."""
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(self._payload(spec))
                proc.stdin.close()
            except BrokenPipeError:
                pass  # died at once: its exit status says why
            outcome: tuple | None = None
            over: float | None = None
            starving = StarvationWatch(proc.pid, self.limits.nice) if self.watch_memory else None
            last = ProgressEvent("running")
            while outcome is None:
                try:
                    ready = conn.poll(WATCH_INTERVAL_S)
                except (OSError, EOFError):
                    break
                if starving is not None and (why := starving.check()):
                    log.warning("job %s: %s", spec.job_id, why)
                    progress(ProgressEvent(last.stage, last.fraction, why))
                if ready:
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        break
                    if message[0] == "progress":
                        last = message[1]
                        progress(last)
                    else:
                        outcome = message
                elif self.watch_memory and self.limits.memory_mb and (used := resident_mb(proc.pid)) > self.limits.memory_mb:
                    over = used
                    self._end(proc)
                    break
            returncode = proc.wait()
        finally:
            conn.close()
        if over is not None:
            raise WorkFailed(
                "RESOURCE_EXHAUSTED",
                f"the worker used {over:.0f} MiB, over the job memory cap of {self.limits.memory_mb} MiB (--job-memory-mb); "
                "raise the cap or pick a lighter recipe",
            )
        if outcome is None:  # the worker died: the job could not finish, the server is fine (never INTERNAL)
            raise WorkFailed("FAILED_PRECONDITION", self._death_reason(returncode))
        if outcome[0] == "done":
            return outcome[1]
        raise WorkFailed(outcome[1], outcome[2])


class LocalRunner(ProcessRunner):
    """One worker process per job (`python -m slimserve.server.management.worker`), below the server's priority,
    its memory watched, on the job yield's duty cycle while serving is busy."""

    name = "local"
    module = "slimserve.server.management.worker"
    watch_memory = True

    def describe(self) -> str:
        cap = f", memory cap {self.limits.memory_mb} MiB" if self.limits.memory_mb else ""
        return f"local worker processes (nice +{self.limits.nice}, {self.limits.threads} thread(s){cap})"


# ---------------------------------------------------------------------------------------------- Ray


class RayRunner(ProcessRunner):
    """Each job as a Ray task on an existing cluster, with its resources declared; the variant comes back here.

    The Ray driver is a process of its own per job (`management/ray_driver.py`): Ray never runs in the server, a
    cluster that dies or a Ray Client connection that fails ends only that process, and ending it (cancel) ends the
    job's task on the cluster (the driver cancels it; Ray ends a dead driver's tasks anyway)."""

    name = "ray"
    module = "slimserve.server.management.ray_driver"
    # A driver that was asked to cancel (SIGTERM) and has not ended by then is killed.
    CANCEL_GRACE_S = 3.0
    # The longest the start waits for the probe driver to join the cluster (Ray Client's own retries included).
    PROBE_TIMEOUT_S = 120.0

    def __init__(self, address: str, limits: WorkLimits, cpus: float = 1.0, gpus: float = 0.0, memory_mb: int = 0) -> None:
        super().__init__(limits)
        try:
            self.target = parse_ray_address(address)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        self.address = str(self.target)
        self.cpus, self.gpus, self.memory_mb = cpus, gpus, memory_mb
        self.cluster = ""  # what the probe at the start saw

    def describe(self) -> str:
        return f"Ray cluster at {self.address} (each job: {self.cpus:g} CPU, {self.gpus:g} GPU, {self.memory_mb or 'any'} MiB)"

    def _order(self, spec: WorkSpec | None) -> RayOrder:
        return RayOrder(self.address, spec, cpus=self.cpus, gpus=self.gpus, memory_mb=self.memory_mb)

    def _payload(self, spec: WorkSpec) -> bytes:
        return pickle.dumps(self._order(spec))

    async def start(self) -> None:
        """Joins the cluster once from a probe driver, or refuses the start saying why."""
        error = answers(self.target.host, self.target.port)
        if error is not None:
            port = "--ray-client-server-port" if self.target.mode == "client" else "--port"
            raise Unavailable(
                f"cannot reach the Ray cluster at {self.address} ({error.strerror or error}): start its head with `ray start --head "
                f"{port} {self.target.port}`, fix --job-runner, or leave it at 'local'"
            )
        if importlib_util.find_spec("ray") is None:
            raise FailedPrecondition(f"--job-runner {self.address} needs Ray: pip install 'slimserve[ray]'")
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(None, self._probe)
        if outcome[0] != "done":
            raise SlimServeError(f"the Ray cluster at {self.address} could not be joined: {outcome[2]}", ErrorKind[outcome[1]])
        self.cluster = outcome[1]
        log.info("Ray cluster at %s: %s", self.address, self.cluster)

    def _probe(self) -> tuple:
        """A driver that joins the cluster, says what it offers, and leaves: ("done", description) or ("failed", kind, message)."""
        proc, conn = self._spawn()
        try:
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps(self._order(None)))
            proc.stdin.close()
            deadline = time.monotonic() + self.PROBE_TIMEOUT_S
            while (left := deadline - time.monotonic()) > 0 and conn.poll(left):
                message = conn.recv()
                if message[0] != "progress":
                    return message
                log.warning("Ray cluster at %s: %s", self.address, message[1].message)  # e.g. the GCS fallback
            return ("failed", "UNAVAILABLE", f"the driver had not joined it within {self.PROBE_TIMEOUT_S:.0f} s")
        except (EOFError, OSError):
            return ("failed", "UNAVAILABLE", self._death_reason(proc.wait()))
        finally:
            conn.close()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _end(self, proc: subprocess.Popen) -> None:
        """Asks the driver to cancel its task (SIGTERM), and kills it if it has not ended within CANCEL_GRACE_S."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)

        def kill_late() -> None:
            try:
                proc.wait(self.CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                super(RayRunner, self)._end(proc)

        threading.Thread(target=kill_late, name="ray-driver-end", daemon=True).start()

    def _death_reason(self, returncode: int) -> str:
        return f"the Ray driver of this job (a process of this server, joined to the Ray cluster at {self.address}) died: {death_reason(returncode)}; {AGAIN}"


def make_runner(job_runner: str, limits: WorkLimits, cpus: float = 1.0, gpus: float = 0.0, memory_mb: int = 0) -> LocalRunner | RayRunner:
    if job_runner in ("", "local"):
        return LocalRunner(limits)
    return RayRunner(job_runner, limits, cpus=cpus, gpus=gpus, memory_mb=memory_mb)
