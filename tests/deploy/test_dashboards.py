"""Grafana: generated files are fresh, dashboards are well formed, and provisioning finds them."""

from __future__ import annotations

import importlib.util
import re

import pytest
import yaml

from tests.deploy.conftest import DEPLOY
from tests.deploy.dashboards import DASHBOARD_DIR, dashboards, panels

BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__name", "__dashboard"}


def load_generator():
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_files_are_fresh():
    """Dashboards and the PrometheusRule are what deploy/generate.py writes: run it after editing rules or panels."""
    stale = [
        str(path.relative_to(DEPLOY)) for path, text in load_generator().outputs().items() if not path.is_file() or path.read_text() != text
    ]
    assert not stale, f"stale generated files (run `python deploy/generate.py`): {stale}"


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_dashboard_is_well_formed(name):
    board = dashboards()[name]
    all_panels = list(panels(board))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, f"{panel['title']} is wider than the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"'{panel['title']}' overlaps '{cells[(x, y)]}'"
                cells[(x, y)] = panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], f"{panel['title']} has no query"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel.get("description"), f"{panel['title']} says nothing of what it shows"
            assert [t["refId"] for t in panel["targets"]] == [chr(ord("A") + i) for i in range(len(panel["targets"]))]
    defined = {v["name"] for v in board["templating"]["list"]}
    text = str(board["panels"]) + str(board["templating"])
    used = set(re.findall(r"\$\{?(\w+)", text))
    assert used - BUILTIN_VARIABLES <= defined, f"undefined variables: {sorted(used - BUILTIN_VARIABLES - defined)}"


def test_model_dashboard_has_every_view_and_the_ab_row():
    board = dashboards()["slimserve-model.json"]
    titles = {p["title"] for p in panels(board)}
    for wanted in (
        "Request rate",
        "Error ratio",
        "Request latency p50 / p99",
        "Queue time p50 / p99",
        "Batch size",
        "Cost per 1000 inferences",
        "Compute cost per hour by node type",
        "Offline accuracy",
        "Online accuracy",
        "Shadow agreement",
        "Traffic weights",
        "A/B: $variant_a vs $variant_b",
        "A/B p99 latency",
    ):
        assert wanted in titles
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["variant_a"]["current"]["value"] == "baseline"
    ab_queries = [t["expr"] for p in panels(board) if p["title"].startswith("A/B ") for t in p["targets"]]
    assert all('variant="$variant_a"' in q or 'variant="$variant_b"' in q for q in ab_queries)
    assert any('variant="$variant_b"' in q for q in ab_queries)


def test_provisioning_points_at_the_dashboards_and_prometheus():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/slimserve.yml").read_text())["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert (DEPLOY / "grafana/dashboards").resolve() == DASHBOARD_DIR.resolve()
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/") and (DASHBOARD_DIR / home.rsplit("/", 1)[1]).is_file()
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
