"""What a model file holds, by format: bytes on disk (with external data), parameters and non-zeros, FLOPs per sample.

The counting itself is per format: slimserve.optimizer.counting.onnx_counts for ONNX graphs, slimserve.optimizer.counting.torch_counts for
torch.export programs; both follow one rule, so that a .pt2 and its ONNX export report the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.counting.onnx_counts import all_tensors, onnx_flops, onnx_params
from slimserve.optimizer.counting.torch_counts import pt2_flops, pt2_params


def artifact_size(path: Path, fmt: str) -> int:
    """Bytes on disk, with the external-data files an ONNX model names."""
    path = Path(path)
    size = path.stat().st_size
    if fmt == "onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        locations = set()
        for tensor in all_tensors(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                locations.update(e.value for e in tensor.external_data if e.key == "location")
        size += sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
    return size


def load_model(path: Path, fmt: str) -> Any:
    """The model file as a graph: an onnx.ModelProto, or a torch.export program loaded without unpickling."""
    if fmt == "onnx":
        import onnx

        return onnx.load(str(path))
    if fmt == "pt2":
        from slimserve.optimizer.formats.pt2io import load_exported_program

        return load_exported_program(path)
    raise OptimizerError(f"cannot read a '{fmt}' model")


def count_params(model: Any, fmt: str) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a model (a path, or what load_model returns); see onnx_params and pt2_params."""
    if isinstance(model, (str, Path)):
        model = load_model(Path(model), fmt)
    return onnx_params(model) if fmt == "onnx" else pt2_params(model)


def count_flops(model: Any, fmt: str, sample: dict[str, np.ndarray]) -> float:
    """FLOPs of one sample (`sample` holds arrays by input name; only the first sample is used)."""
    if isinstance(model, (str, Path)):
        model = load_model(Path(model), fmt)
    return onnx_flops(model, sample) if fmt == "onnx" else pt2_flops(model, sample)
