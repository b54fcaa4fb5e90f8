"""Every slimctl table at 80 and 200 columns: names whole, lines within the width, `-o wide` and `--json` complete (issue 26)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from slimserve.client import cli_common
from slimserve.client.cli import app
from slimserve.client.report import render_report
from slimserve.client.tables import Col, FitTable
from slimserve.optimizer.report import report_rows
from tests.client.test_report import _text
from tests.optimizer.test_report import BASELINE, PRUNED, QUANTIZED

runner = CliRunner()
MODEL = "digits-classifier-for-the-newcomers-first-hour"
VARIANT = "prune-structured-then-quantize-static-int8"


@pytest.fixture
def served(server, echo_onnx):
    result = runner.invoke(app, ["--server", server.address, "register", MODEL, str(echo_onnx)])
    assert result.exit_code == 0, result.output
    server.add_variant(MODEL, VARIANT, echo_onnx, recipe="prune-structured,quantize-static")
    return server


def slimctl(server, width: int, monkeypatch, *args: str):
    monkeypatch.setattr(cli_common.console, "width", width)
    result = runner.invoke(app, ["--server", server.address, *args])
    assert result.exit_code == 0, result.output
    return result.output


def check_fits(text: str, width: int, *names: str) -> None:
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    for name in names:
        assert any(name in line for line in lines), f"{name} not whole in\n{text}"


@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("command", [["models"], ["variants", MODEL], ["compare", MODEL]])
def test_tables_fit_with_names_whole(served, monkeypatch, width, command):
    text = slimctl(served, width, monkeypatch, *command)
    names = [MODEL] if command == ["models"] else [VARIANT, "baseline"]
    check_fits(text, width, *names)
    hidden = "not shown at this width" in text
    wide = slimctl(served, width, monkeypatch, *command, "-o", "wide")
    assert "not shown at this width" not in wide
    if width == 80:
        assert hidden, text  # these tables are wider than 80 columns: something gave way, and the table says so
        assert len(max(wide.splitlines(), key=len)) > 80
    for header in {"models": ["registered", "inputs"], "variants": ["samples/s", "MFLOPs"], "compare": ["batch", "$/1k inf"]}[command[0]]:
        assert header in wide


def test_json_gives_every_field_whatever_the_width(served, monkeypatch):
    [record] = json.loads(slimctl(served, 80, monkeypatch, "models", "--json"))
    assert record["name"] == MODEL and record["inputs"]
    names = [v["name"] for v in json.loads(slimctl(served, 80, monkeypatch, "variants", MODEL, "--json"))]
    assert names == ["baseline", VARIANT]


@pytest.mark.parametrize("width", [80, 200])
def test_the_optimize_report_keeps_the_variant_whole(width):
    rows = report_rows({"baseline": BASELINE, VARIANT: QUANTIZED, "graph-ort": PRUNED})
    text = _text(render_report(rows, "digits", width), width)
    check_fits(text, width, VARIANT, "speed-up ×", "Δ pts")
    assert ("not shown at this width" in text) == (width == 80)
    wide = _text(render_report(rows, "digits", width, wide=True), 400)
    assert "samples/s" in wide and "sparsity %" in wide and "not shown" not in wide


def test_the_least_important_column_goes_first_and_a_too_narrow_terminal_keeps_the_key():
    table = FitTable([Col("name"), Col("keep", rank=1), Col("drop", rank=2)])
    table.add_row("a-very-long-model-name", "12345", "67890")
    # 22 + 5 + 5 characters, a space each side of each, 4 borders: 42 columns
    assert [str(c.header) for c in table.render(42).columns] == ["name", "keep", "drop"]
    assert [str(c.header) for c in table.render(41).columns] == ["name", "keep"]
    assert [str(c.header) for c in table.render(10).columns] == ["name"]


@pytest.mark.parametrize("width", [80, 200])
def test_traffic_and_infer_tables_fit(served, monkeypatch, width, tmp_path):
    import numpy as np

    from tests.conftest import make_echo_onnx

    text = slimctl(served, width, monkeypatch, "traffic", MODEL)
    check_fits(text, width, "baseline")
    model = make_echo_onnx(tmp_path / "fp32.onnx", ["FP32"])
    text = slimctl(served, width, monkeypatch, "register", "fp32-echo-with-a-long-name", str(model))
    check_fits(text, width, "in_fp32", "out_fp32")
    np.savez(tmp_path / "x.npz", in_fp32=np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))
    text = slimctl(served, width, monkeypatch, "infer", "fp32-echo-with-a-long-name", str(tmp_path / "x.npz"))
    check_fits(text, width, "out_fp32", "float32")


@pytest.mark.parametrize("width", [80, 200])
def test_the_rollout_gate_table_fits(monkeypatch, capsys, width):
    from slimserve.client.cli_rollout import print_status

    monkeypatch.setattr(cli_common.console, "width", width)
    evidence = "agreement 0.9731 over 1,200 mirrored requests; lower confidence bound 0.9652 >= 0.95 at alpha 0.0025"
    print_status(
        {
            "model": MODEL,
            "state": "canary",
            "variant": VARIANT,
            "control": "baseline",
            "weight": 25.0,
            "requests": {VARIANT: 300, "baseline": 900},
            "source": "process",
            "gates": [{"name": "error_rate", "decision": "continue", "statistic": 0.0012, "threshold": 0.01, "evidence": evidence}],
            "history": [],
            "reason": None,
            "plan": None,
        }
    )
    text = capsys.readouterr().out
    check_fits(text, width, "error_rate", "continue")
