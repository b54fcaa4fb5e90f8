"""Where optimizer jobs run: `LocalRunner` (a worker process per job on this node, the default) or `RayRunner`
(a task per job on a Ray cluster, `--job-runner ray://HOST:PORT`).

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
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from slimserve.optimizer.base import ProgressEvent
from slimserve.server.errors import FailedPrecondition, InvalidArgument, Unavailable
from slimserve.server.management.throttle import Throttle
from slimserve.server.management.worker import THREAD_ENV, WorkFailed, WorkLimits, WorkResult, WorkSpec, cap_threads, failure_of, run_work

log = logging.getLogger(__name__)

Progress = Callable[[ProgressEvent], None]
# How often a local worker's resident memory is checked against its cap, in seconds.
WATCH_INTERVAL_S = 0.2


def retrieved(future: asyncio.Future) -> None:
    """Marks a shielded future's exception as seen: once its awaiter is cancelled, asyncio would otherwise log it when
    the future is collected, formatting a traceback inside whatever the collector interrupted."""
    if not future.cancelled():
        future.exception()


def resident_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (a pass may start helper processes), in MiB."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total / 2**20


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


class LocalRunner:
    """One worker process per job (`python -m slimserve.server.management.worker`), below the server's priority."""

    name = "local"

    def __init__(self, limits: WorkLimits) -> None:
        self.limits = limits
        self.pids: dict[str, int] = {}  # job id -> pid of its running worker
        self.throttle: Throttle | None = None  # the job yield (--job-yield), set by the JobManager

    def describe(self) -> str:
        cap = f", memory cap {self.limits.memory_mb} MiB" if self.limits.memory_mb else ""
        return f"local worker processes (nice +{self.limits.nice}, {self.limits.threads} thread(s){cap})"

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
        """Starts a worker process (milliseconds: it imports torch later, on its own time) and the pipe it reports on."""
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, **dict.fromkeys(THREAD_ENV, str(self.limits.threads)))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "slimserve.server.management.worker", str(write_fd)],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                env=env,
                close_fds=True,
                start_new_session=True,  # its own process group: ending it ends the helpers it started too
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return proc, Connection(read_fd, writable=False)

    @staticmethod
    def _end(proc: subprocess.Popen) -> None:
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
                proc.stdin.write(pickle.dumps(spec))
                proc.stdin.close()
            except BrokenPipeError:
                pass  # died at once: its exit status says why
            outcome: tuple | None = None
            over: float | None = None
            while outcome is None:
                try:
                    ready = conn.poll(WATCH_INTERVAL_S)
                except (OSError, EOFError):
                    break
                if ready:
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        break
                    if message[0] == "progress":
                        progress(message[1])
                    else:
                        outcome = message
                elif self.limits.memory_mb and (used := resident_mb(proc.pid)) > self.limits.memory_mb:
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
            raise WorkFailed("FAILED_PRECONDITION", death_reason(returncode))
        if outcome[0] == "done":
            return outcome[1]
        raise WorkFailed(outcome[1], outcome[2])


# ---------------------------------------------------------------------------------------------- Ray


def ray_job(spec: WorkSpec, files: dict[str, bytes], events: Any = None) -> tuple[WorkResult, dict[str, bytes]]:
    """A job as a Ray task: the model and data arrive as bytes, the variant's files leave as bytes; progress goes
    into `events` (a ray.util.queue.Queue the server drains), best effort: a full or lost queue never fails the job."""

    def progress(event: ProgressEvent) -> None:
        if events is not None:
            with contextlib.suppress(Exception):
                events.put_nowait(event)

    with tempfile.TemporaryDirectory(prefix=f"slimserve-job-{spec.job_id}-") as tmp:
        root = Path(tmp)
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        staged = root / "staged"
        staged.mkdir()
        local = replace(
            spec,
            source=root / "model" / spec.source.name,
            datasets={role: root / "data" / f"{role}.npz" for role in spec.datasets},
            staged=staged,
        )
        try:
            cap_threads(spec.limits.threads)
            result = run_work(local, progress)
        except BaseException as e:
            failed = failure_of(e, spec.limits)
            raise WorkFailed(failed.kind, failed.message) from None
        out = {p.name: p.read_bytes() for p in result.variant_dir.iterdir() if p.is_file()}
        return replace(result, variant_dir=Path("variant")), out


def parse_ray_address(address: str) -> tuple[str, int]:
    parts = urlsplit(address)
    if parts.scheme != "ray" or not parts.hostname or parts.port is None:
        raise InvalidArgument(f"--job-runner must be 'local' or 'ray://HOST:PORT' (a Ray cluster's client address), got {address!r}")
    return parts.hostname, parts.port


class RayRunner:
    """Each job as a Ray task on an existing cluster, with its resources declared; the variant comes back here."""

    name = "ray"

    def __init__(self, address: str, limits: WorkLimits, cpus: float = 1.0, gpus: float = 0.0, memory_mb: int = 0) -> None:
        self.host, self.port = parse_ray_address(address)
        self.address, self.limits = address, limits
        self.cpus, self.gpus, self.memory_mb = cpus, gpus, memory_mb
        self._ray: Any = None
        self._remote: Any = None
        self.refs: dict[str, Any] = {}

    def describe(self) -> str:
        return f"Ray cluster at {self.address} (each job: {self.cpus:g} CPU, {self.gpus:g} GPU, {self.memory_mb or 'any'} MiB)"

    async def start(self) -> None:
        """Connects to the cluster, or refuses the start saying why."""
        try:
            with socket.create_connection((self.host, self.port), timeout=3):
                pass
        except OSError as e:
            raise Unavailable(
                f"cannot reach the Ray cluster at {self.address} ({e.strerror or e}): start its head with `ray start --head "
                f"--ray-client-server-port {self.port}`, fix --job-runner, or leave it at 'local'"
            ) from None
        try:
            import ray
        except ImportError:
            raise FailedPrecondition(f"--job-runner {self.address} needs Ray: pip install 'slimserve[ray]'") from None
        try:
            await asyncio.get_running_loop().run_in_executor(None, lambda: ray.init(self.address, log_to_driver=False))
        except Exception as e:
            raise Unavailable(f"the Ray cluster at {self.address} refused the connection: {type(e).__name__}: {e}") from None
        self._ray = ray
        self._remote = ray.remote(ray_job)

    async def close(self) -> None:
        if self._ray is not None:
            with contextlib.suppress(Exception):
                self._ray.shutdown()
            self._ray = None

    async def run(self, spec: WorkSpec, progress: Progress) -> WorkResult:
        ray = self._ray
        if ray is None:
            raise FailedPrecondition(f"the Ray runner ({self.address}) is not connected")
        files = {f"model/{p.name}": p.read_bytes() for p in spec.source.parent.iterdir() if p.is_file()}
        files.update({f"data/{role}.npz": path.read_bytes() for role, path in spec.datasets.items()})
        spec = replace(spec, limits=self.limits)
        options: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": 0}
        if self.memory_mb:
            options["memory"] = self.memory_mb * 2**20
        loop = asyncio.get_running_loop()
        from ray.util.queue import Queue

        try:
            events = await loop.run_in_executor(None, lambda: Queue(maxsize=1000, actor_options={"num_cpus": 0}))
            ref = await loop.run_in_executor(None, lambda: self._remote.options(**options).remote(spec, files, events))
        except Exception as e:  # the cluster went away since the server started
            raise WorkFailed(
                "UNAVAILABLE",
                f"cannot hand the job to the Ray cluster at {self.address}: {type(e).__name__}: {e}; if the cluster stopped "
                "(`ray status` on its head), start it again and rerun the job: nothing was registered",
            ) from None
        self.refs[spec.job_id] = ref
        progress(ProgressEvent("ray", 0.0, f"running on the Ray cluster at {self.address}"))
        finished = threading.Event()

        def relay() -> None:  # the task's progress, drained every half second until it ends, then once more
            while True:
                ended = finished.wait(0.5)
                with contextlib.suppress(Exception):
                    for event in events.get_nowait_batch(events.qsize()):
                        loop.call_soon_threadsafe(progress, event)
                if ended:
                    return

        relay_thread = threading.Thread(target=relay, name=f"job-{spec.job_id}-progress", daemon=True)
        relay_thread.start()
        got = loop.run_in_executor(None, ray.get, ref)
        got.add_done_callback(retrieved)
        try:
            result, out = await asyncio.shield(got)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
            raise
        except WorkFailed:
            raise
        except Exception as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, WorkFailed):
                raise WorkFailed(cause.kind, cause.message) from None
            raise WorkFailed(
                "UNAVAILABLE",
                f"the job's task on the Ray cluster at {self.address} failed: {type(e).__name__}: {e}; if the cluster stopped "
                "(`ray status` on its head), start it again and rerun the job: nothing was registered",
            ) from None
        finally:
            self.refs.pop(spec.job_id, None)
            finished.set()
            await loop.run_in_executor(None, relay_thread.join, 5)
            with contextlib.suppress(Exception):
                events.shutdown()
        variant_dir = spec.staged / "variant"
        variant_dir.mkdir()
        for name, content in out.items():
            (variant_dir / name).write_bytes(content)
        return replace(result, variant_dir=variant_dir)


def make_runner(job_runner: str, limits: WorkLimits, cpus: float = 1.0, gpus: float = 0.0, memory_mb: int = 0) -> LocalRunner | RayRunner:
    if job_runner in ("", "local"):
        return LocalRunner(limits)
    return RayRunner(job_runner, limits, cpus=cpus, gpus=gpus, memory_mb=memory_mb)
