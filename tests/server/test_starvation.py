"""A job's worker that wants a core and gets none is reported (management/runners.StarvationWatch): at --job-nice 19
(SCHED_IDLE) it runs only in time its CPU group leaves idle, so other busy processes there hold a job still for as long
as they run. Real processes, pinned to one core beside a real CPU burner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from slimserve.client.client import SlimServeClient
from slimserve.server.management import runners
from slimserve.server.management.runners import StarvationWatch
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "SCHED_IDLE") and hasattr(os, "sched_setaffinity") and os.path.exists("/proc/self/stat")),
    reason="needs Linux's /proc, CPU affinity and SCHED_IDLE",
)

CPU = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0


def spinner(idle: bool, cpus: set[int] | None = None) -> subprocess.Popen:
    """A process that spins on `cpus` (CPU alone by default), in SCHED_IDLE (a job's worker at --job-nice 19) or not."""
    code = (
        f"import os; os.sched_setaffinity(0, {cpus or {CPU}!r}); "
        + ("os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); " if idle else "")
        + "print(flush=True); \nwhile True: pass"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"\n"  # pinned (and idle) before it is watched
    return proc


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def watch_for(pid: int, seconds: float, window_s: float = 1.5) -> str | None:
    """The watch's first report within `seconds`, or None."""
    watch = StarvationWatch(pid, nice=19, window_s=window_s)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if why := watch.check():
            return why
        time.sleep(0.02)
    return None


def test_an_idle_class_worker_beside_a_busy_process_is_reported_waiting_for_a_core(procs):
    procs.append(spinner(idle=False))  # the busy neighbour first, on the same core
    worker = spinner(idle=True)
    procs.append(worker)
    why = watch_for(worker.pid, 6)
    assert why and why.startswith("waiting for a core: the worker was ready to run"), why
    assert "--job-nice 19" in why and "lower --job-nice" in why


def test_a_worker_held_by_serving_itself_is_reported_without_the_advice_to_lower_its_nice(procs, monkeypatch):
    procs.append(spinner(idle=False))
    worker = spinner(idle=True)
    procs.append(worker)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runners.time, "process_time", lambda: time.monotonic() * cores)  # the server on every core
    why = watch_for(worker.pid, 6)
    assert why and f"(serving used {cores:.1f} of the {cores} core(s)); it runs when traffic leaves a core idle" in why, why
    assert "lower --job-nice" not in why


def test_a_worker_that_gets_its_core_or_is_stopped_is_not_reported(procs):
    worker = spinner(idle=True)
    procs.append(worker)
    assert watch_for(worker.pid, 2.0) is None  # alone: it has the core
    os.kill(worker.pid, signal.SIGSTOP)  # the job yield's stop: not runnable, so not starving
    try:
        procs.append(spinner(idle=False))
        assert watch_for(worker.pid, 2.0) is None
    finally:
        os.kill(worker.pid, signal.SIGCONT)


def test_a_starved_job_says_so_in_its_progress_and_ends_once_the_cores_free_up(server_factory, digits, procs, monkeypatch):
    monkeypatch.setattr(runners, "STARVED_WINDOW_S", 1.5)
    server = server_factory(job_nice=19)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx, data=digits.data)
        c.optimize("digits", "graph-ort", variant_name="warm")  # the baseline's measure, before the cores are taken
        cores = os.sched_getaffinity(0)
        burners = [spinner(idle=False, cpus={cpu}) for cpu in cores]
        procs.extend(burners)
        messages: list[str] = []
        done = threading.Event()

        def optimize() -> None:
            try:
                c.optimize("digits", "graph-ort", variant_name="starved", on_progress=lambda p: messages.append(p.message))
            finally:
                done.set()

        threading.Thread(target=optimize, daemon=True).start()
        wait_until(lambda: any(m.startswith("waiting for a core") for m in messages), "the job to say it waits", 30, 0.05)
        for b in burners:
            b.kill()
        assert done.wait(120)
        assert "starved" in [v["name"] for v in c.model("digits")["variants"]]
