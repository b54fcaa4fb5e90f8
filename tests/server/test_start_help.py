"""`slimserve start --help` reads at 80 columns: plain click help, every default whole (issue 26)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_start_help_fits_80_columns_with_defaults_whole():
    done = subprocess.run(
        [sys.executable, "-m", "slimserve.server.cli", "start", "--help"], capture_output=True, text=True, cwd=ROOT, env={"COLUMNS": "80"}
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "…" not in done.stdout
    assert "./slimserve-repository" in done.stdout and "--reuse-port" in done.stdout
    # In rich's boxed panel every help folded into 21 columns: 224 lines for about 35 options (6 a option). Plain help
    # takes under 4 lines an option, however many options later changes add.
    options = sum(1 for line in lines if line.lstrip().startswith("--"))
    assert len(lines) < 4 * options, (len(lines), options)
