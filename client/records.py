"""The server's protobuf records (models, traffic, comparisons, rollouts, passes) as plain dicts: the contract of `slimctl ... --json` and of the SDK's return values.
Fields the server did not measure or had no data for become None."""

from __future__ import annotations

import json
from typing import Any

from slimserve.protos import slimserve_pb2 as spb


def variant_dict(v: spb.VariantRecord) -> dict[str, Any]:
    """A VariantRecord as the `variants --json` contract: unmeasured fields are null."""
    out: dict[str, Any] = {"name": v.name, "recipe": v.recipe, "parent": v.parent, "runtime": v.runtime, "status": v.status}
    for field in ("params", "nonzero_params"):
        out[field] = getattr(v, field) if v.HasField(field) else None
    out["size_bytes"] = v.size_bytes
    for field in ("flops", "latency_p50_ms", "latency_p99_ms", "throughput", "accuracy", "accuracy_delta"):
        out[field] = getattr(v, field) if v.HasField(field) else None
    out["message"] = v.message
    out["created_at"] = v.created_at
    out["evaluation"] = json.loads(v.evaluation_json) if v.evaluation_json else {}
    return out


def model_dict(m: spb.ModelRecord) -> dict[str, Any]:
    spec = lambda s: {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}  # noqa: E731
    return {
        "name": m.name,
        "format": m.format,
        "description": m.description,
        "created_at": m.created_at,
        "inputs": [spec(s) for s in m.inputs],
        "outputs": [spec(s) for s in m.outputs],
        "datasets": list(m.datasets),
        "default_variant": m.default_variant,
        "traffic": traffic_dict(m.traffic),
        "variants": [variant_dict(v) for v in m.variants],
    }


def traffic_dict(t: spb.TrafficPolicy) -> dict[str, Any]:
    return {
        "model": t.model,
        "weights": dict(sorted(t.weights.items())),
        "shadows": list(t.shadows),
        "sticky_parameter": t.sticky_parameter or None,
        "can_rollback": t.can_rollback,
    }


COMPARE_FIELDS = (
    "variant",
    "weight",
    "shadow",
    "requests",
    "errors",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "mean_batch",
    "cost_per_1000",
    "offline_accuracy",
    "online_accuracy",
    "online_accuracy_low",
    "online_accuracy_high",
    "feedback",
    "shadow_agreement",
    "latency_verdict",
    "accuracy_verdict",
)


def comparison_dict(c: spb.VariantComparison) -> dict[str, Any]:
    """One row of `compare --json`: fields the server had no data for are null."""
    out: dict[str, Any] = {}
    for field in COMPARE_FIELDS:
        optional = c.DESCRIPTOR.fields_by_name[field].has_presence and field not in ("variant",)
        out[field] = getattr(c, field) if (not optional or c.HasField(field)) else None
    low, high = out.pop("online_accuracy_low"), out.pop("online_accuracy_high")
    out["online_accuracy_ci"] = [low, high] if low is not None else None
    for field in ("latency_verdict", "accuracy_verdict"):
        out[field] = out[field] or None
    return out


def rollout_dict(r: spb.RolloutStatus) -> dict[str, Any]:
    """`rollout status --json`: state, variant, control, weight (percent), requests per arm, gates, history, reason."""
    gate = lambda g: {  # noqa: E731
        "name": g.name,
        "statistic": g.statistic if g.HasField("statistic") else None,
        "threshold": g.threshold,
        "decision": g.decision,
        "evidence": g.evidence,
    }
    event = lambda e: {  # noqa: E731
        "time": e.time,
        "kind": e.kind,
        "state": e.state,
        "weight": e.weight,
        "message": e.message,
        "gate": e.gate or None,
        "statistic": e.statistic if e.HasField("statistic") else None,
        "threshold": e.threshold if e.HasField("threshold") else None,
        "evidence": e.evidence or None,
    }
    return {
        "model": r.model,
        "state": r.state,
        "variant": r.variant,
        "control": r.control,
        "weight": r.weight,
        "requests": dict(r.requests),
        "gates": [gate(g) for g in r.gates],
        "history": [event(e) for e in r.history],
        "reason": r.reason or None,
        "source": r.source,
        "started_at": r.started_at,
        "finished_at": r.finished_at or None,
        "plan": json.loads(r.plan_json) if r.plan_json else None,
        "slo": slo_dict(r.slo) if r.HasField("slo") else None,
    }


def pass_dict(p: spb.PassRecord) -> dict[str, Any]:
    """A pass: name, kind, description, needs, and its settings (each default as JSON text, as a recipe writes it)."""
    settings = [{"name": s.name, "type": s.type, "default": s.default_json, "description": s.description} for s in p.settings]
    return {"name": p.name, "kind": p.kind, "description": p.description, "needs": list(p.needs), "settings": settings}


# The `slimctl jobs --json` contract, in this order.
JOB_KEYS = (
    "id",
    "model",
    "variant",
    "recipe",
    "status",
    "stage",
    "progress",
    "message",
    "submitted_at",
    "started_at",
    "finished_at",
    "paused_seconds",
)


def job_dict(j: spb.JobRecord) -> dict[str, Any]:
    """A JobRecord as the `jobs --json` contract: state queued | running | succeeded | failed | cancelled | interrupted."""
    return {k: getattr(j, k) for k in JOB_KEYS}


def slo_dict(s: spb.SloStatus) -> dict[str, Any]:
    """A SloStatus as plain values: the `slimctl slo --json` record."""
    return {
        "model": s.model,
        "p99_ms": s.p99_ms,
        "max_drop_pt": s.max_drop_pt,
        "state": s.state,
        "message": s.message,
        "warnings": list(s.warnings),
        "eligible": list(s.eligible),
        "drops": dict(s.drops),
        "weights": dict(s.weights),
        "original": dict(s.original),
        "cost_pt": s.cost_pt,
        "history": [
            {"time": e.time, "kind": e.kind, "reason": e.reason, "weights": dict(e.weights), "cost_pt": e.cost_pt} for e in s.history
        ],
    }
