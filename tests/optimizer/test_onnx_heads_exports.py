"""optimizer/compress/onnx_heads.py on ONNX files torch.onnx wrote, not ones built here: the tiny transformers of
bench/tiny_exports.py (a BERT layer as Hugging Face writes it, a GPT-2 block with fused QKV in Conv1D, a Llama block
with grouped-query attention and a SwiGLU FFN, timm's ViT attention, nn.TransformerEncoder), exported by the TorchScript exporter (dynamo=False) at opsets 11, 14
and 17, then cut by prune-structured, whose ORT check against the original with the removed rows zeroed must pass.
The dynamo exporter's files (about 5 s an export) are cut by `python -m bench.bench_onnx_heads --tiny`."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")

from bench.tiny_exports import HIDDEN, SEQ, export, feeds
from slimserve.optimizer.base import Artifact, PassContext
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.compress.onnx_heads import find_onnx_encoder, tensor_shapes


def prune(tmp_path, name: str, exporter: str, config: dict) -> tuple[Artifact, Artifact]:
    path = tmp_path / f"{name}.onnx"
    export(name, exporter, path)
    np.savez(tmp_path / "data.npz", **feeds(name, 8, 1))
    source = Artifact(path, "onnx", input_names=tuple(feeds(name, 1, 0)), output_names=("output",))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": tmp_path / "data.npz"})
    return source, make_pass("prune-structured", config).run(source, context)


def weights(path) -> dict[str, tuple[int, ...]]:
    from slimserve.optimizer.compress.onnx_heads import _Graph, _linears

    g = _Graph(onnx.load(str(path)), {})
    return {lin.node.name: g.weight(lin).shape for lin in _linears(g).values()}


@pytest.mark.parametrize("exporter", ["torchscript-11", "torchscript-17"])
def test_a_bert_exported_by_torchscript_loses_heads_and_ffn_channels(tmp_path, exporter):
    source, out = prune(tmp_path, "bert", exporter, {"pruning_ratio": 0.5, "importance": "magnitude"})
    assert out.notes["pruned"] == "structured magnitude 0.5: attention heads 8 -> 4, FFN channels 128 -> 64 (ONNX graph, not fine-tuned)"
    assert "not_pruned" not in out.notes
    data = feeds("bert", 3, 7)  # another batch than the data's: the rewritten shapes keep the batch free
    pruned = ort.InferenceSession(str(out.path)).run(None, data)[0]
    assert pruned.shape == ort.InferenceSession(str(source.path)).run(None, data)[0].shape == (3, HIDDEN)
    assert sorted(weights(out.path).values()).count((HIDDEN, 16)) == 6  # Q, K, V of both layers: 2 of 4 heads


def constants_as_nodes(path) -> None:
    """Every initializer moved into a Constant node, as some exporters and tools write weights."""
    model = onnx.load(str(path))
    nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*nodes, *rest])
    onnx.save(model, str(path))


@pytest.mark.parametrize("storage", ["transposed", "constant-nodes"])
def test_weights_behind_transposes_in_gemms_or_in_constant_nodes_are_cut(tmp_path, storage):
    """bert-gemm applies its linears to [B * S, H] rows: Gemm with transB; unfolded, each weight is read through a
    Transpose; or every weight sits in a Constant node."""
    path = tmp_path / "model.onnx"
    export("bert-gemm", "torchscript-14", path, fold=storage != "transposed")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Gemm" in ops and ("Transpose" in ops if storage == "transposed" else True)
    if storage == "constant-nodes":
        constants_as_nodes(path)
    np.savez(tmp_path / "data.npz", **feeds("bert", 8, 1))
    source = Artifact(path, "onnx", input_names=("input_ids", "attention_mask"), output_names=("output",))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": tmp_path / "data.npz"})
    out = make_pass("prune-structured", {"pruning_ratio": 0.5}).run(source, context)
    assert out.notes["pruned"] == "structured magnitude 0.5: attention heads 8 -> 4, FFN channels 128 -> 64 (ONNX graph, not fine-tuned)"
    assert float(out.notes["params_fraction"]) < 0.6


@pytest.mark.parametrize(("model", "ffn"), [("gpt2", 256), ("vit", 128)])
def test_a_fused_qkv_loses_the_same_heads_from_q_k_and_v(tmp_path, model, ffn):
    """GPT-2: c_attn split into Q / K / V; timm's ViT: qkv reshaped to [B, N, 3, H, d] and unbound (Split, Squeeze)."""
    _, out = prune(tmp_path, model, "torchscript-14", {"pruning_ratio": 0.5, "importance": "activation"})
    assert (
        out.notes["pruned"]
        == f"structured activation 0.5: attention heads 8 -> 4, FFN channels {ffn} -> {ffn // 2} (ONNX graph, not fine-tuned)"
    )
    shapes = sorted(weights(out.path).values())
    assert shapes.count((HIDDEN, 48)) == 2 and shapes.count((16, HIDDEN)) == 2  # qkv: 3 x 2 heads of 8; output: 2 heads
    assert ort.InferenceSession(str(out.path)).run(None, feeds(model, 5, 3))[0].shape == (5, SEQ, HIDDEN)


def test_a_llama_block_loses_whole_kv_groups_and_swiglu_channels(tmp_path):
    _, out = prune(tmp_path, "llama", "torchscript-11", {"pruning_ratio": 0.5})
    # 2 K / V heads of 4 Q heads: one K / V head goes with the 2 Q heads that read it; gate and up lose the same channels
    assert out.notes["pruned"] == "structured magnitude 0.5: attention heads 8 -> 4, FFN channels 128 -> 64 (ONNX graph, not fine-tuned)"
    shapes = sorted(weights(out.path).values())
    assert shapes.count((HIDDEN, 16)) == 2 and shapes.count((HIDDEN, 8)) == 4 and shapes.count((16, HIDDEN)) == 2  # Q; K, V; O
    assert shapes.count((HIDDEN, 32)) == 6  # gate, up: [32, 32] each; down: [32, 32]
    assert 0.0 < float(out.notes["cosine_to_source"]) < 0.9999


def test_a_phi3_block_with_fused_unequal_qkv_and_a_chunked_gate_up_is_cut(tmp_path):
    """Phi-3's layout: one qkv_proj split into Q | K | V of unequal widths (32 | 16 | 16: grouped-query attention), and
    one gate_up_proj that torch's chunk exports as Slices whose bounds are computed from its shape."""
    _, out = prune(tmp_path, "phi3", "torchscript-14", {"pruning_ratio": 0.5})
    assert out.notes["pruned"] == "structured magnitude 0.5: attention heads 8 -> 4, FFN channels 128 -> 64 (ONNX graph, not fine-tuned)"
    shapes = sorted(weights(out.path).values())
    assert shapes.count((HIDDEN, 64)) == 2 and shapes.count((16, HIDDEN)) == 2  # gate_up: 2 x 32; o_proj: 2 heads
    assert shapes.count((HIDDEN, 32)) == 4  # qkv_proj: 16 | 8 | 8; down: [32, 32]


def test_the_finder_reads_gqa_groups_and_glu_pairs(tmp_path):
    path = tmp_path / "llama.onnx"
    export("llama", "torchscript-14", path)
    model = onnx.load(str(path))
    encoder = find_onnx_encoder(model, tensor_shapes(model, feeds("llama", 2, 0)))
    assert [(a.heads, a.groups, a.head_dim, len(a.projections)) for a in encoder.attentions] == [(4, 2, 8, 3)] * 2
    assert [len(f.ups) for f in encoder.ffns] == [2, 2] and not encoder.unexplained


def test_an_attention_it_cannot_follow_is_refused_naming_the_node(tmp_path):
    """A per-head position bias (a constant [1, H, S, S] added to the scores) would need cutting too: the Add is named."""
    path = tmp_path / "bert.onnx"
    export("bert", "torchscript-14", path)
    model = onnx.load(str(path))
    g = model.graph
    softmax = next(n for n in g.node if n.op_type == "Softmax")
    g.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 4, SEQ, SEQ), np.float32), "head_bias"))
    g.node.append(onnx.helper.make_node("Add", [softmax.input[0], "head_bias"], ["biased"], name="per_head_bias"))
    softmax.input[0] = "biased"
    from slimserve.optimizer.compress.onnx_heads import _toposort

    _toposort(g)
    encoder = find_onnx_encoder(model, tensor_shapes(model, feeds("bert", 2, 0)))
    assert len(encoder.attentions) == 1  # the other layer is still cut
    (why,) = encoder.unexplained
    assert "per_head_bias (Add) combines the head axis with head_bias [1, 4, 8, 8]" in why
    onnx.save(model, str(path))
    np.savez(tmp_path / "data.npz", **feeds("bert", 8, 1))
    source = Artifact(path, "onnx", input_names=("input_ids", "attention_mask"), output_names=("output",))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": tmp_path / "data.npz"})
    out = make_pass("prune-structured", {"pruning_ratio": 0.5}).run(source, context)
    assert out.notes["pruned"].startswith("structured magnitude 0.5: attention heads 4 -> 2") and "per_head_bias" in out.notes["not_pruned"]


def test_nn_multihead_attention_with_heads_folded_into_the_batch_is_cut(tmp_path):
    """torch's nn.TransformerEncoder (TorchScript export): nn.MultiheadAttention unflattens its fused in_proj to
    [S, B, 3, E], takes Q / K / V apart with Gathers, and folds the heads into the batch ([S, B * H, D]), then unfolds them."""
    _, out = prune(tmp_path, "torch-mha", "torchscript-17", {"pruning_ratio": 0.5})
    assert out.notes["pruned"] == "structured magnitude 0.5: attention heads 8 -> 4, FFN channels 128 -> 64 (ONNX graph, not fine-tuned)"
    assert "not_pruned" not in out.notes
    shapes = sorted(weights(out.path).values())
    assert shapes.count((HIDDEN, 48)) == 2 and shapes.count((16, HIDDEN)) == 2  # in_proj: Q | K | V of 2 heads; out_proj: 2 heads
    assert ort.InferenceSession(str(out.path)).run(None, feeds("torch-mha", 3, 2))[0].shape == (3, SEQ, HIDDEN)


def test_a_kv_cache_output_keeps_its_layer_uncut_and_named(tmp_path):
    """A layer whose K is also a graph output (a KV cache: 'present'): cutting its heads would change that output, so the
    layer is left whole and named; the other layer is cut."""
    path = tmp_path / "gpt2.onnx"
    export("gpt2", "torchscript-14", path)
    model = onnx.load(str(path))
    split = next(n for n in model.graph.node if n.op_type == "Split")
    model.graph.output.append(onnx.helper.make_tensor_value_info(split.output[1], onnx.TensorProto.FLOAT, ["batch", SEQ, HIDDEN]))
    onnx.save(model, str(path))
    np.savez(tmp_path / "data.npz", **feeds("gpt2", 8, 1))
    source = Artifact(path, "onnx", input_names=("input_ids",), output_names=("output", split.output[1]))
    context = PassContext(workdir=tmp_path / "work", datasets={"data": tmp_path / "data.npz"})
    out = make_pass("prune-structured", {"pruning_ratio": 0.5}).run(source, context)
    assert out.notes["pruned"].startswith("structured magnitude 0.5: attention heads 4 -> 2")
    assert f"writes {split.output[1]}, a graph output with the head axis (a KV cache?)" in out.notes["not_pruned"]
