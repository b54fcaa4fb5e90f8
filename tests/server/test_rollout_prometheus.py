"""The rollout's arms from Prometheus (server/rollout/prometheus.py) on canned query answers, and what a rollout exports
(server/rollout/metrics.py) read back from a real registry."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from slimserve.server.errors import Unavailable
from slimserve.server.rollout.controller import RolloutController
from slimserve.server.rollout.metrics import RolloutMetrics
from slimserve.server.rollout.plan import GATE_PARAMETERS
from slimserve.server.rollout.prometheus import PrometheusStatistics, quote, spread
from slimserve.server.telemetry.metrics import ROLLOUT_GATES, Metrics
from tests.server.test_rollout_controller import FAST, Clock, FakeRepository, FakeStatistics, FakeTraffic, drive

BOUNDS = ("0.001", "0.01", "+Inf")


class CannedPrometheus:
    """Answers each query with the series of two replicas ('a', 'b'); `counts` is what each replica exported."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.down = False
        # per replica: variant -> counters; buckets are cumulative per BOUNDS
        self.replicas = {
            "a": {
                "base": {"ok": 90, "bad": 10, "mirrored": 0, "agreed": 0, "right": 8, "wrong": 2, "device": 0.5, "buckets": (50, 100, 100)}
            },
            "b": {
                "base": {
                    "ok": 100,
                    "bad": 0,
                    "mirrored": 0,
                    "agreed": 0,
                    "right": 0,
                    "wrong": 0,
                    "device": 0.25,
                    "buckets": (100, 100, 100),
                }
            },
        }

    def series(self, replica: str, variant: str, value: float, **labels: str) -> dict:
        return {"metric": {"instance": replica, "model": "m", "variant": variant, **labels}, "value": [0, str(value)]}

    def __call__(self, url: str, query: str, timeout_s: float) -> list[dict]:
        self.queries.append(query)
        if self.down:
            raise Unavailable(f"Prometheus at {url} cannot be read: connection refused")
        assert 'model="m"' in query and url == "http://prom:9090"
        out = []
        for replica, variants in self.replicas.items():
            for v, c in variants.items():
                if "slimserve_requests_total" in query:
                    out += [self.series(replica, v, c["ok"], code="OK"), self.series(replica, v, c["bad"], code="INTERNAL")]
                elif "shadow_requests" in query:
                    out.append(self.series(replica, v, c["mirrored"]))
                elif "shadow_agreements" in query:
                    out.append(self.series(replica, v, c["agreed"]))
                elif "feedback" in query:
                    out += [self.series(replica, v, c["right"], correct="true"), self.series(replica, v, c["wrong"], correct="false")]
                elif "compute_duration" in query:
                    out.append(self.series(replica, v, c["device"]))
                elif "bucket" in query:
                    out += [self.series(replica, v, n, le=le) for le, n in zip(BOUNDS, c["buckets"])]
        # Prometheus sums by the query's labels; the statistics must sum whatever rows remain (here: per instance)
        return out


def test_the_arms_are_the_sums_over_every_replica_and_latency_comes_from_the_bucket_deltas():
    prom = CannedPrometheus()
    stats = PrometheusStatistics("http://prom:9090/", query=prom)
    asyncio.run(stats.refresh("m", ["base"]))
    arm = stats.arm("m", "base")
    assert (arm.requests, arm.errors, arm.correct, arm.labelled) == (200, 10, 8, 10)
    assert arm.device_seconds == pytest.approx(0.75) and arm.latency_mark == 200
    assert "prometheus http://prom:9090" in stats.source
    start = arm.latency_mark
    assert len(stats.latencies_since("m", "base", start)) == 0  # nothing since the mark
    prom.replicas["b"]["base"].update(ok=130, buckets=(100, 120, 130))  # 30 more on replica b: 20 in (0.001, 0.01], 10 over
    asyncio.run(stats.refresh("m", ["base"]))
    assert stats.arm("m", "base").requests == 230
    since = stats.latencies_since("m", "base", start)
    assert len(since) == 30 and (since[:20] > 0.001).all() and (since[:20] <= 0.01).all() and (since[20:] == 0.01).all()
    assert sorted({q.split("(")[1].split(")")[0] for q in prom.queries}) == [
        "variant",
        "variant, code",
        "variant, correct",
        "variant, le",
        "variant, reason",
    ]


def test_spread_places_each_bucket_inside_its_bounds_and_quote_escapes():
    samples = spread(np.array([0.001, 0.01, np.inf]), np.array([2, 0, 1]))
    assert samples.tolist() == pytest.approx([0.00025, 0.00075, 0.01])
    assert quote('a"b\\c') == '"a\\"b\\\\c"'


def test_an_unreachable_prometheus_leaves_the_stage_open_says_so_and_times_out(monkeypatch):
    repository, clock = FakeRepository(), Clock()
    prom = CannedPrometheus()
    prom.replicas = {"a": {v: dict(CannedPrometheus().replicas["a"]["base"]) for v in ("baseline", "int8")}}
    controller = RolloutController(repository, FakeTraffic(repository), PrometheusStatistics("http://prom:9090", query=prom), clock)
    r = asyncio.run(controller.start("m", "int8", replace(FAST, shadow=False, max_stage_s=60)))
    assert r.source.startswith("prometheus http://prom:9090")
    asyncio.run(controller.tick())
    assert r.requests == {"int8": 0, "baseline": 0}  # the stage's first look: its snapshot
    prom.down = True
    asyncio.run(controller.tick())
    r = controller.status("m")
    assert r.state == "canary" and "unavailable at the last look" in r.source and "connection refused" in r.source
    assert r.record()["source"] == r.source
    clock.now += 61
    asyncio.run(controller.tick())
    r = controller.status("m")
    assert r.state == "rolled_back" and "could not be read" in r.reason


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "m", "variant": "int8", "node_type": "cpu", **labels})


def test_a_rollout_exports_its_state_weight_and_decisions():
    repository, clock = FakeRepository(), Clock()
    metrics = Metrics(CollectorRegistry())
    stats = FakeStatistics()
    controller = RolloutController(repository, FakeTraffic(repository), stats, clock, metrics=RolloutMetrics(metrics))
    asyncio.run(controller.start("m", "int8", FAST))
    assert sample(metrics, "slimserve_rollout_state", state="shadow") == 1.0
    assert sample(metrics, "slimserve_rollout_state", state="canary") == 0.0
    assert sample(metrics, "slimserve_rollout_canary_weight_ratio") == 0.0
    assert sample(metrics, "slimserve_rollout_decisions_total", gate="error", decision="fail") == 0.0  # born at 0
    assert sample(metrics, "slimserve_rollout_decisions_total", gate="time_limit", decision="fail") == 0.0
    for _ in range(50):
        drive(controller, stats, ticks=1)
        if controller.status("m").state != "shadow":
            break
    assert sample(metrics, "slimserve_rollout_state", state="canary") == 1.0
    assert sample(metrics, "slimserve_rollout_canary_weight_ratio") == pytest.approx(0.1)
    assert sample(metrics, "slimserve_rollout_decisions_total", gate="agreement", decision="pass") == 1.0
    drive(controller, stats, canary={"errors": 0.3})
    assert controller.status("m").state == "rolled_back"
    assert sample(metrics, "slimserve_rollout_decisions_total", gate="error", decision="fail") == 1.0
    assert sample(metrics, "slimserve_rollout_state", state="rolled_back") == 1.0
    assert sample(metrics, "slimserve_rollout_canary_weight_ratio") == 0.0
    assert set(ROLLOUT_GATES) == {*GATE_PARAMETERS, "time_limit"}  # the label's values are the plan's gates


def test_the_prometheus_url_setting_takes_an_http_address_only():
    from pydantic import ValidationError

    from slimserve.server.settings import Settings

    assert Settings(prometheus_url="http://prometheus:9090").prometheus_url == "http://prometheus:9090"
    assert Settings().prometheus_url is None  # default: this process's own statistics
    for bad in ("prometheus:9090", "ftp://p:9090", "http://"):
        with pytest.raises(ValidationError, match="prometheus_url"):
            Settings(prometheus_url=bad)
