"""The job yield (server/management/throttle.py): the duty-cycle decision, and a real process on the cycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from slimserve.server.management.throttle import MIN_RUN, Duty, Throttle, is_stopped, parse_job_yield
from slimserve.server.settings import Settings
from slimserve.server.telemetry.recording import ServingLoad


def test_parse_job_yield():
    assert parse_job_yield("auto") is None
    assert parse_job_yield("off") == 1.0
    assert parse_job_yield("0.25") == 0.25
    for bad in ("0", "1.5", "-0.1", "fast"):
        with pytest.raises(ValueError, match="--job-yield must be"):
            parse_job_yield(bad)
    assert Settings(job_yield="0.3").job_yield == "0.3"
    with pytest.raises(ValueError):
        Settings(job_yield="2")


def test_duty_runs_full_speed_below_the_threshold_and_the_fraction_above():
    duty = Duty(fixed=0.2, busy_threshold=0.5)
    assert duty.run_fraction(0.1) == 1.0
    assert duty.run_fraction(3.0) == 0.2
    assert [Duty.runs(i, 0.2) for i in range(10)] == [True, True] + [False] * 8
    assert sum(Duty.runs(i, MIN_RUN) for i in range(40)) == 2  # one slice in 20
    assert all(Duty.runs(i, 1.0) for i in range(10))


def test_auto_halves_while_serving_loses_and_recovers_when_it_does_not():
    duty = Duty(busy_threshold=0.5, fraction=0.4)
    start = duty.fraction
    for _ in range(3):
        duty.observe(True, 0.015)
        duty.observe(False, 0.010)  # 50% slower while the worker runs
        duty.adapt()
    assert duty.fraction == start / 8
    for _ in range(20):
        duty.observe(True, 0.015)
        duty.adapt()
    assert duty.fraction == MIN_RUN  # the floor: a job under constant traffic still ends
    for _ in range(60):
        duty.observe(True, 0.010)
        duty.observe(False, 0.010)
        duty.adapt()
    assert duty.fraction == 1.0
    fixed = Duty(fixed=0.3)
    fixed.observe(True, 1.0)
    fixed.adapt()
    assert fixed.fraction == 0.1 and fixed.run_fraction(9) == 0.3


def test_auto_also_halves_when_fewer_requests_are_answered_though_none_is_slower():
    duty = Duty(busy_threshold=0.5, fraction=0.4)
    for _ in range(2):  # closed-loop callers: the same time inside the dataplane, 30% fewer answers while the worker runs
        duty.observe(True, 0.001, 1750.0)
        duty.observe(False, 0.001, 2500.0)
        duty.adapt()
    assert duty.fraction == 0.1
    for _ in range(30):
        duty.observe(True, 0.001, 2450.0)  # within the tolerance: it rises again
        duty.observe(False, 0.001, 2500.0)
        duty.adapt()
    assert duty.fraction == 1.0


def test_the_load_counts_the_servers_cpu_while_it_answers_requests():
    load, cpu = ServingLoad(), [0.0]
    throttle = Throttle(load, dict, fixed=0.1, cpu=lambda: cpu[0])
    assert throttle.current_load(0.0) == 0.0
    # A fast model: 250 answers in 0.1 s spend 0.0025 s inside the dataplane, while the server used 0.15 s of CPU.
    for _ in range(250):
        load.add(0.00001)
    cpu[0] = 0.15
    assert throttle.current_load(0.1) == pytest.approx(1.5)
    cpu[0] = 0.30  # CPU without a request answered (a registration, say) is not serving's load
    assert throttle.current_load(1.5) == pytest.approx(0.0)


def test_its_own_stop_still_in_flight_is_not_taken_for_someone_elses(monkeypatch):
    """A worker on busy cores (SCHED_IDLE) may take a slice or more to be scheduled and stop: its SIGSTOP is pending
    meanwhile. The throttle must still hold it (and resume it), not leave it to 'someone else' for good."""
    import slimserve.server.management.throttle as throttle_module

    state = {"stopped": False, "pending": False}
    sent: list[signal.Signals] = []

    def deliver(pid: int, sig: signal.Signals) -> None:
        sent.append(sig)
        if sig == signal.SIGSTOP:
            state["pending"] = True  # not scheduled yet: the stop waits
        else:
            state.update(stopped=False, pending=False)  # SIGCONT resumes and discards a pending stop

    monkeypatch.setattr(throttle_module, "is_stopped", lambda pid: state["stopped"])
    monkeypatch.setattr(throttle_module, "stop_pending", lambda pid: state["pending"])
    throttle = Throttle(ServingLoad(), lambda: {"job": 4242}, fixed=0.1)
    monkeypatch.setattr(throttle, "_signal", deliver)
    throttle._apply(False, 0.1)
    assert sent == [signal.SIGSTOP] and 4242 in throttle.stopped
    throttle._apply(False, 0.1)  # still pending, not yet stopped: ours in flight
    assert 4242 in throttle.stopped and 4242 not in throttle.outside
    state.update(stopped=True, pending=False)  # it got the CPU and stopped
    throttle._apply(True, 0.1)
    assert sent == [signal.SIGSTOP, signal.SIGCONT] and not throttle.stopped
    # Someone else's SIGSTOP on a worker we hold stopped stays pending on a stopped process: theirs, left alone.
    throttle._apply(False, 0.1)
    state.update(stopped=True, pending=True)
    throttle._apply(True, 0.1)
    assert 4242 in throttle.outside and sent[-1] == signal.SIGSTOP
    # They resume the worker alone; our stop was its group's, helpers included: the group is resumed as it is taken back.
    state.update(stopped=False, pending=False)
    throttle._apply(True, 0.1)
    assert 4242 not in throttle.outside and sent[-1] == signal.SIGCONT


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_real_worker_on_the_cycle_and_a_stop_it_did_not_make():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    load = ServingLoad()
    busy = threading.Event()
    busy.set()

    def traffic() -> None:  # two requests in flight on average while `busy`
        while busy.is_set() or load.answered == 0:
            if busy.is_set():
                load.add(0.02)
            time.sleep(0.01)

    feeder = threading.Thread(target=traffic, daemon=True)
    feeder.start()
    throttle = Throttle(load, lambda: {"job": spin.pid}, fixed=0.1)
    stops: list[tuple[str, float]] = []
    throttle.on_paused = lambda job_id, seconds: stops.append((job_id, seconds))
    try:
        started = time.monotonic()
        throttle.start()
        time.sleep(0.3)
        used = cpu_seconds(spin.pid)
        time.sleep(1.5)
        share = (cpu_seconds(spin.pid) - used) / 1.5
        assert share < 0.45, f"the worker ran {share:.0%} of the time at --job-yield 0.1 under load"
        assert "paused for traffic" in throttle.paused_jobs["job"]
        # What the yield cost the job is counted (slimserve_job_paused_seconds_total): most of the time so far.
        assert throttle.run_fraction == 0.1
        paused = throttle.paused_seconds("job")
        assert 0.5 * (time.monotonic() - started) < paused < time.monotonic() - started
        assert stops and {job for job, _ in stops} == {"job"} and sum(s for _, s in stops) <= paused
        # Someone else stops it (the bench's paused windows): the yield must not resume it.
        os.kill(spin.pid, signal.SIGSTOP)
        time.sleep(0.25)
        os.kill(spin.pid, signal.SIGSTOP)
        time.sleep(0.6)
        assert is_stopped(spin.pid)
        assert "job" not in throttle.paused_jobs
        os.kill(spin.pid, signal.SIGCONT)  # theirs resumed: the yield takes it over again
        busy.clear()  # traffic falls: full speed
        time.sleep(1.5)
        used = cpu_seconds(spin.pid)
        time.sleep(0.5)
        assert not is_stopped(spin.pid)
        assert (cpu_seconds(spin.pid) - used) / 0.5 > 0.3
        assert "job" not in throttle.paused_jobs
        assert throttle.run_fraction == 1.0 and not throttle.held  # no stop in progress: all counted
        assert throttle.paused_seconds("job") == pytest.approx(sum(s for _, s in stops))
    finally:
        throttle.stop()
        os.killpg(spin.pid, signal.SIGKILL)
        spin.wait()


def test_a_held_worker_is_cancelled_within_seconds_and_one_killed_while_held_fails_its_job(server_factory, digits):
    from slimserve.client.client import SlimServeClient
    from tests.helpers import wait_until

    server = server_factory(max_jobs=1, job_yield="0.1")
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx, data=digits.data, train=digits.train)
        wait_until(lambda: c.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's measure", 120, 0.2)
        load = server.server.dataplane.serving_load
        busy = threading.Event()
        busy.set()

        def traffic() -> None:  # heavy traffic as the throttle sees it: two requests in flight on average
            while busy.is_set():
                load.add(0.02)
                time.sleep(0.01)

        threading.Thread(target=traffic, daemon=True).start()
        try:
            for ending in ("cancel", "kill"):
                variant, _ = c.optimize("digits", "prune-structured", variant_name=f"held-{ending}", detach=True)
                job_id = variant["job_id"]
                pid = wait_until(lambda j=job_id: server.server.jobs.runner.pids.get(j), "the worker", 30, 0.05)
                wait_until(lambda p=pid: is_stopped(p), "the worker held stopped", 10, 0.01)
                record = next(j for j in c.jobs() if j["id"] == job_id)
                assert record["status"] == "running" and "paused for traffic" in record["message"]
                events = server.server.jobs.jobs[job_id].events  # the progress stream says so too (slimctl optimize)
                wait_until(lambda e=events: any("paused for traffic" in getattr(x, "message", "") for x in e), "the paused event", 5, 0.02)
                if ending == "cancel":
                    metrics = server.metrics.registry
                    assert metrics.get_sample_value("slimserve_job_yield_run_ratio", {"node_type": "cpu"}) == 0.1
                    wait_until(lambda i=job_id: next(j for j in c.jobs() if j["id"] == i)["paused_seconds"] > 0.2, "paused time", 5, 0.05)
                    start = time.monotonic()
                    record = c.cancel_job(job_id)
                    assert record["status"] == "cancelled"
                    assert time.monotonic() - start < 5
                    assert record["paused_seconds"] > 0.2  # kept in the ended job's record
                    labels = {"model": "digits", "recipe": "prune-structured", "node_type": "cpu"}
                    assert metrics.get_sample_value("slimserve_job_paused_seconds_total", labels) >= 0.2
                else:
                    os.kill(pid, signal.SIGKILL)
                    record = wait_until(
                        lambda i=job_id: (r := next(j for j in c.jobs() if j["id"] == i))["status"] == "failed" and r,
                        "the job to fail",
                        30,
                        0.05,
                    )
                    assert "the worker was killed (SIGKILL" in record["message"]
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
        finally:
            busy.clear()
        assert [v["name"] for v in c.model("digits")["variants"]] == ["baseline"]
