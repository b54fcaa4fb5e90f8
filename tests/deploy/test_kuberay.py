"""The KubeRay layout (deploy/k8s/overlays/kuberay): optimizer jobs on a RayCluster, the serving replicas unchanged."""

from __future__ import annotations

import functools

import pytest

from tests.deploy.kubectl import render
from tests.deploy.test_kubernetes import DEPLOY, assert_valid, core_schema, env_of


@functools.cache
def rendered() -> list[dict]:
    return render(DEPLOY / "k8s/overlays/kuberay")


def named(kind: str, name: str) -> dict:
    [found] = [r for r in rendered() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def test_the_writer_sends_jobs_to_the_ray_head_and_serving_is_the_cpu_overlay():
    cluster = named("RayCluster", "slimserve-optimizers")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["namespace"] == "slimserve"
    writer = named("Deployment", "slimserve-writer")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(writer)
    # KubeRay names the head's service <cluster>-head-svc; 10001 is the Ray client port the head exposes.
    assert env["SLIMSERVE_JOB_RUNNER"] == f"ray://{cluster['metadata']['name']}-head-svc:10001"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "client", "containerPort": 10001, "protocol": "TCP"} in head["ports"]
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no job
    # Jobs declare what a worker offers, and the head, the workers and the writer run one image (Ray inside).
    [group] = cluster["spec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert float(env["SLIMSERVE_JOB_CPUS"]) <= float(worker["resources"]["requests"]["cpu"])
    assert head["image"] == worker["image"] == writer["image"]
    serving = named("Deployment", "slimserve")["spec"]["template"]["spec"]["containers"][0]
    assert "SLIMSERVE_JOB_RUNNER" not in env_of(serving)
    # Token authentication: the head, the workers and the writer's Ray drivers share one token (else Ray refuses the
    # writer, which Ray Client reports only as a connection timeout).
    for container in (head, worker, writer):
        assert env_of(container)["RAY_AUTH_MODE"] == "token"
        [token] = [e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"] == {"name": "slimserve-ray-token", "key": "auth_token"}


@pytest.mark.parametrize("role", ["head", "worker"])
def test_ray_containers_are_valid_kubernetes_containers(role):
    spec = named("RayCluster", "slimserve-optimizers")["spec"]
    template = spec["headGroupSpec"] if role == "head" else spec["workerGroupSpecs"][0]
    for container in template["template"]["spec"]["containers"]:
        assert_valid(core_schema("container-v1.json"), container, f"RayCluster {role} container {container['name']}")
