"""Renders our kustomizations: with `kustomize` or `kubectl kustomize` when one is installed, else in Python.

The Python renderer knows only what deploy/ uses (resources, namespace, labels without selectors,
images, strategic-merge patches of maps and of lists keyed by `name`); test_kubernetes.py checks
that it agrees with the real kustomize wherever one is present.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume", "StorageClass"}


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_with_binary(directory: Path) -> list[dict[str, Any]]:
    command = kustomize_command()
    assert command is not None, "no kustomize or kubectl on PATH"
    out = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(command)} {directory} failed: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render(directory: Path) -> list[dict[str, Any]]:
    """The rendered resources of a kustomization directory."""
    return render_with_binary(directory) if kustomize_command() else render_in_python(directory)


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in base + patch):
        out = [copy.deepcopy(i) for i in base]
        for item in patch:
            index = next((n for n, old in enumerate(out) if old["name"] == item["name"]), None)
            if index is None:
                out.append(copy.deepcopy(item))
            else:
                out[index] = _merge(out[index], item)
        return out
    return copy.deepcopy(patch)


def _containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = resource.get("spec", {})
    found = list(spec.get("containers", []))
    found += spec.get("template", {}).get("spec", {}).get("containers", [])
    found += spec.get("template", {}).get("spec", {}).get("initContainers", [])
    return found


def render_in_python(directory: Path) -> list[dict[str, Any]]:
    config = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(config) - {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
    assert not unknown, f"{directory}: the Python renderer does not know {sorted(unknown)}; install kustomize or kubectl"
    resources: list[dict[str, Any]] = []
    for entry in config.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += render_in_python(path)
        else:
            resources += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch_entry in config.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{directory}: only `patches: - path:` (strategic merge) is supported"
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        matches = [
            i for i, r in enumerate(resources)
            if r["kind"] == patch["kind"] and r["metadata"]["name"] == patch["metadata"]["name"]
        ]
        assert len(matches) == 1, f"{patch_entry['path']} matches {len(matches)} resources"
        resources[matches[0]] = _merge(resources[matches[0]], patch)
    for item in config.get("labels", []):
        assert not item.get("includeSelectors") and not item.get("includeTemplates"), "labels go on metadata only"
        for resource in resources:
            resource.setdefault("metadata", {}).setdefault("labels", {}).update(item["pairs"])
    if "namespace" in config:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = config["namespace"]
    for image in config.get("images", []):
        for resource in resources:
            for container in _containers(resource):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return resources
