"""Past one machine: with --prometheus-url the writer's rollout controller counts a read-only replica's traffic too, read
from a real Prometheus scraping both servers on loopback (the writer in this process, the replica a `slimserve` process)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import yaml

from slimserve.client.client import SlimServeClient
from tests.deploy.conftest import make_classifier
from tests.deploy.test_prometheus import api, poll, running_prometheus
from tests.helpers import ServerProcess, free_port

pytestmark = pytest.mark.slow  # a server process, Prometheus, and waits for its scrapes: ~15 s

WRITER_REQUESTS = 30
REPLICA_REQUESTS = 50


@contextmanager
def prometheus_on(tools, port: int, targets: list[int], root):
    """Prometheus on 127.0.0.1:`port` scraping the given metrics ports every second."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "slimserve", "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}]}],
    }
    with running_prometheus(tools.prometheus, config, root, port):
        yield


def test_the_writers_controller_counts_the_replicas_requests_through_prometheus(prometheus_tools, server_factory, tmp_path):
    repository = tmp_path / "repository"
    model = make_classifier(tmp_path / "tiny.onnx")
    prometheus_port = free_port()
    writer = server_factory(repository, prometheus_url=f"http://127.0.0.1:{prometheus_port}", rollout_interval_s=3600.0)
    x = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
    with SlimServeClient(writer.address) as w:
        w.register("tiny", model)
        writer.add_variant("tiny", "copy", model)
        replica = ServerProcess(repository, tmp_path / "replica.log", "--read-only", "--poll-repository-s", "0.2", metrics_port=free_port())
        try:
            with (
                prometheus_on(prometheus_tools, prometheus_port, [writer.server.metrics_port, replica.metrics_port], tmp_path),
                replica.client() as r,
            ):
                plan = {"steps": [50], "shadow": False, "min_requests": 1_000_000, "gates": {"error": 0.05, "latency_p50": 3.0}}
                (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
                started = w.rollout_start("tiny", "copy", tmp_path / "plan.yaml")
                assert started["source"].startswith(f"prometheus http://127.0.0.1:{prometheus_port}")
                # the replica follows the writer's routing through the repository
                poll(lambda: {r.infer("tiny", {"x": x})[0] for _ in range(20)} == {"baseline", "copy"}, "the replica to split 50/50", 20)

                def both_up():
                    targets = api(prometheus_port, "/api/v1/targets")["activeTargets"]
                    return len([t for t in targets if t["health"] == "up"]) == 2

                poll(both_up, "both servers to be scraped", 20)
                # the stage's snapshot, once Prometheus holds every request so far
                replica_so_far = replica.metric("slimserve_requests_total", model="tiny")
                query = 'sum(slimserve_requests_total{model="tiny"})'
                poll(
                    lambda: (
                        float((api(prometheus_port, "/api/v1/query", query=query)["result"] or [{"value": [0, -1]}])[0]["value"][1])
                        == replica_so_far
                    ),
                    "Prometheus to hold the replica's requests",
                    20,
                )
                writer.call(writer.server.rollouts.tick())
                for _ in range(WRITER_REQUESTS):
                    w.infer("tiny", {"x": x})
                for _ in range(REPLICA_REQUESTS):
                    r.infer("tiny", {"x": x})

                def counted():
                    writer.call(writer.server.rollouts.tick())
                    status = w.rollout_status("tiny")
                    return status if sum(status["requests"].values()) == WRITER_REQUESTS + REPLICA_REQUESTS else None

                status = poll(counted, "the controller to count both servers' requests", 20)
        finally:
            replica.stop()
    assert status["state"] == "canary" and status["requests"]["copy"] > 0 and status["requests"]["baseline"] > 0
    assert "unavailable" not in status["source"]
    latency = next(g for g in status["gates"] if g["name"] == "latency_p50")
    counts = [int(part.split(")")[0]) for part in latency["evidence"].split("(n=")[1:]]
    assert sum(counts) == WRITER_REQUESTS + REPLICA_REQUESTS  # the histograms of both servers, since the stage's snapshot
    # this process alone saw only its own share
    own = writer.server.dataplane.loaded_model("tiny").variants
    assert sum(v.stats.requests for v in own.values()) == WRITER_REQUESTS
