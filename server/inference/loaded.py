"""A loaded model: its served variants (runtime, batcher, recorder), those unloaded while idle, its router and its
feedback store, owned together.

Whatever a variant or model owns lives on these objects, so removing one removes its statistics,
feedback tallies and metric series by construction (see server/inference/loader.py, which swaps them). A variant
unloaded while idle keeps its recorder (statistics and series) and what ModelConfig reports of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.batching.batcher import DynamicBatcher
from slimserve.server.errors import FailedPrecondition, NotFound, Unavailable
from slimserve.server.inference.router import Router
from slimserve.server.runtimes import Runtime, TensorSpec
from slimserve.server.store.manifest import ModelInfo
from slimserve.server.telemetry.recording import VariantRecorder
from slimserve.server.telemetry.statistics import FeedbackStore, VariantStats


@dataclass(eq=False)
class ServedVariant:
    """One variant taking requests: its runtime behind its batcher, and what is measured of it."""

    name: str
    runtime: Runtime
    batcher: DynamicBatcher
    recorder: VariantRecorder

    @property
    def stats(self) -> VariantStats:
        return self.recorder.stats


@dataclass(eq=False)
class UnloadedVariant:
    """A ready variant that no route serves, not in memory now: a request that pins it loads it again (loader.reload).

    Its recorder is kept, so its statistics and series go on across unload and reload; the specs and serving
    settings are what ModelConfig and ModelMetadata report while it is unloaded.
    """

    name: str
    recorder: VariantRecorder
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batching: BatchingConfig
    calls: int
    device: str  # the device it ran on; "" if it was never loaded in this process
    reason: str  # why it is not loaded (the repository index says it)

    @property
    def stats(self) -> VariantStats:
        return self.recorder.stats


class VariantUnloaded(Unavailable):
    """A request pinned a variant that is unloaded while idle; DataPlane.serve catches it, waits for the reload and routes again."""

    def __init__(self, model: str, variant: str, reason: str) -> None:
        super().__init__(f"variant '{variant}' of model '{model}' is not loaded ({reason}); a request that pins it loads it again")
        self.model = model
        self.variant = variant


@dataclass(eq=False)
class LoadedModel:
    """One model as served now; replaced whole on a refresh (in-flight requests keep the variant they resolved)."""

    info: ModelInfo
    variants: dict[str, ServedVariant] = field(default_factory=dict)
    router: Router | None = None
    feedback: FeedbackStore = field(default_factory=FeedbackStore)
    # Ready variants out of memory (no route serves them, idle); replaced whole on each change, never mutated.
    unloaded: dict[str, UnloadedVariant] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def runtimes(self) -> dict[str, Runtime]:
        return {name: v.runtime for name, v in self.variants.items()}

    @property
    def ready(self) -> set[str]:
        """The variants that take requests: those in memory and those a pinned request loads again."""
        return set(self.variants) | set(self.unloaded)

    def stats(self) -> dict[str, VariantStats]:
        stats = {name: v.stats for name, v in self.variants.items()}
        stats.update((name, v.stats) for name, v in self.unloaded.items())
        return stats

    def pinned(self, variant: str) -> ServedVariant:
        """The served variant of that name or integer version, or why there is none."""
        variant = self.info.variant_named(variant)
        served = self.variants.get(variant)
        if served is None:
            unloaded = self.unloaded.get(variant)
            if unloaded is not None:
                raise VariantUnloaded(self.name, variant, unloaded.reason)
            if variant in self.info.variants:
                status = self.info.variants[variant].status
                raise FailedPrecondition(f"variant '{variant}' of model '{self.name}' is {status}, not ready")
            ready = self.ready
            served = ", ".join(f"{name} (version {v.version})" for name, v in self.info.variants.items() if name in ready)
            raise NotFound(f"model '{self.name}' has no variant '{variant}' (variants: {served})")
        return served
