"""Tests for optimizer/passes/prune.py and prune_structured.py (and optimizer/compress/pruning.py): real zeros, fewer channels, precise refusals."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext, ProgressEvent
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.counting.model_file import count_flops, count_params
from slimserve.optimizer.formats.export import onnx_io_names
from slimserve.optimizer.passes.prune import PruneGradualConfig, sparsity_at
from tests.optimizer.conftest import top1

FAST = {"epochs": 1, "max_samples": 512}


def weight_sparsity(path) -> float:
    model = onnx.load(str(path))
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if len(i.dims) >= 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)


def _context(digits, path, **kwargs) -> PassContext:
    return PassContext(workdir=path, datasets={"train": digits.train, "data": digits.data}, **kwargs)


@pytest.fixture(scope="module")
def weight_pruned(digits, tmp_path_factory) -> Artifact:
    source = Artifact(digits.pt2, "pt2", input_names=("x",), output_names=("logits",))
    return make_pass("prune-weight", {"sparsity": 0.5, "finetune": {"epochs": 1}}).run(
        source, _context(digits, tmp_path_factory.mktemp("pw"))
    )


@pytest.fixture(scope="module")
def channel_pruned(digits, tmp_path_factory) -> Artifact:
    source = Artifact(digits.pt2, "pt2", input_names=("x",), output_names=("logits",))
    return make_pass("prune-structured", {"pruning_ratio": 0.5, "finetune": {"epochs": 2}}).run(
        source, _context(digits, tmp_path_factory.mktemp("ps"))
    )


@pytest.mark.slow
def test_prune_weight_writes_real_zeros_and_keeps_accuracy(digits, weight_pruned, baseline_accuracy):
    assert (weight_pruned.format, weight_pruned.runtime) == ("onnx", "onnxruntime")
    assert onnx_io_names(weight_pruned.path) == (("x",), ("logits",))
    assert weight_sparsity(weight_pruned.path) == pytest.approx(0.5, abs=0.01)
    params, nonzero = count_params(weight_pruned.path, "onnx")
    assert 1 - nonzero / params >= 0.45  # what evaluation reports as nonzero_params
    assert top1(weight_pruned.path, digits.x_test, digits.y_test) >= baseline_accuracy - 0.01


@pytest.mark.slow
def test_prune_gradual_reaches_its_sparsity_with_regrowth(digits, pt2_model, tmp_path, baseline_accuracy):
    events: list[ProgressEvent] = []
    config = {"sparsity": 0.6, "regrowth": True, "update_every": 3, "finetune": {"epochs": 2}}
    result = make_pass("prune-gradual", config).run(pt2_model, _context(digits, tmp_path, progress=events.append))
    assert weight_sparsity(result.path) == pytest.approx(0.6, abs=0.01)
    assert top1(result.path, digits.x_test, digits.y_test) >= baseline_accuracy - 0.01
    assert [e.epoch for e in events if e.epoch is not None] == [1, 2]


def test_gradual_schedule_is_cubic_between_start_and_end():
    config = PruneGradualConfig(sparsity=0.8, initial_sparsity=0.0, start_fraction=0.0, end_fraction=0.5)
    values = [sparsity_at(step, 100, config) for step in range(101)]
    assert values[0] == 0.0 and values[50] == 0.8 and values[100] == 0.8
    assert values[25] == pytest.approx(0.8 * (1 - 0.5**3))
    assert all(a <= b for a, b in itertools.pairwise(values))


@pytest.mark.slow
def test_prune_structured_makes_the_onnx_model_really_smaller(digits, channel_pruned, baseline_accuracy):
    base_params, _ = count_params(digits.onnx, "onnx")
    params, nonzero = count_params(channel_pruned.path, "onnx")
    sample = {"x": digits.x_test[:1]}
    assert params <= 0.7 * base_params and nonzero > 0.99 * params  # dense: channels are gone, not zeroed
    assert count_flops(channel_pruned.path, "onnx", sample) <= 0.6 * count_flops(digits.onnx, "onnx", sample)
    assert channel_pruned.path.stat().st_size <= 0.7 * digits.onnx.stat().st_size
    session = ort.InferenceSession(str(channel_pruned.path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": digits.x_test[:7]})[0].shape == (7, 10)  # batch still dynamic
    assert top1(channel_pruned.path, digits.x_test, digits.y_test) >= baseline_accuracy - 0.015


@pytest.mark.slow
@pytest.mark.parametrize("importance", ["taylor", "bn-scale"])
def test_prune_structured_importance_criteria(digits, pt2_model, tmp_path, importance):
    result = make_pass("prune-structured", {"importance": importance, "pruning_ratio": 0.25, "finetune": FAST}).run(
        pt2_model, _context(digits, tmp_path)
    )
    # bn-scale ranks only channels that feed a BatchNorm, so the hidden linear layer keeps its width
    assert count_params(result.path, "onnx")[0] < 0.8 * count_params(digits.onnx, "onnx")[0]


@pytest.mark.parametrize("name", ["prune-weight", "prune-gradual", "prune-structured", "distill-soft", "distill-feature"])
def test_no_train_data_says_which_file_to_add(pt2_model, tmp_path, name):
    with pytest.raises(
        OptimizerError, match=rf"{name} fine-tunes the model and needs train data.*slimctl register NAME MODEL --train TRAIN\.npz"
    ):
        make_pass(name).run(pt2_model, PassContext(workdir=tmp_path))


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1])
def test_sparsity_outside_zero_one_is_refused(value):
    with pytest.raises(OptimizerError, match=rf"pass 'prune-weight': sparsity must be in \(0, 1\), got {value}"):
        make_pass("prune-weight", {"sparsity": value})
    with pytest.raises(OptimizerError, match=r"sparsity must be in \(0, 1\)"):
        make_pass("prune-gradual", {"sparsity": value})
    with pytest.raises(OptimizerError, match=r"pruning_ratio must be in \(0, 1\)"):
        make_pass("prune-structured", {"pruning_ratio": value})


def test_onnx_models_are_pruned_like_pt2_ones(digits, tmp_path):
    onnx_model = Artifact(digits.onnx, "onnx", input_names=("x",), output_names=("logits",))
    result = make_pass("prune-weight", {"sparsity": 0.5, "finetune": FAST}).run(onnx_model, _context(digits, tmp_path))
    assert result.format == "onnx" and weight_sparsity(result.path) >= 0.45


def test_nan_loss_fails_precisely_and_leaves_the_model_untouched(digits, pt2_model, tmp_path):
    bad = tmp_path / "train.npz"
    x = np.load(digits.train)["x"].copy()
    x[:] = np.nan
    np.savez(bad, x=x, labels=np.load(digits.train)["labels"])
    before = hashlib.sha256(digits.pt2.read_bytes()).hexdigest()
    with pytest.raises(OptimizerError, match=r"prune-weight: the training loss became nan at epoch 1, step 1 .*lower finetune\.lr"):
        make_pass("prune-weight").run(pt2_model, PassContext(workdir=tmp_path / "work", datasets={"train": bad}))
    assert hashlib.sha256(digits.pt2.read_bytes()).hexdigest() == before


def test_unknown_layer_names_are_listed(digits, pt2_model, tmp_path):
    with pytest.raises(
        OptimizerError, match=r"exclude names no layer 'conv9' \(layers: features\.0, features\.3, classifier\.1, classifier\.3\)"
    ):
        make_pass("prune-weight", {"exclude": ["conv9"]}).run(pt2_model, _context(digits, tmp_path))


# ---------------------------------------------------------------------------------------------
# Recurrent layers, and passes that remove nothing


@pytest.fixture(scope="module")
def lstm(tmp_path_factory):
    from tests.optimizer import tiny_models as tiny

    return tiny.build(tiny.LstmClassifier(), *tiny.tokens(), tmp_path_factory.mktemp("lstm"), "lstm")


def test_prune_weight_zeroes_the_recurrent_weights_of_an_lstm(lstm, tmp_path):
    result = make_pass("prune-weight", {"sparsity": 0.5, "finetune": {"epochs": 1}}).run(
        lstm.pt2, PassContext(workdir=tmp_path, datasets={"train": lstm.train})
    )
    params, nonzero = count_params(result.path, "onnx")
    assert nonzero < 0.6 * params  # 160 of 52,549 weights before: the LSTM's were untouched


def test_prune_structured_removes_hidden_units_of_every_lstm_layer(lstm, tmp_path):
    result = make_pass("prune-structured", {"finetune": {"epochs": 1}}).run(
        lstm.pt2, PassContext(workdir=tmp_path, datasets={"train": lstm.train})
    )
    model = onnx.load(str(result.path))
    recurrent = [i for n in model.graph.node if n.op_type == "LSTM" for i in n.input[1:3]]
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    assert all(shapes[w][1] == 4 * 24 for w in recurrent if w in shapes)  # 32 hidden units, a quarter removed, in both layers
    assert float(result.notes["flops_fraction"]) < 0.8
    assert count_flops(result.path, "onnx", lstm.sample) <= count_flops(lstm.onnx.path, "onnx", lstm.sample)


def test_prune_structured_that_removes_nothing_says_which_layers_it_could_not_touch(tmp_path):
    from tests.optimizer import tiny_models as tiny

    x, labels = tiny.tokens()
    features = np.eye(16, dtype=np.float32)[x % 16]  # [N, T, 16]
    bidirectional = tiny.build(tiny.LstmClassifier(layers=1, bidirectional=True, embedding=False), features, labels, tmp_path, "bi")
    with pytest.raises(
        OptimizerError,
        match=r"prune-structured: no layer is left to prune, so nothing would be removed and no variant was made; it could not prune: rnn \(it is bidirectional",
    ):
        make_pass("prune-structured", {"finetune": {"epochs": 1}}).run(
            bidirectional.pt2, PassContext(workdir=tmp_path / "w", datasets={"train": bidirectional.train})
        )


# ---------------------------------------------------------------------------------------------
# Transformers: whole attention heads and FFN channels (optimizer/compress/transformer.py)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from tests.optimizer.tiny_transformers import bert_pt2

    return bert_pt2(tmp_path_factory.mktemp("bert"), layers=2)


@pytest.mark.slow
def test_prune_structured_removes_heads_and_ffn_channels_of_a_transformer(tiny_bert, tmp_path):
    from tests.optimizer.tiny_transformers import bert_example

    model, train = tiny_bert
    events: list[ProgressEvent] = []
    context = PassContext(workdir=tmp_path, datasets={"train": train}, progress=events.append)
    result = make_pass("prune-structured", {"pruning_ratio": 0.5, "finetune": {"epochs": 1}}).run(model, context)
    assert result.notes["pruned"] == "structured magnitude 0.5: attention heads 8 -> 4, FFN channels 256 -> 128"
    assert float(result.notes["flops_fraction"]) < 0.6
    ids, mask = (t.numpy() for t in bert_example(3))
    weights = {i.name: numpy_helper.to_array(i).shape for i in onnx.load(str(result.path)).graph.initializer}
    assert (16, 32) in weights.values() and (32, 64) in weights.values()  # query rows: 2 heads of 8; FFN output: 64 inputs
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input_ids": ids, "attention_mask": mask})[0].shape == (3, 3)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"pruning_ratio": 0.01}, r"a pruning ratio of 0.01 removes no attention head \(8 in 2 units\) and no FFN channel \(256 in 2 FFNs"),
        ({"global_pruning": True}, "global_pruning ranks channels across layers, and a transformer's heads and FFN channels"),
        ({"importance": "bn-scale"}, "importance bn-scale does not apply to attention heads and FFN channels; use magnitude or taylor"),
    ],
)
def test_prune_structured_refuses_before_training_what_it_cannot_do_to_a_transformer(tiny_bert, tmp_path, config, message):
    model, train = tiny_bert
    events: list[ProgressEvent] = []
    context = PassContext(workdir=tmp_path, datasets={"train": train}, progress=events.append)
    with pytest.raises(OptimizerError, match=message):
        make_pass("prune-structured", config).run(model, context)
    assert not any("epoch" in e.message for e in events)


@pytest.mark.slow
def test_without_labels_prune_structured_fine_tunes_toward_the_unpruned_embeddings(tmp_path):
    from tests.optimizer.passes.test_distill import cosine_to_teacher
    from tests.optimizer.tiny_transformers import embedding_pt2

    model, train, data = embedding_pt2(tmp_path / "embedder", layers=2)
    context = PassContext(workdir=tmp_path, datasets={"train": train})
    config = {"pruning_ratio": 0.5, "round_to": 0}
    untrained = make_pass("prune-structured", {**config, "finetune": {"epochs": 1, "lr": 1e-9}}).run(model, context)
    trained = make_pass("prune-structured", {**config, "finetune": {"epochs": 6}}).run(model, context)
    assert trained.notes["objective"] == "label-free: 1 - cosine + relative MSE to the unpruned model's output"
    assert "attention heads" in trained.notes["pruned"]
    before, after = cosine_to_teacher(model, untrained.path, data), cosine_to_teacher(model, trained.path, data)
    assert after > before + 0.005 and after > 0.97, (before, after)
    with pytest.raises(
        OptimizerError, match="taylor importance takes gradients of the loss on the labels, and the train data has no 'labels'"
    ):
        make_pass("prune-structured", {"importance": "taylor", "finetune": {"epochs": 1}}).run(model, context)
