"""bench.bench_foreign's fast subset: foreign-style models get a variant or a precise refusal, never an unexplained failure."""

from __future__ import annotations

import pytest

from bench.bench_foreign import run_cell, run_matrix
from bench.foreign_models import BUILDERS

# (model, recipe) -> the outcome each cell must have; one cell per crash issue 20 reported, and per data layout.
CELLS = {
    ("const_weights", "quantize-dynamic"): "created",  # was "no constant weights": its weights sit in Constant nodes
    ("opset11", "quantize-static"): "created",  # was an invalid graph: per-channel DequantizeLinear needs opset 13
    ("scalar_input", "graph-ort"): "created",  # a 0-d input `sr`, one value per model in the .npz
    ("state_axis1", "quantize-static"): "created",  # a state [2, N, 8] batched on axis 1, calibrated in its layout
    ("if_subgraph", "quantize-dynamic"): "created",  # an If whose branches read the main graph's tensors
    ("state_axis1", "distill-soft"): "refused",  # training takes inputs batched on axis 0: a precise refusal
}


def test_every_cell_of_the_fast_subset_is_created_or_refused_as_expected(tmp_path):
    cells = {}
    for (model, recipe), expected in CELLS.items():
        built = BUILDERS[model](tmp_path)
        cell = run_cell(built, recipe, epochs=1, workdir=tmp_path / f"work-{model}-{recipe}")
        cells[model, recipe] = cell
        assert cell["outcome"] == expected, cell
        if expected == "created":  # under the default 1-point budget on every output (issue 20's target)
            assert cell["within_budget"] is True and cell["drops"], cell
    assert "axis 1" in cells["state_axis1", "distill-soft"]["detail"]


@pytest.mark.slow
def test_prelu_trains_and_prunes_from_onnx(tmp_path):
    """PReLU slopes convert to nn.PReLU, so pruning the convolution before them shrinks them too (was a size mismatch)."""
    cells = run_matrix(["prelu"], ["prune-structured", "distill-soft"], 1, tmp_path, log=lambda line: None)
    assert [c["outcome"] for c in cells] == ["created", "created"], cells
