#!/usr/bin/env python3
"""Prints the server's pip requirements for one image kind, read from pyproject.toml.

`cpu`: dependencies + [server]. `gpu`: the same with onnxruntime replaced by [gpu]'s
onnxruntime-gpu: both install the `onnxruntime` package and must never sit side by side.
Usage: python deploy/requirements.py cpu|gpu [PYPROJECT]
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement string ("onnxruntime>=1.20" -> "onnxruntime")."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def requirements(kind: str, pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = list(project["dependencies"]) + list(extras["server"])
    if kind == "gpu":
        reqs = [r for r in reqs if distribution(r) != "onnxruntime"] + list(extras["gpu"])
    elif kind != "cpu":
        raise SystemExit(f"requirements.py: kind must be cpu or gpu, got '{kind}'")
    return reqs


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__.strip().splitlines()[-1])
    default = Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(requirements(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) == 3 else default)))
