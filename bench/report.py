"""bench.serving's report: its tables in the terminal and the issue's targets as ratios measured in the run."""

from __future__ import annotations


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    machine = result["machine"]
    console.print(
        f"[bold]digits CNN (ONNX), {machine['cpus']} CPUs ({machine['cpu_model']}), onnxruntime {machine['onnxruntime']}, "
        f"{result['settings']['rounds']} round(s) x {result['settings']['seconds']:g} s per point[/bold]"
    )
    if result.get("inprocess"):
        t = Table(title="(1) in-process ONNX Runtime, one call at a time")
        for col in ("run", "p50 ms/call", "p99 ms/call", "ms/sample", "samples/s"):
            t.add_column(col, justify="right" if col != "run" else "left")
        for r in result["inprocess"]:
            t.add_row(r["name"], f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['ms_per_sample']:.4f}", f"{r['samples_per_s']:,.0f}")
        console.print(t)
    if result.get("serving"):
        best = result.get("inprocess_best_samples_per_s")
        t = Table(title="(2-4) over gRPC, batch-1 requests, closed-loop callers")
        for col in ("server", "callers", "req/s", "p50 ms", "p99 ms", "errors", "share of ORT", "client µs/req"):
            t.add_column(col, justify="left" if col == "server" else "right")
        last_c = None
        for r in result["serving"]:
            if last_c is not None and r["concurrency"] != last_c:
                t.add_section()
            last_c = r["concurrency"]
            f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            share = f"{r['throughput_rps'] / best:.0%}" if best else "-"
            t.add_row(
                r["target"],
                str(r["concurrency"]),
                f"{r['throughput_rps']:,.0f}",
                f(r["p50_ms"], ".3f"),
                f(r["p99_ms"], ".3f"),
                str(r["errors"]) if not r["errors"] else f"[red]{r['errors']} {r['errors_by_code']}[/red]",
                share,
                f(r["client_cpu_us_per_request"], ".0f"),
            )
        console.print(t)
        for note in result.get("notes", []):
            console.print(f"  {note}")
    if result.get("targets"):
        t = Table(title="targets (issue 8)")
        for col in ("check", "measured", "target", "met"):
            t.add_column(col, justify="left" if col == "check" else "right")
        for c in result["targets"]:
            met = "-" if c["met"] is None else ("[green]yes[/green]" if c["met"] else "[red]no[/red]")
            t.add_row(c["check"], c["measured"], c["target"], met)
        console.print(t)
    for name, why in result.get("skipped", {}).items():
        console.print(f"[yellow]skipped {name}: {why}[/yellow]")
    profile = result.get("profile")
    if profile:
        console.print(
            f"[bold]slimserve profile at {profile['concurrency']} callers[/bold]: {profile['throughput_rps']:,.0f} req/s, "
            f"server {profile['server_cores_busy']:.2f} cores busy, {profile['server_cpu_us_per_request']:.0f} µs server CPU "
            f"and {profile['client_cpu_us_per_request']:.0f} µs client CPU per request"
        )
        console.print("  cores by thread: " + ", ".join(f"{k} {v:.2f}" for k, v in profile["cores_by_thread"].items()))
        spy = profile.get("py_spy")
        if isinstance(spy, dict):
            console.print(
                f"py-spy, {spy['samples']} samples of non-idle threads at {spy['throughput_rps_while_sampled']:,.0f} req/s "
                f"(flame graph: {spy['flamegraph']}, stacks: {spy['raw']})"
            )
            for key, title in (("by_category", "where the samples go"), ("by_thread", "by thread"), ("self", "self time by frame")):
                t = Table(title=title)
                t.add_column("name")
                t.add_column("share", justify="right")
                for r in spy[key][:12]:
                    t.add_row(r["name"][:120], f"{r['share']:.1%}")
                console.print(t)
        elif spy:
            console.print(f"[yellow]{spy}[/yellow]")


def row(rows: list[dict], target: str, c: int) -> dict | None:
    return next((r for r in rows if r["target"] == target and r["concurrency"] == c), None)


def check_targets(result: dict) -> list[dict]:
    """The issue's targets, as ratios measured in this run."""
    rows = result.get("serving", [])
    checks = []
    s16, s1 = row(rows, "slimserve", 16), row(rows, "slimserve", 1)
    k16, k1 = row(rows, "kserve", 16), row(rows, "kserve", 1)
    m16, m1 = row(rows, "mlserver", 16), row(rows, "mlserver", 1)
    best = result.get("inprocess_best_samples_per_s")
    if s16 and k16:
        ratio = s16["throughput_rps"] / k16["throughput_rps"]
        checks.append({"check": "req/s at 16 callers vs KServe", "measured": f"{ratio:.2f}x", "target": ">= 2x", "met": ratio >= 2})
    if s16 and m16:
        ratio = s16["throughput_rps"] / m16["throughput_rps"]
        checks.append({"check": "req/s at 16 callers vs MLServer", "measured": f"{ratio:.2f}x", "target": ">= 3x", "met": ratio >= 3})
    if s1 and k1:
        checks.append(
            {
                "check": "p50 at 1 caller vs KServe",
                "measured": f"{s1['p50_ms']:.3f} vs {k1['p50_ms']:.3f} ms",
                "target": "<=",
                "met": s1["p50_ms"] <= k1["p50_ms"],
            }
        )
    if s1 and m1:
        checks.append(
            {
                "check": "p50 at 1 caller vs MLServer",
                "measured": f"{s1['p50_ms'] / m1['p50_ms']:.2f}x",
                "target": "<= 0.5x",
                "met": s1["p50_ms"] <= 0.5 * m1["p50_ms"],
            }
        )
    if s16 and best:
        share = s16["throughput_rps"] / best
        checks.append(
            {"check": "req/s at 16 callers vs in-process ORT best", "measured": f"{share:.0%}", "target": ">= 40%", "met": share >= 0.4}
        )
    f16 = row(rows, "floor (no model)", 16)
    if f16 and k16:
        # Context, not a target: what a server that does nothing but parse and answer reaches against KServe.
        ratio = f16["throughput_rps"] / k16["throughput_rps"]
        checks.append(
            {
                "check": "ceiling: floor server (no model) at 16 callers vs KServe",
                "measured": f"{ratio:.2f}x",
                "target": "context",
                "met": None,
            }
        )
    fm16 = row(rows, "floor + model", 16)
    if fm16 and k16:
        ratio = fm16["throughput_rps"] / k16["throughput_rps"]
        checks.append(
            {
                "check": "ceiling with the model: floor + model at 16 callers vs KServe",
                "measured": f"{ratio:.2f}x",
                "target": "context",
                "met": None,
            }
        )
    if fm16 and s16:
        share = s16["throughput_rps"] / fm16["throughput_rps"]
        checks.append({"check": "slimserve at 16 callers vs floor + model", "measured": f"{share:.0%}", "target": "context", "met": None})
    t16 = row(rows, "slimserve stream", 16)
    if t16 and k16:
        ratio = t16["throughput_rps"] / k16["throughput_rps"]
        checks.append(
            {
                "check": "slimserve over ModelStreamInfer at 16 callers vs KServe (unary)",
                "measured": f"{ratio:.2f}x",
                "target": "context",
                "met": None,
            }
        )
    if s16:
        checks.append({"check": "errors at 16 callers", "measured": str(s16["errors"]), "target": "0", "met": s16["errors"] == 0})
    return checks
