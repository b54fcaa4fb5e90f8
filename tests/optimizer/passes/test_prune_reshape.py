"""prune-structured on CNNs whose traced program flattens with constant sizes (view(-1, C)): the constants follow the pruned channels."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from torch import nn

from slimserve.optimizer.base import OptimizerError, PassContext
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.compress.pruning import prune_channels_
from slimserve.optimizer.counting.model_file import count_params
from slimserve.optimizer.formats.export import export_dynamic_batch
from slimserve.optimizer.formats.torchmodel import trainable_module
from tests.optimizer import tiny_models as tiny


class FlatteningCnn(nn.Module):
    """conv -> conv -> pool -> flatten -> linear, flattened the way a model's forward may spell it."""

    def __init__(self, flatten: str, pooled: int = 1) -> None:
        super().__init__()
        self.flatten, self.pooled = flatten, pooled
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.fc = nn.Linear(16 * pooled * pooled, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        if self.flatten == "view":
            x = x.view(-1, 16 * self.pooled * self.pooled)  # traced as aten.view(x, [-1, 16]): the channel count is a constant
        elif self.flatten == "reshape":
            x = x.reshape(x.shape[0], -1)
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


def _module(model: nn.Module):
    torch.manual_seed(0)
    model.eval()
    example = (torch.randn(2, 1, 8, 8),)
    return trainable_module(export_dynamic_batch(model, example, "test")), example


@pytest.mark.parametrize(("flatten", "pooled"), [("view", 1), ("view", 2), ("reshape", 1), ("flatten", 1)])
def test_pruned_channels_reach_a_flatten_and_the_model_still_runs(flatten, pooled):
    module, example = _module(FlatteningCnn(flatten, pooled))
    prune_channels_(module, example, 0.5, "magnitude", "prune-structured", steps=2)
    assert module.get_submodule("conv2").out_channels < 16
    assert module.get_submodule("fc").in_features == module.get_submodule("conv2").out_channels * pooled * pooled
    assert module(torch.randn(5, 1, 8, 8)).shape == (5, 2)


def test_prune_structured_on_a_view_with_the_channel_count_serves_any_batch(tmp_path):
    x, labels = tiny.images()
    model = tiny.build(FlatteningCnn("view"), x, labels, tmp_path, "view")
    result = make_pass("prune-structured", {"pruning_ratio": 0.5, "finetune": {"epochs": 1}}).run(
        model.pt2, PassContext(workdir=tmp_path / "w", datasets={"train": model.train})
    )
    assert count_params(result.path, "onnx")[0] < 0.6 * count_params(model.onnx.path, "onnx")[0]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": x[:3]})[0].shape == (3, 2)


class SplittingCnn(FlatteningCnn):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(x.view(-1, 4, 4).sum(1).repeat(1, 4))  # the 16 channels as 4 x 4: no single constant holds them


def test_a_reshape_that_cannot_follow_the_channels_names_the_layer_to_keep():
    module, example = _module(SplittingCnn("view"))
    with pytest.raises(OptimizerError, match=r"prune-structured: pruning changed the input of view .* add conv2 to exclude"):
        prune_channels_(module, example, 0.5, "magnitude", "prune-structured")
    module, example = _module(SplittingCnn("view"))
    prune_channels_(module, example, 0.5, "magnitude", "prune-structured", ignored=("conv2",))
    assert module(torch.randn(3, 1, 8, 8)).shape == (3, 2)
