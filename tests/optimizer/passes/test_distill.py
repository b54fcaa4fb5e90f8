"""Tests for optimizer/passes/distill.py: a student a quarter of the teacher's size that keeps its accuracy; students that do not fit are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext, ProgressEvent
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.counting.model_file import count_flops, count_params
from slimserve.optimizer.formats.export import onnx_io_names
from slimserve.optimizer.zoo import DigitsCNN, export_pt2
from tests.optimizer.conftest import top1

FAST = {"epochs": 1, "max_samples": 512}


@pytest.fixture
def teacher(digits) -> Artifact:
    return Artifact(digits.pt2, "pt2", input_names=("x",), output_names=("logits",))


def _context(digits, path, **kwargs) -> PassContext:
    return PassContext(workdir=path, datasets={"train": digits.train, "data": digits.data}, **kwargs)


def _save(module: nn.Module, path) -> str:
    export_pt2(module.eval(), path, torch.zeros(2, 1, 8, 8))
    return str(path)


@pytest.mark.slow
def test_distill_soft_student_is_a_quarter_of_the_teacher_within_two_points(digits, teacher, tmp_path):
    events: list[ProgressEvent] = []
    result = make_pass("distill-soft", {"finetune": {"epochs": 3}}).run(teacher, _context(digits, tmp_path, progress=events.append))
    assert onnx_io_names(result.path) == (("x",), ("logits",))
    sample = {"x": digits.x_test[:1]}
    assert count_params(result.path, "onnx")[0] <= 0.3 * count_params(digits.onnx, "onnx")[0]
    assert count_flops(result.path, "onnx", sample) <= 0.5 * count_flops(digits.onnx, "onnx", sample)
    assert top1(result.path, digits.x_test, digits.y_test) >= top1(digits.onnx, digits.x_test, digits.y_test) - 0.02
    assert any("25.4% of the teacher's" in e.message for e in events)


@pytest.mark.slow
def test_distill_feature_matches_the_named_layers(digits, teacher, tmp_path):
    events: list[ProgressEvent] = []
    config = {"layers": ["features.3", "classifier.1"], "finetune": FAST}
    result = make_pass("distill-feature", config).run(teacher, _context(digits, tmp_path, progress=events.append))
    assert any(e.message == "matching features.3->features.3, classifier.1->classifier.1" for e in events)
    assert count_params(result.path, "onnx")[0] <= 0.3 * count_params(digits.onnx, "onnx")[0]
    assert top1(result.path, digits.x_test, digits.y_test) > 0.8


@pytest.mark.slow
def test_a_user_student_is_trained_and_served(digits, teacher, tmp_path):
    student = _save(DigitsCNN(width=8), tmp_path / "student.pt2")
    config = {"student": student, "finetune": {"epochs": 3, "lr": 1e-2, "augment": {"kind": "none"}}}  # a random init learns from scratch
    result = make_pass("distill-soft", config).run(teacher, _context(digits, tmp_path / "work"))
    assert count_params(result.path, "onnx")[0] == pytest.approx(sum(p.numel() for p in DigitsCNN(width=8).parameters()), rel=0.01)
    assert top1(result.path, digits.x_test, digits.y_test) > 0.5


def test_a_student_with_other_outputs_is_refused(digits, teacher, tmp_path):
    student = _save(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), tmp_path / "five.pt2")
    with pytest.raises(
        OptimizerError, match=r"distill-soft: the student five\.pt2 returns outputs of shapes \[\[2, 5\]\].*teacher \[\[2, 10\]\]"
    ):
        make_pass("distill-soft", {"student": student}).run(teacher, _context(digits, tmp_path / "work"))


def test_a_student_with_other_inputs_is_refused(digits, teacher, tmp_path):
    path = tmp_path / "flat.pt2"
    export_pt2(nn.Linear(64, 10).eval(), path, torch.zeros(2, 64))
    with pytest.raises(
        OptimizerError, match=r"the student flat\.pt2 takes float32 \[N, 64\], and the teacher takes float32 \[N, 1, 8, 8\]"
    ):
        make_pass("distill-feature", {"student": str(path)}).run(teacher, _context(digits, tmp_path / "work"))


def test_a_missing_student_file_and_bad_settings_are_refused(digits, teacher, tmp_path):
    with pytest.raises(OptimizerError, match=r"distill-soft: the student file 'nowhere\.pt2' does not exist"):
        make_pass("distill-soft", {"student": "nowhere.pt2"}).run(teacher, _context(digits, tmp_path))
    with pytest.raises(OptimizerError, match=r"width must be in \(0, 1\] .*got 1.5"):
        make_pass("distill-soft", {"width": 1.5})
    with pytest.raises(OptimizerError, match=r"layers must be a list of 'name' or 'student_name:teacher_name'"):
        make_pass("distill-feature", {"layers": ["a:b:c"]})


def test_keep_layers_is_refused_for_a_model_without_encoder_layers_and_below_zero(digits, teacher, tmp_path):
    with pytest.raises(OptimizerError, match=r"keep_layers must be 0 \(half the encoder layers\) or a count of layers, got -1"):
        make_pass("distill-soft", {"keep_layers": -1})
    with pytest.raises(
        OptimizerError, match="distill-soft: keep_layers 2 applies to a transformer's encoder layers, and the model has no attention"
    ):
        make_pass("distill-soft", {"keep_layers": 2, "finetune": FAST}).run(teacher, _context(digits, tmp_path))


def test_unknown_feature_layers_are_listed(digits, teacher, tmp_path):
    with pytest.raises(
        OptimizerError,
        match=r"layers \(student side\) names no layer 'conv9' \(layers: features\.0, features\.3, classifier\.1, classifier\.3\)",
    ):
        make_pass("distill-feature", {"layers": ["conv9"]}).run(teacher, _context(digits, tmp_path))


@pytest.mark.slow
def test_distill_feature_matches_lstm_features_on_their_last_dim(tmp_path):
    from tests.optimizer import tiny_models as tiny

    lstm = tiny.build(tiny.LstmClassifier(), *tiny.tokens(), tmp_path, "lstm")
    events = []
    context = PassContext(workdir=tmp_path / "w", datasets={"train": lstm.train}, progress=events.append)
    result = make_pass("distill-feature", {"finetune": {"epochs": 1}}).run(lstm.pt2, context)
    assert any(e.message == "matching rnn->rnn" for e in events)
    assert count_params(result.path, "onnx")[0] < 0.5 * count_params(lstm.onnx.path, "onnx")[0]


@pytest.mark.slow
def test_distill_feature_projects_transformer_features_on_their_last_dim(tmp_path):
    from tests.optimizer import tiny_models as tiny

    x, labels = tiny.tokens(classes=3)
    teacher = tiny.build(tiny.EncoderClassifier(width=32), x, labels, tmp_path / "t", "teacher")
    student = tiny.build(tiny.EncoderClassifier(width=16), x, labels, tmp_path / "s", "student")
    events = []
    context = PassContext(workdir=tmp_path / "w", datasets={"train": teacher.train}, progress=events.append)
    config = {"student": str(student.pt2.path), "finetune": {"epochs": 1}}
    result = make_pass("distill-feature", config).run(
        teacher.pt2, context
    )  # refused before: "matched layers need the same rank and spatial size"
    matched = next(e.message for e in events if e.message.startswith("matching "))
    assert "enc.layers.1" in matched
    assert count_params(result.path, "onnx")[0] < 0.5 * count_params(teacher.onnx.path, "onnx")[0]


@pytest.fixture(scope="module")
def bert4(tmp_path_factory):
    from tests.optimizer.tiny_transformers import bert_pt2

    return bert_pt2(tmp_path_factory.mktemp("bert4"), layers=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["distill-soft", "distill-feature"])
def test_a_transformer_student_keeps_half_the_layers_and_matches_their_hidden_states(bert4, tmp_path, name):
    model, train = bert4
    events: list[ProgressEvent] = []
    context = PassContext(workdir=tmp_path, datasets={"train": train}, progress=events.append)
    result = make_pass(name, {"width": 0.5, "finetune": {"epochs": 1}}).run(model, context)
    assert result.notes["student"] == (
        "student with layers encoder.layers.0, encoder.layers.3 of 4; attention heads 8 -> 4, FFN channels 256 -> 128 (teacher init)"
    )
    assert float(result.notes["flops_fraction"]) < 0.3
    matched = [e.message for e in events if e.message.startswith("matching ")]
    if name == "distill-feature":  # [batch, seq, hidden] states of each kept layer against the last teacher layer it stands for
        assert matched == [
            "matching encoder.layers.0.out_norm->encoder.layers.2.out_norm, encoder.layers.3.out_norm->encoder.layers.3.out_norm"
        ]
    else:
        assert matched == []
    assert onnx_io_names(result.path) == (("input_ids", "attention_mask"), ("logits",))


# --------------------------------------------------------------------------------------------
# without labels: an embedding model's student learns the teacher's embeddings (optimizer.objectives)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from tests.optimizer.tiny_transformers import embedding_pt2

    return embedding_pt2(tmp_path_factory.mktemp("embedder"), layers=4)


def cosine_to_teacher(model: Artifact, onnx_path, eval_npz) -> float:
    """Mean cosine of the ONNX variant's embeddings with the .pt2 teacher's on the evaluation rows."""
    import numpy as np
    import onnxruntime as ort

    from slimserve.optimizer.evaluation.quality import cosine_per_sample

    data = dict(np.load(eval_npz))
    teacher = torch.export.load(str(model.path)).module()
    reference = teacher(torch.from_numpy(data["input_ids"]), torch.from_numpy(data["attention_mask"])).detach().numpy()
    out = ort.InferenceSession(str(onnx_path)).run(None, data)[0]
    return float(cosine_per_sample(out, reference).mean())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["distill-soft", "distill-feature"])
def test_without_labels_a_layer_dropping_student_learns_the_teachers_embeddings(embedder, tmp_path, name):
    model, train, data = embedder
    context = PassContext(workdir=tmp_path, datasets={"train": train})
    untrained = make_pass(name, {"width": 1.0, "finetune": {"epochs": 1, "lr": 1e-9}}).run(model, context)  # the student as derived
    trained = make_pass(name, {"width": 1.0, "finetune": {"epochs": 6}}).run(model, context)
    assert trained.notes["student"] == "student with layers encoder.layers.0, encoder.layers.3 of 4 (teacher init)"
    assert trained.notes["objective"].startswith("label-free: 1 - cosine + relative MSE to the teacher's output")
    assert ("hidden-state / feature matching" in trained.notes["objective"]) == (name == "distill-feature")
    before, after = cosine_to_teacher(model, untrained.path, data), cosine_to_teacher(model, trained.path, data)
    assert after > before + 0.01 and after > 0.97, (before, after)
    assert onnx_io_names(trained.path) == (("input_ids", "attention_mask"), ("sentence_embedding",))


def test_width_one_keeps_every_channel_of_a_model_without_layers_to_drop(digits, teacher, tmp_path):
    with pytest.raises(OptimizerError, match="width 1 keeps every channel of a model without encoder layers to drop"):
        make_pass("distill-soft", {"width": 1.0, "finetune": FAST}).run(teacher, _context(digits, tmp_path))


# --------------------------------------------------------------------------------------------
# MiniLM's deep self-attention distillation and direct hidden-state matching


def test_relation_kl_is_zero_for_equal_attention_and_ignores_padded_queries():
    from slimserve.optimizer.compress.students import relation_kl, value_relation

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0]])
    values = torch.randn(1, 2, 4, 8)
    teacher = value_relation(values, mask)
    assert torch.allclose(teacher[..., 3], torch.zeros(1, 2, 4))  # the padded key gets no weight
    assert relation_kl(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)
    other = value_relation(values + torch.randn(1, 2, 4, 8), mask)
    assert relation_kl(other, teacher, mask).item() > 0.01
    moved = teacher.clone()
    moved[:, :, 3] = other[:, :, 3]  # only the padded query row differs
    assert relation_kl(moved, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_minilm_attention_and_direct_hidden_states_train_a_student(tmp_path):
    from tests.optimizer.tiny_transformers import embedding_pt2

    model, train, data = embedding_pt2(tmp_path / "m", layers=4, rows=32)
    events: list[ProgressEvent] = []
    context = PassContext(workdir=tmp_path, datasets={"train": train}, progress=events.append)
    config = {"width": 1.0, "attention_weight": 1.0, "project_features": False, "finetune": {"epochs": 1, "batch_size": 16}}
    result = make_pass("distill-feature", config).run(model, context)
    assert result.notes["objective"].endswith(
        "hidden-state / feature matching (relative MSE, direct); + 1 x MiniLM attention and value-relation KL of the last layer"
    )
    assert onnx_io_names(result.path) == (("input_ids", "attention_mask"), ("sentence_embedding",))
    assert cosine_to_teacher(model, result.path, data) > 0.5
    with pytest.raises(
        OptimizerError, match=r"the student's is \[2, 12, 12\] \(heads, queries, keys\) where the teacher's is \[4, 12, 12\]"
    ):
        make_pass("distill-feature", {**config, "width": 0.5}).run(model, context)


def test_attention_weight_is_refused_below_zero_and_for_a_model_without_attention(digits, teacher, tmp_path):
    with pytest.raises(OptimizerError, match=r"attention_weight must be 0 or more \(0: off\), got -1"):
        make_pass("distill-feature", {"attention_weight": -1})
    with pytest.raises(OptimizerError, match="attention_weight needs a transformer student and teacher"):
        make_pass("distill-feature", {"attention_weight": 1.0, "finetune": FAST}).run(teacher, _context(digits, tmp_path))


# --------------------------------------------------------------------------------------------
# padding-free training: batches by length, the teacher's outputs cached once per row (optimizer/finetune/padding_free.py)


def test_padding_free_training_caches_the_teacher_and_keeps_the_free_length(tmp_path):
    import onnx

    from tests.optimizer.tiny_transformers import embedding_pt2

    model, train, data = embedding_pt2(tmp_path / "free", layers=4, rows=64, free_length=True)
    context = PassContext(workdir=tmp_path, datasets={"train": train})
    config = {"width": 1.0, "finetune": {"epochs": 2, "batch_size": 16, "augment": {"kind": "none"}}}
    free = make_pass("distill-feature", config).run(model, context)
    assert free.notes["training"].startswith("padding-free (") and "the teacher's outputs cached once per row" in free.notes["training"]
    # untrained 0.894; trained padded (padding_free false, same settings) 0.9822, padding-free 0.9822 (measured once)
    assert cosine_to_teacher(model, free.path, data) > 0.95
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(free.path)).graph.input]
    assert dims[0][0] == "batch" and isinstance(dims[0][1], str) and dims[0][1] == dims[1][1]  # the teacher's free length is kept


def training_line(model: Artifact, train, tmp_path, config: dict) -> str:
    """How the pass says it trains, read from its progress; the job is cancelled at its first batch (nothing trained or exported)."""
    events: list[ProgressEvent] = []
    context = PassContext(workdir=tmp_path, datasets={"train": train}, progress=events.append, cancelled=lambda: True)
    with pytest.raises(OptimizerError, match="the job was cancelled"):
        make_pass("distill-feature", config).run(model, context)
    return next(e.message for e in events if e.message.startswith("training "))


def test_training_says_when_the_teacher_runs_on_every_batch_and_when_the_program_takes_one_length(tmp_path):
    from tests.optimizer.tiny_transformers import TOKENS, embedding_pt2

    free_model, free_train, _ = embedding_pt2(tmp_path / "free", layers=2, rows=16, free_length=True)
    augmented = training_line(free_model, free_train, tmp_path, {"width": 1.0, "keep_layers": 1})  # augment auto: text
    assert augmented.startswith("training padding-free (") and augmented.endswith(
        "the teacher runs on every batch: augmentation changes every batch"
    )
    fixed_model, fixed_train, _ = embedding_pt2(tmp_path / "fixed", layers=2, rows=16)
    fixed = training_line(fixed_model, fixed_train, tmp_path, {"width": 1.0, "keep_layers": 1})
    assert fixed.startswith(f"training padded: the program takes a fixed length of {TOKENS} ("), fixed
    assert "export it with a dynamic sequence dimension (torch.export.Dim on axis 1 of the token inputs)" in fixed
