"""Registration: what is accepted, what is refused with which message, and that nothing half-made remains."""

import json
import os
import pickle
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest

from slimserve.client.client import SlimServeClientError
from slimserve.client.transport import sha256_of
from slimserve.protos import slimserve_pb2 as spb
from slimserve.protos import slimserve_pb2_grpc as spb_grpc


def staging_is_empty(server) -> bool:
    return not any((server.settings.repository / ".staging").iterdir())


def refused(client, *args, **kwargs) -> SlimServeClientError:
    with pytest.raises(SlimServeClientError) as e:
        client.register(*args, **kwargs)
    return e.value


def test_register_lists_and_deletes(client, digits, server):
    record = client.register("digits", digits.onnx, data=digits.data, train=digits.train, calibration=digits.calibration)
    assert record["datasets"] == ["calibration", "data", "train"]
    assert [v["name"] for v in record["variants"]] == ["baseline"]
    assert record["variants"][0]["runtime"] == "onnxruntime"
    assert record["variants"][0]["size_bytes"] == digits.onnx.stat().st_size
    assert [m["name"] for m in client.models()] == ["digits"]
    stored = server.settings.repository / "models" / "digits"
    assert (stored / "variants" / "baseline" / "model.onnx").read_bytes() == digits.onnx.read_bytes()
    assert json.loads((stored / "manifest.json").read_text())["traffic"]["weights"] == {"baseline": 1.0}
    client.delete("digits")
    assert client.models() == [] and not stored.exists()
    assert refused_delete(client, "digits") == ("NOT_FOUND", "Request for unknown model: 'digits' is not registered")


def refused_delete(client, name):
    with pytest.raises(SlimServeClientError) as e:
        client.delete(name)
    return e.value.code, e.value.message


def test_duplicate_name(client, digits):
    client.register("digits", digits.onnx)
    e = refused(client, "digits", digits.pt2)
    assert e.code == "ALREADY_EXISTS" and "already registered" in e.message


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "a" * 65, ".hidden", "x..y"])
def test_bad_names(client, digits, name):
    e = refused(client, name, digits.onnx)
    assert e.code == "INVALID_ARGUMENT" and "model name" in e.message


def test_unsupported_file_type(client, tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"w": 1}))
    e = refused(client, "m", path)
    assert e.code == "INVALID_ARGUMENT" and "accepts ONNX (.onnx) and torch.export archives (.pt2)" in e.message


def test_garbage_onnx(client, tmp_path, server):
    path = tmp_path / "broken.onnx"
    path.write_bytes(os.urandom(4096))
    e = refused(client, "m", path)
    assert e.code == "INVALID_ARGUMENT" and "'broken.onnx'" in e.message
    assert client.models() == [] and staging_is_empty(server)


def test_zip_that_is_not_an_export_archive(client, tmp_path):
    path = tmp_path / "fake.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a model")
    e = refused(client, "m", path)
    assert e.code == "INVALID_ARGUMENT" and "could not be loaded as a torch.export archive" in e.message


def test_dataset_must_name_model_inputs(client, digits, tmp_path, server):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 1, 8, 8), np.float32))
    e = refused(client, "digits", digits.onnx, data=bad)
    assert e.code == "INVALID_ARGUMENT"
    assert "data .npz has no array for input 'x' (it holds: images)" in e.message
    assert client.models() == [] and staging_is_empty(server)


def test_dataset_shape_checked(client, digits, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    e = refused(client, "digits", digits.onnx, train=bad)
    assert "train .npz array 'x' has shape [4, 8, 8], the model expects FP32 [-1,1,8,8]" in e.message


def test_object_arrays_in_npz_are_never_unpickled(client, digits, tmp_path):
    bad = tmp_path / "objects.npz"
    np.savez(bad, x=np.array([{"a": 1}], dtype=object))
    e = refused(client, "digits", digits.onnx, data=bad)
    assert e.code == "INVALID_ARGUMENT" and "pickle" in e.message


class Payload:
    """Unpickling this creates a marker file: proof that code from an upload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def poisoned_pt2(source: Path, target: Path, marker: Path) -> Path:
    """A real .pt2 whose first weight is declared pickled and carries a code-running pickle."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                victim = first["path_name"]
                data = json.dumps(config).encode()
            dst.writestr(item, data)
        prefix = next(n for n in src.namelist() if n.endswith("model_weights_config.json")).rsplit("/", 1)[0]
    with zipfile.ZipFile(target) as z:
        names = z.namelist()
    # Rewrite the weight file with the payload (zip cannot replace in place: rebuild).
    rebuilt = target.with_suffix(".tmp")
    with zipfile.ZipFile(target) as src, zipfile.ZipFile(rebuilt, "w") as dst:
        for name in names:
            data = src.read(name)
            if name == f"{prefix}/{victim}":
                data = pickle.dumps(Payload(marker))
            dst.writestr(name, data)
    rebuilt.replace(target)
    return target


def test_malicious_pt2_never_runs(client, digits, tmp_path, server):
    import torch

    marker = tmp_path / "pwned"
    evil = poisoned_pt2(digits.pt2, tmp_path / "evil.pt2", marker)
    # The payload is live: torch's own loader runs it.
    try:
        torch.export.load(str(evil))
    except Exception:
        pass
    assert marker.exists(), "the test payload should run under torch.export.load"
    marker.unlink()

    e = refused(client, "evil", evil)
    assert e.code == "INVALID_ARGUMENT"
    assert "never unpickles" in e.message
    assert not marker.exists()
    assert client.models() == [] and staging_is_empty(server)


def raw_register(channel, messages):
    stub = spb_grpc.ModelRegistryStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Register(iter(messages))
    return e.value.code(), e.value.details()


def header_for(path: Path, **overrides) -> spb.RegisterRequest:
    f = spb.UploadFile(role="model", filename=path.name, size_bytes=path.stat().st_size, sha256=sha256_of(path))
    for k, v in overrides.items():
        setattr(f, k, v)
    return spb.RegisterRequest(header=spb.RegisterHeader(name="m", files=[f]))


def test_corrupted_and_truncated_uploads(client, digits, server):
    data = digits.onnx.read_bytes()
    flipped = bytes([data[0] ^ 0xFF]) + data[1:]
    code, details = raw_register(client.channel, [header_for(digits.onnx), spb.RegisterRequest(chunk=spb.FileChunk(data=flipped))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "arrived corrupted" in details
    code, details = raw_register(client.channel, [header_for(digits.onnx), spb.RegisterRequest(chunk=spb.FileChunk(data=data[:100]))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"after 100 of {len(data)} bytes" in details
    code, details = raw_register(client.channel, [spb.RegisterRequest(chunk=spb.FileChunk(data=data))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "starts with a RegisterHeader" in details
    assert client.models() == [] and staging_is_empty(server)


def test_upload_size_limit(server_factory, digits):
    from slimserve.client.client import SlimServeClient

    server = server_factory(max_upload_bytes=1000)
    with SlimServeClient(server.address) as c:
        e = refused(c, "m", digits.onnx)
    assert e.code == "INVALID_ARGUMENT" and "exceeds the server's limit of 1000 bytes" in e.message


def test_crash_leftovers_are_cleared_at_start(server_factory, tmp_path, digits):
    from slimserve.client.client import SlimServeClient

    repo = tmp_path / "repo"
    first = server_factory(repo)
    with SlimServeClient(first.address) as c:
        c.register("digits", digits.onnx)
    first.stop()
    # What a kill -9 could leave: a staged upload, and a model directory whose manifest was never written.
    (repo / ".staging" / "abc123").mkdir()
    (repo / ".staging" / "abc123" / "upload-0.onnx").write_bytes(b"partial")
    (repo / "models" / "half").mkdir()
    (repo / "models" / "half" / "variants").mkdir()
    second = server_factory(repo)
    with SlimServeClient(second.address) as c:
        assert [m["name"] for m in c.models()] == ["digits"]
    assert not (repo / "models" / "half").exists()
    assert not (repo / ".staging" / "abc123").exists()
    # The re-measure of the baseline at start runs as a job with a staging of its own; a stop leaves none behind.
    second.stop()
    assert not any((repo / ".staging").iterdir()), list((repo / ".staging").iterdir())


def test_datasets_follow_each_inputs_batch_axis():
    """A state batched on axis 1, a 0-d sample rate and a batch fixed to 1 take data of N samples (slimserve.optimizer.data)."""
    from slimserve.server.errors import InvalidArgument
    from slimserve.server.runtimes.base import TensorSpec
    from slimserve.server.store.manifest import check_dataset

    vad = [TensorSpec("x", "FP32", (-1, 16)), TensorSpec("state", "FP32", (2, -1, 8)), TensorSpec("sr", "INT64", ())]
    check_dataset(
        "data", {"x": ("float32", (48, 16)), "state": ("float32", (2, 48, 8)), "sr": ("int64", ()), "labels": ("int64", (48,))}, vad
    )
    check_dataset("data", {"image": ("float32", (48, 3, 16, 16))}, [TensorSpec("image", "FP32", (1, 3, 16, 16))])
    with pytest.raises(InvalidArgument, match=r"disagree on the number of samples: \{'x': 48, 'state': 40"):
        check_dataset("data", {"x": ("float32", (48, 16)), "state": ("float32", (2, 40, 8)), "sr": ("int64", ())}, vad)
    with pytest.raises(InvalidArgument, match=r"array 'sr' has shape \[48\]; input 'sr' takes one value per model, INT64 \[\]"):
        check_dataset("data", {"x": ("float32", (48, 16)), "state": ("float32", (2, 48, 8)), "sr": ("int64", (48,))}, vad)
