"""The servers bench.serving measures, as subprocesses on free ports: slimserve, KServe and MLServer (each in its own
virtualenv), and the floor server; the digits CNN they all serve; a Target (a server and the request bytes sent to it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import HERE, RESULTS, ROOT, free_port, say, slimserve_command, wait_quiet, wait_until

CACHE = RESULTS / "serving-cache"
VENVS = HERE / ".venvs"
PEERS = HERE / "peers"
MODEL = "digits"

# Peers and their pins: the versions the targets were measured with, onnxruntime as ours.
PEER_PACKAGES = {
    "kserve": ["kserve==0.21.0"],
    # uvloop 0.22 made get_event_loop() raise outside a running loop, which kills MLServer 1.7.1's workers.
    "mlserver": ["mlserver==1.7.1", "uvloop==0.21.0"],
}
# The console scripts a peer is started with, besides python.
PEER_COMMANDS: dict[str, tuple[str, ...]] = {"mlserver": ("mlserver",)}


def ort_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime")


@dataclass(frozen=True)
class ModelFiles:
    """A model as the benchmark serves it: the ONNX file, its data files and the inputs requests carry."""

    onnx: Path
    data: Path  # evaluation .npz: one array per input (+ labels)
    calibration: Path
    sample: dict[str, np.ndarray]  # one request's inputs (batch 1)
    pool: dict[str, np.ndarray]  # rows that in-process batches are cut from
    name: str = MODEL
    title: str = "digits CNN (slimserve.optimizer.zoo, width 32), ONNX"
    output_shape: tuple[int, ...] = (1, 10)
    train: Path | None = None


def prepare_model(fresh: bool) -> ModelFiles:
    """Trains and exports the digits CNN once; later runs reuse bench/results/serving-cache/."""
    from slimserve.optimizer.zoo import load_digits_splits

    train, test = load_digits_splits()
    onnx_path, data, calib = CACHE / "digits.onnx", CACHE / "eval.npz", CACHE / "calibration.npz"
    if fresh or not onnx_path.exists():
        import torch

        from slimserve.optimizer.zoo import export_onnx, train_digits_cnn

        say("training the digits CNN and exporting it to ONNX")
        CACHE.mkdir(parents=True, exist_ok=True)
        model, accuracy = train_digits_cnn()
        tmp = CACHE / "digits.onnx.tmp"
        export_onnx(model, tmp, torch.from_numpy(test.x[:2]))
        os.replace(tmp, onnx_path)
        say(f"digits CNN test accuracy {accuracy:.3f}")
    if fresh or not data.exists():
        np.savez(data, x=test.x, labels=test.y)
        np.savez(calib, x=train.x[:256])
    return ModelFiles(onnx_path, data, calib, {"x": test.x[:1].copy()}, {"x": test.x})


@dataclass
class Server:
    """A model server subprocess on 127.0.0.1:port, its log in bench/results/logs/."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        logs = RESULTS / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.name}.log"
        log = open(self.log_path, "w")  # noqa: SIM115  the server process writes it until it stops
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, model: str, timeout: float) -> None:
        """Polls ServerReady and ModelReady over gRPC; raises with the log's tail if the server dies or times out."""
        import grpc

        from slimserve.protos import inference_pb2 as pb
        from slimserve.protos import inference_pb2_grpc as pb_grpc

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")
            return stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready and (
                not model or stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1.0).ready
            )

        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                wait_until(ready, f"{self.name} to be ready", timeout, interval=0.25, ignore=(grpc.RpcError,))
            except TimeoutError:
                raise RuntimeError(f"{self.name} was not ready on {self.address} within {timeout:.0f} s:\n{self.log_tail()}") from None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        except ProcessLookupError:
            pass


@dataclass
class Target:
    """One row of the serving table: a server and the request bytes sent to it."""

    name: str
    kind: str  # slimserve | variant | peer | floor
    server: Server
    payload: bytes | tuple[bytes, ...]  # one request, or several sent in turn (a workload of real sentences)
    note: str = ""
    stream: bool = False  # requests over one ModelStreamInfer stream per client process, not unary calls


def start_slimserve(
    files: ModelFiles, variants: list[str], fresh: bool, extra_flags: tuple[str, ...] = (), extra_models: tuple[ModelFiles, ...] = ()
) -> tuple[Server, list[str]]:
    """slimserve on a cached repository (bench/results/serving-cache/repository); registers and optimizes what is missing.

    `extra_models` are registered beside it (a variant file made offline, served as a model of its own).
    Returns the server and the variants that are ready (a recipe that fails is reported and left out).
    """
    from slimserve.client.client import SlimServeClient, SlimServeClientError

    repo = CACHE / "repository"
    if fresh and repo.exists():
        shutil.rmtree(repo)
    port = free_port()
    server = Server("slimserve", slimserve_command(repo, port, *extra_flags), port)
    server.start()
    server.wait_ready("", 120)
    ready: list[str] = []
    with SlimServeClient(server.address) as client:
        for i, model in enumerate((files, *extra_models)):
            have = _registered(client, model)
            for recipe in variants if i == 0 else ():
                if have.get(recipe) == "ready":
                    ready.append(recipe)
                    continue
                say(f"slimserve: optimizing with {recipe} (once; the repository is cached)")
                try:
                    client.optimize(model.name, recipe, variant_name=recipe)
                    ready.append(recipe)
                except SlimServeClientError as e:
                    say(f"variant {recipe} skipped: optimize failed: {e}")
    for model in (files, *extra_models):
        server.wait_ready(model.name, 60)
    # Registration measures the baseline in the background: wait for that (or any other work) to end.
    # A real model's measurement takes minutes on a small CPU, and a server measuring while it serves loses the race.
    quiet_s = 180 if files.name == MODEL else 900
    if not wait_quiet(server.process.pid, quiet_s):
        say(f"slimserve still busy after {quiet_s} s; measuring anyway")
    return server, ready


def _registered(client, files: ModelFiles) -> dict[str, str]:
    """The model on record with its baseline ready (registered now if it was not); its variants' statuses by name."""
    from slimserve.client.client import SlimServeClientError

    try:
        record = client.model(files.name)
    except SlimServeClientError as e:
        if e.code != "NOT_FOUND":
            raise
        record = None
    if record is not None and not any(v["name"] == "baseline" and v["status"] == "ready" for v in record["variants"]):
        client.delete(files.name)
        record = None
    if record is None:
        say(f"registering {files.name} ({files.onnx.name}) with slimserve")
        record = client.register(files.name, files.onnx, data=files.data, calibration=files.calibration)
    return {v["name"]: v["status"] for v in record["variants"]}


def _runnable(script: Path) -> bool:
    """Whether a console script exists and its #! interpreter does."""
    if not script.exists():
        return False
    first = script.read_bytes()[:512].split(b"\n", 1)[0]
    return not first.startswith(b"#!") or Path(first[2:].decode(errors="replace").strip().split()[0]).exists()


def ensure_venv(name: str, rebuild: bool) -> tuple[Path | None, str]:
    """bench/.venvs/NAME with the peer's pinned packages; (python, '') or (None, why it cannot be had)."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    pins = [*PEER_PACKAGES[name], f"onnxruntime=={ort_version()}"]
    marker = venv / ".installed"
    # A venv copied from elsewhere keeps its marker and python, but its console scripts (bin/mlserver) name the old
    # path's interpreter: exec then fails with "No such file or directory" for a file that is there.
    commands = [venv / "bin" / c for c in PEER_COMMANDS.get(name, ())]
    if not rebuild and marker.exists() and marker.read_text().split() == pins and python.exists() and all(map(_runnable, commands)):
        return python, ""
    if venv.exists():
        shutil.rmtree(venv)
    say(f"creating {venv} with {' '.join(pins)} (first run only; takes a minute or two)")
    base = getattr(sys, "_base_executable", sys.executable)
    made = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        return None, f"python -m venv {venv} failed: {made.stderr.strip().splitlines()[-1:]}"
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins], capture_output=True, text=True
    )
    if pip.returncode != 0:
        errors = [ln for ln in pip.stderr.splitlines() if ln.startswith("ERROR")] or pip.stderr.strip().splitlines()[-3:]
        return None, f"pip install {' '.join(pins)} into {venv} failed: {' | '.join(e[:200] for e in errors)}"
    marker.write_text(" ".join(pins) + "\n")
    return python, ""


def start_kserve(python: Path, files: ModelFiles, intra_op: int) -> Server:
    port = free_port()
    argv = [
        str(python),
        str(PEERS / "kserve_server.py"),
        "--model-file",
        str(files.onnx),
        "--model-name",
        files.name,
        "--intra-op-threads",
        str(intra_op),
        "--http_port",
        str(free_port()),
        "--grpc_port",
        str(port),
        "--enable_latency_logging",
        "false",
        "--configure_logging",
        "false",
    ]
    return Server("kserve", argv, port)


def start_floor(files: ModelFiles, with_model: bool = False, intra_op: int = 1) -> Server:
    """bench/peers/floor_server.py in our own virtualenv: parse the request, answer fixed bytes
    (or, `with_model`, run the model on the loop and answer its output)."""
    port = free_port()
    argv = [sys.executable, str(PEERS / "floor_server.py"), "--port", str(port), "--model-name", files.name, "--outputs", "10"]
    if with_model:
        argv += ["--model-file", str(files.onnx), "--intra-op-threads", str(intra_op)]
    return Server("floor-model" if with_model else "floor", argv, port, env={"PYTHONPATH": f"{ROOT}{os.pathsep}{PEERS}"})


def start_mlserver(python: Path, files: ModelFiles, intra_op: int, batch: int, batch_time_s: float) -> Server:
    port = free_port()
    root = CACHE / "mlserver"
    if root.exists():
        shutil.rmtree(root)
    (root / files.name).mkdir(parents=True)
    (root / "settings.json").write_text(
        json.dumps(
            {
                "debug": False,
                "host": "127.0.0.1",
                "http_port": free_port(),
                "grpc_port": port,
                "metrics_port": free_port(),
                "metrics_dir": str(root / ".metrics"),
            },
            indent=2,
        )
    )
    (root / files.name / "model-settings.json").write_text(
        json.dumps(
            {
                "name": files.name,
                "implementation": "mlserver_runtime.OnnxRuntimeModel",
                "max_batch_size": batch,
                "max_batch_time": batch_time_s,
                "parameters": {"extra": {"model_file": str(files.onnx), "intra_op_threads": intra_op}},
            },
            indent=2,
        )
    )
    argv = [str(python.with_name("mlserver")), "start", str(root)]
    return Server("mlserver", argv, port, env={"PYTHONPATH": str(PEERS)}, cwd=root)
