"""Tests for optimizer/compress/transformer.py and optimizer/compress/students.py: heads and FFN channels really removed, layer-dropping students."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.compress.students import exit_module, hidden_state_pairs, layer_dropping_student
from slimserve.optimizer.compress.transformer import find_encoder, prune_encoder_
from slimserve.optimizer.formats.export import export_dynamic_batch
from slimserve.optimizer.formats.torchlayers import lift_layers
from tests.optimizer.tiny_transformers import TOKENS, GluEncoder, TorchEncoder, bert, bert_example, torch_example

_LIFTED: dict[tuple, torch.fx.GraphModule] = {}


def lifted(module: nn.Module, example: tuple[torch.Tensor, ...], key: tuple = ()) -> torch.fx.GraphModule:
    """The module exported and lifted (a fresh copy each call; exported once per key, the slow part)."""
    if not key or key not in _LIFTED:
        program = lift_layers(export_dynamic_batch(module, example, "test").module(check_guards=False))
        if not key:
            return program
        _LIFTED[key] = program
    return copy.deepcopy(_LIFTED[key])


CASES = {"bert": (bert, bert_example), "torch": (lambda: TorchEncoder().eval(), torch_example)}


def case(kind: str, layers: int = 2) -> tuple[torch.fx.GraphModule, object]:
    _, example = CASES[kind]
    module = bert(layers) if kind == "bert" else TorchEncoder(layers).eval()
    return lifted(module, example(), key=(kind, layers)), example


@pytest.mark.parametrize("kind", CASES)
def test_find_encoder_names_attention_units_ffns_and_layers(kind):
    module, _ = case(kind)
    encoder = find_encoder(module)
    assert encoder is not None
    prefix = "encoder.layers" if kind == "bert" else "enc.layers"
    assert encoder.layers == [f"{prefix}.0", f"{prefix}.1"]
    assert [(a.heads, a.head_dim) for a in encoder.attentions] == [(4, 8), (4, 8)]
    if kind == "bert":
        assert encoder.attentions[0].projections == ("encoder.layers.0.query", "encoder.layers.0.key", "encoder.layers.0.value")
        assert [(f.up, f.down) for f in encoder.ffns] == [(f"{prefix}.{i}.intermediate", f"{prefix}.{i}.output") for i in range(2)]
    else:
        assert encoder.attentions[0].fused and encoder.attentions[0].out == "enc.layers.0.self_attn.out_proj"
        assert [(f.up, f.down) for f in encoder.ffns] == [(f"{prefix}.{i}.linear1", f"{prefix}.{i}.linear2") for i in range(2)]


def test_a_model_without_attention_has_no_encoder():
    mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    assert find_encoder(lifted(mlp, (torch.randn(2, 8),))) is None


@pytest.mark.parametrize("kind", CASES)
def test_prune_encoder_removes_heads_and_ffn_channels_and_the_model_still_runs_and_exports(kind):
    module, example = case(kind)
    encoder = find_encoder(module)
    params = sum(p.numel() for p in module.parameters())
    removed = prune_encoder_(module, example(), 0.5, "test")
    ffn = 128 if kind == "bert" else 64  # per layer: BERT's 4 x hidden, nn.TransformerEncoderLayer's 64 here
    assert removed.describe() == f"attention heads 8 -> 4, FFN channels {2 * ffn} -> {ffn}"
    unit = encoder.attentions[0]
    for name in unit.projections:
        assert module.get_submodule(name).out_features == (16 if kind == "bert" else 48)  # 2 heads of 8 (x3 when fused)
    assert module.get_submodule(unit.out).in_features == 16
    assert module.get_submodule(encoder.ffns[0].up).out_features == ffn // 2
    assert module.get_submodule(encoder.ffns[0].down).in_features == ffn // 2
    assert sum(p.numel() for p in module.parameters()) < params
    module.eval()
    program = export_dynamic_batch(module, example(), "test")  # exports with a free batch: the reshapes follow the batch
    assert program.module()(*example(5)).shape == (5, 3)


def test_a_glu_ffn_loses_the_same_rows_of_gate_and_up_and_columns_of_down():
    module = lifted(GluEncoder().eval(), torch_example(), key=("glu", 2))
    encoder = find_encoder(module)
    assert [(f.gate, f.up, f.down) for f in encoder.ffns] == [(f"layers.{i}.gate", f"layers.{i}.up", f"layers.{i}.down") for i in range(2)]
    gate, up = module.get_submodule("layers.0.gate").weight.data.clone(), module.get_submodule("layers.0.up").weight.data.clone()
    removed = prune_encoder_(module, torch_example(), 0.5, "test")  # checks itself against the original with the channels zeroed
    assert removed.describe() == "attention heads 8 -> 4, FFN channels 128 -> 64"
    kept_gate, kept_up = module.get_submodule("layers.0.gate").weight.data, module.get_submodule("layers.0.up").weight.data
    assert kept_gate.shape == kept_up.shape == (32, 32) and module.get_submodule("layers.0.down").in_features == 32
    rows = [next(i for i in range(64) if torch.equal(gate[i], row)) for row in kept_gate]
    assert torch.equal(up[rows], kept_up)  # the same channels of both: the product down reads stays whole
    module.eval()
    assert export_dynamic_batch(module, torch_example(), "test").module()(*torch_example(5)).shape == (5, 3)


def test_pruned_heads_compute_what_the_original_computes_without_them():
    """prune_encoder_ checks itself against the masked original; here the check is checked: a wrong rewrite is refused."""
    module, _ = case("bert")
    unit = find_encoder(module).attentions[0]
    reshape = next(n for n in unit.region if "reshape" in str(n.target))
    before = reshape.args
    prune_encoder_(module, bert_example(), 0.5, "test")
    assert reshape.args != before  # the head count constant was rewritten (4 -> 2)
    broken, _ = case("bert")
    unit = find_encoder(broken).attentions[0]
    for node in unit.region:  # a unit whose shapes cannot be followed: a transpose in place of its head split
        if "reshape" in str(node.target):
            node.args = (node.args[0], [node.args[1][0], TOKENS, 2, 16] if len(node.args[1]) == 4 else node.args[1])
    broken.recompile()
    with pytest.raises(OptimizerError, match="the attention's reshapes could not be rewritten for fewer heads"):
        prune_encoder_(broken, bert_example(), 0.5, "test")


def test_taylor_importance_keeps_the_heads_with_gradient_and_bn_scale_is_refused():
    module, _ = case("bert")
    with pytest.raises(OptimizerError, match="importance bn-scale is not defined for attention heads"):
        prune_encoder_(module, bert_example(), 0.5, "test", importance="bn-scale")
    module.train()
    nn.functional.cross_entropy(module(*bert_example()), torch.tensor([0, 1])).backward()
    query = module.get_submodule("encoder.layers.0.query")
    grad = query.weight.grad.clone()
    grad[:8] = 0  # head 0 of the query / key / value rows and the output columns: no gradient, least important
    for name in ("key", "value"):
        module.get_submodule(f"encoder.layers.0.{name}").weight.grad[:8] = 0
    module.get_submodule("encoder.layers.0.attn_out").weight.grad[:, :8] = 0
    query.weight.grad.copy_(grad)
    kept = query.weight.data[8:32].clone()
    prune_encoder_(module, bert_example(), 0.25, "test", importance="taylor")
    assert torch.equal(query.weight.data, kept)  # heads 1, 2, 3 stay, in order


# ---------------------------------------------------------------------------------------------
# Layer-dropping students


@pytest.mark.parametrize("kind", CASES)
def test_the_student_keeps_half_the_layers_first_and_last_with_the_teachers_weights(kind):
    teacher, example = case(kind, layers=4)
    student, kept = layer_dropping_student(teacher, example(), 0.99, "test")
    layers = find_encoder(student).layers
    prefix = "encoder.layers" if kind == "bert" else "enc.layers"
    assert layers == [f"{prefix}.0", f"{prefix}.3"] and kept == f"layers {prefix}.0, {prefix}.3 of 4"  # width 0.99 removes no head
    names = dict(student.named_parameters())
    assert not any(n.startswith((f"{prefix}.1.", f"{prefix}.2.")) for n in names)
    for name, value in teacher.named_parameters():
        if name.startswith((f"{prefix}.0.", f"{prefix}.3.")):
            assert torch.equal(names[name], value), name
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    with torch.no_grad():
        assert student(*example()).shape == (2, 3)
    student.eval()
    assert export_dynamic_batch(student, example(), "test").module()(*example(4)).shape == (4, 3)


def test_a_narrower_student_also_loses_heads_and_ffn_channels():
    teacher, _ = case("bert", layers=4)
    student, kept = layer_dropping_student(teacher, bert_example(), 0.5, "test")
    assert kept == "layers encoder.layers.0, encoder.layers.3 of 4; attention heads 8 -> 4, FFN channels 256 -> 128"  # layers 0 and 3
    assert student.get_submodule("encoder.layers.3.query").out_features == 16


def test_keep_layers_picks_k_layers_spread_from_first_to_last_and_refuses_counts_that_shrink_nothing():
    teacher, _ = case("bert", layers=4)
    student, kept = layer_dropping_student(teacher, bert_example(), 1.0, "test", keep_layers=3)
    assert find_encoder(student).layers == ["encoder.layers.0", "encoder.layers.2", "encoder.layers.3"]
    assert kept == "layers encoder.layers.0, encoder.layers.2, encoder.layers.3 of 4"
    pairs = hidden_state_pairs(student, teacher)  # layer 0 stands for teacher layers 0-1, so it matches 1's output
    assert [t.split(".")[2] for _, t in pairs] == ["1", "2", "3"]
    for bad in (4, 5):
        with pytest.raises(OptimizerError, match=rf"keep_layers {bad} does not make a smaller student of a model with 4 encoder layers"):
            layer_dropping_student(teacher, bert_example(), 1.0, "test", keep_layers=bad)


def test_a_one_layer_encoder_has_no_layer_to_drop():
    teacher = lifted(TorchEncoder(layers=1).eval(), torch_example())
    with pytest.raises(OptimizerError, match=r"1 encoder layer\(s\) .* there is no layer to drop; give a smaller student as a \.pt2"):
        layer_dropping_student(teacher, torch_example(), 0.5, "test")


def test_hidden_states_pair_each_kept_layer_with_the_last_teacher_layer_it_stands_for():
    teacher, _ = case("bert", layers=4)
    student, _ = layer_dropping_student(teacher, bert_example(), 0.99, "test")
    assert hidden_state_pairs(student, teacher) == [
        ("encoder.layers.0.out_norm", "encoder.layers.2.out_norm"),
        ("encoder.layers.3.out_norm", "encoder.layers.3.out_norm"),
    ]
    assert hidden_state_pairs(teacher, teacher) == []  # the same layers: not a layer-dropping student


def test_a_pre_layernorm_layer_gets_an_identity_to_tap_and_computes_the_same():
    module = lifted(TorchEncoder(norm_first=True).eval(), torch_example())
    with torch.no_grad():
        before = module(*torch_example())
    name = exit_module(module, "enc.layers.1")
    assert name == "enc.layers.1.hidden_state"
    seen = []
    module.get_submodule(name).register_forward_hook(lambda _m, _a, out: seen.append(out.shape))
    with torch.no_grad():
        np.testing.assert_array_equal(module(*torch_example()).numpy(), before.numpy())
    assert seen == [(2, TOKENS, 32)]


def test_least_harm_drops_the_layer_that_changes_the_output_least_and_merge_averages_into_neighbours():
    module = bert(4)
    with torch.no_grad():  # layer 2 adds nothing to its input: dropping it costs nothing, so least-harm drops it, not layer 1
        for name in ("attn_out", "output"):
            layer = module.get_submodule(f"encoder.layers.2.{name}")
            layer.weight.zero_()
            layer.bias.zero_()
    teacher = lifted(module, bert_example(), key=("bert-identity-2", 4))
    student, kept = layer_dropping_student(teacher, bert_example(), 1.0, "test", keep_layers=3, choice="least-harm", probe=bert_example(8))
    assert find_encoder(student).layers == ["encoder.layers.0", "encoder.layers.1", "encoder.layers.3"]
    assert kept == "layers encoder.layers.0, encoder.layers.1, encoder.layers.3 of 4 (least harm)"
    merged, kept = layer_dropping_student(teacher, bert_example(), 1.0, "test", keep_layers=3, merge=True)  # spread: 0, 2, 3
    assert kept.endswith(", dropped layers averaged into their kept neighbours")
    weights = [teacher.get_submodule(f"encoder.layers.{i}.query").weight for i in (0, 1)]
    assert torch.allclose(merged.get_submodule("encoder.layers.0.query").weight, (weights[0] + weights[1]) / 2)
    assert torch.equal(merged.get_submodule("encoder.layers.3.query").weight, teacher.get_submodule("encoder.layers.3.query").weight)
