"""Tests for optimizer/formats/torchlayers.py (lifted by optimizer/formats/torchmodel.py): a .pt2 rebuilt with real layers computes what the program does."""

from __future__ import annotations

import torch

from slimserve.optimizer.base import Artifact
from slimserve.optimizer.formats.export import load_program
from slimserve.optimizer.formats.torchlayers import lift_layers, output_layers

FAST = {"epochs": 1, "max_samples": 512}


def test_lifted_module_computes_what_the_program_does(digits):
    program = load_program(Artifact(digits.pt2, "pt2"), "test")
    lifted = lift_layers(program.module(check_guards=False)).eval()
    x = torch.from_numpy(digits.x_test[:16])
    assert torch.allclose(lifted(x), program.module()(x), atol=1e-5)
    assert isinstance(lifted.get_submodule("features.0"), torch.nn.Conv2d) and output_layers(lifted) == ["classifier.3"]
