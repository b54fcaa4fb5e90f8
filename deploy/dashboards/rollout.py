"""The per-model dashboard's rollout row and its annotations: state, canary weight and gate decisions of `slimctl rollout`.

The series come from the writer's rollout controller (server/rollout/metrics.py), labelled by the variant rolled out.
"""

from __future__ import annotations

from dashboards.builders import DATASOURCE, Layout, stat, timeseries

# The model's rollouts, whatever variant (the variant picker is for serving variants; a rollout names its own).
SEL = 'model="$model", node_type=~"$node_type"'


def rollout_row(grid: Layout) -> None:
    grid.row("Rollout")
    grid.add(
        stat(
            "Rollout state",
            "The state of the model's latest rollout of each variant (shadow, canary, promoted, rolled_back, aborted).",
            "short",
            ("max by (variant, state) (slimserve_rollout_state{" + SEL + "}) == 1", "{{variant}}: {{state}}"),
            decimals=0,
        ),
        w=6,
    )
    grid.add(
        timeseries(
            "Rollout canary weight",
            "Live traffic share the rollout gives its variant: 0 in shadow and after a rollback, 1 once promoted.",
            "percentunit",
            ("max by (variant) (slimserve_rollout_canary_weight_ratio{" + SEL + "})", "{{variant}}"),
            max_=1,
        ),
        w=9,
    )
    grid.add(
        timeseries(
            "Rollout gate decisions",
            "Gate decisions the controller acted on at a stage's end, by gate and outcome (time_limit: a stage ran out undecided).",
            "short",
            (
                "sum by (variant, gate, decision) (increase(slimserve_rollout_decisions_total{" + SEL + "}[$__range]))",
                "{{variant}} {{gate}} {{decision}}",
            ),
        ),
        w=9,
    )


def rollout_annotations() -> list[dict]:
    """A mark on every panel where a rollout changed state (started a stage, promoted, rolled back, aborted)."""
    changed = 'max by (variant, state) (changes(slimserve_rollout_state{model="$model"}[1m]))'
    now = 'max by (variant, state) (slimserve_rollout_state{model="$model"})'
    return [
        {
            "name": "Rollout events",
            "datasource": DATASOURCE,
            "enable": True,
            "iconColor": "orange",
            "expr": f"{changed} > 0 and on (variant, state) {now} == 1",
            "step": "30s",
            "titleFormat": "rollout of {{variant}}: {{state}}",
            "textFormat": "",
            "useValueForTime": False,
        }
    ]
