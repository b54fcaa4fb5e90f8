"""Triton's own example clients (tests/e2e/triton_examples, unmodified) against slimserve over gRPC and HTTP/REST."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from slimserve.client.client import SlimServeClient
from tests.e2e.test_triton_http import _io, _save, simple_onnx, simple_string_onnx
from tests.helpers import ServerProcess

EXAMPLES = Path(__file__).parent / "triton_examples"
IMAGE_EXAMPLES = EXAMPLES / "image"  # their own folder: they take a model and an image besides -u


def simple_int8_onnx(path: Path) -> Path:
    """Triton's `simple_int8`: `simple` over INT8 tensors."""
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]), helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    return _save(path, nodes, _io("INPUT", T.INT8), _io("OUTPUT", T.INT8))


def simple_identity_onnx(path: Path) -> Path:
    """Triton's `simple_identity`: OUTPUT0 = INPUT0, BYTES [-1, 16]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "simple_identity",
        [helper.make_tensor_value_info("INPUT0", T.STRING, ["batch", 16])],
        [helper.make_tensor_value_info("OUTPUT0", T.STRING, ["batch", 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-examples")
    # --server-name triton: the health_metadata examples check the name ServerMetadata answers.
    server = ServerProcess(root / "repo", root / "server.log", "--server-name", "triton", http=True)
    try:
        with SlimServeClient(server.address) as client:
            for name, make in (
                ("simple", simple_onnx),
                ("simple_string", simple_string_onnx),
                ("simple_int8", simple_int8_onnx),
                ("simple_identity", simple_identity_onnx),
            ):
                client.register(name, make(root / f"{name}.onnx"))
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.py")))
def test_the_example_passes_unmodified(served, example):
    # reuse_infer_objects_client speaks HTTP by default, like every simple_http_* example.
    url = served.http_address if ("http" in example or example == "reuse_infer_objects_client") else served.address
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{example}.py"), "-u", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{example} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.mark.slow
def test_the_http_model_control_example_passes_on_a_repository_of_seven_models(tmp_path):
    """simple_http_model_control.py counts Triton's test repository (7 models), loads `simple` with a config override,
    refuses an invalid one and a wrong name with "failed to load", and unloads."""
    server = ServerProcess(tmp_path / "repo", tmp_path / "server.log", http=True)
    try:
        with SlimServeClient(server.address) as client:
            client.register("simple", simple_onnx(tmp_path / "simple.onnx"))
            for i in range(6):
                client.register(f"other{i}", simple_onnx(tmp_path / f"other{i}.onnx"))
        example = EXAMPLES / "model_control" / "simple_http_model_control.py"
        done = subprocess.run([sys.executable, str(example), "-u", server.http_address], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "PASS: model control" in done.stdout, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    finally:
        server.stop()


def densenet_onnx(path: Path) -> Path:
    """A tiny stand-in for Triton's `densenet_onnx` (random weights): data_0 FP32 [3, 224, 224] -> fc6_1 FP32 [1000],
    no batch dimension, as the image examples and grpc_client.py expect it."""
    rng = np.random.default_rng(0)
    weights = [
        helper.make_tensor("axes", T.INT64, [1], [0]),
        helper.make_tensor("conv", T.FLOAT, [8, 3, 8, 8], rng.normal(0, 0.1, 8 * 3 * 64).astype(np.float32)),
        helper.make_tensor("fc", T.FLOAT, [8, 1000], rng.normal(0, 1.0, 8000).astype(np.float32)),
        helper.make_tensor("bias", T.FLOAT, [1000], rng.normal(0, 0.1, 1000).astype(np.float32)),
        helper.make_tensor("shape", T.INT64, [1], [1000]),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["data_0", "axes"], ["batched"]),
        helper.make_node("Conv", ["batched", "conv"], ["features"], strides=[8, 8]),
        helper.make_node("Relu", ["features"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "bias"], ["logits"]),
        helper.make_node("Reshape", ["logits", "shape"], ["fc6_1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "densenet_onnx",
        [helper.make_tensor_value_info("data_0", T.FLOAT, [3, 224, 224])],
        [helper.make_tensor_value_info("fc6_1", T.FLOAT, [1000])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def image_served(tmp_path_factory):
    """slimserve serving `densenet_onnx` with its 1000 labels, loaded as a Triton user would: a load `config` naming the
    output's label_filename, and the file as a `file:` parameter; and a PNG written with PIL."""
    image = pytest.importorskip("PIL.Image", reason="Triton's image examples open images with Pillow (a dev dependency)")

    root = tmp_path_factory.mktemp("triton-image-examples")
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    image.fromarray(pixels, "RGB").save(root / "mug.png")
    server = ServerProcess(root / "repo", root / "server.log", http=True)
    try:
        with SlimServeClient(server.address) as client:
            client.register("densenet_onnx", densenet_onnx(root / "densenet_onnx.onnx"))
        (root / "densenet_labels.txt").write_text("".join(f"CLASS_{i}\n" for i in range(1000)))
        config = json.dumps({"output": [{"name": "fc6_1", "label_filename": "densenet_labels.txt"}]})
        # tritonclient in its own process: its generated protos and ours share the protobuf package name.
        load = (
            "import sys, tritonclient.grpc as g; "
            "g.InferenceServerClient(sys.argv[1]).load_model('densenet_onnx', config=sys.argv[2], "
            "files={'file:densenet_labels.txt': open(sys.argv[3], 'rb').read()})"
        )
        subprocess.run([sys.executable, "-c", load, server.address, config, str(root / "densenet_labels.txt")], check=True, timeout=60)
        yield server, root / "mug.png"
    finally:
        server.stop()


def expected_top3(model: Path, png: Path) -> list[int]:
    """The classes the examples must print: their own preprocessing (RGB, bilinear 224x224, INCEPTION, CHW) through ORT."""
    import onnxruntime as ort
    from PIL import Image

    pixels = np.array(Image.open(png).convert("RGB").resize((224, 224), Image.BILINEAR)).astype(np.float32)
    chw = np.transpose(pixels / 127.5 - 1, (2, 0, 1)).astype(np.float32)
    logits = ort.InferenceSession(str(model)).run(None, {"data_0": chw})[0]
    return [int(i) for i in np.argsort(-logits, kind="stable")[:3]]


def run_example(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(IMAGE_EXAMPLES / script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "flags", "protocol"),
    [
        ("image_client.py", (), "grpc"),
        ("image_client.py", ("-a",), "grpc"),
        ("image_client.py", ("--streaming",), "grpc"),
        ("image_client.py", (), "http"),
        ("grpc_image_client.py", (), "grpc"),
        ("grpc_image_client.py", ("--streaming",), "grpc"),
    ],
)
def test_the_image_examples_classify_with_labels_unmodified(image_served, tmp_path, script, flags, protocol):
    """They read ModelConfig (an input of 3 dims with format FORMAT_NCHW, max_batch_size 0), send the image and
    print the top 3 "score (index) = label" from the classification extension."""
    server, png = image_served
    if protocol == "http" and importlib.util.find_spec("attrdict") is None:  # imported only after the client patches collections
        pytest.skip("image_client.py reads HTTP answers with attrdict (a dev dependency)")
    url = server.http_address if protocol == "http" else server.address
    protocol_flag = ("-i", "grpc") if script == "image_client.py" and protocol == "grpc" else ()
    out = run_example(script, "-m", "densenet_onnx", "-c", "3", "-s", "INCEPTION", *protocol_flag, *flags, "-u", url, str(png))
    top3 = expected_top3(densenet_onnx(tmp_path / "densenet_onnx.onnx"), png)
    printed = [line.split("(")[1].split(")")[0] for line in out.splitlines() if " = CLASS_" in line]
    assert printed == [str(i) for i in top3], out
    assert all(f"({i}) = CLASS_{i}" in out for i in top3), out


@pytest.mark.slow
def test_grpc_client_example_reads_config_and_infers_on_densenet_onnx(image_served):
    server, _ = image_served
    out = run_example("grpc_client.py", "-u", server.address)
    assert "format: FORMAT_NCHW" in out and 'label_filename: "densenet_labels.txt"' in out and out.rstrip().endswith("PASS"), out
