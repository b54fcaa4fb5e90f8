"""A model's traffic policy on record (weights, shadows, sticky parameter, rollback) and its checks.

Pure domain code: no gRPC, no metrics. The control-plane operations (`set_traffic`, `promote`,
`rollback`, `without_variant`) are functions from one policy to a new one; on error they raise and
the current policy stays as it was, so a caller can store the result only once it exists.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from slimserve.server.errors import FailedPrecondition, InvalidArgument, NotFound

POLICY_VERSION = 1
# Not imported from server.repository so that routing stays importable without numpy and the runtimes.
BASELINE = "baseline"
STICKY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


def _num(x: float) -> str:
    """A weight as a user typed it: 30 not 30.0, 0.3 not 0.30000000000000004."""
    return f"{x:.6g}"


def _listing(names: Iterable[str]) -> str:
    names = sorted(names, key=lambda n: (n != BASELINE, n))
    return ", ".join(names) if names else "none"


@dataclass(frozen=True)
class TrafficPolicy:
    """How a model's traffic is split.

    weights: share per primary variant (stored normalized to sum to 1; a weight of 0 keeps the
        variant listed but sends it nothing).
    shadows: variants that receive a copy of each request; their answers are compared with the
        primary's, never returned.
    sticky_parameter: name of a request parameter whose value pins a caller to one variant.
    previous: the policy before the last change, for `rollback` (one level; its own previous is None).
    """

    weights: dict[str, float]
    shadows: tuple[str, ...] = ()
    sticky_parameter: str | None = None
    previous: TrafficPolicy | None = None

    def __post_init__(self) -> None:
        # Own copies, so that a caller's dict changing later cannot change a stored policy.
        object.__setattr__(self, "weights", {str(k): float(v) for k, v in self.weights.items()})
        object.__setattr__(self, "shadows", tuple(dict.fromkeys(str(s) for s in self.shadows)))

    @classmethod
    def single(cls, variant: str = BASELINE) -> TrafficPolicy:
        """All traffic to one variant: the policy of a model nobody has routed yet."""
        return cls(weights={variant: 1.0})

    @property
    def can_rollback(self) -> bool:
        return self.previous is not None

    def variants(self) -> set[str]:
        """Every variant the policy names, primary (any weight) or shadow."""
        return set(self.weights) | set(self.shadows)

    def snapshot(self) -> TrafficPolicy:
        """This policy without its history: what a change stores as `previous`."""
        return TrafficPolicy(self.weights, self.shadows, self.sticky_parameter, None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-plain, for the model's manifest.json under "traffic"."""
        return {
            "version": POLICY_VERSION,
            "weights": dict(self.weights),
            "shadows": list(self.shadows),
            "sticky_parameter": self.sticky_parameter,
            "previous": self.previous.to_dict() if self.previous is not None else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrafficPolicy:
        version = d.get("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise FailedPrecondition(f"traffic policy has version {version}, expected {POLICY_VERSION}")
        weights = d.get("weights")
        if not isinstance(weights, Mapping):
            raise InvalidArgument(f"traffic policy needs 'weights' mapping variants to numbers, got {weights!r}")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise InvalidArgument(f"traffic weight of '{name}' must be a number, got {w!r}")
        shadows = d.get("shadows") or []
        if isinstance(shadows, str) or not all(isinstance(s, str) for s in shadows):
            raise InvalidArgument(f"traffic policy 'shadows' must be a list of variant names, got {shadows!r}")
        sticky = d.get("sticky_parameter") or None
        previous = d.get("previous")
        return cls(
            weights=dict(weights),
            shadows=tuple(shadows),
            sticky_parameter=sticky,
            previous=cls.from_dict(previous).snapshot() if previous else None,
        )


def validate_policy(
    policy: TrafficPolicy,
    variants_ready: Collection[str],
    *,
    model: str | None = None,
    statuses: Mapping[str, str] | None = None,
) -> None:
    """Raises InvalidArgument / NotFound / FailedPrecondition with a precise message when `policy` cannot serve.

    `variants_ready` are the variants that can take traffic now. With `statuses` (every variant of the
    model -> its status) a variant that exists but is not ready gets its own message.
    """
    who = f"model '{model}'" if model else "model"
    if not policy.weights:
        raise InvalidArgument("no weights given: name at least one variant and its share, e.g. baseline=1")
    for name, w in policy.weights.items():
        if not math.isfinite(w) or w < 0:
            raise InvalidArgument(f"weight of '{name}' must be a number >= 0, got {_num(w)}")
    if sum(policy.weights.values()) <= 0:
        got = ", ".join(f"{k}={_num(v)}" for k, v in policy.weights.items())
        raise InvalidArgument(f"weights must sum to a positive number, got {got}")
    known = set(statuses) if statuses is not None else set(variants_ready)
    for name in [*policy.weights, *policy.shadows]:
        if name in variants_ready:
            continue
        if name in known:
            status = statuses.get(name, "not ready") if statuses is not None else "not ready"
            raise FailedPrecondition(f"variant '{name}' of {who} is {status}, not ready; it cannot take traffic")
        raise NotFound(f"{who} has no variant '{name}' (variants: {_listing(known)})")
    for name in policy.shadows:
        w = policy.weights.get(name, 0.0)
        if w > 0:
            raise InvalidArgument(f"variant '{name}' cannot be both primary (weight {_num(w)}) and shadow")
    sticky = policy.sticky_parameter
    if sticky is not None:
        if not sticky:
            raise InvalidArgument("sticky parameter name is empty; leave it out to route without pinning")
        if not STICKY_RE.match(sticky):
            raise InvalidArgument(
                f"sticky parameter '{sticky[:80]}' is not a valid parameter name: use up to 64 letters, digits, "
                "'_', '-' or '.', starting with a letter or '_' (e.g. user_id)"
            )


def _normalized(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def set_traffic(
    current: TrafficPolicy,
    weights: Mapping[str, float],
    shadows: Iterable[str] = (),
    sticky: str | None = None,
    *,
    variants_ready: Collection[str],
    model: str | None = None,
    statuses: Mapping[str, str] | None = None,
) -> TrafficPolicy:
    """A new policy with these weights (normalized), shadows and sticky parameter; `current` becomes `previous`."""
    proposed = TrafficPolicy(dict(weights), tuple(shadows), sticky)
    validate_policy(proposed, variants_ready, model=model, statuses=statuses)
    return TrafficPolicy(_normalized(proposed.weights), proposed.shadows, sticky, current.snapshot())


def promote(
    current: TrafficPolicy,
    variant: str,
    *,
    variants_ready: Collection[str],
    model: str | None = None,
    statuses: Mapping[str, str] | None = None,
) -> TrafficPolicy:
    """All traffic to `variant`, shadows cleared, the sticky parameter kept; `current` becomes `previous`."""
    proposed = TrafficPolicy({variant: 1.0}, (), current.sticky_parameter)
    validate_policy(proposed, variants_ready, model=model, statuses=statuses)
    return TrafficPolicy(proposed.weights, (), current.sticky_parameter, current.snapshot())


def rollback(
    current: TrafficPolicy,
    *,
    variants_ready: Collection[str] | None = None,
    model: str | None = None,
    statuses: Mapping[str, str] | None = None,
) -> TrafficPolicy:
    """Back to the policy before the last change. One level: rolling back twice says there is nothing left.

    With `variants_ready`, the previous policy is checked first (a variant it names may have failed since).
    """
    if current.previous is None:
        who = f"model '{model}'" if model else "the model"
        raise FailedPrecondition(f"nothing to roll back to: the traffic of {who} has not changed since it was set up")
    restored = current.previous.snapshot()
    if variants_ready is not None:
        validate_policy(restored, variants_ready, model=model, statuses=statuses)
    return restored


def _drop(policy: TrafficPolicy, variant: str) -> TrafficPolicy:
    weights = {k: v for k, v in policy.weights.items() if k != variant}
    shadows = tuple(s for s in policy.shadows if s != variant)
    if sum(weights.values()) <= 0:
        # It held all the traffic: back to the baseline, which cannot be deleted.
        weights = {BASELINE: 1.0}
        shadows = tuple(s for s in shadows if s != BASELINE)
    return TrafficPolicy(_normalized(weights), shadows, policy.sticky_parameter)


def without_variant(current: TrafficPolicy, variant: str) -> TrafficPolicy:
    """The policy once `variant` is deleted: dropped from weights, shadows and history, weights renormalized.

    Not a routing change of the user's, so `previous` stays (minus the variant) rather than becoming `current`.
    """
    if variant == BASELINE:
        raise FailedPrecondition("the baseline cannot be removed from routing; delete the model instead")
    previous = _drop(current.previous, variant) if current.previous is not None else None
    dropped = _drop(current, variant)
    return TrafficPolicy(dropped.weights, dropped.shadows, dropped.sticky_parameter, previous)
