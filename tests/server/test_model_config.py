"""Triton's ModelConfig view of a variant, and what a load `config` may change (server/inference/model_config.py)."""

from __future__ import annotations

import json

import pytest

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.errors import InvalidArgument
from slimserve.server.inference.model_config import ServingOverride, config_view, parse_load_config
from slimserve.server.runtimes import TensorSpec
from slimserve.server.store.manifest import VariantInfo

X = [TensorSpec("x", "FP32", (-1, 3, 4))]
FIXED = [TensorSpec("x", "FP32", (1, 3, 4))]
Y = [TensorSpec("y", "INT64", (-1, 5))]
VARIANT = VariantInfo("baseline", "", "", "onnxruntime", "onnx", file="model.onnx", version=1)


def parse(config, inputs=X, device="cpu"):
    return parse_load_config(json.dumps(config) if not isinstance(config, str) else config, "m", inputs, device, BatchingConfig())


def test_a_batching_variant_drops_the_batch_dimension_and_a_fixed_one_has_max_batch_size_0():
    view = config_view("m", VARIANT, X, Y, BatchingConfig(max_batch_size=16, preferred_batch_sizes=(4, 8)), 2, "cuda:0")
    assert (view.max_batch_size, view.inputs[0].shape, view.outputs[0].shape) == (16, (3, 4), (5,))
    assert view.batching.preferred_batch_sizes == (4, 8) and (view.instance_count, view.instance_kind) == (2, "GPU")
    assert (view.platform, view.backend, view.default_model_filename) == ("onnxruntime_onnx", "onnxruntime", "model.onnx")
    fixed = config_view("m", VARIANT, FIXED, Y, BatchingConfig(), 1, "cpu")
    assert (fixed.max_batch_size, fixed.inputs[0].shape, fixed.batching, fixed.instance_kind) == (0, (1, 3, 4), None, "CPU")


def test_the_runtimes_parameters_reach_triton_s_model_config_beside_the_variant():
    from slimserve.server.grpc import triton_converters as converters_triton

    view = config_view("m", VARIANT, X, Y, BatchingConfig(), 2, "cpu", parameters={"intra_op_thread_count": "2"})
    parameters = converters_triton.model_config(view).config.parameters
    assert {k: v.string_value for k, v in parameters.items()} == {
        "intra_op_thread_count": "2",
        "slimserve_variant": "baseline",
        "slimserve_version": "1",
    }


def test_a_load_config_in_either_json_spelling_overrides_the_batcher():
    override = parse(
        {
            "maxBatchSize": 8,
            "dynamicBatching": {"preferredBatchSize": [2, 4], "maxQueueDelayMicroseconds": "250"},
            "instanceGroup": [{"count": 2}, {"count": 1, "kind": "KIND_CPU"}],
            "name": "m",
            "platform": "onnxruntime_onnx",
        }
    )
    assert override == ServingOverride(8, (2, 4), 250, 3)
    config, calls = override.apply(BatchingConfig(), 1)
    assert (config.max_batch_size, config.preferred_batch_sizes, config.max_queue_delay_ms, calls) == (8, (2, 4), 0.25, 3)
    off, calls = parse({"max_batch_size": 0}).apply(BatchingConfig(), 4)
    assert not off.enabled and calls == 4


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sequence_batching": {}}, "sequence_batching are not supported"),
        ({"max_batch_size": "eight"}, "max_batch_size must be an integer"),
        ({"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [8]}}, "must lie in 1..max_batch_size"),
        ({"dynamic_batching": {"preserve_ordering": True}}, "preserve_ordering are not supported"),
        ({"instance_group": [{"count": 0}]}, "count must be >= 1"),
        ({"instance_group": [{"count": 1, "kind": "KIND_GPU"}]}, "runs as KIND_CPU"),
        ({"name": "other"}, "not the model loaded"),
        ([1, 2], "JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_what_cannot_be_applied_is_refused_precisely(config, message):
    with pytest.raises(InvalidArgument, match=message):
        parse(config)


def test_a_model_without_a_free_batch_dimension_cannot_be_given_a_batch_limit():
    with pytest.raises(InvalidArgument, match="without a free batch dimension"):
        parse({"max_batch_size": 4}, inputs=FIXED)
    assert parse({"max_batch_size": 0}, inputs=FIXED).max_batch_size == 0
