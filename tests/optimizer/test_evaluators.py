"""Tests for optimizer/evaluation/evaluators.py: built-in task metrics in points, plugins by entry point or module, refusals."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.evaluation.evaluators import decode_detections, load_evaluator, mean_iou, nms

RNG = np.random.default_rng(0)


def test_classification_top_k_scores_the_labelled_output_only():
    logits = np.array([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1], [0.2, 0.3, 0.5]], dtype=np.float32)
    outputs = {"boxes": RNG.standard_normal((3, 4)).astype(np.float32) * 100, "class_logits": logits}
    data = {"labels": np.array([2, 0, 1])}
    assert load_evaluator("classification-top1").score(outputs, data, None) == pytest.approx(100 / 3)
    assert load_evaluator("classification-top5").score(outputs, data, None) == 100.0  # 3 classes: k is 3
    with pytest.raises(OptimizerError, match="evaluator 'classification-top1': classification needs evaluation data holding 'labels'"):
        load_evaluator("classification-top1").score(outputs, {}, None)


def _head(boxes_xyxy: list[list[float]], scores: list[float], classes: list[int], anchors: int = 16, n_classes: int = 2) -> np.ndarray:
    """One sample of a YOLOv5-style head [A, 5 + C] (cx cy w h, objectness, class scores), zeros beyond the given boxes."""
    head = np.zeros((anchors, 5 + n_classes), dtype=np.float32)
    for i, (b, s, c) in enumerate(zip(boxes_xyxy, scores, classes)):
        head[i, :4] = [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]
        head[i, 4], head[i, 5 + c] = s, 1.0
    return head


def test_detection_decodes_a_yolo_head_suppresses_duplicates_and_matches_by_iou():
    base = _head([[0, 0, 100, 100], [2, 2, 101, 99], [200, 200, 300, 260]], [0.9, 0.8, 0.7], [0, 0, 1])
    ((boxes, _scores, classes),) = decode_detections({"output0": base[None]})
    assert len(boxes) == 2 and list(classes) == [0, 1]  # the overlapping duplicate is suppressed
    detection = load_evaluator("detection")
    moved = _head([[0, 0, 100, 100], [200, 200, 300, 260]], [0.9, 0.1], [0, 1])  # the second falls below the threshold
    assert detection.score({"output0": base[None]}, {}, {"output0": base[None]}) == 100.0
    assert detection.score({"output0": moved[None]}, {}, {"output0": base[None]}) == pytest.approx(100 * 2 * 1 / (1 + 2))
    gt = {"gt_boxes": np.array([[[0, 0, 100, 100], [-1, -1, -1, -1]]], dtype=np.float32), "gt_classes": np.array([[0, -1]])}
    assert detection.score({"output0": moved[None]}, gt, None) == 100.0  # against ground truth, padding rows ignored


def test_detection_reads_separate_box_and_score_outputs():
    boxes = np.array([[[0, 0, 10, 10], [50, 50, 60, 60]]], dtype=np.float32)
    scores = np.array([[[0.1, 0.9], [0.8, 0.05]]], dtype=np.float32)
    ((_b, s, c),) = decode_detections({"boxes": boxes, "scores": scores})
    assert list(c) == [1, 0] and s[0] == pytest.approx(0.9)
    with pytest.raises(OptimizerError, match=r"detection needs boxes \[N, A, 4\].*the outputs are embedding \[2, 8\]"):
        decode_detections({"embedding": np.zeros((2, 8), dtype=np.float32)})


def test_nms_keeps_other_classes_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]], dtype=np.float64)
    kept = nms(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]))
    assert list(kept) == [0, 2]


def test_segmentation_is_mean_iou_of_class_masks():
    truth = np.zeros((1, 4, 4), dtype=np.int64)
    truth[0, :2] = 1
    logits = np.zeros((1, 2, 4, 4), dtype=np.float32)
    logits[0, 1, :2] = 1.0
    logits[0, 1, 2, 0] = 2.0  # one pixel wrong
    seg = load_evaluator("segmentation")
    expected = 100 * mean_iou(logits.argmax(1), truth)
    assert seg.score({"mask": logits}, {"masks": truth}, None) == pytest.approx(expected) and 70 < expected < 100
    assert seg.score({"mask": logits}, {}, {"mask": logits}) == 100.0


def plugin(outputs, data, reference):
    return 42.0


def raises(outputs, data, reference):
    raise ValueError("no 'plates' array in the evaluation data")


def test_plugins_load_by_entry_point_or_module_and_their_failures_are_refusals(tmp_path, monkeypatch):
    dist = tmp_path / "myeval-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myeval\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[slimserve.evaluators]\nanswer = tests.optimizer.test_evaluators:plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    answer = load_evaluator("answer")
    assert answer.origin == "entry point tests.optimizer.test_evaluators:plugin" and answer.score({}, {}, None) == 42.0
    q = answer.quality({}, {}, {}, 50.0)
    assert (q.metric, q.value, q.drop) == ("evaluator:answer", 42.0, 8.0)
    with pytest.raises(OptimizerError, match=r"unknown evaluator 'nope': this node has answer, classification-top1.*module:attribute"):
        load_evaluator("nope")
    with pytest.raises(
        OptimizerError,
        match=r"evaluator 'tests.optimizer.test_evaluators:raises' \(module tests.optimizer.test_evaluators\) raised ValueError: "
        r"no 'plates' array",
    ):
        load_evaluator("tests.optimizer.test_evaluators:raises").score({}, {}, None)
    with pytest.raises(OptimizerError, match="module 'no_such_module_xyz' cannot be imported"):
        load_evaluator("no_such_module_xyz:f")
    with pytest.raises(OptimizerError, match="has no attribute 'missing'"):
        load_evaluator("tests.optimizer.test_evaluators:missing")
    assert "tests.optimizer.test_evaluators" in sys.modules


def test_an_evaluator_must_return_a_finite_number():
    for bad, said in ((lambda o, d, r: "high", "returned 'high'"), (lambda o, d, r: float("nan"), "returned nan")):
        monkey = load_evaluator("classification-top1")
        evaluator = type(monkey)("bad", "test", bad)
        with pytest.raises(OptimizerError, match=said):
            evaluator.score({}, {}, None)
