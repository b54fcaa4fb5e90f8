"""Whole attention heads and FFN channels removed from a transformer's ONNX graph: its initializers sliced, its head counts rewritten.

A BERT-style ONNX export computes each attention unit as three MatMuls with constant [hidden, width] weights (Q, K, V),
each (after its bias Add) reshaped to [batch, seq, heads, head_dim] by a constant shape, and an output MatMul with a
[width, hidden] weight read after the heads are merged back by a Reshape to [batch, seq, width]; an FFN is a MatMul
to the inner width, element-wise ops (GELU, or its Erf form), and a MatMul back. Removing head h slices its head_dim
columns out of Q, K, V (and their biases) and its rows out of the output weight; the two Reshapes get the new head
count and width. An FFN loses columns of its first weight (and bias) and the same rows of its second.

Torch-Pruning works on torch modules, and an ONNX transformer converted to torch by onnx2torch computes its reshape
shapes at run time, which torch.export cannot trace with a free batch (slimserve.optimizer.formats.torchmodel refuses
it): so the graph is cut here, where the weights are plain initializers. No fine-tuning (register the .pt2 for that).

Checked before it returns: the pruned graph gives the outputs of the original graph with the removed heads' and
channels' rows of the output weights zeroed, on real inputs, so a reshape this module missed is refused, not served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.compress.transformer import Removed, kept_count

ELEMENTWISE = {"Gelu", "Relu", "Erf", "Div", "Mul", "Add", "Sub", "Sigmoid", "Tanh", "Pow", "FastGelu", "BiasGelu", "Cast", "Identity"}


@dataclass
class _Linear:
    """A MatMul with a constant 2-D weight, and the bias Add that follows it (if any)."""

    node: Any
    weight: str
    bias: str  # '' when none
    out: str  # the tensor after the bias


@dataclass
class OnnxAttention:
    projections: list[_Linear]  # Q, K, V
    out: _Linear
    splits: list[Any]  # the Reshapes to [.., heads, head_dim]
    merge: Any  # the Reshape back to [.., width]
    heads: int
    head_dim: int


@dataclass
class OnnxFfn:
    up: _Linear
    down: _Linear


@dataclass
class OnnxEncoder:
    attentions: list[OnnxAttention] = field(default_factory=list)
    ffns: list[OnnxFfn] = field(default_factory=list)


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.constants = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant" and n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)

    def array(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.constants.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def linear(self, node: Any) -> _Linear | None:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in self.inits:
            return None
        if len(self.inits[node.input[1]].dims) != 2:
            return None
        users = self.consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != node.output[0]]
            if len(other) == 1 and other[0] in self.inits and len(self.inits[other[0]].dims) == 1:
                return _Linear(node, node.input[1], other[0], users[0].output[0])
        return _Linear(node, node.input[1], "", node.output[0])

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.inits[name].dims)


def find_onnx_encoder(model: onnx.ModelProto) -> OnnxEncoder:
    """The attention units and FFNs of a BERT-style ONNX graph (empty when it has none this module can cut)."""
    g = _Graph(model)
    linears = {n.output[0]: lin for n in g.graph.node if (lin := g.linear(n)) is not None}
    by_input: dict[str, list[_Linear]] = {}
    for lin in linears.values():
        by_input.setdefault(lin.node.input[0], []).append(lin)
    found = OnnxEncoder()
    taken: set[str] = set()
    for group in by_input.values():
        if len(group) != 3:
            continue
        splits = []
        for lin in group:
            users = g.consumers.get(lin.out, [])
            shape = g.array(users[0].input[1]) if len(users) == 1 and users[0].op_type == "Reshape" else None
            if shape is None or shape.ndim != 1 or len(shape) != 4:
                break
            splits.append((users[0], int(shape[2]), int(shape[3])))
        if len(splits) != 3 or len({(h, d) for _, h, d in splits}) != 1:
            continue
        heads, head_dim = splits[0][1], splits[0][2]
        width = g.shape_of(group[0].weight)[1]
        if heads < 1 or heads * head_dim != width or any(g.shape_of(lin.weight)[1] != width for lin in group):
            continue
        # From the value branch forward to the first weighted MatMul: the output projection, reached through one Reshape.
        merge, out, stack, seen = None, None, [group[2].out], set()
        while stack:
            tensor = stack.pop()
            for user in g.consumers.get(tensor, []):
                if id(user) in seen:
                    continue
                seen.add(id(user))
                lin = linears.get(user.output[0]) if user.op_type == "MatMul" else None
                if lin is not None and user.input[1] in g.inits:
                    out = lin if out is None or out.node is lin.node else None
                    continue
                if user.op_type == "Reshape" and user not in [s for s, _, _ in splits]:
                    merge = user
                stack.extend(user.output)
        if out is None or merge is None or g.shape_of(out.weight)[0] != width:
            continue
        merge_shape = g.array(merge.input[1])
        if merge_shape is None or merge_shape.ndim != 1 or int(merge_shape[-1]) != width:
            continue
        found.attentions.append(OnnxAttention(group, out, [s for s, _, _ in splits], merge, heads, head_dim))
        taken.update(lin.node.output[0] for lin in (*group, out))
    for lin in linears.values():
        if lin.node.output[0] in taken:
            continue
        hidden, inner = g.shape_of(lin.weight)
        if inner <= hidden:
            continue
        # Element-wise ops only, up to exactly one weighted MatMul that reads the inner width back to the hidden size;
        # every input of those ops is the chain's own tensor or a constant (GELU's Erf form reads x twice).
        stack, reached, downs, chain, visited = [lin.out], [], [], {lin.out}, set()
        while stack:
            tensor = stack.pop()
            for user in g.consumers.get(tensor, []):
                if id(user) in visited:
                    continue
                visited.add(id(user))
                down = linears.get(user.output[0]) if user.op_type == "MatMul" else None
                if down is not None and user.input[0] == tensor:
                    downs.append(down)
                    continue
                reached.append(user)
                chain.update(user.output)
                stack.extend(user.output)
        clean = all(n.op_type in ELEMENTWISE and all(i in chain or g.array(i) is not None for i in n.input) for n in reached)
        if clean and reached and len(downs) == 1 and g.shape_of(downs[0].weight) == (inner, hidden):
            found.ffns.append(OnnxFfn(lin, downs[0]))
    return found


def _set(g: _Graph, name: str, value: np.ndarray) -> None:
    g.inits[name].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(g.inits[name]).dtype), name))


def _own_shape(g: _Graph, node: Any, value: np.ndarray, tag: str) -> None:
    """Gives a Reshape its own shape initializer holding `value` (shape constants are shared between layers)."""
    name = f"{node.input[1]}__{tag}"
    i = 0
    while name in g.inits:
        i += 1
        name = f"{node.input[1]}__{tag}_{i}"
    tensor = numpy_helper.from_array(value.astype(np.int64), name)
    g.graph.initializer.append(tensor)
    g.inits[name] = g.graph.initializer[-1]
    node.input[1] = name


def prune_onnx_encoder(
    model: onnx.ModelProto,
    ratio: float,
    needed_by: str,
    round_to: int,
    check: Callable[[onnx.ModelProto, onnx.ModelProto], None],
    activations: Callable[[onnx.ModelProto, list[str]], dict[str, np.ndarray]] | None = None,
) -> tuple[onnx.ModelProto, Removed]:
    """A copy of the model without `ratio` of every unit's heads and every FFN's channels (magnitude: L2 of their weights).

    `check(pruned, reference)` runs both graphs on real inputs and raises when they differ; the reference is the original
    with the removed heads' and channels' rows of the output weights zeroed, so the two compute the same when the cut is right.
    """
    pruned, reference = onnx.ModelProto(), onnx.ModelProto()
    pruned.CopyFrom(model)
    reference.CopyFrom(model)
    encoder = find_onnx_encoder(pruned)
    if not encoder.attentions and not encoder.ffns:
        raise OptimizerError(
            f"{needed_by}: found no attention unit (Q / K / V MatMuls with constant weights, each reshaped to heads by a constant shape) "
            "and no FFN (MatMul, element-wise activation, MatMul back) in the ONNX graph; register the model's .pt2 to prune it"
        )
    g, ref = _Graph(pruned), _Graph(reference)
    removed = Removed()
    # Activation importance: what each head adds to the output projection's result, and each FFN channel's
    # activation times its row of the down weight, on real inputs (the tensors read as extra graph outputs).
    seen: dict[str, np.ndarray] = {}
    if activations is not None:
        wanted = [u.merge.output[0] for u in encoder.attentions] + [f.down.node.input[0] for f in encoder.ffns]
        seen = activations(model, wanted)
    for n, unit in enumerate(encoder.attentions):
        keep = kept_count(unit.heads, ratio, 0)
        removed.heads_before += unit.heads
        removed.heads_after += keep
        if keep == unit.heads:
            continue
        d = unit.head_dim
        out_w = g.array(unit.out.weight)
        if unit.merge.output[0] in seen:
            x = seen[unit.merge.output[0]].reshape(-1, unit.heads, d)
            scores = np.array([((x[:, h] @ out_w[h * d : (h + 1) * d]) ** 2).sum() for h in range(unit.heads)])
        else:
            scores = out_w.reshape(unit.heads, d, -1).__pow__(2).sum((1, 2))
            for lin in unit.projections:
                scores = scores + (g.array(lin.weight) ** 2).reshape(-1, unit.heads, d).sum((0, 2))
        heads = np.sort(np.argsort(-scores, kind="stable")[:keep])
        cols = np.concatenate([np.arange(h * d, (h + 1) * d) for h in heads])
        dropped = np.setdiff1d(np.arange(unit.heads * d), cols)
        for lin in unit.projections:
            _set(g, lin.weight, g.array(lin.weight)[:, cols])
            if lin.bias:
                _set(g, lin.bias, g.array(lin.bias)[cols])
        zeroed = ref.array(unit.out.weight).copy()
        zeroed[dropped] = 0
        _set(ref, unit.out.weight, zeroed)
        _set(g, unit.out.weight, out_w[cols])
        for split in unit.splits:
            shape = g.array(split.input[1]).copy()
            shape[2] = keep
            _own_shape(g, split, shape, f"heads{n}")
        shape = g.array(unit.merge.input[1]).copy()
        shape[-1] = keep * d
        _own_shape(g, unit.merge, shape, f"width{n}")
    for ffn in encoder.ffns:
        up_w, down_w = g.array(ffn.up.weight), g.array(ffn.down.weight)
        width = up_w.shape[1]
        keep = kept_count(width, ratio, round_to)
        removed.ffn_before += width
        removed.ffn_after += keep
        if keep == width:
            continue
        if ffn.down.node.input[0] in seen:
            scores = (seen[ffn.down.node.input[0]].reshape(-1, width) ** 2).sum(0) * (down_w**2).sum(1)
        else:
            scores = (up_w**2).sum(0) + (down_w**2).sum(1)
        channels = np.sort(np.argsort(-scores, kind="stable")[:keep])
        _set(g, ffn.up.weight, up_w[:, channels])
        if ffn.up.bias:
            _set(g, ffn.up.bias, g.array(ffn.up.bias)[channels])
        _set(g, ffn.down.weight, down_w[channels])
        zeroed = ref.array(ffn.down.weight).copy()
        zeroed[np.setdiff1d(np.arange(width), channels)] = 0
        _set(ref, ffn.down.weight, zeroed)
    if removed.heads_after == removed.heads_before and removed.ffn_after == removed.ffn_before:
        raise OptimizerError(
            f"{needed_by}: a pruning ratio of {ratio:g} removes no attention head ({removed.heads_before} in {len(encoder.attentions)} units) "
            f"and no FFN channel ({removed.ffn_before} in {len(encoder.ffns)} FFNs, kept in multiples of round_to {round_to}); raise pruning_ratio"
        )
    # Shape inference recorded the old widths on intermediate tensors: they are dropped, ORT infers them again.
    del pruned.graph.value_info[:]
    used = {i for n in pruned.graph.node for i in n.input}
    kept = [t for t in pruned.graph.initializer if t.name in used]
    del pruned.graph.initializer[:]
    pruned.graph.initializer.extend(kept)
    check(pruned, reference)
    return pruned, removed
