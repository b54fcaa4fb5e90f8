"""The `slimctl rollout` commands: start (optionally following it live), status and abort of a model's rollout."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer
from rich import box

from slimserve.client.cli_common import connect, console, err, fail, print_json
from slimserve.client.client import SlimServeClientError
from slimserve.client.tables import Col, FitTable

# The defaults of the server's RolloutPlan (server/rollout/plan.py; tests/client/test_first_hour.py checks they agree):
# the SDK does not import the server.
DEFAULT_MIN_REQUESTS = 500
DEFAULT_MAX_STAGE_S = 3600.0

rollout_app = typer.Typer(help="Roll a variant out by itself: shadow, canary steps, promote, or roll back on a failed gate.")


def add_commands(app: typer.Typer) -> None:
    """Registers `slimctl rollout ...` and `slimctl slo` on slimctl's app."""
    app.add_typer(rollout_app, name="rollout")
    app.command("slo")(slo)


def parse_steps(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"--steps '{text}' is not comma-separated percents, e.g. 5,25,50")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def requests_text(r: dict[str, Any]) -> str:
    """Requests per arm this stage, in words: `int8 12, baseline 40`."""
    return ", ".join(f"{k} {v:,}" for k, v in r["requests"].items()) or "none yet"


def waiting_for(r: dict[str, Any], now: datetime | None = None) -> list[str]:
    """What a running rollout waits for, in plain words: the requests its stage still needs, and the stage's deadline."""
    if r["state"] not in ("shadow", "canary") or not r.get("plan"):
        return []
    lines = []
    need, have = int(r["plan"].get("min_requests", 0)), int(r["requests"].get(r["variant"], 0))
    kind = "shadow" if r["state"] == "shadow" else "canary"
    if have < need:
        hint = " (no traffic reaches the model: send some, or the stage will time out)" if have == 0 else ""
        lines.append(f"waiting for {need:,} {kind} requests (have {have:,}){hint}")
    else:
        lines.append(f"{have:,} {kind} requests of {need:,} needed: waiting for the gates to decide")
    entered = [e["time"] for e in r["history"] if e["kind"] == "stage"]
    max_stage_s = r["plan"].get("max_stage_s")
    if entered and max_stage_s:
        deadline = datetime.fromisoformat(entered[-1].replace("Z", "+00:00")) + timedelta(seconds=float(max_stage_s))
        left = (deadline - (now or datetime.now(UTC))).total_seconds()
        when = f"in {_duration(left)}" if left > 0 else "now"
        lines.append(f"stage deadline {deadline:%Y-%m-%d %H:%M:%S} UTC ({when}): still undecided then, it rolls back")
    return lines


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s" if minutes else f"{secs}s"


def print_status(r: dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        print_json(r)
        return
    where = f"canary {r['weight']:g}%" if r["state"] == "canary" else r["state"]
    console.print(f"rollout of [bold]{r['variant']}[/bold] on {r['model']} against {r['control']}: {where}")
    if r["requests"]:
        console.print("requests this stage: " + requests_text(r))
    for line in waiting_for(r):
        console.print(line, markup=False, highlight=False)
    if r.get("source"):
        console.print(f"statistics from: {r['source']}", markup=False, highlight=False)
    if r["gates"]:
        table = FitTable(
            [
                Col("gate"),
                Col("decision", rank=1),
                Col("statistic", rank=3, justify="right"),
                Col("threshold", rank=4, justify="right"),
                Col("evidence", rank=2, wraps=True),
            ],
            box=box.SIMPLE_HEAVY,
        )
        for g in r["gates"]:
            table.add_row(g["name"], g["decision"], _num(g["statistic"]), _num(g["threshold"]), g["evidence"])
        table.print(console)
    for e in r["history"]:
        console.print(f"  {e['time']}  {e['kind']:<11} {e['message']}", markup=False, highlight=False)
    if r["reason"]:
        console.print(f"reason: {r['reason']}", markup=False, highlight=False)
    if r.get("slo"):
        console.print("")
        print_slo(r["slo"])


def follow(name: str) -> dict[str, Any]:
    """Prints each change of the rollout until it ends; returns its last status."""
    last: dict[str, Any] | None = None
    shown = ""
    with connect() as client:
        for r in client.rollout_watch(name):
            waiting = waiting_for(r)[:1]
            line = f"{r['state']} {r['weight']:g}% {waiting} " + " ".join(f"{g['name']}={g['decision']}" for g in r["gates"])
            if line != shown:  # the same look again says nothing new
                console.print(
                    f"{r['state']:<11} weight {r['weight']:>5g}%  requests: {requests_text(r)}  "
                    + "  ".join([*(f"{g['name']}: {g['decision']}" for g in r["gates"]), *waiting]),
                    markup=False,
                    highlight=False,
                )
                shown = line
            last = r
    if last is None:
        fail("the rollout's stream ended without a status")
    return last


def optimize_first(client, name: str, recipe: str, plan: Path | None) -> str:
    """Runs the optimizer job (refused first if a rollout already runs: the job would be wasted); returns its variant's name."""
    if plan is not None and not plan.is_file():
        fail(f"plan file '{plan}' does not exist")
    try:
        running = client.rollout_status(name)
    except SlimServeClientError as e:
        if e.code != "NOT_FOUND" or "has no rollout" not in e.message:
            raise
    else:
        if running["state"] in ("shadow", "canary"):
            fail(f"model '{name}' already has a rollout of '{running['variant']}' ({running['state']}); abort it first")
    console.print(f"optimizing {name} with {recipe} ...", markup=False, highlight=False)
    variant, _ = client.optimize(name, recipe)
    console.print(f"variant '{variant['name']}' is measured and serving; rolling it out", markup=False, highlight=False)
    return variant["name"]


@rollout_app.command("start")
def start(
    name: str = typer.Argument(..., help="Model name."),
    variant: str | None = typer.Argument(None, help="The variant to roll out against the model's serving variant."),
    recipe: str | None = typer.Option(
        None, "--recipe", help="Optimize first with this recipe (as `slimctl optimize --recipe`), then roll out the variant it makes."
    ),
    steps: str | None = typer.Option(None, "--steps", help="Canary weights in percent, e.g. 5,25,50 (then promote)."),
    plan: Path | None = typer.Option(None, "--plan", help="Plan file (YAML or JSON): preset, steps, gates and margins."),
    min_requests: int | None = typer.Option(
        None,
        "--min-requests",
        help=f"Requests the variant answers in each stage before its gates may pass it (default {DEFAULT_MIN_REQUESTS}, or the --plan's).",
    ),
    max_stage_s: float | None = typer.Option(
        None,
        "--max-stage-s",
        help=f"Seconds a stage may stay undecided; then it rolls back (default {DEFAULT_MAX_STAGE_S:g} s = 1 h, or the --plan's).",
    ),
    alpha: float | None = typer.Option(None, "--alpha", help="Chance of a wrong promotion (and of a wrong rollback)."),
    wait: bool = typer.Option(False, "--wait", help="Follow it live; exit 0 when promoted, 1 with the reason otherwise."),
    as_json: bool = typer.Option(False, "--json", help="Print the rollout's record as JSON."),
) -> None:
    """Start a rollout: shadow, then canary steps, then promote; any failed gate rolls back at once."""
    if (variant is None) == (recipe is None):
        fail("give the VARIANT to roll out, or --recipe R to optimize one first and roll that out (not both)")
    step_list = parse_steps(steps) if steps else None
    try:
        with connect() as client:
            if recipe is not None:
                variant = optimize_first(client, name, recipe, plan)
            r = client.rollout_start(name, variant, plan, step_list, min_requests, max_stage_s, alpha)
        if not wait:
            print_status(r, as_json)
            return
        r = follow(name)
    except SlimServeClientError as e:
        fail(str(e))
    print_status(r, as_json)
    if r["state"] != "promoted":
        err.print(f"slimctl: rollout {r['state']}: {r['reason']}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@rollout_app.command("status")
def status(
    name: str = typer.Argument(..., help="Model name."),
    as_json: bool = typer.Option(False, "--json", help="Print the rollout's record as JSON."),
) -> None:
    """The model's rollout: state, weight, requests per arm, every gate's statistic and decision, history, reason; and
    its latency objective's shifts, if one is set (also when no rollout ever ran)."""
    try:
        with connect() as client:
            try:
                r = client.rollout_status(name)
            except SlimServeClientError as e:
                if e.code != "NOT_FOUND" or "has no rollout" not in e.message:
                    raise
                s = objective(client, name)
                if s is None:
                    raise
                if as_json:
                    print_json({"model": name, "state": None, "slo": s})
                else:
                    console.print(f"model {name} has no rollout", markup=False, highlight=False)
                    print_slo(s)
                return
    except SlimServeClientError as e:
        fail(str(e))
    print_status(r, as_json)


def objective(client, name: str) -> dict[str, Any] | None:
    """The model's latency objective, or None when it has none."""
    try:
        return client.slo_status(name)
    except SlimServeClientError as e:
        if e.code in ("NOT_FOUND", "FAILED_PRECONDITION"):
            return None
        raise


@rollout_app.command("abort")
def abort(
    name: str = typer.Argument(..., help="Model name."),
    as_json: bool = typer.Option(False, "--json", help="Print the rollout's record as JSON."),
) -> None:
    """Stop the model's rollout and give its traffic back to the control."""
    try:
        with connect() as client:
            r = client.rollout_abort(name)
    except SlimServeClientError as e:
        fail(str(e))
    print_status(r, as_json)


def print_slo(s: dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        print_json(s)
        return
    console.print(
        f"latency objective of {s['model']}: p99 <= {s['p99_ms']:g} ms, max drop {s['max_drop_pt']:g} points: {s['state']}",
        markup=False,
        highlight=False,
    )
    console.print(s["message"], markup=False, highlight=False)
    for w in s["warnings"]:
        err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)
    split = ", ".join(f"{v} {w:.0%}" for v, w in s["weights"].items() if w > 0)
    console.print(f"split: {split}; expected accuracy cost {s['cost_pt']:.2f} points", markup=False, highlight=False)
    drops = ", ".join(f"{v} {s['drops'].get(v, 0.0):+.2f}" for v in s["eligible"])
    console.print(f"variants it may use, fastest first (drop in points): {drops}", markup=False, highlight=False)
    for e in s["history"]:
        console.print(slo_event_line(e), markup=False, highlight=False)


def slo_event_line(e: dict[str, Any]) -> str:
    """One event of the objective: when, what, why, and the expected accuracy cost of the split it left."""
    return f"  {e['time']}  {e['kind']:<14} {e['reason']} [cost {e['cost_pt']:.2f} pt]"


def slo(
    name: str = typer.Argument(..., help="Model name."),
    p99: float | None = typer.Option(None, "--p99", help="The objective: p99 latency in milliseconds."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="Accuracy points a variant may give up against the serving one."),
    clear: bool = typer.Option(False, "--clear", help="Remove the objective; the original split comes back."),
    as_json: bool = typer.Option(False, "--json", help="Print the objective's record as JSON."),
    watch: bool = typer.Option(False, "--watch", help="Then print each new event (shift, wait, step aside) until it is removed."),
) -> None:
    """Hold a latency objective: while the live p99 breaks it, move traffic step by step to the fastest variants within
    --max-drop of the serving variant's accuracy (shadows paused first), and back as the load falls. Without --p99 or
    --clear: the objective now, its split and its shifts."""
    if clear and p99 is not None:
        fail("give --p99 MS to set an objective, or --clear to remove it (not both)")
    try:
        with connect() as client:
            if clear:
                s = client.slo_clear(name)
            elif p99 is not None:
                s = client.slo_set(name, p99, max_drop)
            else:
                s = client.slo_status(name)
    except SlimServeClientError as e:
        fail(str(e))
    print_slo(s, as_json)
    if watch:
        follow_slo(name, s["history"], as_json)


def follow_slo(name: str, shown: list[dict[str, Any]], as_json: bool = False) -> None:
    """Prints each event of the objective not in `shown` (the record keeps the last 50), until it is removed."""
    key = lambda e: (e["time"], e["kind"], e["reason"])  # noqa: E731
    last = key(shown[-1]) if shown else None
    try:
        with connect() as client:
            for s in client.slo_watch(name):
                keys = [key(e) for e in s["history"]]
                new = s["history"][keys.index(last) + 1 :] if last in keys else s["history"]
                for e in new:
                    if as_json:
                        print_json(e)
                    else:
                        console.print(slo_event_line(e), markup=False, highlight=False)
                if s["history"]:
                    last = keys[-1]
    except SlimServeClientError as e:
        fail(str(e))
