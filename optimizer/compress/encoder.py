"""The transformer structure of a lifted program: its attention units, FFNs (plain or GLU) and numbered layers.

A lifted program (optimizer/formats/torchlayers.py) is an fx graph whose Linear layers are modules again. An attention
unit is three projections (or one fused in_proj) whose outputs are split into heads before a matmul /
scaled_dot_product_attention, and the output projection they reach; an FFN is Linear -> activation -> Linear
back to the hidden size, or a GLU (down(act(gate(x)) * up(x)), as LLaMA-style blocks). slimserve.optimizer.compress.transformer
removes heads and channels from what this module finds; slimserve.optimizer.compress.students drops layers by its layer names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SHAPE_OPS = ("reshape", "view", "_unsafe_view", "unflatten", "split_with_sizes", "split")
ATTENTION_OPS = ("matmul", "bmm", "scaled_dot_product_attention")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "sigmoid", "dropout", "gelu_", "relu_", "mish", "hardswish")


@dataclass
class Attention:
    """A multi-head attention unit: projections (one name when fused), the output projection and the nodes between them."""

    layer: str
    projections: tuple[str, ...]
    out: str
    heads: int
    head_dim: int
    region: list[Any] = field(default_factory=list)

    @property
    def fused(self) -> bool:
        return len(self.projections) == 1


@dataclass
class Ffn:
    """A feed-forward block: up (and, in a GLU, gate) to the inner width, down back to the hidden size."""

    layer: str
    up: str
    down: str
    gate: str = ""  # a GLU's gate projection: down(act(gate(x)) * up(x)); its rows go with up's

    @property
    def projections(self) -> tuple[str, ...]:
        """The layers whose rows are the inner channels (up, and a GLU's gate)."""
        return (self.gate, self.up) if self.gate else (self.up,)


@dataclass
class Encoder:
    """The attention units and FFNs of a program, and its layers in order (module paths such as 'encoder.layers.0')."""

    attentions: list[Attention]
    ffns: list[Ffn]
    layers: list[str]


def op_name(node: Any) -> str:
    """An fx node's operator without its overload ('view' for aten.view.default); also used by optimizer/compress/pruning.py."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _linear(module: Any, node: Any) -> Any:
    from torch import nn

    if node.op != "call_module":
        return None
    layer = module.get_submodule(node.target)
    return layer if isinstance(layer, nn.Linear) else None


def _layer_of(name: str) -> str:
    """The enclosing repeated layer of a module path: the longest prefix ending in an index ('encoder.layers.0')."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return ""


def _shape(node: Any) -> tuple | None:
    value = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(value.shape) if value is not None and hasattr(value, "shape") else None


def _attention_from(module: Any, projections: list[Any]) -> Attention | None:
    """The unit that starts at these projection nodes: walks forward to the first Linear (the output projection)."""
    region, outs, stack, seen = [], set(), list(projections), set(projections)
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if _linear(module, user) is not None:
                outs.add(user.target)
                continue
            if user.op == "output":
                return None
            region.append(user)
            stack.append(user)
    if len(outs) != 1:
        return None
    order = {n: i for i, n in enumerate(module.graph.nodes)}
    region.sort(key=order.__getitem__)
    first = next((n for n in region if op_name(n) in ATTENTION_OPS), None)
    shape = _shape(first.args[0]) if first is not None else None
    if shape is None or len(shape) != 4 or not isinstance(shape[3], int):  # the sequence may be free (symbolic); the head size not
        return None
    # The head size from the graph's metadata; the head count from the widths (a pruned unit's metadata still shows the old count).
    head_dim = int(shape[3])
    width = module.get_submodule(next(iter(outs))).in_features
    heads = width // head_dim
    if heads < 1 or heads * head_dim != width:
        return None
    names = tuple(p.target for p in projections)
    return Attention(_layer_of(names[0]), names, next(iter(outs)), heads, head_dim, region)


def _through_activations(node: Any) -> Any:
    """The last node of the chain of activations that follows `node` alone (`node` itself when none does)."""
    current = node
    while len(current.users) == 1 and op_name(next(iter(current.users))) in ACTIVATIONS:
        current = next(iter(current.users))
    return current


def _glu(module: Any, first: Any, end: Any, product: Any) -> Ffn | None:
    """The GLU that multiplies `first`'s branch (ending at `end`) with another Linear of the same input, then projects down."""
    other = next((a for a in product.args if a is not end), None)
    if not hasattr(other, "op") or len(product.args) != 2:  # a product with a constant is no GLU
        return None
    source = other
    while source.op == "call_function" and op_name(source) in ACTIVATIONS and len(source.args) >= 1:
        source = source.args[0]
    partner = _linear(module, source)
    up = _linear(module, first)
    if partner is None or source.args[0] is not first.args[0] or partner.out_features != up.out_features:
        return None
    if (end is first) == (other is source):  # exactly one branch has the activation: it is the gate
        return None
    gate_node, up_node = (source, first) if end is first else (first, source)
    if len(source.users) != 1:
        return None
    down_node = _through_activations(product)
    down_node = next(iter(down_node.users)) if len(down_node.users) == 1 else None
    down = None if down_node is None else _linear(module, down_node)
    if down is None or down.in_features != up.out_features or down.out_features != up.in_features:
        return None
    return Ffn(_layer_of(up_node.target), up_node.target, down_node.target, gate=gate_node.target)


def find_encoder(module: Any) -> Encoder | None:
    """The program's transformer structure, or None when it has no multi-head attention."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    by_input: dict[Any, list[Any]] = {}
    fused: list[Any] = []
    for node in graph.nodes:
        layer = _linear(module, node)
        if layer is None:
            continue
        splits = [u for u in node.users if op_name(u) in SHAPE_OPS]
        if any(op_name(u) == "unflatten" and list(u.args[2])[:1] == [3] for u in splits) and layer.out_features % 3 == 0:
            fused.append(node)
        elif splits:
            by_input.setdefault(node.args[0], []).append(node)
    attentions = [a for a in (_attention_from(module, [n]) for n in fused) if a is not None]
    for nodes in by_input.values():
        if len(nodes) == 3:
            unit = _attention_from(module, nodes)
            if unit is not None:
                attentions.append(unit)
    if not attentions:
        return None
    taken = {n for a in attentions for n in (*a.projections, a.out)}
    ffns: list[Ffn] = []
    for node in graph.nodes:
        up = _linear(module, node)
        if up is None or node.target in taken or up.out_features <= up.in_features:
            continue
        current = _through_activations(node)
        if len(current.users) != 1:
            continue
        user = next(iter(current.users))
        if op_name(user) == "mul":  # a GLU: down(act(gate(x)) * up(x)), as LLaMA-style blocks
            ffn = _glu(module, node, current, user)
            if ffn is not None:
                ffns.append(ffn)
                taken.update((ffn.gate, ffn.up, ffn.down))
            continue
        if current is node:
            continue
        down = _linear(module, user)
        if down is not None and down.in_features == up.out_features and down.out_features == up.in_features:
            ffns.append(Ffn(_layer_of(node.target), node.target, user.target))
    layers: list[str] = []
    for name in [a.layer for a in attentions]:
        if name and name not in layers:
            layers.append(name)
    return Encoder(attentions, ffns, layers)
