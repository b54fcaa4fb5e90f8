"""Optimization jobs through the server: progress, the new variant served and measured, failures leave nothing."""

import json

import numpy as np
import pytest

from slimserve.client.client import SlimServeClient, SlimServeClientError
from tests.helpers import wait_until


@pytest.fixture
def registered(client, digits):
    client.register("digits", digits.onnx, data=digits.data, train=digits.train)
    return client


def test_graph_ort_job_registers_a_measured_variant(registered, digits, server):
    events = []
    variant, report = registered.optimize("digits", "graph-ort", on_progress=events.append)
    assert variant["name"] == "graph-ort" and variant["status"] == "ready" and variant["runtime"] == "onnxruntime"
    assert variant["parent"] == "baseline" and variant["recipe"] == "graph-ort"
    assert events and events[-1].fraction <= 1.0 and any(e.stage == "graph-ort" for e in events)
    assert [r["variant"] for r in report] == ["baseline", "graph-ort"]
    # Every variant, the baseline included, carries its evaluation.
    records = {v["name"]: v for v in registered.model("digits")["variants"]}
    for name in ("baseline", "graph-ort"):
        v = records[name]
        assert v["params"] == 85066 and v["flops"] > 0 and v["latency_p50_ms"] > 0 and v["throughput"] > 0
        assert v["accuracy"] == pytest.approx(digits.accuracy)
    assert records["graph-ort"]["accuracy_delta"] == pytest.approx(0.0)
    # The new variant serves at once, pinned by model_version, with the same answers.
    x = digits.x_test[:16]
    pinned, out = registered.infer("digits", {"x": x}, variant="graph-ort")
    _, base = registered.infer("digits", {"x": x}, variant="baseline")
    assert pinned == "graph-ort"
    np.testing.assert_allclose(out["logits"], base["logits"], rtol=1e-5, atol=1e-5)
    [job] = registered.jobs("digits")
    assert job["status"] == "succeeded" and job["variant"] == "graph-ort"


def test_name_and_duplicate(registered):
    variant, _ = registered.optimize("digits", "graph-ort", variant_name="fast")
    assert variant["name"] == "fast"
    with pytest.raises(SlimServeClientError) as e:
        registered.optimize("digits", "graph-ort", variant_name="fast")
    assert e.value.code == "ALREADY_EXISTS" and "already has a variant 'fast'" in e.value.message


def test_unknown_recipe_touches_nothing(registered, server):
    before = registered.model("digits")
    with pytest.raises(SlimServeClientError) as e:
        registered.optimize("digits", "quantize-magic")
    assert e.value.code == "INVALID_ARGUMENT" and "unknown recipe or pass 'quantize-magic'" in e.value.message
    assert "graph-ort" in e.value.message  # lists what exists
    assert registered.model("digits")["variants"] == before["variants"]


def test_bad_recipe_file_setting(registered, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: tuned\npasses:\n  - pass: graph-ort\n    config: {level: turbo}\n")
    with pytest.raises(SlimServeClientError) as e:
        registered.optimize("digits", str(recipe))
    assert e.value.code == "INVALID_ARGUMENT" and "turbo" in e.value.message


def test_recipe_file(registered, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "name": "ort-basic", "passes": [{"pass": "graph-ort", "config": {"level": "basic"}}]}))
    variant, _ = registered.optimize("digits", str(recipe))
    assert variant["name"] == "ort-basic" and variant["recipe"] == "ort-basic"


def test_unknown_model(client):
    with pytest.raises(SlimServeClientError) as e:
        client.optimize("nope", "graph-ort")
    assert e.value.code == "NOT_FOUND"


def test_a_budget_without_evaluation_data_is_refused_before_any_job(client, digits):
    client.register("digits", digits.onnx)
    with pytest.raises(SlimServeClientError) as e:
        client.optimize("digits", "graph-ort", accuracy_budget=1.0)
    assert e.value.code == "FAILED_PRECONDITION" and "--data EVAL.npz" in e.value.message
    assert [v["name"] for v in client.model("digits")["variants"]] == ["baseline"]
    assert client.jobs("digits") == []  # refused in the call: nothing started, nothing measured


@pytest.mark.parametrize(
    "train, recipe, message",
    [
        (None, "prune-weight", "needs train data; the model was registered without it"),
        ("unlabelled", "prune-weight", "the train data has no 'labels' array"),
        (None, "quantize-static", "quantize-static needs calibration data"),
    ],
)
def test_a_recipe_that_lacks_data_is_refused_at_once(client, digits, tmp_path, train, recipe, message):
    """Checked on the array names alone, before the baseline is measured: a second, not a minute."""
    import time

    if train == "unlabelled":
        train = tmp_path / "train.npz"
        np.savez(train, x=digits.x_test[:8])
    client.register("digits", digits.onnx, data=digits.data, train=train)
    start = time.monotonic()
    with pytest.raises(SlimServeClientError) as e:
        client.optimize("digits", recipe)
    assert time.monotonic() - start < 5
    assert e.value.code == "FAILED_PRECONDITION" and message in e.value.message, e.value.message
    assert client.jobs("digits") == []


def test_the_baseline_is_measured_once_for_every_job(registered):
    wait_until(lambda: registered.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's measurement", 60, 0.2)
    for recipe in ("graph-ort", "quantize-dynamic"):
        events = []
        registered.optimize("digits", recipe, on_progress=events.append)
        assert not any("measuring the baseline" in e.message for e in events), [e.message for e in events]


def test_interrupted_job_marked_interrupted_at_start(server_factory, tmp_path, digits):
    repo = tmp_path / "repo"
    first = server_factory(repo)
    with SlimServeClient(first.address) as c:
        c.register("digits", digits.onnx)
    first.stop()
    manifest = repo / "models" / "digits" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["jobs"]["dead"] = {"id": "dead", "variant": "half", "recipe": "graph-ort", "status": "running", "started_at": "x"}
    manifest.write_text(json.dumps(data))
    (repo / "models" / "digits" / "variants" / "half").mkdir()  # moved in by the dead job, never recorded
    second = server_factory(repo)
    with SlimServeClient(second.address) as c:
        [job] = c.jobs("digits")
        assert job["status"] == "interrupted" and "while the job was running" in job["message"]
        assert [v["name"] for v in c.model("digits")["variants"]] == ["baseline"]
    assert not (repo / "models" / "digits" / "variants" / "half").exists()


def test_baseline_is_measured_after_registration(registered, digits):
    baseline = wait_until(
        lambda: (b := registered.model("digits")["variants"][0])["latency_p50_ms"] is not None and b,
        "the baseline's background measurement",
        timeout=60,
        interval=0.2,
    )
    assert baseline["params"] == 85066 and baseline["accuracy"] == pytest.approx(digits.accuracy)
    assert baseline["accuracy_delta"] is None


def test_quality_and_evaluator_are_checked_before_the_job_and_held_in_it(registered):
    """--quality naming no output and an unknown evaluator: INVALID_ARGUMENT at once; an evaluator that raises fails the job with
    its message; a built-in evaluator is scored and reported per output."""
    with pytest.raises(SlimServeClientError) as e:
        registered.optimize("digits", "graph-ort", quality=["probs=cosine"])
    assert e.value.code == "INVALID_ARGUMENT" and "the model has no output 'probs' (its outputs: logits)" in e.value.message
    with pytest.raises(SlimServeClientError) as e:
        registered.optimize("digits", "graph-ort", evaluator="mAP")
    assert e.value.code == "INVALID_ARGUMENT" and "unknown evaluator 'mAP'" in e.value.message and "detection" in e.value.message
    with pytest.raises(SlimServeClientError) as e:
        registered.optimize("digits", "graph-ort", evaluator="segmentation")
    assert e.value.code == "FAILED_PRECONDITION" and "evaluator 'segmentation'" in e.value.message
    assert "needs a mask output" in e.value.message
    assert [v["name"] for v in registered.model("digits")["variants"]] == ["baseline"]  # nothing registered
    _, report = registered.optimize("digits", "graph-ort", quality=["logits=top1-agreement"], evaluator="classification-top5")
    rows = {r["output"]: r for r in report[1]["quality_by_output"]}
    assert rows["logits"]["metric"] == "top1-agreement" and rows["logits"]["drop_pt"] == pytest.approx(0.0, abs=0.5)
    assert rows["evaluator:classification-top5"]["value"] > 90 and report[1]["within_budget"] is True
    assert report[1]["speedup_ci"][0] <= report[1]["speedup_x"] <= report[1]["speedup_ci"][1]


def test_quality_settings_given_at_register_hold_for_every_job(client, digits):
    with pytest.raises(SlimServeClientError) as e:
        client.register("d1", digits.onnx, data=digits.data, evaluator="no-such-evaluator")
    assert e.value.code == "INVALID_ARGUMENT" and "unknown evaluator 'no-such-evaluator'" in e.value.message
    with pytest.raises(SlimServeClientError) as e:
        client.register("d1", digits.onnx, data=digits.data, quality=["boxes=relative-error"])
    assert e.value.code == "INVALID_ARGUMENT" and "the model has no output 'boxes' (its outputs: logits)" in e.value.message
    assert "d1" not in [m["name"] for m in client.models()]
    client.register("d1", digits.onnx, data=digits.data, quality=["logits=top1-agreement"], evaluator="classification-top1")
    _, report = client.optimize("d1", "graph-ort")
    rows = {r["output"]: r for r in report[1]["quality_by_output"]}
    assert rows["logits"]["metric"] == "top1-agreement" and "evaluator:classification-top1" in rows
    assert rows["evaluator:classification-top1"]["value"] == pytest.approx(100 * digits.accuracy, abs=0.5)
