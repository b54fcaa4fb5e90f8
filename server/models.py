"""A loaded model: its served variants (runtime, batcher, recorder), its router and its feedback store, owned together.

Whatever a variant or model owns lives on these objects, so removing one removes its statistics,
feedback tallies and metric series by construction (see server/loader.py, which swaps them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.batching import DynamicBatcher
from server.errors import FailedPrecondition, NotFound
from server.manifest import ModelInfo
from server.recording import VariantRecorder
from server.routing import Router
from server.runtimes import Runtime
from server.stats import FeedbackStore, VariantStats


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
class LoadedModel:
    """One model as served now; replaced whole on a refresh (in-flight requests keep the variant they resolved)."""

    info: ModelInfo
    variants: dict[str, ServedVariant] = field(default_factory=dict)
    router: Router | None = None
    feedback: FeedbackStore = field(default_factory=FeedbackStore)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def runtimes(self) -> dict[str, Runtime]:
        return {name: v.runtime for name, v in self.variants.items()}

    def stats(self) -> dict[str, VariantStats]:
        return {name: v.stats for name, v in self.variants.items()}

    def pinned(self, variant: str) -> ServedVariant:
        """The served variant of that name or integer version, or why there is none."""
        variant = self.info.variant_named(variant)
        served = self.variants.get(variant)
        if served is None:
            if variant in self.info.variants:
                status = self.info.variants[variant].status
                raise FailedPrecondition(f"variant '{variant}' of model '{self.name}' is {status}, not ready")
            served = ", ".join(f"{name} (version {self.info.variants[name].version})" for name in self.variants)
            raise NotFound(f"model '{self.name}' has no variant '{variant}' (variants: {served})")
        return served
