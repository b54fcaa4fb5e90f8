"""Feedback for every request (issue 26): a multi-row request takes one label per row, or a row's label by its index."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from slimserve.client.cli import app
from slimserve.server.errors import InvalidArgument, NotFound
from slimserve.server.telemetry.statistics import FeedbackStore


def test_rows_take_one_label_each_or_one_by_index():
    store = FeedbackStore()
    store.record_rows("r", "v", np.array([1, 2, 3]))
    with pytest.raises(InvalidArgument, match=r"had 3 rows: send one label per row .* or a row's label with its index \(--row N\)"):
        store.feedback("r", 1)
    with pytest.raises(InvalidArgument, match="send 3 labels"):
        store.feedback("r", labels=[1, 2])
    result = store.feedback("r", labels=[1, 2, 0])
    assert (result.variant, result.rows, result.correct_rows, result.correct) == ("v", 3, 2, False)
    with pytest.raises(InvalidArgument, match=r"row\(s\) 0, 1, 2 already have a label"):
        store.feedback("r", labels=[1, 2, 3])
    assert store.online_counts("v") == (2, 3)

    store.record_rows("s", "v", np.array([4, 5]))
    assert store.feedback("s", 5, row=1).correct
    with pytest.raises(InvalidArgument, match=r"row 2 does not exist \(rows: 0 to 1\)"):
        store.feedback("s", 5, row=2)
    with pytest.raises(InvalidArgument, match=r"row\(s\) 1 already have a label"):
        store.feedback("s", 5, row=1)
    assert not store.feedback("s", 0, row=0).correct
    assert store.online_counts("v") == (3, 5)
    with pytest.raises(NotFound):
        store.feedback("ghost", 1)


def test_the_id_slimctl_infer_prints_takes_feedback_for_every_row(server, tmp_path):
    from tests.conftest import echo_arrays, make_echo_onnx

    runner = CliRunner()
    slimctl = lambda *a: runner.invoke(app, ["--server", server.address, *map(str, a)])  # noqa: E731
    model = make_echo_onnx(tmp_path / "echo.onnx", ["FP32"])
    assert slimctl("register", "echo", model).exit_code == 0
    arrays = echo_arrays(batch=5, types=["FP32"])
    np.savez(tmp_path / "rows.npz", **arrays)
    result = slimctl("infer", "echo", tmp_path / "rows.npz", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    request_id = answer["request_id"]
    predicted = np.array(answer["outputs"]["out_fp32"]["data"]).argmax(1)

    result = slimctl("feedback", "echo", request_id, 3)  # one label for five rows: says what to send instead
    assert result.exit_code == 1 and "had 5 rows" in result.output
    labels = [*predicted[:4].tolist(), (int(predicted[4]) + 1) % 3]
    result = slimctl("feedback", "echo", request_id, *labels)
    assert result.exit_code == 0, result.output
    assert f"{request_id}: answered by baseline, 4 of 5 rows correct" in result.output

    result = slimctl("infer", "echo", tmp_path / "rows.npz", "--json")
    request_id = json.loads(result.stdout)["request_id"]
    result = slimctl("feedback", "echo", request_id, int(predicted[2]), "--row", 2)
    assert result.exit_code == 0, result.output
    assert f"{request_id} row 2: answered by baseline, correct" in result.output
