"""Triton's system shared memory extension: registered POSIX shared-memory regions, and tensors read from / written to them.

A region is only what was registered (key, offset, byte_size): every access is checked against it, and
against the file's current size, so a region that shrank or vanished answers INVALID_ARGUMENT instead of
a SIGBUS. Runs on the event-loop thread only (no locks).
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.client.codec import TensorCodecError, decode_raw, encode_raw
from slimserve.server.errors import AlreadyExists, InvalidArgument, NotFound, Unimplemented

SHM_DIR = Path("/dev/shm")
# shm_open's names: one leading slash at most, then no slash (no path of the node's file system can be named).
KEY_RE = re.compile(r"^/?[A-Za-z0-9_.+-]{1,250}$")


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class ShmRef:
    """A tensor's place in a region: from the request's shared_memory_region / _offset / _byte_size parameters."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class ShmInput:
    ref: ShmRef
    datatype: str
    shape: tuple[int, ...]


class _Region:
    __slots__ = ("fd", "map", "status")

    def __init__(self, status: RegionStatus, fd: int, mapped: mmap.mmap) -> None:
        self.status = status
        self.fd = fd
        self.map = mapped

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class SharedMemoryRegions:
    """The registered system shared-memory regions by name."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.directory = directory
        self._regions: dict[str, _Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> RegionStatus:
        if not name:
            raise InvalidArgument("shared memory region name is empty")
        if name in self._regions:
            raise AlreadyExists(f"shared memory region '{name}' is already registered; unregister it first")
        if not KEY_RE.match(key) or key.strip("/") in (".", ".."):
            raise InvalidArgument(f"shared memory key {key[:80]!r} is not a POSIX shared memory name (e.g. '/input_data')")
        if byte_size < 1:
            raise InvalidArgument(f"shared memory region '{name}': byte_size must be >= 1, got {byte_size}")
        try:
            fd = os.open(self.directory / key.lstrip("/"), os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise InvalidArgument(f"shared memory key '{key}' cannot be opened: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(f"shared memory key '{key}' is not a shared memory object")
            if offset + byte_size > info.st_size:
                raise InvalidArgument(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} exceeds the {info.st_size} bytes of '{key}'"
                )
            mapped = mmap.mmap(fd, info.st_size)
        except BaseException:
            os.close(fd)
            raise
        status = RegionStatus(name, key, offset, byte_size)
        self._regions[name] = _Region(status, fd, mapped)
        return status

    def unregister(self, name: str = "") -> None:
        """Unregisters one region, or every region when `name` is empty (Triton's rule: an unknown name is not an error)."""
        for region_name in [name] if name else list(self._regions):
            region = self._regions.pop(region_name, None)
            if region is not None:
                region.close()

    def status(self, name: str = "") -> list[RegionStatus]:
        if name:
            region = self._regions.get(name)
            if region is None:
                raise NotFound(f"shared memory region '{name}' is not registered")
            return [region.status]
        return [r.status for r in self._regions.values()]

    def close(self) -> None:
        self.unregister()

    def _span(self, ref: ShmRef, need: int) -> tuple[_Region, int]:
        """Where `need` bytes at the reference start, checked against the region and the file's size now."""
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidArgument(f"shared memory region '{ref.region}' is not registered")
        status = region.status
        if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > status.byte_size:
            raise InvalidArgument(
                f"shared memory region '{ref.region}': offset {ref.offset} + byte_size {ref.byte_size} "
                f"exceeds its {status.byte_size} registered bytes"
            )
        start = status.offset + ref.offset
        if os.fstat(region.fd).st_size < start + need:  # truncated since registration: reading it would SIGBUS
            raise InvalidArgument(f"shared memory region '{ref.region}' is smaller than when it was registered")
        return region, start

    def read_inputs(self, inputs: Mapping[str, ShmInput]) -> dict[str, np.ndarray]:
        arrays = {}
        for name, tensor in inputs.items():
            region, start = self._span(tensor.ref, tensor.ref.byte_size)
            data = bytes(region.map[start : start + tensor.ref.byte_size])
            try:
                arrays[name] = decode_raw(data, tensor.datatype, list(tensor.shape), name)
            except TensorCodecError as e:
                raise InvalidArgument(f"input '{name}' in shared memory region '{tensor.ref.region}': {e}") from None
        return arrays

    def write_output(self, name: str, array: np.ndarray, datatype: str, ref: ShmRef) -> None:
        data = encode_raw(array, datatype)
        if len(data) > ref.byte_size:
            raise InvalidArgument(f"output '{name}' needs {len(data)} bytes; shared memory region '{ref.region}' was given {ref.byte_size}")
        region, start = self._span(ref, len(data))
        region.map[start : start + len(data)] = data


def cuda_shared_memory_status(name: str = "") -> list[RegionStatus]:
    """CUDA shared memory is not served, so no region is ever registered: none to list, a named one is unknown."""
    if name:
        raise NotFound(f"CUDA shared memory region '{name}' is not registered (slimserve serves system shared memory only)")
    return []


def register_cuda_shared_memory(name: str) -> None:
    raise Unimplemented(
        f"CUDA shared memory region '{name}': slimserve serves system shared memory only (register_system_shared_memory); "
        "see docs/guides/triton-kserve.md, 'Using Triton's tools'"
    )
