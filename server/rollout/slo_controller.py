"""The SLO loop in the server: one latency objective per model, held by moving traffic between its variants.

`set` checks an objective against the model's variants (their evaluation: batch-1 latency `latency_p50_ms`, top-1
`accuracy`; slo.check_policy answers bad input) and stores it in the model's manifest under "slo"; `tick` (with the
rollout controller's interval) reads the live p99 of the model's current split since the last look and applies
slo.SloSteering's shift, if any, through the same `Traffic` calls the rollout controller makes (automatic=True).
A rollout in progress wins: the objective waits, saying so, and the split stays the rollout's. Every shift is an
event in the record (`GetSlo`, `slimctl slo NAME`, `slimctl rollout status NAME`), on the `watch` stream (`WatchSlo`,
`slimctl slo NAME --watch`) and a count of slimserve_slo_shifts_total{reason}.

Besides the live p99, each look reads the queue's predicted wait of every variant taking traffic (`waits`: the
batcher's BatchSizer estimate of how long a request arriving now waits before its compute starts), so that a spike is
answered at the first look, before enough requests were answered for a p99. A manual traffic change (`manual_change`,
called by Control like the rollout's `interrupted`; or a split in the manifest that is not the one it set) makes the
objective step aside: it records why, and resumes from the new split (which `--clear` then gives back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from slimserve.server.errors import NotFound, Unavailable
from slimserve.server.rollout.gates import ArmStatistics
from slimserve.server.rollout.periodic import Periodic
from slimserve.server.rollout.slo import SHED_BREACH, SloPolicy, SloSteering, VariantProfile, check_policy
from slimserve.server.rollout.state import iso
from slimserve.server.store.repository import Repository

log = logging.getLogger(__name__)

MIN_SAMPLES = 20  # requests a look needs before its p99 means anything
HISTORY = 50  # events kept in the record
LOOK_S = 1.0  # seconds between looks: a load step is answered within a few of them


class Traffic(Protocol):
    async def set_traffic(
        self, model: str, weights: dict[str, float], shadows: list[str], sticky: str | None, *, automatic: bool = False
    ) -> Any: ...


class Rollouts(Protocol):
    running: dict[str, Any]


@dataclass
class SloState:
    """What `GetSlo` shows and the manifest keeps."""

    model: str
    p99_ms: float
    max_drop_pt: float
    original: dict[str, float]
    shadows: list[str]
    eligible: list[str]
    drops: dict[str, float]
    latency_ms: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    state: str = "active"  # active | waiting
    message: str = ""
    weights: dict[str, float] = field(default_factory=dict)
    cost_pt: float = 0.0
    last_p99_ms: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SloState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def profiles(info) -> tuple[list[VariantProfile], str]:
    """Each ready variant's batch-1 latency and accuracy drop against the serving variant (the baseline's quality). A
    model without labels (an embedding model) has no accuracy: a variant's drop is then the optimizer's measured drop of
    its quality metric against the baseline's outputs (`quality_drop`, in that metric's points: (1 - mean cosine) x 100
    for embeddings, as the optimizer's budget reads it)."""
    base = info.default_variant
    base_accuracy = info.variants[base].evaluation.get("accuracy") if base in info.variants else None
    out = []
    for name, v in info.variants.items():
        latency = v.evaluation.get("latency_p50_ms")
        accuracy = v.evaluation.get("accuracy")
        if v.status != "ready" or latency is None:
            continue
        if name == base:
            drop = 0.0
        elif accuracy is not None and base_accuracy is not None:
            drop = (float(base_accuracy) - float(accuracy)) * 100.0
        elif base_accuracy is None and v.evaluation.get("quality_drop") is not None:
            drop = float(v.evaluation["quality_drop"])
        else:
            continue  # no accuracy or quality drop measured: its drop is unknown, so it is never eligible
        out.append(VariantProfile(name, float(latency), drop))
    return out, base


class SloController(Periodic):  # start_ticking() looks every LOOK_S; stop
    default_interval_s = LOOK_S

    def __init__(
        self,
        repository: Repository,
        traffic: Traffic,
        statistics: ArmStatistics,
        rollouts: Rollouts,
        clock: Callable[[], float] = time.time,
        on_shift: Callable[[str, str, str], None] | None = None,
        waits: Callable[[str], dict[str, float | None]] | None = None,
    ) -> None:
        self.repository = repository
        self.traffic = traffic
        self.statistics = statistics
        self.rollouts = rollouts
        self.clock = clock
        self.on_shift = on_shift  # (model, the variant traffic moves to, reason): the Prometheus counter
        # model -> each served variant's predicted queue wait in seconds (DynamicBatcher.predicted_wait); None: p99 only
        self.waits = waits
        self._watchers: dict[str, set[asyncio.Queue[SloState]]] = {}
        self._aside: dict[str, str] = {}  # model -> the manual change not answered yet (why)
        self._unread: dict[str, str] = {}  # model -> why its statistics could not be read at the last look
        self.active: dict[str, SloState] = {}  # model -> its objective, as stored (read once: `resume`, `set`)
        self._steering: dict[str, SloSteering] = {}
        self._marks: dict[str, dict[str, int]] = {}
        self._shed_marks: dict[str, dict[str, tuple[int, int]]] = {}  # model -> variant -> (requests, shed) at the last look
        self._counts: dict[str, tuple[float, dict[str, tuple[int, float]]]] = {}  # model -> (when, variant -> (requests, device s))

    # ------------------------------------------------------------------ use cases

    def set(self, model: str, p99_ms: float, max_drop_pt: float) -> SloState:
        """Checks and stores the objective (InvalidArgument on bad input; nothing is stored then)."""
        self.repository.check_writable()
        policy = SloPolicy(p99_ms, max_drop_pt)
        info = self.repository.get(model)  # NotFound
        found, base = profiles(info)
        rollout = self.rollouts.running.get(model)
        checked = check_policy(policy, model, found, getattr(rollout, "variant", None))
        state = SloState(
            model,
            float(p99_ms),
            float(max_drop_pt),
            dict(info.traffic.weights),
            list(info.traffic.shadows),
            list(checked.eligible),
            {p.name: p.drop_pt for p in found},
            {p.name: p.batch1_ms for p in found},
            list(checked.warnings),
            "waiting" if checked.waiting else "active",
            checked.waiting or f"holding p99 <= {p99_ms:g} ms with the variants within {max_drop_pt:g} points of '{base}'",
            dict(info.traffic.weights),
        )
        self._event(state, "set", state.message)
        self._steering.pop(model, None)
        self._marks.pop(model, None)
        self._shed_marks.pop(model, None)
        self._save(state)
        self.active[model] = state
        return state

    def status(self, model: str) -> SloState:
        if model in self.active:
            return self.active[model]
        record = self.repository.get(model).slo
        if not record:
            raise NotFound(f"model '{model}' has no latency objective; set one with 'slimctl slo {model} --p99 MS'")
        return SloState.from_dict(record)

    async def clear(self, model: str) -> SloState:
        """Removes the objective and gives the split it started from back (shadows resumed)."""
        state = self.status(model)
        if model not in self.rollouts.running and state.weights != state.original:
            await self.traffic.set_traffic(model, dict(state.original), list(state.shadows), self._sticky(model), automatic=True)
        self._steering.pop(model, None)
        self.active.pop(model, None)

        def put(info) -> None:
            info.slo = None

        self.repository.update(model, put)
        state.state, state.message, state.weights, state.cost_pt = (
            "off",
            "objective removed; the original split is back",
            dict(state.original),
            0.0,
        )
        self._event(state, "off", state.message)
        return state

    async def watch(self, model: str) -> AsyncIterator[SloState]:
        """The objective now, then again at each of its events (shifts, waits, steps aside), until it is removed."""
        state = self.status(model)
        yield state
        if state.state == "off":
            return
        queue: asyncio.Queue[SloState] = asyncio.Queue()
        self._watchers.setdefault(model, set()).add(queue)
        try:
            while True:
                state = await queue.get()
                yield state
                if state.state == "off":
                    return
        finally:
            self._watchers.get(model, set()).discard(queue)

    async def manual_change(self, model: str, reason: str, variant: str | None = None) -> None:
        """Control's hook (with the rollout's): someone else changed the model's routing. The objective steps aside at
        its next look and resumes from the split it finds then; a deleted variant is no longer one it may use."""
        state = self.active.get(model)
        if state is None:
            return
        if variant is not None:
            if variant not in state.drops and variant not in state.weights:
                return
            state.eligible = [v for v in state.eligible if v != variant]
            for kept in (state.drops, state.latency_ms):
                kept.pop(variant, None)
        self._aside[model] = reason

    # ------------------------------------------------------------------ the loop

    def resume(self) -> None:
        """The objectives on record when the server starts (their steering begins again from the stored split)."""
        for name in self.repository.names():
            try:
                record = self.repository.get(name).slo
                if record:
                    self.active[name] = SloState.from_dict(record)
            except Exception:  # one unreadable record must not stop the server
                log.exception("latency objective of model '%s' cannot be read; not resumed", name)

    async def tick(self) -> None:
        for model, state in list(self.active.items()):
            try:
                await self._step(state)
            except NotFound:  # the model was deleted
                self.active.pop(model, None)
                self._steering.pop(model, None)
            except Exception:  # one model's failure must not stop the others
                log.exception("SLO look at model '%s' failed", model)

    async def _step(self, state: SloState) -> None:
        rollout = self.rollouts.running.get(state.model)
        if rollout is not None:
            message = f"a rollout of '{rollout.variant}' is running: its gates win, and the SLO waits until it ends"
            if state.state != "waiting" or state.message != message:
                state.state, state.message = "waiting", message
                self._event(state, "waiting", message)
                self._save(state)
            self._steering.pop(state.model, None)
            self._aside.pop(state.model, None)  # the rollout is told of manual changes; the split it leaves is taken below
            return
        if state.state == "waiting":
            state.state, state.message = "active", "the rollout ended: the SLO applies again"
            info = self.repository.get(state.model)
            state.original = state.weights = dict(info.traffic.weights)  # the split the rollout left
            state.shadows = list(info.traffic.shadows)
            self._event(state, "active", state.message)
            self._save(state)
        else:
            self._step_aside_if_changed(state)
        await self._refresh(state)
        p99 = self._live_p99(state)
        shed = self._shed_fraction(state)
        wait_ms = self._predicted_wait_ms(state)
        if p99 is None and (wait_ms is None or wait_ms <= state.p99_ms) and shed <= SHED_BREACH:
            return  # too few answers for a p99, the queue does not predict a breach, and next to nothing was shed
        if p99 is not None:
            state.last_p99_ms = p99
        steering = self._steering.get(state.model)
        if steering is None:
            policy = SloPolicy(state.p99_ms, state.max_drop_pt)
            steering = SloSteering(
                policy, dict(state.original), tuple(state.eligible), state.drops, state.latency_ms, weights=dict(state.weights)
            )
            steering.shadows_paused = bool(state.shadows) and not set(state.shadows) <= set(
                self.repository.get(state.model).traffic.shadows
            )
            self._steering[state.model] = steering
        rate, service = self._load(state)
        shift = steering.look(
            p99 or 0.0, wait_ms or 0.0, has_shadows=bool(state.shadows), rate_rps=rate, service_s=service, shed_fraction=shed
        )
        if shift is None:
            return
        if not shift.saturated:
            shadows = [] if steering.shadows_paused else list(state.shadows)
            weights = {v: w for v, w in shift.weights.items() if w > 0}
            await self.traffic.set_traffic(state.model, weights, shadows, self._sticky(state.model), automatic=True)
        state.weights, state.cost_pt = dict(shift.weights), shift.cost_pt
        kind = shift.kind
        self._event(state, kind, shift.reason)
        self._save(state)
        if self.on_shift is not None:
            self.on_shift(state.model, state.eligible[0], kind)

    def _step_aside_if_changed(self, state: SloState) -> None:
        """A manual change told by Control, or a split in the manifest that is not the one this objective set: record it
        and start again from the split found (it becomes the one `--clear` gives back)."""
        info = self.repository.get(state.model)
        found = dict(info.traffic.weights)
        reason = self._aside.pop(state.model, None)
        if reason is None and same_split(found, state.weights):
            return
        why = reason or "the routing changed outside the objective"
        state.original = state.weights = found
        state.shadows = list(info.traffic.shadows)
        state.cost_pt = sum(w * max(state.drops.get(v, 0.0), 0.0) for v, w in normalized(found).items())
        state.message = (
            f"{why}: the objective stepped aside and resumes from the new split "
            f"({', '.join(f'{v} {w:.0%}' for v, w in normalized(found).items() if w > 0)}), which --clear now gives back"
        )
        self._steering.pop(state.model, None)
        self._event(state, "stepped_aside", state.message)
        self._save(state)

    async def _refresh(self, state: SloState) -> None:
        """The statistics read once per look, as the rollout controller does: with `--prometheus-url` (PrometheusStatistics)
        that is every replica's traffic summed, so the live p99 is the whole model's, not the writer's own. Prometheus
        unreachable: this look has the writer's predicted queue waits only (said once, and again when it comes back)."""
        try:
            await self.statistics.refresh(state.model, tuple(state.drops))
        except Unavailable as e:
            if self._unread.get(state.model) != e.message:
                log.warning(
                    "latency objective of model '%s': %s; until it can be read, only this process's queue is seen", state.model, e.message
                )
            self._unread[state.model] = e.message
            return
        if self._unread.pop(state.model, None) is not None:
            log.info("latency objective of model '%s': the statistics (%s) can be read again", state.model, self.statistics.source)

    def _predicted_wait_ms(self, state: SloState) -> float | None:
        """The longest predicted queue wait in ms among the variants taking traffic now (None: not known)."""
        if self.waits is None:
            return None
        try:
            waits = self.waits(state.model)
        except Exception:  # not loaded now (Unavailable, NotFound): the p99 alone decides
            return None
        known = [w for v, w in waits.items() if w is not None and state.weights.get(v, 0.0) > 0]
        return max(known) * 1000.0 if known else None

    def _shed_fraction(self, state: SloState) -> float:
        """The share of the model's requests since the last look that its queues shed (refused on arrival, for their
        deadline or a full queue, or dropped at their deadline, `Arm.shed`; they are never answered, so the answered requests' p99 does not show them). 0 until
        two looks have counted at least MIN_SAMPLES requests."""
        before = self._shed_marks.get(state.model, {})
        now: dict[str, tuple[int, int]] = {}
        for variant in state.drops:
            try:
                arm = self.statistics.arm(state.model, variant)
            except NotFound:
                continue
            now[variant] = (arm.requests, arm.shed)
        self._shed_marks[state.model] = now
        requests = shed = 0
        for variant, (n, s) in now.items():
            if variant in before and n >= before[variant][0]:
                requests += n - before[variant][0]
                shed += max(s - before[variant][1], 0)
        return shed / requests if requests >= MIN_SAMPLES else 0.0

    def _live_p99(self, state: SloState) -> float | None:
        """The p99 in ms of every request the model's variants answered since the last look (None: too few yet)."""
        marks = self._marks.setdefault(state.model, {})
        samples = []
        for variant in state.drops:
            try:
                mark = self.statistics.arm(state.model, variant).latency_mark
            except NotFound:
                continue
            since = marks.get(variant)
            if since is not None and mark >= since:
                samples.append(self.statistics.latencies_since(state.model, variant, since))
            marks[variant] = mark
        joined = np.concatenate(samples) if samples else np.empty(0)
        if joined.size < MIN_SAMPLES:
            return None
        return float(np.quantile(joined, 0.99) * 1000.0)

    def _load(self, state: SloState) -> tuple[float | None, dict[str, float] | None]:
        """Requests per second to the model since the last look, and each variant's compute seconds per request (its
        totals): what a step back would ask of each variant (None until two looks have counted)."""
        now = time.monotonic()
        counts = {}
        for variant in state.drops:
            try:
                arm = self.statistics.arm(state.model, variant)
            except NotFound:
                continue
            counts[variant] = (arm.requests, arm.device_seconds)
        before = self._counts.get(state.model)
        self._counts[state.model] = (now, counts)
        if before is None or now <= before[0]:
            return None, None
        then, old = before
        answered = sum(n - old.get(v, (0, 0.0))[0] for v, (n, _) in counts.items())
        # compute per request over the last look where it answered some (under contention it is not the evaluation's)
        recent = {v: (d - old[v][1]) / (n - old[v][0]) for v, (n, d) in counts.items() if v in old and n - old[v][0] >= 5}
        service = {v: recent.get(v, d / n) for v, (n, d) in counts.items() if n > 0 and d > 0}
        return max(answered, 0) / (now - then), service or None

    def _sticky(self, model: str) -> str | None:
        return self.repository.get(model).traffic.sticky_parameter

    def _event(self, state: SloState, kind: str, reason: str) -> None:
        state.history.append(
            {"time": iso(self.clock()), "kind": kind, "reason": reason, "weights": dict(state.weights), "cost_pt": state.cost_pt}
        )
        del state.history[:-HISTORY]
        watchers = self._watchers.get(state.model)
        if watchers:
            now = SloState.from_dict(state.to_dict())  # as of this event: a slow reader still sees each one
            for queue in watchers:
                queue.put_nowait(now)

    def _save(self, state: SloState) -> None:
        record = state.to_dict()

        def put(info) -> None:
            info.slo = record

        try:
            self.repository.update(state.model, put)
        except NotFound:
            pass


def normalized(weights: dict[str, float]) -> dict[str, float]:
    total = sum(w for w in weights.values() if w > 0)
    return {v: (w / total if total > 0 else 0.0) for v, w in weights.items()}


def same_split(a: dict[str, float], b: dict[str, float], tolerance: float = 1e-6) -> bool:
    """Whether two weight maps route the same shares (the manifest keeps what was set; zero shares may be left out)."""
    na, nb = normalized(a), normalized(b)
    return all(abs(na.get(v, 0.0) - nb.get(v, 0.0)) <= tolerance for v in set(na) | set(nb))
