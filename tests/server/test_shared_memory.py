"""System shared memory regions (server/inference/shared_memory.py): only what was registered is read or written, and a region
that shrank is refused rather than read (a SIGBUS)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from slimserve.server.errors import AlreadyExists, InvalidArgument, NotFound
from slimserve.server.inference.shared_memory import SharedMemoryRegistry, ShmInput, ShmRef


@pytest.fixture
def registry(tmp_path):
    registry = SharedMemoryRegistry(tmp_path)
    yield registry
    registry.close()


def region_file(tmp_path, key: str, data: bytes):
    (tmp_path / key).write_bytes(data)
    return tmp_path / key


def test_inputs_read_and_outputs_written_at_their_offsets(tmp_path, registry):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    region_file(tmp_path, "io", b"\0" * 16 + x.tobytes() + b"\0" * 64)
    registry.register("io", "/io", offset=16, byte_size=24 + 64)
    got = registry.read_inputs({"x": ShmInput(ShmRef("io", 0, 24), "FP32", (2, 3))})
    np.testing.assert_array_equal(got["x"], x)
    registry.write_output("y", x * 2, "FP32", ShmRef("io", 24, 64))
    np.testing.assert_array_equal(np.frombuffer((tmp_path / "io").read_bytes()[40:64], np.float32), (x * 2).ravel())
    assert [s.name for s in registry.status()] == ["io"] and registry.status("io")[0].offset == 16


def test_refusals_are_precise_and_change_nothing(tmp_path, registry):
    region_file(tmp_path, "small", b"\0" * 32)
    with pytest.raises(InvalidArgument, match="exceeds the 32 bytes"):
        registry.register("r", "/small", offset=8, byte_size=32)
    with pytest.raises(InvalidArgument, match="cannot be opened"):
        registry.register("r", "/absent", 0, 8)
    with pytest.raises(InvalidArgument, match="not a POSIX shared memory name"):
        registry.register("r", "/../small", 0, 8)
    registry.register("r", "small", 0, 32)
    with pytest.raises(AlreadyExists):
        registry.register("r", "/small", 0, 8)
    with pytest.raises(InvalidArgument, match="exceeds its 32 registered bytes"):
        registry.read_inputs({"x": ShmInput(ShmRef("r", 16, 32), "FP32", (8,))})
    with pytest.raises(InvalidArgument, match="needs 256 bytes of raw data"):
        registry.read_inputs({"x": ShmInput(ShmRef("r", 0, 32), "FP32", (64,))})
    with pytest.raises(InvalidArgument, match="needs 64 bytes"):
        registry.write_output("y", np.zeros(16, np.float32), "FP32", ShmRef("r", 0, 32))
    with pytest.raises(InvalidArgument, match="'nope' is not registered"):
        registry.read_inputs({"x": ShmInput(ShmRef("nope", 0, 4), "FP32", (1,))})
    with pytest.raises(NotFound):
        registry.status("nope")
    registry.unregister("nope")  # Triton's rule: nothing to do is not an error
    registry.unregister()
    assert registry.status() == []


def test_a_region_truncated_after_registration_is_refused_not_read(tmp_path, registry):
    path = region_file(tmp_path, "shrinks", b"\1" * 4096)
    registry.register("r", "/shrinks", 0, 4096)
    os.truncate(path, 0)
    with pytest.raises(InvalidArgument, match="smaller than when it was registered"):
        registry.read_inputs({"x": ShmInput(ShmRef("r", 0, 4096), "UINT8", (4096,))})
    with pytest.raises(InvalidArgument, match="smaller than when it was registered"):
        registry.write_output("y", np.zeros(4, np.uint8), "UINT8", ShmRef("r", 0, 4))
    path.unlink()  # unlinked while registered: the mapping stays valid until unregistered
    registry.unregister("r")
