"""`slimserve start --model-repository DIR`: a Triton-layout repository served as it is (server/management/triton_repository.py)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from slimserve.server.grpc.triton_converters import parse_config_pbtxt
from slimserve.server.inference.dataplane import InferRequest
from slimserve.server.management.triton_repository import scan
from tests.conftest import ServerHandle

DIGITS_CONFIG = """
name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { all { } }
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" } ]
dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 200 }
instance_group [ { count: 2 kind: KIND_GPU } ]
optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def model_dir(root: Path, name: str, onnx: Path, config: str | None, versions=(1,), labels: bool = True) -> Path:
    path = root / name
    for v in versions:
        (path / str(v)).mkdir(parents=True)
        shutil.copyfile(onnx, path / str(v) / "model.onnx")
    if config is not None:
        (path / "config.pbtxt").write_text(config.replace('"digits"', f'"{name}"'))
    if labels:
        (path / "labels.txt").write_text("\n".join(f"digit-{i}" for i in range(10)))
    return path


@pytest.fixture
def triton_repo(tmp_path, digits) -> Path:
    root = tmp_path / "triton"
    model_dir(root, "digits", digits.onnx, DIGITS_CONFIG, versions=(1, 2))
    model_dir(root, "broken", digits.onnx, 'name: "broken"\nmax_batch_size: 8\ninput [ { name: "x" data_typ: TYPE_FP32 } ]\n')
    model_dir(root, "wrongdims", digits.onnx, DIGITS_CONFIG.replace("dims: [ 1, 8, 8 ]", "dims: [ 1, 9, 9 ]"))
    model_dir(root, "nolabels", digits.onnx, DIGITS_CONFIG, labels=False)
    model_dir(root, "plain", digits.onnx, None)  # no config.pbtxt: served as the ONNX file says, as Triton auto-completes
    (root / "emptyversion" / "1").mkdir(parents=True)
    (root / "torchscript" / "1").mkdir(parents=True)
    (root / "torchscript" / "1" / "model.pt").write_bytes(b"not really")
    return root


def infer(server: ServerHandle, model: str, version: str = ""):
    x = np.zeros((1, 1, 8, 8), np.float32)
    return server.call(server.server.dataplane.serve(InferRequest(model, version, "", lambda: {"x": x})))


def test_each_model_is_read_or_refused_with_its_file_and_reason(triton_repo):
    models = {m.name: m for m in scan(triton_repo, parse_config_pbtxt)}
    assert models["digits"].error == "" and sorted(models["digits"].versions) == [1, 2]
    assert models["plain"].error == "" and models["plain"].config == {}
    assert f"{triton_repo}/broken/config.pbtxt:3:21" in models["broken"].error and 'no field named "data_typ"' in models["broken"].error
    assert "label_filename 'labels.txt'" in models["nolabels"].error and "does not exist" in models["nolabels"].error
    assert f"{triton_repo}/emptyversion/1: version 1 has no model file" in models["emptyversion"].error
    assert "TorchScript is not served" in models["torchscript"].error and "torch.export" in models["torchscript"].error
    not_applied = models["digits"].not_applied
    assert any(line.startswith("optimization: ") and "TensorRT" in line for line in not_applied)
    assert any(line.startswith("instance_group.kind KIND_GPU: not applied") for line in not_applied)


def test_a_triton_repository_serves_with_its_config_labels_and_versions_and_still_does_after_a_restart(triton_repo, tmp_path):
    repository = tmp_path / "slimserve"
    server = ServerHandle(repository, model_repository=triton_repo)
    try:
        assert sorted(server.server.dataplane.models) == ["digits", "plain"]
        errors = server.server.triton.errors
        assert "dims [1, 8, 8] in the model file, not ['1', '9', '9']" in errors["wrongdims"]
        assert sorted(errors) == ["broken", "emptyversion", "nolabels", "torchscript", "wrongdims"]
        assert not (repository / "models" / "wrongdims").exists()  # refused after the files were checked: nothing left behind
        config = server.server.control.model_config("digits")
        assert (config.max_batch_size, config.instance_count, config.batching.preferred_batch_sizes) == (8, 2, (4,))
        assert config.batching.max_queue_delay_ms == 0.2 and config.label_files == {"logits": "labels.txt"}
        assert (config.version, config.variant) == (2, "v2")  # unversioned: the latest version, as Triton
        assert server.server.control.model_config("digits", "1").variant == "baseline"
        assert infer(server, "digits", "1").variant == "baseline" and infer(server, "digits").variant == "v2"
        assert server.server.dataplane.loader.overrides["digits"].labels["logits"][3] == "digit-3"
        created = server.server.repository.get("digits").created_at
    finally:
        server.stop()
    again = ServerHandle(repository, model_repository=triton_repo)
    try:
        config = again.server.control.model_config("digits")
        assert (config.max_batch_size, config.instance_count, config.label_files, config.version) == (8, 2, {"logits": "labels.txt"}, 2)
        assert again.server.repository.get("digits").created_at == created  # the same files: not imported again
    finally:
        again.stop()


def test_poll_mode_imports_a_changed_directory_and_explicit_mode_loads_on_request(triton_repo, tmp_path):
    server = ServerHandle(tmp_path / "polled", model_repository=triton_repo, model_control_mode="poll", repository_poll_secs=3600)
    try:
        time.sleep(0.01)  # a distinct modification time
        config = triton_repo / "digits" / "config.pbtxt"
        config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 4").replace("[ 4 ]", "[ 2 ]"))
        assert server.call(server.server.triton.poll_once()) == ["digits"]
        assert server.server.control.model_config("digits").max_batch_size == 4
        config.write_text(config.read_text().replace("dims: [ 1, 8, 8 ]", "dims: [ 1, 9, 9 ]"))  # broken: the old import stays
        assert server.call(server.server.triton.poll_once()) == []
        assert "dims [1, 8, 8] in the model file" in server.server.triton.errors["digits"]
        assert server.server.repository.get("digits").variants["v2"].version == 2
        assert server.server.control.model_config("digits").max_batch_size == 4
        config.write_text(config.read_text().replace("dims: [ 1, 9, 9 ]", "dims: [ 1, 8, 8 ]"))
        shutil.rmtree(triton_repo / "plain")
        server.call(server.server.triton.poll_once())
        assert "plain" not in server.server.dataplane.models
    finally:
        server.stop()
    explicit = ServerHandle(tmp_path / "explicit", model_repository=triton_repo, model_control_mode="explicit")
    try:
        assert explicit.server.dataplane.models == {}
        explicit.call(explicit.server.control.load_model("digits"))
        assert explicit.server.control.model_config("digits").max_batch_size == 4  # the stored config, applied at the load
    finally:
        explicit.stop()


def test_register_with_a_config_and_labels_keeps_them_across_loads_and_restarts(tmp_path, digits):
    from slimserve.client.client import SlimServeClient, SlimServeClientError

    config = tmp_path / "config.pbtxt"
    config.write_text('name: "digits"\nmax_batch_size: 4\ninstance_group [ { count: 3 } ]\n')
    labels = tmp_path / "digits.txt"
    labels.write_text("\n".join(f"digit-{i}" for i in range(10)))
    repository = tmp_path / "repo"
    server = ServerHandle(repository)
    try:
        with SlimServeClient(server.address) as c:
            c.register("digits", digits.onnx, config=config, labels={"logits": labels})
            bad = tmp_path / "bad.json"
            bad.write_text('{"input": [{"name": "x", "dims": [2, 8, 8]}]}')
            with pytest.raises(SlimServeClientError, match=r"input 'x' has dims \[1, 8, 8\] in the model file"):
                c.register("other", digits.onnx, config=bad)
            assert [m["name"] for m in c.models()] == ["digits"]  # the refused one left nothing behind
            broken = tmp_path / "broken.pbtxt"
            broken.write_text("max_batch_size: eight\n")
            with pytest.raises(SlimServeClientError, match=r"broken.pbtxt:1:17: .*max_batch_size"):
                c.register("other", digits.onnx, config=broken)
        server.call(server.server.control.load_model("digits"))  # a load without a config keeps the registered one
        view = server.server.control.model_config("digits")
        assert (view.max_batch_size, view.instance_count, view.label_files) == (4, 3, {"logits": "digits.txt"})
    finally:
        server.stop()
    again = ServerHandle(repository)
    try:
        view = again.server.control.model_config("digits")
        assert (view.max_batch_size, view.instance_count, view.label_files) == (4, 3, {"logits": "digits.txt"})
        assert again.server.dataplane.loader.overrides["digits"].labels["logits"][9] == "digit-9"
    finally:
        again.stop()


def test_when_the_first_version_leaves_the_next_becomes_the_baseline_and_keeps_its_optimized_variants_and_traffic(tmp_path, digits):
    from slimserve.server.store.manifest import VariantInfo
    from slimserve.server.store.traffic import TrafficPolicy

    root = tmp_path / "triton"
    model_dir(root, "digits", digits.onnx, DIGITS_CONFIG, versions=(1, 2))
    server = ServerHandle(tmp_path / "polled", model_repository=root, model_control_mode="poll", repository_poll_secs=3600)
    try:
        repository = server.server.repository
        for name, parent in (("fast1", "baseline"), ("fast2", "v2")):  # optimized variants of version 1 and of version 2
            with repository.staging() as staged:
                (staged / "variant").mkdir()
                shutil.copyfile(digits.onnx, staged / "variant" / "model.onnx")
                variant = VariantInfo(name=name, recipe="quantize", parent=parent, runtime="onnxruntime", format="onnx", file="model.onnx")
                repository.add_variant("digits", staged / "variant", variant)
        policy = TrafficPolicy({"fast2": 0.5, "v2": 0.3, "baseline": 0.2}, ("fast1",))
        repository.update("digits", lambda i: setattr(i, "traffic", policy))
        shutil.rmtree(root / "digits" / "1")  # the baseline's version leaves, a third arrives
        shutil.copytree(root / "digits" / "2", root / "digits" / "3")
        running = {"state": "canary", "variant": "fast1", "control": "v2"}  # a rollout of a variant that would go: refused
        repository.update("digits", lambda i: setattr(i, "rollout", running))
        assert server.call(server.server.triton.poll_once()) == []
        assert "rollout running of 'fast1'" in server.server.triton.errors["digits"] and "fast1" in repository.get("digits").variants
        repository.update("digits", lambda i: setattr(i, "rollout", {**running, "state": "aborted"}))
        assert server.call(server.server.triton.poll_once()) == ["digits"]
        info = repository.get("digits")
        assert sorted(info.variants) == ["baseline", "fast2", "v3"]  # fast1 was version 1, optimized: it left with it
        assert (info.variants["baseline"].version, info.variants["v3"].version, info.variants["fast2"].parent) == (2, 3, "baseline")
        assert info.traffic.weights == pytest.approx({"fast2": 0.625, "baseline": 0.375}) and info.traffic.shadows == ()
        assert not (tmp_path / "polled" / "models" / "digits" / "variants" / "v2").exists()
        assert infer(server, "digits", "2").variant == "baseline" and infer(server, "digits", "3").variant == "v3"
        model_dir(root, "older", digits.onnx, None)  # (another model, so that version 1 below can be copied from it)
        shutil.copytree(root / "older" / "1", root / "digits" / "1")  # a version below the first: v1, beside the baseline
        assert "digits" in server.call(server.server.triton.poll_once())
        info = repository.get("digits")
        assert sorted(info.variants) == ["baseline", "fast2", "v1", "v3"] and info.variants["v1"].version == 1
        assert info.variants["baseline"].version == 2 and infer(server, "digits", "1").variant == "v1"
    finally:
        server.stop()
