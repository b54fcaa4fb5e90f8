"""ONNX models with weights in side files, as torch.onnx.export writes them by default (issue 26)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from slimserve.client.client import SlimServeClientError
from slimserve.client.onnx_files import side_files
from slimserve.optimizer.formats.onnx_files import external_locations
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny MLP through a default torch.onnx.export: the graph in tiny.onnx, the weights in tiny.onnx.data."""
    import torch

    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 8),), folder / "tiny.onnx", input_names=["x"], output_names=["y"], dynamic_shapes=({0: "batch"},)
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(folder / "data.npz", x=x, labels=labels)
    return folder / "tiny.onnx"


def test_the_default_export_keeps_weights_in_a_side_file(exported):
    assert (exported.parent / "tiny.onnx.data").is_file()
    assert side_files(exported) == external_locations(exported) == ["tiny.onnx.data"]


def test_registers_serves_and_optimizes_online_into_one_file(exported, server, client):
    model = client.register("tiny", exported, data=exported.parent / "data.npz")
    assert model["name"] == "tiny"
    x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    assert client.infer("tiny", {"x": x})[1]["y"].shape == (3, 3)
    variant, _ = client.optimize("tiny", "graph-ort", variant_name="fast")
    assert variant["name"] == "fast"
    repository = server.server.repository
    stored = repository.variant_path(repository.get("tiny"), "fast")
    assert external_locations(stored) == []  # a variant under 2 GiB is one file
    assert client.infer("tiny", {"x": x}, variant="fast")[1]["y"].shape == (3, 3)


def test_a_missing_side_file_is_refused_by_name(exported, tmp_path, client, monkeypatch):
    lone = tmp_path / "tiny.onnx"
    lone.write_bytes(exported.read_bytes())
    with pytest.raises(SlimServeClientError, match=r"'tiny\.onnx\.data'.*not beside it"):
        client.register("lone", lone)
    # A client that does not send it (another SDK): the server names it, and keeps nothing.
    import slimserve.client.client as sdk

    monkeypatch.setattr(sdk, "side_files", lambda path: [])
    with pytest.raises(SlimServeClientError, match=r"side files the upload does not carry: 'tiny\.onnx\.data'"):
        client.register("lone", exported)
    assert all(m["name"] != "lone" for m in client.models())


def test_offline_optimize_reads_side_files_and_names_a_missing_one(exported, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "slimserve.server.cli", "optimize", str(exported), "--recipe", "graph-ort"]
    done = subprocess.run(
        [*command, "--data", str(exported.parent / "data.npz"), "--out", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert external_locations(out / "model.onnx") == []
    lone = tmp_path / "lone" / "tiny.onnx"
    lone.parent.mkdir()
    lone.write_bytes(exported.read_bytes())
    done = subprocess.run(
        [*command[:4], str(lone), *command[5:], "--out", str(tmp_path / "out2")], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "'tiny.onnx.data' (weights of" in done.stderr and "is missing" in done.stderr, done.stderr
