"""Triton's classification extension (server/inference/classification.py): top-K as BYTES "score:index"."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.server.errors import InvalidArgument
from slimserve.server.inference import classification
from slimserve.server.runtimes import TensorSpec


def test_top_k_per_sample_best_first_in_tritons_format():
    logits = np.array([[0.1, 2.5, -1.0, 2.5], [3.0, 0.0, 1.0, 2.0]], np.float32)
    out = classification.classify("y", logits, 2, batched=True)
    assert out.shape == (2, 2) and out.dtype == object
    assert out.tolist() == [[b"2.500000:1", b"2.500000:3"], [b"3.000000:0", b"2.000000:3"]]
    assert classification.classify("y", np.array([5, 9, 7], np.int64), 2, batched=False).tolist() == [b"9:1", b"7:2"]


def test_apply_replaces_the_output_and_its_spec_with_bytes():
    outputs, specs = classification.apply({"y": np.eye(3, dtype=np.float32)}, {"y": TensorSpec("y", "FP32", (-1, 3))}, {"y": 1}, True)
    assert specs["y"] == TensorSpec("y", "BYTES", (3, 1)) and outputs["y"][2, 0] == b"1.000000:2"


def test_a_class_count_larger_than_the_output_is_refused_before_and_after_running():
    specs = {"y": TensorSpec("y", "FP32", (-1, 10))}
    with pytest.raises(InvalidArgument, match="class_count 11 is larger than its 10 classes"):
        classification.check(specs, {"y": 11}, batched=True)
    with pytest.raises(InvalidArgument, match="class_count must be >= 1"):
        classification.check(specs, {"y": 0}, batched=True)
    with pytest.raises(InvalidArgument, match="class_count 4 is larger than its 3 classes"):
        classification.classify("y", np.zeros((2, 3), np.float32), 4, batched=True)
