"""`--model-control-mode` refusals over both transports, and poll mode's re-import that keeps optimized variants and
their traffic (server/management/triton_repository.py, server/management/control.py)."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import onnx
import pytest

from slimserve.protos import inference_pb2 as pb
from slimserve.protos import inference_pb2_grpc as pb_grpc
from slimserve.server.store.traffic import TrafficPolicy
from tests.conftest import ServerHandle
from tests.server.test_triton_repository import DIGITS_CONFIG, infer, model_dir

TRITON_REFUSAL = "explicit model load / unload is not allowed if polling is enabled"


@pytest.fixture
def small_repo(tmp_path, digits) -> Path:
    root = tmp_path / "triton"
    model_dir(root, "digits", digits.onnx, DIGITS_CONFIG, versions=(1, 2))
    return root


def rest(server: ServerHandle, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{server.http_address}{path}", data=json.dumps(body or {}).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def grpc_call(server: ServerHandle, method: str, request):
    with grpc.insecure_channel(server.address) as channel:
        return getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)(request, timeout=30)


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_and_unload_are_refused_as_triton_refuses_them_outside_explicit_mode(small_repo, tmp_path, mode):
    server = ServerHandle(tmp_path / "slimserve", model_repository=small_repo, model_control_mode=mode, repository_poll_secs=3600)
    try:
        for method, request in [
            ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="digits")),
            ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="digits")),
        ]:
            with pytest.raises(grpc.RpcError) as raised:
                grpc_call(server, method, request)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert raised.value.details().startswith(TRITON_REFUSAL)
            assert f"--model-control-mode {mode}" in raised.value.details() and "--model-control-mode explicit" in raised.value.details()
        for action in ("load", "unload"):
            status, body = rest(server, f"/v2/repository/models/digits/{action}")
            assert status == 503 and body["error"].startswith(TRITON_REFUSAL)
        assert server.server.dataplane.is_loaded("digits")  # nothing changed
    finally:
        server.stop()


def test_explicit_mode_allows_load_and_unload_over_both_transports(small_repo, tmp_path):
    server = ServerHandle(tmp_path / "slimserve", model_repository=small_repo, model_control_mode="explicit")
    try:
        assert not server.server.dataplane.is_loaded("digits")
        grpc_call(server, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="digits"))
        assert server.server.dataplane.is_loaded("digits")
        assert rest(server, "/v2/repository/models/digits/unload") == (200, {})
        assert not server.server.dataplane.is_loaded("digits")
        assert rest(server, "/v2/repository/models/digits/load") == (200, {})
        assert server.server.dataplane.is_loaded("digits")
    finally:
        server.stop()


def resaved(source: Path, target: Path, note: str) -> None:
    """The same network with other bytes: a changed version file that still serves."""
    model = onnx.load(str(source))
    model.doc_string = note
    onnx.save(model, str(target))


def test_poll_replaces_only_changed_versions_keeps_variants_and_traffic_and_survives_a_broken_version(small_repo, tmp_path, digits):
    server = ServerHandle(tmp_path / "slimserve", model_repository=small_repo, model_control_mode="poll", repository_poll_secs=3600)
    repository = server.server.repository
    try:
        server.add_variant("digits", "int8", digits.onnx, recipe="quantize")
        split = TrafficPolicy(weights={"v2": 0.5, "int8": 0.5})
        repository.update("digits", lambda i: setattr(i, "traffic", split))
        server.call(server.server.dataplane.refresh("digits"))
        before = repository.get("digits")

        # a new version whose file does not load: the previous import keeps serving, and the index says why
        (small_repo / "digits" / "3").mkdir()
        (small_repo / "digits" / "3" / "model.onnx").write_bytes(b"not an onnx file")
        assert server.call(server.server.triton.poll_once()) == []
        assert "version 3" in server.server.triton.errors["digits"] and "could not be loaded" in server.server.triton.errors["digits"]
        assert repository.get("digits").to_dict() == before.to_dict()
        assert infer(server, "digits") is not None
        index = server.server.control.repository_index()
        refused = [e for e in index if e.model == "digits" and not e.ready]
        assert [(e.version, e.reason) for e in refused] == [(3, server.server.triton.errors["digits"])]
        assert {e.variant for e in index if e.model == "digits" and e.ready} == {"baseline", "v2", "int8"}

        # fixed, and version 2 changed too: v3 added, v2 replaced, baseline and int8 untouched, the split kept
        resaved(digits.onnx, small_repo / "digits" / "3" / "model.onnx", "version 3")
        resaved(digits.onnx, small_repo / "digits" / "2" / "model.onnx", "version 2, retrained")
        assert server.call(server.server.triton.poll_once()) == ["digits"]
        after = repository.get("digits")
        assert set(after.variants) == {"baseline", "v2", "v3", "int8"} and after.variants["v3"].version == 3
        assert after.traffic.weights == split.weights
        assert after.variants["int8"].to_dict() == before.variants["int8"].to_dict()
        assert after.variants["baseline"].to_dict() == before.variants["baseline"].to_dict()
        v2 = repository.variant_path(after, "v2")
        assert onnx.load(str(v2)).doc_string == "version 2, retrained"
        assert server.server.triton.errors == {} and not [e for e in server.server.control.repository_index() if not e.ready]
        assert set(server.server.dataplane.models["digits"].variants) == {"baseline", "v2", "v3", "int8"}

        # version 3 removed: its variant goes, its traffic share with it; the others stay
        shutil.rmtree(small_repo / "digits" / "3")
        assert server.call(server.server.triton.poll_once()) == ["digits"]
        assert set(repository.get("digits").variants) == {"baseline", "v2", "int8"}
    finally:
        server.stop()


def test_poll_moves_the_imports_own_traffic_to_a_new_latest_version(small_repo, tmp_path, digits):
    server = ServerHandle(tmp_path / "slimserve", model_repository=small_repo, model_control_mode="poll", repository_poll_secs=3600)
    try:
        assert server.server.repository.get("digits").traffic.weights == {"v2": 1.0}
        model_dir(small_repo, "digits", digits.onnx, None, versions=(3,), labels=False)
        assert server.call(server.server.triton.poll_once()) == ["digits"]
        assert server.server.repository.get("digits").traffic.weights == {"v3": 1.0}
    finally:
        server.stop()
