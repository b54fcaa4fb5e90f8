"""The `auto` pass: the search's config and its place in a recipe; slimserve.optimizer.search.auto runs it (it measures every candidate)."""

from __future__ import annotations

from dataclasses import dataclass

from slimserve.optimizer.base import (
    Artifact,
    ConfigValueError,
    OptimizerError,
    Pass,
    PassConfig,
    PassContext,
    check_choice,
    setting,
)
from slimserve.optimizer.evaluation.quality import METRICS

DEFAULT_CANDIDATES = (
    "graph-ort",
    "quantize-dynamic",  # skipped where it does not pay (convolutions; no MatMul / Gemm)
    "quantize-static",
    "prune-structured",
    "prune-structured,quantize-static",
    "distill-soft",
    "distill-soft,quantize-static",
    "distill-soft,graph-ort",
    "distill-soft,quantize-dynamic",  # a transformer's layer-dropping student, INT8 where dynamic quantization pays
)


@dataclass(frozen=True)
class AutoConfig(PassConfig):
    """The search: candidates (pipelines, passes joined by commas), each measured against the baseline.

    accuracy_budget: points a candidate may lose (accuracy points with labels; else points of the quality
    metric, see slimserve.optimizer.evaluation.quality), used when the request gives no --accuracy-budget. epochs: fine-tuning
    epochs of training passes in candidates (bounded search). candidates: the pipelines tried; those that
    need what the model lacks (a .pt2 to train, train data) are skipped and reported as such.
    noise_margin: how much faster than the best FP32 runtime a candidate must be, timed in turns with it
    (0.05: 5%), to be kept. metric: the quality metric (accuracy, top1-agreement, cosine,
    relative-error); empty: chosen from the labels and the model's output. search_evaluations: probes of each
    ratio-controlled pass's budget search (its pruning ratio, sparsity or student width, slimserve.optimizer.search.budget);
    search_seconds: the time all those searches share, after which such a pass runs at its default setting.
    row_floor: with the cosine metric (embeddings), the lowest cosine to the baseline any one evaluation row may keep: the
    budget holds the mean, the floor the worst row (MiniLM's dynamic INT8 kept a mean of 0.991 with one sentence at 0.969);
    0 turns it off. keep_fp32_steps: a quantize-dynamic candidate within the budget but under the floor is quantized again
    with that many of its most INT8-sensitive MatMuls / embedding Gathers in FP32 (quantize-dynamic's keep_fp32), one step
    after the other until the floor holds.
    """

    accuracy_budget: float = setting(1.0, "points of quality a candidate may lose, when the request gives no --accuracy-budget")
    epochs: int = setting(2, "fine-tuning epochs of the training passes in candidates")
    candidates: tuple[str, ...] = setting(
        DEFAULT_CANDIDATES, "the pipelines tried (passes joined by commas); those the model cannot run are skipped and reported"
    )
    noise_margin: float = setting(0.05, "how much faster than the best FP32 runtime a candidate must be to be kept (0.05: 5%)")
    metric: str = setting("", "the quality metric: accuracy | top1-agreement | cosine | relative-error; empty: chosen from the data")
    search_evaluations: int = setting(4, "probes of each ratio-controlled pass's budget search")
    search_seconds: float = setting(600.0, "time all budget searches share, after which a pass runs at its default setting")
    row_floor: float = setting(0.99, "cosine metric: the lowest cosine to the baseline one evaluation row may keep (0: no floor)")
    keep_fp32_steps: tuple[int, ...] = setting(
        (4, 8, 16), "FP32 MatMuls / Gathers tried in turn for a quantize-dynamic candidate under the row floor (empty: none)"
    )

    def __post_init__(self) -> None:
        if not self.accuracy_budget >= 0:
            raise ConfigValueError(f"accuracy_budget must be 0 points or more, got {self.accuracy_budget}")
        if self.epochs < 1:
            raise ConfigValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.candidates or not all(isinstance(c, str) and c.strip() for c in self.candidates):
            raise ConfigValueError(
                f"candidates must be a non-empty list of pipelines such as 'prune-structured,quantize-static', got {self.candidates!r}"
            )
        if any("auto" in c.split(",") for c in self.candidates):
            raise ConfigValueError("candidates cannot contain auto itself")
        if not 0.0 <= self.noise_margin < 1.0:
            raise ConfigValueError(f"noise_margin must be in [0, 1) (0.05: 5% faster), got {self.noise_margin}")
        check_choice("metric", self.metric, ("", *METRICS))
        if self.search_evaluations < 2:
            raise ConfigValueError(f"search_evaluations must be at least 2 (both ends of a knob), got {self.search_evaluations}")
        if not 0.0 <= self.row_floor <= 1.0:
            raise ConfigValueError(f"row_floor must be a cosine in [0, 1] (0: no floor), got {self.row_floor}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.keep_fp32_steps):
            raise ConfigValueError(f"keep_fp32_steps must be whole numbers of nodes, 1 or more, got {list(self.keep_fp32_steps)}")
        if not self.search_seconds >= 0:
            raise ConfigValueError(f"search_seconds must be 0 (no search: default settings) or more, got {self.search_seconds}")


class AutoPass(Pass[AutoConfig]):
    """Searches pipelines (prune, distill, quantize, graph) and keeps the fastest within the accuracy budget that beats the best FP32 runtime.

    Stands for the search in a recipe; slimserve.optimizer.pipeline.optimize runs slimserve.optimizer.search.auto instead of `run`."""

    name = "auto"
    config_cls = AutoConfig
    kind = "search"
    needs = ("data",)  # the quality it holds is measured on evaluation data (pipeline.preflight refuses a model without)

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        raise OptimizerError(
            "auto measures every candidate on its serving runtime, so it runs through slimserve.optimizer.pipeline.optimize "
            "(slimctl optimize / slimserve optimize), not as a step of a pipeline; use it alone"
        )
