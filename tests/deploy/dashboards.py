"""The dashboards and rule files under deploy/, read as the tests need them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import yaml

from tests.deploy.conftest import DEPLOY

DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel target, annotation and query variable."""
    for name, board in dashboards().items():
        for panel in panels(board):
            for target in panel.get("targets", []):
                yield name, panel["title"], target["expr"]
        for annotation in board["annotations"]["list"]:
            yield name, f"annotation {annotation['name']}", annotation["expr"]
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                # label_values(SELECTOR, label): the selector is the query Grafana runs.
                query = variable["query"]["query"]
                assert query.startswith("label_values(") and query.endswith(")"), query
                yield name, f"variable {variable['name']}", query[len("label_values(") : query.rindex(",")]


def rules() -> list[dict]:
    """Every rule of every group in deploy/prometheus/rules."""
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
