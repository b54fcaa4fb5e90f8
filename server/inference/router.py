"""The router of one model: picks each request's primary variant from a traffic policy (store/traffic.py).

Per-request, immutable and pure: a new policy builds a new router, swapped in at once.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Mapping
from hashlib import blake2b
from typing import Any

from slimserve.server.errors import InvalidArgument
from slimserve.server.store.traffic import TrafficPolicy

_TWO_64 = float(2**64)


def sticky_point(value: str) -> float:
    """A stable point in [0, 1) for a sticky value: the same on every process and restart (unlike hash())."""
    digest = blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


class Router:
    """Picks the primary variant of each request from a policy; immutable, so swap a new one in on change.

    Variants are laid out in name order on [0, 1) by their weights; a random point (or the sticky
    value's hash point) falls into one. The same sticky value keeps its variant while weights stay.
    """

    __slots__ = ("_cumulative", "_names", "_only", "_random", "_shadows", "policy")

    def __init__(self, policy: TrafficPolicy, seed: int | None = None) -> None:
        self.policy = policy
        names = sorted(v for v, w in policy.weights.items() if w > 0)
        if not names:
            raise InvalidArgument("a router needs at least one variant with a weight > 0")
        total = sum(policy.weights[n] for n in names)
        cumulative, acc = [], 0.0
        for n in names:
            acc += policy.weights[n] / total
            cumulative.append(acc)
        cumulative[-1] = 1.0  # rounding must not leave a gap at the top
        self._names = tuple(names)
        # bisect_right over the upper edges, excluding the last (1.0): index == chosen variant.
        self._cumulative = tuple(cumulative[:-1])
        self._only = names[0] if len(names) == 1 else None
        self._random = random.Random(seed).random
        self._shadows = policy.shadows

    @property
    def shadows(self) -> tuple[str, ...]:
        return self._shadows

    @property
    def sticky_parameter(self) -> str | None:
        return self.policy.sticky_parameter

    def choose(self, sticky_value: str | None = None) -> str:
        """The primary variant for one request: by weight at random, or by the sticky value's stable hash."""
        if self._only is not None:
            return self._only
        point = self._random() if sticky_value is None else sticky_point(sticky_value)
        return self._names[bisect_right(self._cumulative, point)]

    def choose_for(self, parameters: Mapping[str, Any] | None) -> str:
        """`choose` with the sticky value taken from a request's parameters (absent: weighted random)."""
        sticky = self.policy.sticky_parameter
        if sticky is None or not parameters:
            return self.choose(None)
        value = parameters.get(sticky)
        return self.choose(None if value is None or value == "" else str(value))
