"""The wheel: built from the working tree, its top level is `slimserve` alone, it holds every module of the four folders,
and installed into a fresh virtualenv its `slimserve` and `slimctl` commands run from that virtualenv.

What this installs for real: the wheel, with pip, into a new virtualenv (its files, console scripts and metadata).
What it borrows: the third-party dependencies (torch, grpc, ...), read from the project virtualenv's site-packages
through a path line in a .pth file. Such a line adds the directory only: the .pth files inside it (the editable
install's finder among them) are not run, so `slimserve` cannot resolve to the repository, and the test checks
that every imported `slimserve` module comes from the new virtualenv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"server": "slimserve/server", "optimizer": "slimserve/optimizer", "client": "slimserve/client", "protos": "slimserve/protos"}

pytestmark = pytest.mark.slow  # about 30-60 s: copy, build, a virtualenv with pip, install, three commands


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the working tree (tracked and untracked, not ignored files), built without network or build isolation."""
    source = tmp_path_factory.mktemp("source")
    files = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        path = ROOT / name
        if path.is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(path.read_bytes())
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, source, cwd=source)
    [built] = out.glob("slimserve-*.whl")
    return built


def test_the_wheel_installs_slimserve_alone_and_every_module_of_the_four_folders(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"slimserve", wheel.name.split("-py")[0] + ".dist-info"}
    expected = {
        f"{package}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, package in FOLDERS.items()
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    missing = sorted(expected - set(names))
    assert not missing, f"modules left out of the wheel (add their package to [tool.setuptools] packages): {missing}"
    assert "slimserve/protos/slimserve.proto" in names
    assert not any(n.startswith("slimserve/examples") or n.endswith("demo.py") for n in names)


def test_the_installed_commands_run_from_a_fresh_virtualenv(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).stdout.strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")  # the dependencies, not slimserve
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run(
        python,
        "-c",
        "import slimserve.server, slimserve.server.app, slimserve.client.cli, slimserve.optimizer.catalog, slimserve.protos.slimserve_pb2 as m;"
        "import sys; print('\\n'.join(sorted({x.__file__ for n, x in sys.modules.items() if n.startswith('slimserve.') and x.__file__})))",
        cwd=tmp_path,
        env=env,
    ).stdout.split()
    assert where and all(Path(f).is_relative_to(site) for f in where), f"slimserve imported from outside the new virtualenv: {where}"
    assert "start" in _run(venv / "bin" / "slimserve", "--help", cwd=tmp_path, env=env).stdout
    assert "register" in _run(venv / "bin" / "slimctl", "--help", cwd=tmp_path, env=env).stdout
    assert "quantize-static" in _run(venv / "bin" / "slimserve", "passes", cwd=tmp_path, env=env).stdout
