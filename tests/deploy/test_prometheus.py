"""Prometheus config, recording rules and alerts, checked by promtool and by a real Prometheus scraping slimserve."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import BAD_REQUESTS, DEPLOY, GOOD_REQUESTS, MODEL
from tests.deploy.dashboards import RULE_FILES, dashboard_queries, recording_rules
from tests.deploy.promql import substitute, usage
from tests.helpers import free_port, wait_until

PROMETHEUS_DIR = DEPLOY / "prometheus"


def promtool(tools, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tools.promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_accepts_the_compose_config_and_its_rule_files(prometheus_tools):
    out = promtool(prometheus_tools, "check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out.stdout + out.stderr


def test_promtool_accepts_the_rules(prometheus_tools):
    out = promtool(prometheus_tools, "check", "rules", *map(str, RULE_FILES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_unit_tests_pass(prometheus_tools):
    """deploy/prometheus/tests: each alert fires on the series it is for, and not on its look-alikes."""
    out = promtool(prometheus_tools, "test", "rules", "tests/slimserve-alerts-test.yml", cwd=PROMETHEUS_DIR)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load((PROMETHEUS_DIR / "tests/slimserve-alerts-test.yml").read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    alerts = {r["alert"] for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert alerts <= tested, f"alerts without a unit test: {sorted(alerts - tested)}"


def test_every_dashboard_query_is_valid_promql(prometheus_tools, tmp_path):
    """promtool parses each dashboard query, with Grafana's variables filled in, as a recording rule."""
    queries = list(dashboard_queries())
    group = {
        "name": "dashboards",
        "rules": [{"record": f"dashboard:query_{i}", "expr": substitute(q, MODEL)} for i, (_, _, q) in enumerate(queries)],
    }
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    out = promtool(prometheus_tools, "check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------- a live Prometheus


def api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def poll(condition, what: str, timeout: float):
    """wait_until at Prometheus' pace (it scrapes and evaluates every second); "not listening yet" means not yet."""
    return wait_until(condition, what, timeout, interval=0.25, ignore=(OSError,))


@contextmanager
def running_prometheus(binary: str, config: dict, root: Path, port: int) -> Iterator[None]:
    """A real Prometheus on 127.0.0.1:`port` with `config` (written under `root`), ready when this enters."""
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "prometheus.log", "w"),  # noqa: SIM115  Prometheus writes it until it stops
    )
    try:
        poll(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200, "Prometheus to be ready", 30)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="module")
def prometheus(prometheus_tools, served, tmp_path_factory):
    """Prometheus on a free loopback port, scraping the served slimserve every second with our rules.

    The config is deploy/prometheus/prometheus.yml with the target, the intervals and the rule
    paths changed for a test; the rules are ours with their group intervals dropped (1 s here).
    """
    root = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    rule_paths = []
    for path in RULE_FILES:
        groups = yaml.safe_load(path.read_text())["groups"]
        for group in groups:
            group.pop("interval", None)
        (root / path.name).write_text(yaml.safe_dump({"groups": groups}))
        rule_paths.append(str(root / path.name))
    config["rule_files"] = rule_paths
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["slimserve"]["static_configs"][0]["targets"] = [f"127.0.0.1:{served.handle.server.metrics_port}"]
    jobs["prometheus"]["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
    with running_prometheus(prometheus_tools.prometheus, config, root, port):
        yield port


def test_prometheus_scrapes_slimserve_and_answers_queries(prometheus):
    def slimserve_target_up():
        targets = api(prometheus, "/api/v1/targets")["activeTargets"]
        return [t for t in targets if t["labels"]["job"] == "slimserve" and t["health"] == "up"]

    poll(slimserve_target_up, "the slimserve target to be up", 20)
    query = f'sum by (code) (slimserve_requests_total{{job="slimserve", model="{MODEL}"}})'
    result = poll(lambda: api(prometheus, "/api/v1/query", query=query)["result"], query, 20)
    counts = {r["metric"]["code"]: float(r["value"][1]) for r in result}
    assert counts == {"OK": GOOD_REQUESTS, "INVALID_ARGUMENT": BAD_REQUESTS}


def test_rules_load_without_errors_and_record_series(prometheus):
    """Every group loads, and the recording rules over request metrics produce series for the model."""
    groups = poll(lambda: api(prometheus, "/api/v1/rules")["groups"], "rule groups", 10)
    errors = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("health") == "err"]
    assert not errors
    loaded = {r.get("name") for g in groups for r in g["rules"]}
    assert set(recording_rules()) <= loaded
    for record in (
        "model_variant:slimserve_requests:rate5m",
        "model_variant:slimserve_request_duration_seconds:p99_5m",
        "model_variant:slimserve_request_server_error_ratio:rate5m",
        "model_variant:slimserve_cost_per_1k_inferences_dollars:rate5m",
    ):
        query = f'{record}{{model="{MODEL}", variant="baseline"}}'
        # rate() needs two scrapes in its window; the rules then evaluate once a second.
        result = poll(lambda: api(prometheus, "/api/v1/query", query=query)["result"], query, 20)  # noqa: B023  called within this iteration
        assert result[0]["metric"]["node_type"] == "cpu"


def test_every_dashboard_query_runs_and_shows_data(prometheus, served):
    """Grafana's queries, variables filled in, run on the live Prometheus; those over fed metrics return series."""
    poll(
        lambda: api(prometheus, "/api/v1/query", query=f'model_variant:slimserve_requests:rate5m{{model="{MODEL}"}}')["result"],
        "the first rule evaluations",
        20,
    )
    fed = {f.name for f in served.families().values() if f.samples} | {"up", "ALERTS"}
    records = recording_rules()
    empty = []
    for board, title, expr in dashboard_queries():
        query = substitute(expr, MODEL)
        result = api(prometheus, "/api/v1/query", query=query)["result"]
        families = set().union(*(base_family(m, records) for m in usage(query).metrics))
        # an annotation marks events (a rollout's state changing): nothing in a window without one is its right answer
        if not result and families <= fed and not title.startswith("annotation "):
            empty.append(f"{board} / {title}: {query}")
    assert not empty, "queries over metrics the server exports returned nothing:\n" + "\n".join(empty)


def base_family(metric: str, records: dict[str, str]) -> set[str]:
    """The exported families a series name reads: itself less its suffix, or what a recording rule reads."""
    if metric in records:
        return set().union(*(base_family(m, records) for m in usage(records[metric]).metrics))
    for suffix in ("_bucket", "_sum", "_count", "_total", "_created"):
        if metric.endswith(suffix):
            return {metric[: -len(suffix)]}
    return {metric}
