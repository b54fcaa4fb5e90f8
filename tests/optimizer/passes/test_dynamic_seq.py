"""graph-dynamic-seq: a fixed-length text export made to take any length, checked row by row at the real length."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.passes.dynamic_seq import fixed_sequence
from slimserve.server.runtimes import create_runtime
from tests.token_models import token_model, token_rows


def context(tmp_path, rows=None) -> PassContext:
    datasets = {}
    if rows is not None:
        np.savez(tmp_path / "eval.npz", **rows)
        datasets["data"] = tmp_path / "eval.npz"
    return PassContext(workdir=tmp_path / "work", datasets=datasets)


def test_a_fixed_length_export_takes_any_length_and_answers_the_same(tmp_path):
    path = token_model(tmp_path / "fixed.onnx", seq=32, token_types=True)
    assert fixed_sequence(path) == (["input_ids", "attention_mask", "token_type_ids"], 32)
    rows = token_rows([3, 9, 17, 32], 32, token_types=True)
    out = make_pass("graph-dynamic-seq").run(Artifact(path, "onnx"), context(tmp_path, rows))
    assert fixed_sequence(out.path) is None and "was 32" in out.notes["dynamic_sequence"]
    model = onnx.load(str(out.path))
    assert [i.type.tensor_type.shape.dim[1].dim_param for i in model.graph.input] == ["sequence"] * 3
    runtime = create_runtime("onnxruntime", out.path)
    runtime.load()
    assert runtime.inputs[0].shape == (-1, -1) and runtime.outputs[0].shape == (-1, -1, 16)
    short = {k: v[:1, :3] for k, v in rows.items()}
    full = create_runtime("onnxruntime", path)
    full.load()
    np.testing.assert_allclose(
        runtime.predict(short)["pooled"], full.predict({k: v[:1] for k, v in rows.items()})["pooled"], rtol=1e-5, atol=1e-6
    )


def test_made_up_rows_without_eval_data(tmp_path):
    path = token_model(tmp_path / "fixed.onnx", seq=24)
    out = make_pass("graph-dynamic-seq").run(Artifact(path, "onnx"), context(tmp_path))
    assert fixed_sequence(out.path) is None


def test_refuses_a_model_that_reads_its_padding_with_the_output_and_difference(tmp_path):
    path = token_model(tmp_path / "reads.onnx", seq=32, reads_padding=True)
    with pytest.raises(OptimizerError, match=r"output 'pooled' differs by \d\.\d\de[-+]\d+ \(relative, > 0.0001\) at length 3 "):
        make_pass("graph-dynamic-seq").run(Artifact(path, "onnx"), context(tmp_path, token_rows([3, 9], 32)))


def test_refuses_a_model_already_dynamic_or_without_a_mask(tmp_path):
    path = token_model(tmp_path / "dynamic.onnx")
    with pytest.raises(OptimizerError, match="nothing to make dynamic"):
        make_pass("graph-dynamic-seq").run(Artifact(path, "onnx"), context(tmp_path))
    with pytest.raises(OptimizerError, match="mask 'm' must be one of the inputs"):
        make_pass("graph-dynamic-seq", {"inputs": ["input_ids"], "mask": "m"})


def test_an_int8_variant_of_a_fixed_length_export_is_served_at_any_length(tmp_path, runtime_factory):
    """quantize-dynamic on a fixed-length export starts from the graph made any length: the server's load-time rewrite
    cannot make the INT8 file itself any length (its exact check refuses: dynamic INT8 scales each activation by its range,
    padding included), so the variant was served and timed at full length (MiniLM: 3x slower than its FP32 parent)."""
    from slimserve.optimizer.pipeline import optimize
    from slimserve.optimizer.recipes import parse_recipe

    path = token_model(tmp_path / "fixed.onnx", seq=32)
    rows = token_rows([3, 9, 17, 32, 5, 12], 32)
    source = Artifact(path, "onnx", input_names=("input_ids", "attention_mask"), output_names=("hidden", "pooled"))
    (tmp_path / "plain").mkdir()
    plain = make_pass("quantize-dynamic").run(source, context(tmp_path / "plain", rows))
    with pytest.raises(OptimizerError, match="differs"):  # what the server's rewrite says of the INT8 file made from the export
        from slimserve.optimizer.passes.dynamic_seq import any_length_in_memory

        any_length_in_memory(plain.path)
    result = optimize(source, parse_recipe("quantize-dynamic"), context(tmp_path, rows), runtime_factory, "int8", register_over_budget=True)
    assert fixed_sequence(result.artifact.path) is None
    assert "any length" in result.report[-1]["dynamic_sequence"]
    served = create_runtime("onnxruntime", result.artifact.path)
    served.load()
    assert served.inputs[0].shape == (-1, -1)
