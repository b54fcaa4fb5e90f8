"""The server's log of a newcomer's first run (register, infer, optimize) holds no warning and no traceback (issue 26)."""

from __future__ import annotations

import logging
import re
import socket
import warnings

import numpy as np
import pytest

from tests.helpers import ServerProcess, wait_until

WARNING_OR_WORSE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Warning:|^W\d{4} |Traceback")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny MLP as torch.onnx.export writes it by default (weights in a side file) and as a .pt2, with data."""
    import torch

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    example = (torch.randn(2, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, folder / "tiny.onnx", input_names=["x"], output_names=["y"], dynamic_shapes=({0: "batch"},))
        program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, folder / "tiny.pt2")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(folder / "onnx.npz", x=x, labels=labels)
    np.savez(folder / "pt2.npz", input=x, labels=labels)
    return folder


@pytest.mark.slow
def test_register_infer_optimize_log_no_warning_and_no_traceback(models, tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess(tmp_path / "repository", log, "--log-level", "INFO", http=True)
    try:
        with server.client() as c:
            c.register("tiny", models / "tiny.onnx", data=models / "onnx.npz")
            c.register("tp", models / "tiny.pt2", data=models / "pt2.npz")
            x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
            for _ in range(3):
                c.infer("tiny", {"x": x})
                c.infer("tp", {"input": x})
            c.optimize("tiny", "quantize-dynamic")
            c.optimize("tp", "quantize-dynamic")  # through torch.onnx.export in the server
            c.infer("tiny", {"x": x}, variant="quantize-dynamic")
        text = log.read_text(errors="replace")
        noisy = [line for line in text.splitlines() if WARNING_OR_WORSE.search(line)]
        assert not noisy, "\n".join(noisy)
        assert text.count("request ") == 0  # requests are logged at debug level only

        # A gRPC client dialling the REST port: one warning line that says so, no traceback.
        host, port = server.http_address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(64))
            s.recv(1024)
        wait_until(lambda: "HTTP port" in log.read_text(), "the wrong-protocol warning", 30)
        new = log.read_text(errors="replace")[len(text) :].splitlines()
        assert len(new) == 1 and "WARNING" in new[0] and "gRPC" in new[0], new
    finally:
        server.stop()


def test_one_debug_line_per_request(server, echo_onnx, caplog):
    from slimserve.client.client import SlimServeClient
    from tests.conftest import echo_arrays

    with SlimServeClient(server.address) as c:
        c.register("echo", echo_onnx)
        with caplog.at_level(logging.INFO, logger="slimserve.server.inference.dataplane"):
            c.infer("echo", echo_arrays())
        assert not [r for r in caplog.records if r.getMessage().startswith("request ")]
        with caplog.at_level(logging.DEBUG, logger="slimserve.server.inference.dataplane"):
            for _ in range(3):
                c.infer("echo", echo_arrays())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert len(lines) == 3 and all("echo/baseline OK in" in line for line in lines), lines
