"""What Triton's image clients read of ModelConfig (server/inference/model_config.py): an input's image `format`, from its shape or a
load `config`, and an output's labels from a `label_filename` sent as a `file:` parameter, used by classification."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.errors import InvalidArgument
from slimserve.server.grpc import triton_converters as converters_triton
from slimserve.server.inference import classification
from slimserve.server.inference.model_config import config_view, image_format, parse_load_config
from slimserve.server.runtimes import TensorSpec
from slimserve.server.store.manifest import VariantInfo

VARIANT = VariantInfo("baseline", "", "", "onnxruntime", "onnx", file="model.onnx", version=1)
NCHW = TensorSpec("images", "FP32", (-1, 3, 224, 224))
OUT = TensorSpec("probs", "FP32", (-1, 10))


@pytest.mark.parametrize(
    "spec, batched, expected",
    [
        (NCHW, True, "FORMAT_NCHW"),
        (TensorSpec("data_0", "FP32", (3, 224, 224)), False, "FORMAT_NCHW"),
        (TensorSpec("x", "FP32", (-1, 28, 28, 1)), True, "FORMAT_NHWC"),
        (TensorSpec("x", "FP16", (-1, 1, 28, 28)), True, "FORMAT_NCHW"),
        (TensorSpec("x", "FP32", (-1, 3, 8, 3)), True, "FORMAT_NONE"),  # channels first or last: the shape does not say
        (TensorSpec("x", "UINT8", (-1, 3, 224, 224)), True, "FORMAT_NONE"),  # only floating-point inputs are images by default
        (TensorSpec("x", "FP32", (-1, 64, 16)), True, "FORMAT_NONE"),
        (TensorSpec("x", "FP32", (-1, 8, 8, 8)), True, "FORMAT_NONE"),
    ],
)
def test_the_default_format_follows_the_channels_dimension(spec, batched, expected):
    assert image_format(spec, batched) == expected


def parse(config: dict, inputs=(NCHW,), outputs=(OUT,), files=None):
    return parse_load_config(json.dumps(config), "m", list(inputs), "cpu", BatchingConfig(), list(outputs), files or {})


def test_a_load_config_declares_the_format_and_the_labels_and_model_config_says_them():
    square = TensorSpec("images", "FP32", (-1, 3, 8, 3))
    override = parse(
        {
            "input": [{"name": "images", "format": "FORMAT_NHWC", "data_type": "TYPE_FP32", "dims": [3, 8, 3]}],
            "output": [{"name": "probs", "labelFilename": "labels.txt", "dims": ["10"]}],
        },
        inputs=[square],
        files={"file:labels.txt": b"cat\ndog\n"},
    )
    assert override.input_formats == {"images": "FORMAT_NHWC"} and override.labels == {"probs": ("cat", "dog")}
    view = config_view("m", VARIANT, [square], [OUT], BatchingConfig(), 1, "cpu", override)
    config = converters_triton.model_config(view).config
    assert config.input[0].Format.Name(config.input[0].format) == "FORMAT_NHWC"
    assert config.output[0].label_filename == "labels.txt"
    default = converters_triton.model_config(config_view("m", VARIANT, [NCHW], [OUT], BatchingConfig(), 1, "cpu")).config
    assert default.input[0].Format.Name(default.input[0].format) == "FORMAT_NCHW" and default.output[0].label_filename == ""


@pytest.mark.parametrize(
    "config, files, message",
    [
        ({"input": [{"name": "pixels", "format": "FORMAT_NCHW"}]}, {}, "input 'pixels' is not one of the model's: images"),
        ({"input": [{"name": "images", "format": "NCHW"}]}, {}, "format 'NCHW' is not one of FORMAT_NONE, FORMAT_NHWC, FORMAT_NCHW"),
        ({"input": [{"name": "images", "data_type": "TYPE_UINT8"}]}, {}, "is TYPE_FP32 in the model file, not TYPE_UINT8"),
        ({"input": [{"name": "images", "dims": [3, 299, 299]}]}, {}, "has dims [3, 224, 224] in the model file"),
        ({"input": [{"name": "images", "reshape": {"shape": [1]}}]}, {}, "field(s) reshape are not supported"),
        ({"output": [{"name": "probs", "label_filename": "l.txt"}]}, {}, "needs its content as parameter 'file:l.txt'"),
        ({"output": [{"name": "probs", "label_filename": "l.txt"}]}, {"file:l.txt": b"\xff"}, "is not UTF-8 text"),
        ({}, {"file:1/model.onnx": b"x"}, "file:1/model.onnx: loading model files through RepositoryModelLoad is not supported"),
        ({"input": "images"}, {}, "input must be a list of objects"),
    ],
)
def test_what_a_load_config_cannot_declare_is_refused_precisely(config, files, message):
    with pytest.raises(InvalidArgument) as refused:
        parse(config, files=files)
    assert message in refused.value.message


def test_a_format_needs_three_dimensions():
    with pytest.raises(InvalidArgument, match="FORMAT_NCHW needs 3 dimensions"):
        parse({"input": [{"name": "x", "format": "FORMAT_NCHW"}]}, inputs=[TensorSpec("x", "FP32", (-1, 10))])


def test_classification_appends_the_label_where_the_output_has_one():
    scores = np.array([[0.1, 0.7, 0.2]], np.float32)
    outputs, _ = classification.apply({"probs": scores}, {"probs": OUT}, {"probs": 2}, True, {"probs": ("cat", "dog")})
    # index 2 has no label (the file has fewer lines than classes): Triton's "score:index"
    assert outputs["probs"].tolist() == [[b"0.700000:1:dog", b"0.200000:2"]]
