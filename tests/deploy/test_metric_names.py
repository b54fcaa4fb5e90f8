"""Every series a dashboard, recording rule or alert reads is one a running slimserve exports, with those labels."""

from __future__ import annotations

import pytest

from tests.deploy.dashboards import dashboard_queries, recording_rules, rules
from tests.deploy.promql import substitute, usage

# Series that Prometheus itself makes, not slimserve.
PROMETHEUS_SERIES = {"up": {"job", "instance"}, "ALERTS": {"alertname", "alertstate"}}
# Labels Prometheus adds to every scraped series (job/instance) and our compose target's label.
TARGET_LABELS = {"job", "instance", "service", "namespace", "pod", "container", "endpoint"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def expressions() -> list[tuple[str, str]]:
    found = [(f"{board} / {title}", substitute(expr, "tiny")) for board, title, expr in dashboard_queries()]
    found += [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in rules()]
    return found


@pytest.fixture(scope="module")
def exported(served) -> dict[str, tuple[str, set[str], bool]]:
    """Exposed series name -> (family type, label names, has samples), from the server's /metrics after traffic."""
    names: dict[str, tuple[str, set[str], bool]] = {}
    declared = {m._name: m for m in vars(served.handle.metrics).values() if hasattr(m, "_labelnames")}
    for family in served.families().values():
        if family.type not in SUFFIXES or family.name.endswith("_created"):
            continue  # the _created series prometheus_client adds
        labels = set(declared[family.name]._labelnames) if family.name in declared else set()
        labels |= {k for s in family.samples for k in s.labels}
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = (family.type, labels | ({"le"} if suffix == "_bucket" else set()), bool(family.samples))
    return names


@pytest.mark.parametrize("where, expr", [pytest.param(w, e, id=w) for w, e in expressions()])
def test_reads_only_exported_series_and_labels(where, expr, exported):
    records = recording_rules()
    used = usage(expr)
    grouping_known = set(TARGET_LABELS) | {"le", "alertname", "alertstate"}
    for metric in used.metrics:
        if metric in records:
            grouping_known |= {"model", "variant", "node_type"}  # what every recording rule keeps
            continue
        if metric in PROMETHEUS_SERIES:
            known = PROMETHEUS_SERIES[metric]
        else:
            assert metric in exported, f"{where}: '{metric}' is not exported by slimserve (exported: {sorted(exported)})"
            _kind, known, has_samples = exported[metric]
            assert has_samples, f"{where}: '{metric}' is declared but got no samples from A/B traffic, shadows and feedback"
        unknown = used.labels.get(metric, set()) - known - TARGET_LABELS
        assert not unknown, f"{where}: '{metric}' has no label {sorted(unknown)} (it has {sorted(known)})"
        grouping_known |= known
    assert used.grouping <= grouping_known, f"{where}: groups by unknown labels {sorted(used.grouping - grouping_known)}"


def test_recording_rules_read_only_exported_series(exported):
    """Each recording rule bottoms out in exported series (rules may read each other, never a name nobody writes)."""
    records = recording_rules()
    for name, expr in records.items():
        for metric in usage(expr).metrics:
            assert metric in records or metric in exported or metric in PROMETHEUS_SERIES, f"{name} reads '{metric}', which nobody exports"


def test_every_declared_metric_is_on_a_dashboard(served):
    """Nothing the server measures is left off the dashboards."""
    shown = set()
    for _, _, expr in dashboard_queries():
        shown |= usage(substitute(expr, "tiny")).metrics
    shown_families = {m.removesuffix(s) for m in shown for s in ("_bucket", "_sum", "_count", "") if m.endswith(s)}
    declared = {m._name for m in vars(served.handle.metrics).values() if hasattr(m, "_labelnames")}  # counters without _total
    shown_bases = {m.removesuffix("_total") for m in shown_families}
    assert declared <= shown_bases, f"declared but on no dashboard: {sorted(declared - shown_bases)}"
