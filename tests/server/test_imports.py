"""A server of ONNX models never loads torch: importing it costs about 180 MB of resident memory and a second of start."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_starting_the_server_does_not_import_torch():
    code = "import sys, slimserve.server.app; heavy = [m for m in ('torch', 'onnx2torch') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        f"importing slimserve.server.app imported {result.stdout.strip()}: keep torch behind the .pt2 runtime's load"
    )
