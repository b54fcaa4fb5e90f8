"""Generates the Python modules of protos/*.proto; `make proto` runs it, a test checks it is current."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on an include tree where protos/ sits at slimserve/protos, the package it installs as,
    so the generated modules import each other as `from slimserve.protos import ...`."""
    include = Path(protoc.__file__).parent / "_proto"
    tree = out_dir / "include"
    (tree / "slimserve").mkdir(parents=True)
    (tree / "slimserve" / "protos").symlink_to(ROOT / "protos", target_is_directory=True)
    args = [
        "protoc",
        f"-I{tree}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[f"slimserve/protos/{p.name}" for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: " + " ".join(args))
    return sorted((out_dir / "slimserve" / "protos").glob("*_pb2*.py*"))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            target = ROOT / "protos" / path.name
            target.write_bytes(path.read_bytes())
            print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
