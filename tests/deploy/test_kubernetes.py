"""Kubernetes and KServe manifests: rendered with `kubectl kustomize`, validated offline against the Kubernetes schemas."""

from __future__ import annotations

import functools
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from slimserve.server.app import SERVICES
from slimserve.server.telemetry.pricing import DEFAULT_PRICES_PER_HOUR
from tests.deploy.conftest import DEPLOY
from tests.deploy.crd_schemas import SCHEMAS
from tests.deploy.kubectl import render

# Keys avoid the bare word "gpu": tests/conftest.py skips tests with a `gpu` keyword where CUDA is absent.
KUSTOMIZATIONS = {"overlay-cpu": DEPLOY / "k8s/overlays/cpu", "overlay-gpu": DEPLOY / "k8s/overlays/gpu", "kserve": DEPLOY / "kserve"}
# Native gRPC probes are GA since 1.27; check the oldest version we support and the newest schema we have.
KUBERNETES_VERSIONS = ("1.30.0", kv.latest_version() + ".0")
HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002


@functools.cache
def rendered(name: str) -> list[dict]:
    return render(KUSTOMIZATIONS[name])


SERVING = {"Deployment": "slimserve", "Service": "slimserve"}  # the writer has its own (see test below)


def one(name: str, kind: str, named: str | None = None) -> dict:
    named = named or SERVING.get(kind)
    found = [r for r in rendered(name) if r["kind"] == kind and (named is None or r["metadata"]["name"] == named)]
    assert len(found) == 1, f"{name}: {len(found)} {kind}s named {named}"
    return found[0]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_builtin_resources_match_the_kubernetes_schemas(name, version):
    checked = []
    for resource in rendered(name):
        if (resource["apiVersion"], resource["kind"]) in SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {resource['kind']}/{resource['metadata']['name']} on Kubernetes {version}: {e.message} at {list(e.path)}")
        checked.append(resource["kind"])
    assert checked or name == "kserve"


@functools.cache
def core_schema(filename: str, version: str = KUBERNETES_VERSIONS[0]):
    """A validator for one Kubernetes type (e.g. container-v1.json) from kubernetes-validate's strict schemas."""
    directory = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv.schema_contents(f"{directory}/{filename}", version)
    registry = Resource.from_contents(kv.schema_contents(f"{directory}/_definitions.json", version)) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=Resource.from_contents(schema) @ registry)


def assert_valid(validator, value, where: str) -> None:
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    assert not errors, f"{where}: " + "; ".join(f"{e.message} at {list(e.path)}" for e in errors[:5])


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_custom_resources_are_well_formed(name):
    for resource in rendered(name):
        key = (resource["apiVersion"], resource["kind"])
        if key not in SCHEMAS:
            continue
        where = f"{name}: {resource['kind']}/{resource['metadata']['name']}"
        assert_valid(jsonschema.Draft202012Validator(SCHEMAS[key]), resource, where)
        spec = resource["spec"]
        for container in spec.get("containers", []):
            assert_valid(core_schema("container-v1.json"), container, f"{where} container {container.get('name')}")
        for volume in spec.get("volumes", []):
            assert_valid(core_schema("volume-v1.json"), volume, f"{where} volume {volume.get('name')}")
        if "predictor" in spec:
            assert_valid(core_schema("resourcerequirements-v1.json"), spec["predictor"]["model"].get("resources", {}), f"{where} resources")


@pytest.mark.parametrize("name", ["overlay-cpu", "overlay-gpu"])
def test_deployment_is_wired_together(name):
    deployment, service = one(name, "Deployment"), one(name, "Service")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = pod["spec"]["containers"][0]
    env = env_of(container)
    assert env["SLIMSERVE_HOST"] == "0.0.0.0", "slimserve listens on loopback by default: unreachable in a pod"
    assert int(env["SLIMSERVE_GRPC_PORT"]) == GRPC_PORT and int(env["SLIMSERVE_METRICS_PORT"]) == METRICS_PORT
    assert int(env["SLIMSERVE_HTTP_PORT"]) == HTTP_PORT
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == GRPC_PORT
        assert grpc_probe.get("service", "") in ("", *SERVICES), f"{probe} asks the health of an unknown service"
    assert container["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"
    # Non-root, as the image.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["runAsUser"] != 0
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30, "must outlast slimserve's 30 s graceful shutdown"
    # Everything that points at the pods or at each other finds them.
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    pdb = one(name, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(name, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert container["resources"]["requests"]["cpu"], "a CPU utilization target needs a CPU request"
    monitor = one(name, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["repository"]["persistentVolumeClaim"]["claimName"]
    assert claim in {r["metadata"]["name"] for r in rendered(name) if r["kind"] == "PersistentVolumeClaim"}
    assert volumes["prices"]["configMap"]["name"] in {r["metadata"]["name"] for r in rendered(name) if r["kind"] == "ConfigMap"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["SLIMSERVE_REPOSITORY"].startswith(mounts["repository"] + "/")
    assert env["SLIMSERVE_PRICES"].startswith(mounts["prices"] + "/")
    assert {r["metadata"].get("namespace") for r in rendered(name) if r["kind"] != "Namespace"} == {"slimserve"}


@pytest.mark.parametrize("name", ["overlay-cpu", "overlay-gpu"])
def test_node_type_has_a_price_and_the_gpu_overlay_asks_for_a_gpu(name):
    container = one(name, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    node_type = env_of(container)["SLIMSERVE_NODE_TYPE"]
    prices = yaml.safe_load(one(name, "ConfigMap")["data"]["prices.yaml"])
    assert node_type in {**DEFAULT_PRICES_PER_HOUR, **prices}, f"node type '{node_type}' has no price: slimserve would refuse to start"
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == 1) if name == "overlay-gpu" else gpus is None
    assert one(name, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-" + name.removeprefix("overlay-"))


def test_prometheus_rule_carries_the_rule_files():
    groups = []
    for path in sorted((DEPLOY / "prometheus/rules").glob("*.yml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    assert one("overlay-cpu", "PrometheusRule")["spec"]["groups"] == groups


def test_kserve_runtime_serves_the_inference_service():
    runtime, isvc = one("kserve", "ServingRuntime"), one("kserve", "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    container = runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container"
    # KServe routes the protocol to the first port (h2c: HTTP/2, gRPC); raw deployment mode publishes the rest by number.
    assert container["ports"] == [
        {"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"},
        {"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"},
    ]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment", "Serverless allows one port"
    script = " ".join(container["args"])
    assert "/mnt/models" in script and f"--grpc-port {GRPC_PORT}" in script and "--host 0.0.0.0" in script
    assert f"--http-port {HTTP_PORT}" in script
    assert runtime["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(METRICS_PORT)
    assert container["readinessProbe"]["grpc"] == {"port": GRPC_PORT, "service": "inference.GRPCInferenceService"}
    assert re.match(r"^registry\.example\.com/slimserve:", container["image"])


@pytest.mark.parametrize("name", ["overlay-cpu", "overlay-gpu"])
def test_one_writer_and_read_only_replicas_share_the_repository(name):
    """slimserve locks a repository for one writer: the scaled replicas must run read-only."""
    serving, writer = one(name, "Deployment"), one(name, "Deployment", "slimserve-writer")
    serving_args = serving["spec"]["template"]["spec"]["containers"][0]["args"]
    writer_args = writer["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--read-only" in serving_args and "--poll-repository-s" in serving_args
    assert "--read-only" not in writer_args
    assert writer["spec"]["replicas"] == 1 and writer["spec"]["strategy"]["type"] == "Recreate"
    claims = {
        d["metadata"]["name"]: {
            v["persistentVolumeClaim"]["claimName"] for v in d["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v
        }
        for d in (serving, writer)
    }
    assert claims["slimserve"] == claims["slimserve-writer"]
    admin = one(name, "Service", "slimserve-admin")
    assert admin["spec"]["selector"].items() <= writer["spec"]["template"]["metadata"]["labels"].items()
    assert not admin["spec"]["selector"].items() <= serving["spec"]["template"]["metadata"]["labels"].items()
    hpa = one(name, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "slimserve"


def slimserve_containers(name: str) -> list[tuple[str, dict]]:
    """Every slimserve container a kustomization renders, with where it is: Deployments' pods and KServe runtimes."""
    found = []
    for resource in rendered(name):
        spec = resource.get("spec", {})
        for container in spec.get("template", {}).get("spec", spec).get("containers", []):
            found.append((f"{name}: {resource['kind']}/{resource['metadata']['name']} container {container['name']}", container))
    return found


def listens_on(container: dict, flag: str, variable: str) -> int:
    """The port slimserve in this container listens on: its `--flag N` argument, else the SLIMSERVE_* variable."""
    words = " ".join(container.get("args", [])).split()
    if flag in words:
        return int(words[words.index(flag) + 1])
    return int(env_of(container)[variable])


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_container_serves_and_exposes_the_rest_port_beside_grpc(name):
    containers = slimserve_containers(name)
    assert containers
    for where, container in containers:
        assert listens_on(container, "--http-port", "SLIMSERVE_HTTP_PORT") == HTTP_PORT, f"{where} does not serve REST on {HTTP_PORT}"
        assert listens_on(container, "--grpc-port", "SLIMSERVE_GRPC_PORT") == GRPC_PORT, where
        exposed = {p["containerPort"] for p in container["ports"]}
        assert {HTTP_PORT, GRPC_PORT} <= exposed, f"{where} exposes {sorted(exposed)}"
        # The probes stay on gRPC: REST is the same process, ready and stopping at the same moments.
        assert container["readinessProbe"]["grpc"]["port"] == GRPC_PORT, where


@pytest.mark.parametrize("name", ["overlay-cpu", "overlay-gpu"])
@pytest.mark.parametrize("service_name, deployment_name", [("slimserve", "slimserve"), ("slimserve-admin", "slimserve-writer")])
def test_services_route_rest_and_grpc_to_the_pods_ports(name, service_name, deployment_name):
    service, deployment = one(name, "Service", service_name), one(name, "Deployment", deployment_name)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    routed = {p["port"]: named.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert routed.get(HTTP_PORT) == HTTP_PORT, f"{service_name} does not route REST {HTTP_PORT} to the pods: {routed}"
    assert routed.get(GRPC_PORT) == GRPC_PORT, f"{service_name} does not route gRPC {GRPC_PORT} to the pods: {routed}"
    protocols = {p["port"]: p.get("appProtocol") for p in service["spec"]["ports"]}
    assert protocols[HTTP_PORT] == "http" and protocols[GRPC_PORT] == "kubernetes.io/h2c"
