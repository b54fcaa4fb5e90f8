"""Tests for optimizer/evaluation/quality.py: the metric follows the output's kind, and every drop is in points of the budget."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.evaluation.quality import choose_metric, choose_metrics, describe, measure, measure_outputs, parse_declared, worst

RNG = np.random.default_rng(0)
EMBEDDINGS = RNG.standard_normal((50, 384)).astype(np.float32)
LOGITS = RNG.standard_normal((50, 10)).astype(np.float32)
LABELS = RNG.integers(0, 10, 50)


def test_the_metric_follows_labels_shape_and_name():
    assert choose_metric(LOGITS, LABELS, "output_0") == "accuracy"
    assert choose_metric(EMBEDDINGS, None, "sentence_embedding") == "cosine"  # MiniLM [N, 384]: not argmax
    assert choose_metric(EMBEDDINGS[:, :64], None, "output_0") == "cosine"  # wide and unnamed: an embedding
    assert choose_metric(EMBEDDINGS[:, :10], None, "output_0") == "top1-agreement"  # narrow and unnamed: a classifier's
    assert choose_metric(EMBEDDINGS[:, :2], None, "output") == "top1-agreement"  # [N, 2]: decisions, not cosine
    assert choose_metric(EMBEDDINGS[:, :10], None, "pooled_features") == "cosine"
    assert choose_metric(EMBEDDINGS[:, :4], LABELS, "boxes") == "relative-error"  # labels never go to boxes
    assert choose_metric(LOGITS, None, "logits") == "top1-agreement"
    assert choose_metric(LOGITS, None, "probabilities") == "top1-agreement"
    assert choose_metric(LOGITS[:, 0], None, "price") == "relative-error"
    assert choose_metric(LOGITS[:, :1], LABELS, "price") == "relative-error"  # labels, but no classes to score them on
    assert choose_metric(LABELS, None, "class_id") == "top1-agreement"  # integers: equal or not
    assert choose_metric(RNG.standard_normal((4, 7, 32)), None, "last_hidden_state") == "cosine"


def test_a_requested_metric_is_checked():
    assert choose_metric(LOGITS, LABELS, "logits", "cosine") == "cosine"
    with pytest.raises(OptimizerError, match=r"must be one of accuracy, top1-agreement, cosine, relative-error"):
        choose_metric(LOGITS, None, "logits", "mse")
    with pytest.raises(OptimizerError, match=r"'accuracy' of output 'embedding' needs a classifier's logits .* 'labels'"):
        choose_metric(EMBEDDINGS, None, "embedding", "accuracy")


def test_cosine_keeps_mean_and_worst_and_drops_in_points():
    noisy = EMBEDDINGS + 0.1 * RNG.standard_normal(EMBEDDINGS.shape).astype(np.float32)
    q = measure("cosine", noisy, None, EMBEDDINGS, None)
    cos = (noisy * EMBEDDINGS).sum(1) / np.linalg.norm(noisy, axis=1) / np.linalg.norm(EMBEDDINGS, axis=1)
    assert q.value == pytest.approx(cos.mean(), rel=1e-5) and q.worst == pytest.approx(cos.min(), rel=1e-5)
    assert q.drop == pytest.approx((1 - cos.mean()) * 100, rel=1e-5)
    assert 0.99 < q.value < 1.0
    # What argmax agreement would have said of the same embeddings: far lower, and wrong.
    assert np.mean(noisy.argmax(1) == EMBEDDINGS.argmax(1)) < q.value - 0.05


def test_accuracy_drop_is_accuracy_points_and_the_baseline_has_none():
    base = measure("accuracy", LOGITS, LABELS, None, None)
    assert base.value == pytest.approx(np.mean(LOGITS.argmax(1) == LABELS)) and base.drop is None
    worse = LOGITS.copy()
    right = np.flatnonzero(LOGITS.argmax(1) == LABELS)[:2]
    worse[right, LABELS[right]] = -100.0
    q = measure("accuracy", worse, LABELS, LOGITS, base.value)
    assert q.drop == pytest.approx(4.0)  # two of 50 answers: 4 points


def test_agreement_and_relative_error():
    flipped = LOGITS.copy()
    flipped[:5] = -flipped[:5]
    q = measure("top1-agreement", flipped, None, LOGITS, None)
    assert q.value == pytest.approx(np.mean(flipped.argmax(1) == LOGITS.argmax(1))) and q.drop == pytest.approx(100 * (1 - q.value))
    values = RNG.standard_normal(50)
    q = measure("relative-error", values * 1.02, None, values, None)
    assert q.value == pytest.approx(0.02) and q.drop == pytest.approx(2.0)
    with pytest.raises(OptimizerError, match=r"shape \[50, 10\], the baseline's \[50, 384\]"):
        measure("cosine", LOGITS, None, EMBEDDINGS, None)


def test_describe_says_the_value_in_its_unit():
    assert describe("cosine", 0.99312) == "cosine 0.9931"
    assert describe("accuracy", 0.9725) == "accuracy 97.25%"
    assert describe("relative-error", 0.0041) == "relative error 0.41%"
    assert describe(None, None) == "quality not measured"


def test_every_output_gets_its_metric_and_labels_go_to_one_output():
    outputs = {"boxes": RNG.standard_normal((50, 4)) * 100, "scores": RNG.standard_normal((50, 2)), "embedding": EMBEDDINGS}
    labels = RNG.integers(0, 2, 50)
    assert choose_metrics(outputs, labels) == {"boxes": "relative-error", "scores": "accuracy", "embedding": "cosine"}
    assert choose_metrics(outputs, None) == {"boxes": "relative-error", "scores": "top1-agreement", "embedding": "cosine"}
    declared = {"embedding": "relative-error", "boxes": "cosine"}
    assert choose_metrics(outputs, labels, declared) == {"boxes": "cosine", "scores": "accuracy", "embedding": "relative-error"}


def test_the_budget_holds_the_worst_output():
    """A detector whose boxes move while its class scores agree: the boxes' relative error binds, not the scores' agreement."""
    boxes = RNG.uniform(0, 640, (50, 4))
    scores = RNG.standard_normal((50, 3))
    reference = {"boxes": boxes, "scores": scores}
    variant = {"boxes": boxes * 1.05, "scores": scores}
    metrics = choose_metrics(reference, None)
    qualities = measure_outputs(metrics, variant, None, reference, {})
    assert qualities["scores"].drop == pytest.approx(0.0)
    assert qualities["boxes"].drop == pytest.approx(5.0)
    assert worst(qualities) == "boxes"


def test_quality_declarations_are_checked():
    assert parse_declared(["logits=top1-agreement", " boxes = relative-error"], ["logits", "boxes"]) == {
        "logits": "top1-agreement",
        "boxes": "relative-error",
    }
    with pytest.raises(OptimizerError, match=r"has no output 'logit'.*logits, boxes"):
        parse_declared(["logit=cosine"], ["logits", "boxes"])
    with pytest.raises(OptimizerError, match="must be one of"):
        parse_declared(["logits=mse"], ["logits"])
    with pytest.raises(OptimizerError, match="OUTPUT=METRIC"):
        parse_declared(["logits"], ["logits"])
    with pytest.raises(OptimizerError, match="'accuracy' of output 'price' needs a classifier's logits"):
        choose_metrics({"price": RNG.standard_normal(5)}, LABELS[:5], {"price": "accuracy"})
    with pytest.raises(OptimizerError, match="names output logit, and the model's outputs are price"):
        choose_metrics({"price": RNG.standard_normal(5)}, None, {"logit": "cosine"})
