"""Tests for optimizer/formats/export.py: .pt2 to ONNX with the served names and a dynamic batch."""

from __future__ import annotations

import numpy as np
import onnx

from slimserve.optimizer.base import Artifact, PassContext
from slimserve.optimizer.formats.export import onnx_io_names, to_onnx
from tests.optimizer.conftest import ort_session


def test_to_onnx_returns_onnx_as_is_and_names_pt2_outputs(digits, onnx_model, tmp_path):
    context = PassContext(workdir=tmp_path)
    assert to_onnx(onnx_model, context) is onnx_model
    converted = to_onnx(Artifact(digits.pt2, "pt2"), context)  # registered without names: the program's, then output_N
    assert (converted.format, converted.runtime) == ("onnx", "onnxruntime")
    assert onnx_io_names(converted.path) == (("x",), ("output_0",))
    model = onnx.load(str(converted.path))
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [converted.path.name]  # weights inside: no side file
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[:1]] == ["batch"]
    np.testing.assert_allclose(
        ort_session(converted.path).run(None, {"x": digits.x_test[:5]})[0],
        ort_session(digits.onnx).run(None, {"x": digits.x_test[:5]})[0],
        atol=1e-4,
    )


def test_to_onnx_makes_the_batch_dynamic_for_a_fixed_batch_archive(tmp_path):
    import torch

    from slimserve.optimizer.zoo import DigitsCNN

    model = DigitsCNN(width=4).eval()
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), str(fixed))
    converted = to_onnx(Artifact(fixed, "pt2", input_names=("image",), output_names=("scores",)), PassContext(workdir=tmp_path / "work"))
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    out = ort_session(converted.path).run(None, {"image": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(torch.from_numpy(x)).numpy(), atol=1e-5)
