"""Tests for optimizer/compress/onnx_heads.py through prune-structured on an ONNX source: heads and FFN channels sliced out of a
tiny BERT-style graph (2 layers, hidden 32, 4 heads, FFN 64), built with onnx.helper so no exporter runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.compress import onnx_heads
from slimserve.optimizer.compress.onnx_heads import find_onnx_encoder, tensor_shapes

VOCAB, SEQ, HIDDEN, HEADS, FFN, LAYERS = 50, 12, 32, 4, 64, 2


def tiny_bert_onnx() -> onnx.ModelProto:
    """Embedding, LAYERS post-LN BERT layers (GELU in its Erf form), mean over the sequence: as torch.onnx's dynamo exporter writes them."""
    rng = np.random.default_rng(0)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name: str, *shape: int) -> str:
        return const(name, (rng.standard_normal(shape) * (0.5 / np.sqrt(shape[0]))).astype(np.float32))

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=f"n_{out}", **attrs))
        return out

    const("split_shape", np.array([-1, SEQ, HEADS, HIDDEN // HEADS], np.int64))  # shared by every layer, as exported
    const("merge_shape", np.array([-1, SEQ, HIDDEN], np.int64))
    for name, value in (("one", 1.0), ("half", 0.5), ("sqrt2", np.sqrt(2.0)), ("scale", np.sqrt(HIDDEN // HEADS)), ("neg", -1e4)):
        const(name, np.array(value, np.float32))
    x = node("Gather", [weight("emb", VOCAB, HIDDEN), "input_ids"], "x0")
    m = node("Cast", ["attention_mask"], "m", to=TensorProto.FLOAT)
    m = node("Mul", [node("Sub", ["one", m], "inv"), "neg"], "bias2")
    bias = node("Unsqueeze", [m, const("axes12", np.array([1, 2], np.int64))], "mask_bias")
    for i in range(LAYERS):
        p = f"l{i}"

        def linear(src: str, name: str, n_in: int, n_out: int, p: str = p) -> str:
            mm = node("MatMul", [src, weight(f"{p}.{name}.w", n_in, n_out)], f"{p}.{name}.mm")
            return node("Add", [mm, weight(f"{p}.{name}.b", n_out)], f"{p}.{name}")

        heads = {}
        for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            r = node("Reshape", [linear(x, name, HIDDEN, HIDDEN), "split_shape"], f"{p}.{name}.heads")
            heads[name] = node("Transpose", [r], f"{p}.{name}.t", perm=perm)
        s = node("Div", [node("MatMul", [heads["q"], heads["k"]], f"{p}.qk"), "scale"], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [s, bias], f"{p}.masked")], f"{p}.probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, heads["v"]], f"{p}.ctx")], f"{p}.ctx.t", perm=[0, 2, 1, 3])
        merged = node("Reshape", [ctx, "merge_shape"], f"{p}.merged")
        x = node("Add", [x, linear(merged, "o", HIDDEN, HIDDEN)], f"{p}.res1")
        x = node(
            "LayerNormalization",
            [x, const(f"{p}.g1", np.ones(HIDDEN, np.float32)), const(f"{p}.b1", np.zeros(HIDDEN, np.float32))],
            f"{p}.ln1",
        )
        h = linear(x, "up", HIDDEN, FFN)
        erf = node("Add", [node("Erf", [node("Div", [h, "sqrt2"], f"{p}.d")], f"{p}.erf"), "one"], f"{p}.erf1")
        gelu = node("Mul", [node("Mul", [h, erf], f"{p}.hx"), "half"], f"{p}.gelu")
        x = node("Add", [x, linear(gelu, "down", FFN, HIDDEN)], f"{p}.res2")
        x = node(
            "LayerNormalization",
            [x, const(f"{p}.g2", np.ones(HIDDEN, np.float32)), const(f"{p}.b2", np.zeros(HIDDEN, np.float32))],
            f"{p}.ln2",
        )
    node("ReduceMean", [x], "sentence_embedding", axes=[1], keepdims=0)
    graph = helper.make_graph(
        nodes,
        "tiny_bert",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", SEQ]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feeds(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(SEQ)[None] < rng.integers(3, SEQ + 1, rows)[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, VOCAB, (rows, SEQ)).astype(np.int64) * mask, "attention_mask": mask}


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(tiny_bert_onnx(), str(path))
    np.savez(tmp_path / "data.npz", **feeds(16, 1))
    artifact = Artifact(path, "onnx", input_names=("input_ids", "attention_mask"), output_names=("sentence_embedding",))
    return artifact, PassContext(workdir=tmp_path / "work", datasets={"data": tmp_path / "data.npz"})


def test_the_finder_names_each_layers_attention_and_ffn():
    model = tiny_bert_onnx()
    encoder = find_onnx_encoder(model, tensor_shapes(model, feeds(2, 0)))
    assert [(a.heads, a.head_dim, a.out.weight) for a in encoder.attentions] == [(4, 8, "l0.o.w"), (4, 8, "l1.o.w")]
    assert [(f.up.weight, f.down.weight) for f in encoder.ffns] == [("l0.up.w", "l0.down.w"), ("l1.up.w", "l1.down.w")]


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_an_onnx_transformer_loses_whole_heads_and_ffn_channels_and_still_runs(source, importance):
    artifact, context = source
    out = make_pass("prune-structured", {"pruning_ratio": 0.5, "importance": importance}).run(artifact, context)
    assert (
        out.notes["pruned"] == f"structured {importance} 0.5: attention heads 8 -> 4, FFN channels 128 -> 64 (ONNX graph, not fine-tuned)"
    )
    model = onnx.load(str(out.path))
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    assert (
        shapes["l0.q.w"] == [32, 16] and shapes["l1.o.w"] == [16, 32] and shapes["l0.up.w"] == [32, 32] and shapes["l1.down.w"] == [32, 32]
    )
    assert float(out.notes["params_fraction"]) < 0.8
    data = feeds(3, 7)  # another batch size than the data's: the rewritten reshapes keep the batch free
    pruned = ort.InferenceSession(str(out.path)).run(None, data)[0]
    original = ort.InferenceSession(str(artifact.path)).run(None, data)[0]
    assert pruned.shape == original.shape == (3, HIDDEN)
    assert 0.0 < float(out.notes["cosine_to_source"]) < 0.9999  # half the heads gone: close, not equal


def test_activation_importance_keeps_the_heads_that_carry_the_output(source):
    artifact, context = source
    model = onnx.load(str(artifact.path))
    w = {t.name: t for t in model.graph.initializer}
    value = numpy_helper.to_array(w["l0.v.w"]).copy()
    value[:, 8:16] *= 1e-3  # head 1's values are near zero: it adds nothing, though its Q / K / O weights are large
    w["l0.v.w"].CopyFrom(numpy_helper.from_array(value, "l0.v.w"))
    b = numpy_helper.to_array(w["l0.v.b"]).copy()
    b[8:16] = 0
    w["l0.v.b"].CopyFrom(numpy_helper.from_array(b, "l0.v.b"))
    o = numpy_helper.to_array(w["l0.o.w"]).copy()
    o[8:16] *= 10  # ... and magnitude ranks it first
    w["l0.o.w"].CopyFrom(numpy_helper.from_array(o, "l0.o.w"))
    onnx.save(model, str(artifact.path))
    magnitude = make_pass("prune-structured", {"pruning_ratio": 0.25, "importance": "magnitude"}).run(artifact, context)
    kept_o = numpy_helper.to_array({t.name: t for t in onnx.load(str(magnitude.path)).graph.initializer}["l0.o.w"])
    assert any(np.allclose(kept_o[i * 8 : (i + 1) * 8], o[8:16]) for i in range(3))  # magnitude keeps the idle head
    out = make_pass("prune-structured", {"pruning_ratio": 0.25, "importance": "activation"}).run(artifact, context)
    kept_o = numpy_helper.to_array({t.name: t for t in onnx.load(str(out.path)).graph.initializer}["l0.o.w"])
    assert kept_o.shape == (24, 32) and not any(np.allclose(kept_o[i * 8 : (i + 1) * 8], o[8:16]) for i in range(3))


def test_a_reshape_left_with_the_old_head_count_is_refused(source, monkeypatch):
    artifact, context = source
    monkeypatch.setattr(onnx_heads, "_rewrite_entry", lambda *a, **k: None)
    with pytest.raises(OptimizerError, match="nothing was registered"):
        make_pass("prune-structured", {"pruning_ratio": 0.5}).run(artifact, context)
    assert not list((context.workdir).glob("*-heads*.onnx"))


def test_settings_that_need_torch_are_refused_for_an_onnx_transformer(source):
    artifact, context = source
    with pytest.raises(OptimizerError, match="ONNX transformer, pruned in the graph: importance taylor needs the model in torch"):
        make_pass("prune-structured", {"importance": "taylor"}).run(artifact, context)
    with pytest.raises(OptimizerError, match="exclude names layers of the torch model"):
        make_pass("prune-structured", {"exclude": ["l0.q"]}).run(artifact, context)
