"""System shared memory regions (server/inference/shared_memory.py): only what was registered is read or written, and a region
that shrank is refused rather than read (a SIGBUS)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from slimserve.server.errors import AlreadyExists, InvalidArgument, NotFound
from slimserve.server.inference.shared_memory import SharedMemoryRegions, ShmInput, ShmRef


@pytest.fixture
def regions(tmp_path):
    regions = SharedMemoryRegions(tmp_path)
    yield regions
    regions.close()


def region_file(tmp_path, key: str, data: bytes):
    (tmp_path / key).write_bytes(data)
    return tmp_path / key


def test_inputs_read_and_outputs_written_at_their_offsets(tmp_path, regions):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    region_file(tmp_path, "io", b"\0" * 16 + x.tobytes() + b"\0" * 64)
    regions.register("io", "/io", offset=16, byte_size=24 + 64)
    got = regions.read_inputs({"x": ShmInput(ShmRef("io", 0, 24), "FP32", (2, 3))})
    np.testing.assert_array_equal(got["x"], x)
    regions.write_output("y", x * 2, "FP32", ShmRef("io", 24, 64))
    np.testing.assert_array_equal(np.frombuffer((tmp_path / "io").read_bytes()[40:64], np.float32), (x * 2).ravel())
    assert [s.name for s in regions.status()] == ["io"] and regions.status("io")[0].offset == 16


def test_refusals_are_precise_and_change_nothing(tmp_path, regions):
    region_file(tmp_path, "small", b"\0" * 32)
    with pytest.raises(InvalidArgument, match="exceeds the 32 bytes"):
        regions.register("r", "/small", offset=8, byte_size=32)
    with pytest.raises(InvalidArgument, match="cannot be opened"):
        regions.register("r", "/absent", 0, 8)
    with pytest.raises(InvalidArgument, match="not a POSIX shared memory name"):
        regions.register("r", "/../small", 0, 8)
    regions.register("r", "small", 0, 32)
    with pytest.raises(AlreadyExists):
        regions.register("r", "/small", 0, 8)
    with pytest.raises(InvalidArgument, match="exceeds its 32 registered bytes"):
        regions.read_inputs({"x": ShmInput(ShmRef("r", 16, 32), "FP32", (8,))})
    with pytest.raises(InvalidArgument, match="needs 256 bytes of raw data"):
        regions.read_inputs({"x": ShmInput(ShmRef("r", 0, 32), "FP32", (64,))})
    with pytest.raises(InvalidArgument, match="needs 64 bytes"):
        regions.write_output("y", np.zeros(16, np.float32), "FP32", ShmRef("r", 0, 32))
    with pytest.raises(InvalidArgument, match="'nope' is not registered"):
        regions.read_inputs({"x": ShmInput(ShmRef("nope", 0, 4), "FP32", (1,))})
    with pytest.raises(NotFound):
        regions.status("nope")
    regions.unregister("nope")  # Triton's rule: nothing to do is not an error
    regions.unregister()
    assert regions.status() == []


def test_a_region_truncated_after_registration_is_refused_not_read(tmp_path, regions):
    path = region_file(tmp_path, "shrinks", b"\1" * 4096)
    regions.register("r", "/shrinks", 0, 4096)
    os.truncate(path, 0)
    with pytest.raises(InvalidArgument, match="smaller than when it was registered"):
        regions.read_inputs({"x": ShmInput(ShmRef("r", 0, 4096), "UINT8", (4096,))})
    with pytest.raises(InvalidArgument, match="smaller than when it was registered"):
        regions.write_output("y", np.zeros(4, np.uint8), "UINT8", ShmRef("r", 0, 4))
    path.unlink()  # unlinked while registered: the mapping stays valid until unregistered
    regions.unregister("r")
