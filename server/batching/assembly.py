"""What a batch is, without running one: a variant's `BatchingConfig`, which requests may merge (`batch_key`),
and how a batched call's outputs split back into one answer per request (`split_outputs`)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimserve.server.errors import InvalidArgument

CONFIG_VERSION = 1


@dataclass(frozen=True)
class BatchingConfig:
    """How one variant batches. Saved with `to_dict`, read back (and checked) with `from_dict`."""

    enabled: bool = True
    max_batch_size: int = 32
    # The delay applies only while another call of this variant runs and a slot is free
    # (max_concurrency >= 2): with one call at a time, requests gather while it computes and go the
    # moment it ends, and a lone request goes at once. Measured (bench/bench_batching.py, 2-core CPU,
    # digits CNN at 0.06 ms for batch 1 and 0.4-0.55 ms for batch 32), 0, 0.5, 1 and 2 ms gave the same
    # throughput and p50 within noise; 0.5 ms, about one full-batch call, bounds what a second call
    # waits to fill while adding little to any request.
    max_queue_delay_ms: float = 0.5
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024  # requests waiting (not yet running); beyond it submit answers RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise InvalidArgument(f"batching: max_batch_size must be >= 1, got {self.max_batch_size}")
        if not self.max_queue_delay_ms >= 0:
            raise InvalidArgument(f"batching: max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_queue_size < 1:
            raise InvalidArgument(f"batching: max_queue_size must be >= 1, got {self.max_queue_size}")
        sizes = tuple(int(s) for s in self.preferred_batch_sizes)
        bad = [s for s in sizes if not 1 <= s <= self.max_batch_size]
        if bad:
            raise InvalidArgument(
                f"batching: preferred_batch_sizes {list(sizes)} must lie in 1..max_batch_size ({self.max_batch_size}); out of range: {bad}"
            )
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(set(sizes))))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "enabled": self.enabled,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_ms": self.max_queue_delay_ms,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "max_queue_size": self.max_queue_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BatchingConfig:
        d = dict(d or {})
        version = d.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise InvalidArgument(f"batching: config version {version} is not supported (this server reads version {CONFIG_VERSION})")
        known = {"enabled", "max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes", "max_queue_size"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgument(f"batching: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "preferred_batch_sizes" in d:
            d["preferred_batch_sizes"] = tuple(d["preferred_batch_sizes"] or ())
        return cls(**d)


class _Solo:
    """The batching key of a request that can merge with nothing (each instance is unequal to all others)."""

    __slots__ = ()


def batch_key(inputs: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[Hashable, int]:
    """What a request may merge with, and its number of samples (its dim 0)."""
    wanted = tuple(sorted(outputs)) if outputs else None
    if len(inputs) == 1:  # the common case, without the general path's list and sort
        ((name, array),) = inputs.items()
        if array.ndim == 0 or array.shape[0] < 1:
            return _Solo(), 1
        return (((name, array.dtype, array.shape[1:]),), wanted), array.shape[0]
    size = -1
    parts = []
    for name, array in inputs.items():
        if array.ndim == 0 or (size != -1 and array.shape[0] != size):
            return _Solo(), max(size, 1)
        size = array.shape[0]
        parts.append((name, array.dtype, array.shape[1:]))
    if size < 1:  # no inputs, or an empty batch: nothing to merge
        return _Solo(), 1
    parts.sort(key=lambda p: p[0])
    return (tuple(parts), wanted), size


def split_outputs(result: dict[str, np.ndarray], sizes: list[int], total: int) -> list[dict[str, np.ndarray]]:
    """One dict per request: rows [offset, offset + size) of every output whose dim 0 is the batch total;
    outputs without that batch dimension are shared whole."""
    parts: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    for name, array in result.items():
        if isinstance(array, np.ndarray) and array.ndim >= 1 and array.shape[0] == total:
            offset = 0
            for part, size in zip(parts, sizes):
                part[name] = array[offset : offset + size]
                offset += size
        else:
            for part in parts:
                part[name] = array
    return parts
