"""The rollout controller: one rollout per model, stepped through shadow and canary stages by its gates, in the server.

Each `tick` reads every running rollout's arms (counts since its stage began), asks the gates, and
then rolls back at the first fail, moves to the next stage when every gate passed with enough
requests, promotes after the last, or rolls back a stage that stays undecided past its limit. Routing
changes go through the `Traffic` it is given (slimserve.server.management.control.Control, with automatic=True, so that
its own changes do not count as a manual one); a manual change calls `interrupted` instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from slimserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from slimserve.server.rollout import state as store
from slimserve.server.rollout.gates import Arm, ArmStatistics, judge
from slimserve.server.rollout.periodic import Periodic
from slimserve.server.rollout.plan import RolloutPlan
from slimserve.server.rollout.state import Event, GateResult, RolloutState
from slimserve.server.store.repository import Repository
from slimserve.server.store.traffic import TrafficPolicy

log = logging.getLogger(__name__)


class Traffic(Protocol):
    """The routing calls the controller makes (slimserve.server.management.control.Control has them)."""

    async def set_traffic(
        self, model: str, weights: dict[str, float], shadows: list[str], sticky: str | None, *, automatic: bool = False
    ) -> TrafficPolicy: ...

    async def promote(self, model: str, variant: str, *, automatic: bool = False) -> TrafficPolicy: ...

    def ready_variants(self, model: str) -> set[str]: ...


class Exported(Protocol):
    """What the controller tells Prometheus (server/rollout/metrics.RolloutMetrics)."""

    def started(self, r: RolloutState) -> None: ...

    def show(self, r: RolloutState) -> None: ...

    def decided(self, r: RolloutState, gates: list[str], decision: str) -> None: ...


class RolloutController(Periodic):  # start_ticking(interval_s) / stop: the loop of `tick`
    def __init__(
        self,
        repository: Repository,
        traffic: Traffic,
        statistics: ArmStatistics,
        clock: Callable[[], float] = time.time,
        metrics: Exported | None = None,
        judge: Callable[..., list[GateResult]] = judge,
    ) -> None:
        self.repository = repository
        self.traffic = traffic
        self.statistics = statistics
        self.clock = clock
        self.metrics = metrics
        self.judge = judge  # gates.judge; bench/bench_rollout.py passes fixed-sample tests to compare
        self.running: dict[str, RolloutState] = {}
        self._start: dict[str, dict[str, Arm]] = {}  # model -> arm snapshot at its stage's start
        self._watchers: dict[str, set[asyncio.Queue[RolloutState]]] = {}
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ use cases

    async def start(self, model: str, variant: str, plan: RolloutPlan) -> RolloutState:
        """Checks everything first (routing stays untouched on error), then routes the first stage."""
        async with self._lock:
            self.repository.check_writable()
            info = self.repository.get(model)  # NotFound
            if model in self.running:
                r = self.running[model]
                raise FailedPrecondition(f"model '{model}' already has a rollout of '{r.variant}' ({r.state}); abort it first")
            if variant not in info.variants:
                raise NotFound(f"model '{model}' has no variant '{variant}' (variants: {', '.join(info.variants)})")
            control = info.default_variant
            if variant == control:
                raise InvalidArgument(f"variant '{variant}' already serves model '{model}' (it is the control); roll out another")
            ready = self.traffic.ready_variants(model)
            for name in (variant, control):
                if name not in ready:
                    raise FailedPrecondition(f"variant '{name}' of model '{model}' is not loaded and ready; it cannot take traffic")
            now = self.clock()
            r = RolloutState(model, variant, control, plan, info.traffic.snapshot(), started_at=now, stage_started_at=now)
            r.source = self.statistics.source
            r.history.append(Event(now, "started", "", 0.0, f"rollout of '{variant}' against '{control}', stages {_stages(plan)}"))
            moved = standing_shares(info.traffic.weights, control)
            if moved:  # the stages route the variant and the control only: say where the other shares go, and that they come back
                r.history.append(Event(now, "started", "", 0.0, moved))
            await self._enter(r, 0, now)
            return r

    def status(self, model: str) -> RolloutState:
        running = self.running.get(model)
        if running is not None:
            return running
        found = store.load(self.repository, model)
        if found is None:
            raise NotFound(f"model '{model}' has no rollout; start one with 'slimctl rollout start {model} VARIANT'")
        return found

    async def abort(self, model: str, reason: str = "aborted by the user") -> RolloutState:
        """Stops a running rollout and gives the traffic back to the control (the routing from before it started)."""
        async with self._lock:
            r = self._running(model)
            await self._restore(r)
            self._finish(r, "aborted", reason, self.clock())
            return r

    async def interrupted(self, model: str, reason: str, variant: str | None = None) -> None:
        """A manual routing change or deletion: the rollout stops with that reason and leaves the routing to it.
        With `variant`, only a change to the rollout's variant or control interrupts it."""
        async with self._lock:
            r = self.running.get(model)
            if r is None or (variant is not None and variant not in (r.variant, r.control)):
                return
            self._finish(r, "aborted", reason, self.clock())

    async def watch(self, model: str) -> AsyncIterator[RolloutState]:
        """The rollout now, then again at each tick and change, until it ends."""
        r = self.status(model)
        yield r
        if not r.active:
            return
        queue: asyncio.Queue[RolloutState] = asyncio.Queue()
        self._watchers.setdefault(model, set()).add(queue)
        try:
            while True:
                r = await queue.get()
                yield r
                if not r.active:
                    return
        finally:
            self._watchers.get(model, set()).discard(queue)

    # ------------------------------------------------------------------ the loop

    def resume(self) -> None:
        """Rollouts that were running when the server stopped continue at their stage (its counts begin again)."""
        now = self.clock()
        for name in self.repository.names():
            try:
                r = store.load(self.repository, name)
            except Exception:  # one unreadable record must not stop the server
                log.exception("rollout of model '%s' cannot be read; not resumed", name)
                continue
            if r is None:
                continue
            if not r.active:
                self._show(r)  # the last rollout's outcome stays on the dashboard after a restart
                continue
            r.stage_started_at = now
            r.history.append(Event(now, "resumed", r.state, r.weight, "server restarted: the stage's counts begin again"))
            self.running[name] = r
            self._start.pop(name, None)
            store.save(self.repository, r)
            if self.metrics is not None:
                self.metrics.started(r)

    async def tick(self) -> None:
        """One look at every running rollout."""
        async with self._lock:
            for model in list(self.running):
                try:
                    await self._step(self.running[model], self.clock())
                except NotFound as e:  # the variant or model went away under it
                    self._finish(self.running[model], "aborted", f"stopped: {e.message}", self.clock())

    # ------------------------------------------------------------------ stage machine

    async def _step(self, r: RolloutState, now: float) -> None:
        stage, _ = r.plan.stages()[r.stage]
        try:
            await self.statistics.refresh(r.model, (r.variant, r.control))
        except Unavailable as e:  # no look this time: the stage stays open, and its time limit still runs
            log.warning("rollout of '%s' on model '%s': %s", r.variant, r.model, e.message)
            r.source = f"{self.statistics.source}: unavailable at the last look ({e.message})"
            if now - r.stage_started_at >= r.plan.max_stage_s:
                await self._time_out(r, now, "the statistics could not be read")
            else:
                self._publish(r)
            return
        r.source = self.statistics.source
        arms = {v: self.statistics.arm(r.model, v) for v in (r.variant, r.control)}
        start = self._start.get(r.model)
        if start is None or any((arms[v] - start[v]).went_back() for v in arms):
            self._start[r.model] = start = arms  # (re)loaded variants: their counts begin again
        canary, control = (arms[v] - start[v] for v in (r.variant, r.control))
        r.requests = {r.variant: canary.requests, r.control: control.requests}
        latency = [self.statistics.latencies_since(r.model, v, start[v].latency_mark) for v in (r.variant, r.control)]
        r.gates = self.judge(r.plan, stage, canary, control, *latency)
        failed = [g for g in r.gates if g.decision == "fail" and g.name != "cost"]
        decided = all(g.decision in ("pass", "skip") for g in r.gates if g.name != "cost")
        enough = canary.requests >= r.plan.min_requests
        if not failed and decided and enough:
            failed = [g for g in r.gates if g.name == "cost" and g.decision == "fail"]  # a point check: only on the stage's evidence
        if failed:
            gate = failed[0]
            self._decided(r, [gate.name], "fail")
            await self._restore(r)
            self._finish(r, "rolled_back", f"gate '{gate.name}' failed at {_where(r)}: {gate.evidence}", now, gate)
        elif decided and enough and all(g.decision in ("pass", "skip") for g in r.gates):
            self._decided(r, [g.name for g in r.gates if g.decision == "pass"], "pass")
            if r.stage + 1 < len(r.plan.stages()):
                await self._enter(r, r.stage + 1, now)
            else:
                await self.traffic.promote(r.model, r.variant, automatic=True)
                self._finish(r, "promoted", f"every gate passed at every stage; '{r.variant}' takes all traffic", now)
        elif now - r.stage_started_at >= r.plan.max_stage_s:
            open_gates = [g.name for g in r.gates if g.decision == "continue"]
            why = f"gates {', '.join(open_gates)} undecided" if open_gates else f"{canary.requests} of {r.plan.min_requests} requests"
            await self._time_out(r, now, why)
        else:
            self._publish(r)

    async def _time_out(self, r: RolloutState, now: float, why: str) -> None:
        self._decided(r, ["time_limit"], "fail")
        await self._restore(r)
        self._finish(r, "rolled_back", f"{_where(r)} not shown as good within {r.plan.max_stage_s:g} s ({why})", now)

    async def _enter(self, r: RolloutState, index: int, now: float) -> None:
        """Routes stage `index` (a failed routing change leaves the rollout where it was), records it, persists it."""
        stage, weight = r.plan.stages()[index]
        sticky = r.original.sticky_parameter
        if stage == "shadow":
            await self.traffic.set_traffic(r.model, {r.control: 1.0}, [r.variant], sticky, automatic=True)
        else:
            await self.traffic.set_traffic(r.model, {r.control: 100.0 - weight, r.variant: weight}, [], sticky, automatic=True)
        first = not self.running.get(r.model)
        r.state, r.stage, r.weight, r.stage_started_at = stage, index, weight, now
        r.gates, r.requests = [], {r.variant: 0, r.control: 0}
        self._start.pop(r.model, None)
        what = "shadow: mirrors every request" if stage == "shadow" else f"canary at {weight:g}%"
        r.history.append(Event(now, "stage", stage, weight, f"stage {index + 1} of {len(r.plan.stages())}: {what}"))
        self.running[r.model] = r
        store.save(self.repository, r)
        if first and self.metrics is not None:
            self.metrics.started(r)
        if not first:
            self._show(r)
            self._publish(r)

    async def _restore(self, r: RolloutState) -> None:
        """Traffic back to where the rollout found it; if a variant of that routing is gone, all to the control."""
        o = r.original
        ready = self.traffic.ready_variants(r.model)
        if o.variants() <= ready:
            await self.traffic.set_traffic(r.model, dict(o.weights), list(o.shadows), o.sticky_parameter, automatic=True)
        else:
            await self.traffic.set_traffic(r.model, {r.control: 1.0}, [], o.sticky_parameter, automatic=True)

    def _finish(self, r: RolloutState, state: str, reason: str, now: float, gate=None) -> None:
        r.state, r.reason, r.finished_at = state, reason, now
        if state != "promoted":
            r.weight = 0.0
        r.history.append(
            Event(
                now,
                state,
                state,
                r.weight,
                reason,
                gate.name if gate else "",
                gate.statistic if gate else None,
                gate.threshold if gate else None,
                gate.evidence if gate else "",
            )
        )
        self.running.pop(r.model, None)
        self._start.pop(r.model, None)
        try:
            store.save(self.repository, r)
        except NotFound:  # the model itself was deleted
            pass
        log.info("rollout of '%s' on model '%s' %s: %s", r.variant, r.model, state, reason)
        self._show(r)
        self._publish(r)

    def _show(self, r: RolloutState) -> None:
        if self.metrics is not None:
            self.metrics.show(r)

    def _decided(self, r: RolloutState, gates: list[str], decision: str) -> None:
        if self.metrics is not None:
            self.metrics.decided(r, gates, decision)

    def _publish(self, r: RolloutState) -> None:
        for queue in self._watchers.get(r.model, ()):
            queue.put_nowait(r)

    def _running(self, model: str) -> RolloutState:
        r = self.running.get(model)
        if r is None:
            self.repository.get(model)  # NotFound for an unknown model
            raise FailedPrecondition(f"model '{model}' has no running rollout")
        return r


def _stages(plan: RolloutPlan) -> str:
    return " -> ".join("shadow" if s == "shadow" else f"{w:g}%" for s, w in plan.stages()) + " -> promote"


def _where(r: RolloutState) -> str:
    return "the shadow stage" if r.state == "shadow" else f"canary {r.weight:g}%"


def standing_shares(weights: dict[str, float], control: str) -> str:
    """What a rollout does to the shares other variants held when it started, in words ('' when only the control served)."""
    total = sum(weights.values()) or 1.0
    held = {v: w / total * 100.0 for v, w in weights.items() if v != control and w > 0}
    if not held:
        return ""
    shares = ", ".join(f"'{v}' {p:.0f}%" for v, p in held.items())
    return (
        f"standing shares {shares} go to '{control}' while the rollout runs (each stage routes the control and the rolled-out "
        "variant only); an abort or a rollback gives them back, a promotion sends everything to the variant"
    )
