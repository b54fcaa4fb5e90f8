"""Whole attention heads and FFN channels removed from a transformer's ONNX graph: its weights sliced, its shapes rewritten.

What is recognised, by following the head axis forward from every linear layer with a constant weight:
- a linear layer is a MatMul with a constant 2-D weight (an initializer, a Constant node, or either through a Transpose),
  with or without a bias Add after it, or a Gemm (transB or not) with a constant weight and bias;
- an attention unit is the set of linears whose outputs reach, through the heads' split Reshapes, the attention
  MatMuls and Softmax, and the merging Reshape, one output linear (O): Q, K, V; one fused QKV cut by a Split or Slices
  (GPT-2's c_attn, Phi-3's qkv_proj); or unflattened to [.., 3, E] / [.., 3, H, d] and taken apart by Gathers or by
  Split / Slice + Squeeze (nn.MultiheadAttention's in_proj, timm's qkv). Heads may be folded into the batch
  ([S, B * H, d], as nn.MultiheadAttention does). Reshape, Expand, Split and Slice shapes may be constants (the dynamo
  exporter) or computed at run time (TorchScript's Shape -> Gather -> Unsqueeze -> Concat, torch's chunk): only their
  constant entries that carry the heads are rewritten, each consumer getting its own copy (exporters share shape
  constants between layers); an entry computed from the shape of a tensor that is cut follows the cut by itself;
- grouped-query attention (fewer K / V heads than Q heads, repeated by Expand + Reshape as Llama does) is cut by whole
  groups: a K / V head goes with the Q heads that read it, so the repetition count stays;
- an FFN is one or more linears from the same input (up; or gate and up, as a GLU / SwiGLU has, also as one fused
  gate | up) whose outputs meet, through element-wise ops (and Reshapes that keep the channel axis, as GPT-2's Conv1D
  writes), in one linear back (down).

The head axis is followed with the tensors' real shapes (and the small int tensors' values), read once by running the
graph on two rows of the data (`tensor_shapes`): a Reshape maps the axis where the dimensions before it, times what
the axis folds in, make as many rows on both sides. A split that turns out to separate Q | K | V (one piece is then
taken alone) is reinterpreted as such. What cannot be followed (a Gather or Concat on the head axis, a per-head
constant, a KV cache output, tied weights) is named: an attention Softmax that no unit explains is listed in
`OnnxEncoder.unexplained` with the node and what stopped it.

Torch-Pruning works on torch modules, and an ONNX transformer converted by onnx2torch computes its reshape shapes at
run time, which torch.export cannot trace with a free batch (slimserve.optimizer.formats.torchmodel refuses it): so the
graph is cut here. No fine-tuning (register the .pt2 for that).

Checked before it returns: the pruned graph gives the outputs of the original graph with the removed heads' and
channels' rows of the output weights zeroed, on real inputs, so a shape this module missed is refused, not served.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.compress.transformer import Removed, kept_count

ELEMENTWISE = {
    "Abs", "Add", "BiasGelu", "Cast", "Clip", "Div", "Dropout", "Equal", "Erf", "Exp", "FastGelu", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "IsNaN", "LeakyRelu", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Not", "Pow", "QuickGelu",
    "Reciprocal", "Relu", "Selu", "Sigmoid", "Sign", "Sin", "Cos", "Softplus", "Sqrt", "Sub", "Tanh", "Where", "Less",
    "Greater", "And", "Or", "Elu", "Celu", "Floor", "Ceil", "Round",
}  # fmt: skip
REDUCES = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceProd", "ReduceLogSumExp"}


class NotUnderstood(Exception):
    """A node on the head (or channel) axis this module cannot follow or cut; `str()` names it and says why."""

    def __init__(self, node: Any, why: str) -> None:
        super().__init__(f"{node.name or node.output[0]} ({node.op_type}) {why}")
        self.node = node


# A graph the tracer was not written for may also break its own assumptions (a shape it did not see, an index out of
# range): that unit is not cut, and the error is reported with it, rather than failing the pass.
_NOT_FOLLOWED = (NotUnderstood, TypeError, IndexError, KeyError, ValueError, ZeroDivisionError)


def _why(e: Exception) -> str:
    return str(e) if isinstance(e, NotUnderstood) else f"the tracer could not follow this graph ({type(e).__name__}: {e})"


@dataclass
class _Linear:
    """A linear layer: its node, the constant holding its weight (read as [in, out]) and bias, and its output tensor."""

    node: Any
    weight: str  # the constant's name (an initializer or a Constant node's output)
    transposed: bool  # stored [out, in]
    bias: str  # '' when none
    out: str  # the tensor after the bias
    inner: list[Any] = field(default_factory=list)  # Transpose nodes between the constant and the MatMul

    @property
    def data(self) -> str:
        return self.node.input[0]


@dataclass
class OnnxAttention:
    projections: list[_Linear]  # Q, K, V (or one fused QKV)
    parts: list[list[int]]  # per projection, the widths of its parts along its output (Q | K | V for a fused one)
    out: _Linear
    groups: int  # K / V heads (the Q heads in multi-head attention): what is removed whole
    heads: int  # Q heads
    head_dim: int


@dataclass
class OnnxFfn:
    ups: list[_Linear]  # up (and gate, for a GLU)
    down: _Linear

    @property
    def up(self) -> _Linear:
        return self.ups[-1]


@dataclass
class OnnxEncoder:
    attentions: list[OnnxAttention] = field(default_factory=list)
    ffns: list[OnnxFfn] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)  # attention Softmaxes no unit explains, each with what stopped it


class _Graph:
    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
        self.model = model
        self.graph = model.graph
        self.shapes = shapes
        self.known: dict[str, np.ndarray] = getattr(shapes, "ints", {})  # small int tensors' values when the graph ran
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.inputs = {i.name for i in self.graph.input}
        self.inits = {i.name: i for i in self.graph.initializer if i.name not in self.inputs}
        self.constants = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant" and n.output}
        self.outputs = {o.name for o in self.graph.output}
        self.shared: list[str] = []  # MatMul / Gemm nodes not taken as linears because their weight is shared
        self.refresh()
        self._fresh = 0

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
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
                if a.name == "value_ints":
                    return np.array(list(a.ints), np.int64)
                if a.name == "value_int":
                    return np.array(a.i, np.int64)
                if a.name == "value_floats":
                    return np.array(list(a.floats), np.float32)
                if a.name == "value_float":
                    return np.array(a.f, np.float32)
        return None

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.constants

    def set_array(self, name: str, value: np.ndarray) -> None:
        dtype = self.array(name).dtype
        tensor = numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
            return
        node = self.constants[name]
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", tensor))

    def add_const(self, base: str, value: np.ndarray) -> str:
        self._fresh += 1
        name = f"{base}__pruned{self._fresh}"
        while name in self.inits or name in self.producer:
            self._fresh += 1
            name = f"{base}__pruned{self._fresh}"
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def clone(self, node: Any) -> Any:
        """A copy of `node` with fresh output names, appended to the graph (sorted into place at the end)."""
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        self._fresh += 1
        del copy.output[:]
        copy.output.extend(f"{o}__pruned{self._fresh}" for o in node.output)
        copy.name = f"{node.name or node.op_type}__pruned{self._fresh}"
        self.graph.node.append(copy)
        return self.graph.node[-1]

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def ints(self, node: Any, attr: str, index: int) -> list[int] | None:
        """An int list given as an attribute (older opsets) or as the constant input `index` (newer ones); None when absent."""
        value = self.attr(node, attr)
        if value is not None:
            return [int(v) for v in value]
        if len(node.input) > index and node.input[index]:
            arr = self.array(node.input[index])
            if arr is None:
                raise NotUnderstood(node, f"takes its {attr} from the computed tensor {node.input[index]}, not a constant")
            return [int(v) for v in arr.reshape(-1)]
        return None

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.shapes:
            return self.shapes[name]
        arr = self.array(name)
        return None if arr is None else tuple(arr.shape)

    # ---- linear layers

    def _const_weight(self, name: str, user: Any) -> tuple[str, bool, list[Any]] | None:
        """The constant behind a weight input (directly, or through Transposes), used by `user` alone."""
        inner, transposed = [], False
        while not self.is_const(name):
            node = self.producer.get(name)
            if node is None or node.op_type != "Transpose" or len(self.consumers.get(name, [])) != 1:
                return None
            perm = self.attr(node, "perm")
            if perm is not None and list(perm) != [1, 0]:
                return None
            inner.append(node)
            transposed = not transposed
            user, name = node, node.input[0]
        arr = self.array(name)
        if arr is None or arr.ndim != 2 or arr.dtype.kind != "f":
            return None
        others = [u for u in self.consumers.get(name, []) if u is not user]
        if others:  # tied weights (or an exporter that merged equal ones): slicing one would cut the other
            self.shared.append(f"{user.name or user.output[0]} reads {name}, which {len(others)} other node(s) read too (tied weights)")
            return None
        return name, transposed, inner

    def linear(self, node: Any) -> _Linear | None:
        if node.op_type == "MatMul" and len(node.input) == 2:
            found = self._const_weight(node.input[1], node)
            if found is None:
                return None
            name, transposed, inner = found
            out_features = self.array(name).shape[0 if transposed else 1]
            users = self.consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in self.outputs:
                other = [i for i in users[0].input if i != node.output[0]]
                bias = self.array(other[0]) if len(other) == 1 else None
                if bias is not None and bias.shape == (out_features,) and len(self.consumers.get(other[0], [])) == 1:
                    return _Linear(node, name, transposed, other[0], users[0].output[0], inner)
            return _Linear(node, name, transposed, "", node.output[0], inner)
        if node.op_type == "Gemm" and len(node.input) >= 2 and not self.attr(node, "transA", 0):
            found = self._const_weight(node.input[1], node)
            if found is None:
                return None
            name, transposed, inner = found
            transposed = transposed != bool(self.attr(node, "transB", 0))
            out_features = self.array(name).shape[0 if transposed else 1]
            bias = ""
            if len(node.input) > 2 and node.input[2]:
                arr = self.array(node.input[2])
                if arr is None or arr.size != out_features or arr.shape[-1] != out_features:
                    return None  # a full [M, N] C, or a computed one
                if len(self.consumers.get(node.input[2], [])) != 1:
                    return None
                bias = node.input[2]
            return _Linear(node, name, transposed, bias, node.output[0], inner)
        return None

    def weight(self, lin: _Linear) -> np.ndarray:
        w = self.array(lin.weight)
        return w.T if lin.transposed else w

    def set_weight(self, lin: _Linear, value: np.ndarray) -> None:
        self.set_array(lin.weight, value.T if lin.transposed else value)

    def set_bias(self, lin: _Linear, keep: np.ndarray) -> None:
        if lin.bias:
            b = self.array(lin.bias)
            self.set_array(lin.bias, b.reshape(-1)[keep].reshape(*b.shape[:-1], len(keep)))


# ---------------------------------------------------------------------------------------------
# Following the head axis


Segs = tuple[tuple[int, int], ...]  # (groups, elements per group) per part of an axis: [Q | K | V] for a fused one


@dataclass(frozen=True)
class _Axis:
    axis: int
    segs: Segs | None  # None while discovering (groups not known yet)
    origin: tuple[int, int]  # the start tensor's range this axis covers (discovering)
    outer: int = 1  # a factor folded in before the heads on this axis (the batch, in nn.MultiheadAttention's [B * H, S, D])
    inner: int | None = None  # discovering: the axis after the last split, in case it split Q | K | V rather than heads
    split: tuple[int, int, int] | None = None  # discovering: (origin start, part size, parts) of that split
    parts: int | None = None  # joint: the axis holding a fused projection's Q | K | V once unflattened


@dataclass
class _Trace:
    states: dict[str, _Axis] = field(default_factory=dict)
    ends: list[tuple[Any, _Axis]] = field(default_factory=list)  # (linear node, its input's state)
    cores: list[Any] = field(default_factory=list)  # MatMuls of two computed tensors passed through
    softmaxes: list[Any] = field(default_factory=list)
    heads: dict[tuple[int, int], int] = field(default_factory=dict)  # origin range -> heads at its first split
    edits: list[Callable[[], None]] = field(default_factory=list)


def _size(segs: Segs, groups: int | None = None) -> int:
    return sum((g if groups is None else groups) * per for g, per in segs)


def _cut(segs: Segs, bounds: list[tuple[int, int]], node: Any) -> list[Segs]:
    """The parts of `segs` between each (start, end): each must start and end on a part's boundary or a group's."""
    out = []
    for lo, hi in bounds:
        pieces, offset = [], 0
        for g, per in segs:
            a, b = max(lo, offset), min(hi, offset + g * per)
            if a < b:
                if (a - offset) % per or (b - offset) % per:
                    raise NotUnderstood(node, f"cuts the head axis at [{lo}, {hi}), inside a head of {per} elements")
                pieces.append(((b - a) // per, per))
            offset += g * per
        out.append(tuple(pieces))
    return out


class _Tracer:
    """Follows the head (or channel) axis from start tensors to the linears that read it.

    Discovering (`groups` None): one start at a time, other computed operands allowed (they belong to the unit's other
    projections), heads recorded at each part's first split. Joint (`groups`, `new_groups`): all of a unit's starts,
    every operand on the axis must be the unit's own, and the edits that take the axis from `groups` to `new_groups`
    per part are collected.
    """

    def __init__(self, g: _Graph, linears: dict[str, _Linear], new_groups: int | None = None) -> None:
        self.g, self.linears, self.new = g, linears, new_groups

    def run(self, starts: dict[str, _Axis]) -> _Trace:
        g, t = self.g, _Trace(states=dict(starts))
        joint = next(iter(starts.values())).segs is not None
        region, stack = set(), list(starts)
        ends: dict[int, Any] = {}
        while stack:
            tensor = stack.pop()
            if tensor in g.outputs:
                raise NotUnderstood(
                    g.producer[tensor], f"writes {tensor}, a graph output with the head axis (a KV cache?): its shape would change"
                )
            for user in g.consumers.get(tensor, []):
                if user.op_type in ("Shape", "Size") or id(user) in region:
                    continue
                lin = self.linears.get(user.output[0])
                if lin is not None and user.input[0] == tensor:
                    ends[id(user)] = user
                    continue
                region.add(id(user))
                stack.extend(o for o in user.output if o)
        for node in g.graph.node:
            if id(node) in region:
                self.step(node, t, joint)
            elif id(node) in ends:
                state = t.states.get(node.input[0])
                shape = g.shape(node.input[0])
                if state is None or shape is None:
                    raise NotUnderstood(node, "reads the head axis from a tensor whose shape was not seen")
                if state.axis != len(shape) - 1 or state.outer != 1 or state.parts is not None:
                    raise NotUnderstood(node, f"multiplies its weight along axis {state.axis} of {list(shape)}, not the head axis")
                t.ends.append((node, state))
        return t

    # each op: the state of its outputs from the states of its inputs
    def step(self, node: Any, t: _Trace, joint: bool) -> None:
        g, op = self.g, node.op_type
        ins = [(i, t.states[i]) for i in node.input if i in t.states]
        if not ins:
            raise NotUnderstood(node, "is reached from the head axis through an input whose axis was not followed")
        name, state = ins[0]
        shape_in = g.shape(name)
        shape_out = g.shape(node.output[0])
        if shape_in is None or (shape_out is None and op not in ("Split",)):
            raise NotUnderstood(node, "is on the head axis, and its shapes were not seen when the graph was run")
        rank = len(shape_in)
        a = state.axis
        if state.parts is not None and op not in ("Transpose", "Unsqueeze", "Squeeze", "Gather", "Identity", "Split", "Slice"):
            raise NotUnderstood(node, "is applied before the fused projection's Q / K / V parts are taken apart")
        if op in ("Identity", "Dropout") or (op == "Cast" and state.parts is None):
            t.states[node.output[0]] = state
            return
        if op in ELEMENTWISE or op == "Softmax" or op == "LogSoftmax" or op in REDUCES:
            k = rank - a  # position from the end: broadcasting aligns to the right
            for other, s in ins[1:]:
                if len(g.shape(other)) - s.axis != k or (joint and s.segs != state.segs):
                    raise NotUnderstood(node, f"combines {name} and {other} with their head axes in different places")
            for other in node.input:
                if not other or other in t.states:
                    continue
                shape = g.shape(other)
                if shape is not None and len(shape) >= k and shape[-k] != 1 and (g.is_const(other) or joint):
                    raise NotUnderstood(
                        node,
                        f"combines the head axis with {other} {list(shape)}, which has {shape[-k]} entries on that axis and is not cut",
                    )
            out_axis = len(shape_out) - k
            if op in ("Softmax", "LogSoftmax"):
                default = -1 if g.opset >= 13 else 1
                axis = g.attr(node, "axis", default)
                axis = axis + rank if axis < 0 else axis
                if axis == a or (g.opset < 13 and axis < a):
                    raise NotUnderstood(node, f"normalizes over axis {axis}, which holds (or flattens) the heads")
                t.softmaxes.append(node)
            if op in REDUCES:
                axes = g.ints(node, "axes", 1)
                axes = list(range(rank)) if axes is None else [x + rank if x < 0 else x for x in axes]
                if a in axes:
                    raise NotUnderstood(node, "reduces over the head axis")
                out_axis = a if g.attr(node, "keepdims", 1) else a - sum(x < a for x in axes)
            if shape_out[out_axis] != shape_in[a]:
                raise NotUnderstood(node, f"changes the head axis from {shape_in[a]} to {shape_out[out_axis]} entries")
            self.set(t, node.output[0], out_axis, state)
            return
        if op in ("Transpose", "Unsqueeze", "Squeeze"):
            if op == "Transpose":
                perm = list(g.attr(node, "perm") or reversed(range(rank)))
                where: Callable[[int], int | None] = perm.index
            elif op == "Unsqueeze":
                axes = sorted(x + len(shape_out) if x < 0 else x for x in g.ints(node, "axes", 1) or [])
                kept = [i for i in range(len(shape_out)) if i not in axes]
                where = kept.__getitem__
            else:
                axes = g.ints(node, "axes", 1)
                axes = [i for i, d in enumerate(shape_in) if d == 1] if axes is None else [x + rank if x < 0 else x for x in axes]
                if a in axes and state.inner is not None and state.split is not None and shape_in[a] == 1:
                    # discovering: a piece of the last split taken alone (timm's unbind: Split or Slice, then Squeeze):
                    # that split cut Q | K | V apart, and the heads are on the axis after it
                    lo, size, count = state.split
                    t.heads.pop((lo, lo + size * count), None)
                    t.heads[state.origin] = shape_in[state.inner]  # heads, unless a later Reshape splits them (see there)
                    self.set(t, node.output[0], state.inner - sum(y < state.inner for y in axes), state)
                    return
                if a in axes:
                    raise NotUnderstood(node, "squeezes the head axis")
                where = lambda x: None if x in axes else x - sum(y < x for y in axes)  # noqa: E731
            moved = {k: where(v) for k in ("inner", "parts") if (v := getattr(state, k)) is not None}
            self.set(t, node.output[0], where(a), state, split=state.split if moved.get("inner") is not None else None, **moved)
            return
        if op in ("Reshape", "Expand"):
            self.reshape(node, t, state, shape_in, shape_out)
            return
        if op == "Split":
            self.split(node, t, state, shape_in)
            return
        if op == "Slice":
            self.slice(node, t, state, shape_in, shape_out)
            return
        if op == "Concat":
            axis = g.attr(node, "axis", 0)
            axis = axis + rank if axis < 0 else axis
            if axis == a:
                raise NotUnderstood(node, "concatenates along the head axis")
            for other in node.input:
                if other in t.states:
                    s = t.states[other]
                    if s.axis != a or (joint and s.segs != state.segs):
                        raise NotUnderstood(node, f"concatenates {name} and {other} with their head axes in different places")
                elif joint or g.is_const(other):
                    raise NotUnderstood(node, f"concatenates the heads with {other}, which is not cut (a KV cache?)")
            self.set(t, node.output[0], a, state)
            return
        if op == "MatMul":
            self.matmul(node, t, joint, shape_out)
            return
        if op == "Gather":
            axis = g.attr(node, "axis", 0)
            axis = axis + rank if axis < 0 else axis
            index = g.array(node.input[1])
            picks = name == node.input[0] and index is not None and index.ndim == 0
            if picks and axis == a and state.inner is not None and state.split is not None:
                # discovering: the last split cut Q | K | V apart (nn.MultiheadAttention's unflatten(-1, (3, E))), not heads
                lo, size, count = state.split
                i = int(index) % count
                t.heads.pop(state.origin, None)
                inner = state.inner - (state.inner > axis)
                t.heads[(lo + i * size, lo + (i + 1) * size)] = shape_in[state.inner]  # heads, unless a later Reshape splits them
                self.set(t, node.output[0], inner, state, origin=(lo + i * size, lo + (i + 1) * size))
                return
            if picks and state.parts is not None and axis == state.parts:
                self.set(t, node.output[0], a - (a > axis), state)
                return
            if name != node.input[0] or axis == a:
                raise NotUnderstood(node, "gathers along the head axis")
            idx = g.shape(node.input[1]) or ()
            self.set(t, node.output[0], a if a < axis else a - 1 + len(idx), state)
            return
        raise NotUnderstood(node, "is on the head axis, and this pruner does not follow that operator")

    def bounds(self, node: Any, key: str, index: int, t: _Trace) -> tuple[list[int], bool]:
        if self.g.opset < 10:
            return self.g.ints(node, key, index), False
        return _known_ints(self.g, node, key, index, t.states)

    def set(
        self, t: _Trace, tensor: str, axis: int, state: _Axis, segs: Segs | None = None, origin: tuple[int, int] | None = None, **moved: Any
    ) -> None:
        """The output's state: the split / parts axes are kept only where the op moved them (`moved`), else forgotten."""
        changes: dict[str, Any] = {"inner": None, "split": None, "parts": None, **moved}
        if segs is not None:
            changes["segs"] = segs
        if origin is not None:
            changes["origin"] = origin
        t.states[tensor] = dataclasses.replace(state, axis=axis, **changes)

    def matmul(self, node: Any, t: _Trace, joint: bool, shape_out: tuple[int, ...]) -> None:
        g = self.g
        a_name, b_name = node.input
        if g.is_const(a_name) or g.is_const(b_name):
            raise NotUnderstood(node, "multiplies the head axis by a constant it does not treat as a linear layer's weight")
        t.cores.append(node)
        ks, state = set(), None
        for name in (a_name, b_name):
            shape = g.shape(name)
            s = t.states.get(name)
            if s is None:
                continue
            k = len(shape) - s.axis
            if k <= 2:
                raise NotUnderstood(node, f"multiplies along the head axis of {name} (axis {s.axis} of {list(shape)})")
            if state is not None and joint and s.segs != state.segs:
                raise NotUnderstood(node, f"multiplies {a_name} and {b_name}, whose heads are grouped differently")
            ks.add(k)
            state = s
        if len(ks) != 1:
            raise NotUnderstood(node, f"multiplies {a_name} and {b_name} with their head axes in different places")
        k = ks.pop()
        for name in (a_name, b_name):
            if name not in t.states and joint:
                shape = g.shape(name)
                if len(shape) >= k and shape[-k] != 1:
                    raise NotUnderstood(node, f"multiplies the heads with {name}, which is not one of this unit's tensors")
        self.set(t, node.output[0], len(shape_out) - k, state)

    def entry(self, node: Any, index: int, pos: int, old: int, new: int, t: _Trace, state: _Axis) -> None:
        """Entry `pos` of the shape-like input `index` of `node` holds the head axis (`old` entries): it is edited to `new`."""
        g = self.g
        source = _entry_source(g, node.input[index], pos)
        if source is None:  # computed at run time: from the shape of a tensor that is itself cut, it follows the cut
            if _shape_from(g, _entry_tensor(g, node.input[index], pos), t.states):
                return
            # From another tensor's shape (MiniLM's reshape(b, s, h) reads h from the layer's input): a Reshape infers the
            # entry instead (-1) where no other entry is inferred; an Expand keeps its input's size (1).
            free = 1 if node.op_type == "Expand" else -1
            length = (g.shape(node.input[index]) or (0,))[0]
            others = [_entry_source(g, node.input[index], i) for i in range(length) if i != pos]
            if (node.op_type == "Reshape" and -1 in others) or not _single_entry(g, node.input[index], pos):
                raise NotUnderstood(
                    node, f"takes the head axis's size (entry {pos} of {node.input[index]}) from the shape of a tensor that is not cut"
                )
            if self.new is not None and new != old:
                t.edits.append(lambda: _rewrite_entry(g, node, index, pos, free))
            return
        value = int(source)
        if value in (-1, 0) and node.op_type == "Reshape":
            return  # inferred, or copied from the input
        if value == 1 and node.op_type == "Expand":
            return
        if value != old:
            raise NotUnderstood(node, f"has {value} at entry {pos} of {node.input[index]}, where the head axis has {old} entries")
        if self.new is not None and new != old:
            t.edits.append(lambda: _rewrite_entry(g, node, index, pos, new))

    def reshape(self, node: Any, t: _Trace, state: _Axis, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> None:
        a = state.axis
        if node.input[0] not in t.states:
            raise NotUnderstood(node, "takes its shape from the head axis")
        if node.op_type == "Expand":
            j = a + len(shape_out) - len(shape_in)
            if shape_out[j] != shape_in[a]:
                raise NotUnderstood(node, "broadcasts along the head axis")
            if state.segs is not None:
                old, new = _size(state.segs), _size(state.segs, self.new)
                pos = j - (len(shape_out) - (self.g.shape(node.input[1]) or (len(shape_out),))[0])
                if pos >= 0:  # else the shape is shorter and the axis is the input's own
                    self.entry(node, 1, pos, old, new, t, state)
            self.set(t, node.output[0], j, state)
            return
        # The rows before the heads (the dims before the axis, and a batch folded into it) must stay before them: the
        # output axis is where the dims before it, times what it folds in, make as many rows.
        dim, outer = shape_in[a], state.outer
        content, rows = dim // outer, math.prod(shape_in[:a]) * outer
        found = []
        for j in range(len(shape_out)):
            before = math.prod(shape_out[:j])
            if before > rows:
                break
            fold = rows // before
            if rows % before == 0 and shape_out[j] % fold == 0 and shape_out[j] // fold > 1:
                found.append((fold != 1, j, fold))
        if not found:
            raise NotUnderstood(node, f"reshapes {list(shape_in)} to {list(shape_out)} across the head axis {a}")
        _, j, fold = min(found)
        out = shape_out[j] // fold
        segs, origin, moved = state.segs, state.origin, {}
        if segs is not None and len(segs) > 1 and out != content:
            count, groups = len(segs), segs[0][0]
            width = shape_out[j + 1] if j + 1 < len(shape_out) else 0
            if fold != 1 or out != count or len(set(segs)) != 1 or not width or (content // count) % width or width % groups:
                raise NotUnderstood(node, f"reshapes the head axis of {count} fused parts ({list(shape_in)} to {list(shape_out)})")
            # a fused projection unflattened to [.., Q | K | V, width] (or [.., 3, heads, head_dim]): the heads are on the
            # next axis, the parts on this one
            part = ((groups, width // groups),)
            self.entry(node, 1, j + 1, width, _size(part, self.new), t, state)
            self.set(t, node.output[0], j + 1, state, part, parts=j)
            return
        if out != content:
            if (content % out if out < content else out % content) or (segs is not None and out % segs[0][0]):
                raise NotUnderstood(node, f"reshapes {content} entries of the head axis into {out}")
            if segs is None and out < content:
                if t.heads.get(origin, content) == content:  # the first split of this part into heads (a whole part may stand first)
                    t.heads[origin] = out
                if j + 1 < len(shape_out):
                    moved = {"inner": j + 1, "split": (origin[0], content // out, out)}
            if segs is not None:
                segs = ((segs[0][0], out // segs[0][0]),)
        if state.segs is not None:
            self.entry(node, 1, j, shape_out[j], fold * _size(segs, self.new), t, state)
        self.set(t, node.output[0], j, state, segs, origin, **moved)
        t.states[node.output[0]] = dataclasses.replace(t.states[node.output[0]], outer=fold)

    def split(self, node: Any, t: _Trace, state: _Axis, shape_in: tuple[int, ...]) -> None:
        g, a = self.g, state.axis
        rank = len(shape_in)
        axis = g.attr(node, "axis", 0)
        axis = axis + rank if axis < 0 else axis
        outs = [o for o in node.output if o]
        if axis == a and state.outer != 1:
            raise NotUnderstood(node, "splits an axis that holds the heads folded with the batch")
        if axis != a and state.parts is None:
            for o in outs:
                self.set(t, o, a, state)
            return
        computed = g.attr(node, "split") is None and len(node.input) > 1 and bool(node.input[1]) and not g.is_const(node.input[1])
        sizes = _known_ints(g, node, "split", 1, t.states)[0] if computed else g.ints(node, "split", 1)
        given = None if sizes is None or computed else "attr" if g.attr(node, "split") is not None else "input"
        if sizes is None:
            if shape_in[axis] % len(node.output):
                raise NotUnderstood(node, f"splits {shape_in[axis]} entries into {len(node.output)} unequal parts")
            sizes = [shape_in[axis] // len(node.output)] * len(node.output)
        if state.parts is not None:  # joint: the fused projection's Q, K and V taken one by one (timm's unbind)
            if axis != state.parts or any(size != 1 for size in sizes):
                raise NotUnderstood(node, "splits the fused projection's Q / K / V axis other than one part at a time")
            for o in outs:
                self.set(t, o, a, state, parts=state.parts)
            return
        if axis == a and state.segs is None and state.inner is not None and state.split is not None and set(sizes) == {1}:
            lo, size, _ = state.split  # discovering: maybe Q | K | V one by one (see Squeeze)
            for i, o in enumerate(node.output):
                if o:
                    self.set(t, o, a, state, origin=(lo + i * size, lo + (i + 1) * size), inner=state.inner, split=state.split)
            return
        bounds, offset = [], 0
        for s in sizes:
            bounds.append((offset, offset + s))
            offset += s
        lo = state.origin[0]
        if state.segs is None:
            for o, (b0, b1) in zip(node.output, bounds, strict=False):
                if o:
                    self.set(t, o, a, state, origin=(lo + b0, lo + b1))
            return
        parts = _cut(state.segs, bounds, node)
        new_sizes = [_size(p, self.new) for p in parts]
        if given is None and len(set(new_sizes)) > 1:
            raise NotUnderstood(node, f"splits into equal parts, and the cut parts would be {new_sizes}")
        if given is not None and self.new is not None and new_sizes != sizes:
            if given == "attr":
                t.edits.append(lambda: _set_attr(node, "split", new_sizes))
            else:
                for i, v in enumerate(new_sizes):
                    if v != sizes[i]:
                        t.edits.append(lambda i=i, v=v: _rewrite_entry(g, node, 1, i, v))
        for o, p, (b0, b1) in zip(node.output, parts, bounds, strict=False):
            if o:
                self.set(t, o, a, state, segs=p, origin=(lo + b0, lo + b1))

    def slice(self, node: Any, t: _Trace, state: _Axis, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> None:
        g, a, rank = self.g, state.axis, len(shape_in)
        if node.input[0] not in t.states:
            raise NotUnderstood(node, "takes its bounds from the head axis")
        old_style = g.opset < 10
        count = len(g.attr(node, "starts")) if old_style else (g.shape(node.input[1]) or (0,))[0]
        axes = g.ints(node, "axes", 3) or list(range(count))
        axes = [x + rank if x < 0 else x for x in axes]
        piece = state.parts if state.parts is not None else a if state.inner is not None and state.split is not None else None
        if piece in axes and (state.parts is None or a not in axes):  # one of the fused Q / K / V (timm's unbind)
            k = axes.index(piece)
            first, last = g.ints(node, "starts", 1)[k], g.ints(node, "ends", 2)[k]
            first += shape_in[piece] if first < 0 else 0
            if last - first == 1 and first >= 0:
                if state.parts is not None:
                    self.set(t, node.output[0], a, state, parts=state.parts)
                else:
                    lo, size, _ = state.split
                    origin = (lo + first * size, lo + (first + 1) * size)
                    self.set(t, node.output[0], a, state, origin=origin, inner=state.inner, split=state.split)
                return
        if state.parts is not None:
            raise NotUnderstood(node, "slices the fused projection's Q / K / V axis other than one part at a time")
        if a not in axes:  # bounds on other axes (rotary halves of the head dim) may be computed
            self.set(t, node.output[0], a, state)
            return
        (starts, computed_starts), (ends, computed_ends) = (self.bounds(node, key, index, t) for key, index in (("starts", 1), ("ends", 2)))
        steps = (None if old_style else g.ints(node, "steps", 4)) or [1] * len(starts)
        i = axes.index(a)
        if state.outer != 1:
            raise NotUnderstood(node, "slices an axis that holds the heads folded with the batch")
        if steps[i] != 1:
            raise NotUnderstood(node, f"slices the head axis with step {steps[i]}")
        dim = shape_in[a]
        lo = min(max(starts[i] + dim if starts[i] < 0 else starts[i], 0), dim)
        hi = min(max(ends[i] + dim if ends[i] < 0 else ends[i], 0), dim)
        if state.segs is None:
            self.set(t, node.output[0], a, state, origin=(state.origin[0] + lo, state.origin[0] + hi))
            return
        (part,) = _cut(state.segs, [(lo, hi)], node)
        before = _cut(state.segs, [(0, lo)], node)[0] if lo else ()
        new_lo, new_hi = _size(before, self.new), _size(before, self.new) + _size(part, self.new)
        if self.new is not None:
            for key, index, old, value, full, computed in (
                ("starts", 1, starts[i], new_lo, lo, computed_starts),
                ("ends", 2, ends[i], new_hi, hi, computed_ends),
            ):
                if value == full or (key == "ends" and hi == dim and old >= dim) or computed:
                    continue  # unchanged, "to the end", or computed from the shape of a tensor that is cut (torch's chunk)
                if old_style:
                    t.edits.append(lambda key=key, value=value: _set_attr_entry(node, key, i, value))
                else:
                    t.edits.append(lambda index=index, value=value: _rewrite_entry(g, node, index, i, value))
        self.set(t, node.output[0], a, state, segs=part, origin=(state.origin[0] + lo, state.origin[0] + hi))


def _known_ints(g: _Graph, node: Any, key: str, index: int, states: dict[str, _Axis]) -> tuple[list[int], bool]:
    """An int list input (Slice bounds, Split sizes): its constant, or its value when the graph ran, if it is computed from
    the shape of a tensor that is cut (so that it follows the cut); the flag says which."""
    if g.attr(node, key) is not None or g.is_const(node.input[index]):
        return g.ints(node, key, index), False
    name = node.input[index]
    seen = g.known.get(name)
    if seen is None or not _shape_from(g, name, states):
        raise NotUnderstood(node, f"takes its {key} on the head axis from {name}, computed at run time from a tensor that is not cut")
    return [int(v) for v in np.asarray(seen).reshape(-1)], True


def _entry_source(g: _Graph, name: str, pos: int) -> int | None:
    """The constant at entry `pos` of a 1-D int tensor (through Concat, Unsqueeze, Cast), or None when computed at run time."""
    arr = g.array(name)
    if arr is not None:
        return int(arr.reshape(-1)[pos])
    node = g.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Concat":
        offset = 0
        for part in node.input:
            n = int(np.prod(g.shape(part) or (1,)))
            if pos < offset + n:
                return _entry_source(g, part, pos - offset)
            offset += n
        return None
    if node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze") and pos == 0:
        return _entry_source(g, node.input[0], 0)
    return None


def _entry_tensor(g: _Graph, name: str, pos: int) -> str:
    """The tensor that computes entry `pos` of a shape tensor: its part of a Concat (the other parts may read other shapes)."""
    node = g.producer.get(name)
    while node is not None and node.op_type == "Concat":
        offset = 0
        for part in node.input:
            n = int(np.prod(g.shape(part) or (1,)))
            if pos < offset + n:
                name, pos = part, pos - offset
                break
            offset += n
        else:
            return name
        node = g.producer.get(name)
    return name


def _shape_from(g: _Graph, name: str, states: dict[str, _Axis]) -> bool:
    """Whether the computed shape tensor reads a Shape of a tensor on the head axis."""
    stack, seen = [name], set()
    while stack:
        tensor = stack.pop()
        node = g.producer.get(tensor)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Shape":
            if node.input[0] in states:
                return True
            continue
        stack.extend(node.input)
    return False


def _single_entry(g: _Graph, name: str, pos: int) -> bool:
    """Whether entry `pos` of the shape tensor is a constant, or a one-entry part of a Concat (so it can be replaced alone)."""
    if g.array(name) is not None:
        return True
    node = g.producer.get(name)
    if node is None or node.op_type != "Concat":
        return node is not None and node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze") and _single_entry(g, node.input[0], 0)
    offset = 0
    for part in node.input:
        n = int(np.prod(g.shape(part) or (1,)))
        if pos < offset + n:
            return n == 1 or _single_entry(g, part, pos - offset)
        offset += n
    return False


def _rewrite_entry(g: _Graph, consumer: Any, index: int, pos: int, value: int) -> None:
    """Sets entry `pos` of `consumer`'s input `index` to `value` in a copy of its own (shape constants are shared); a
    computed one-entry part of a Concat is replaced by the constant."""
    name = consumer.input[index]
    arr = g.array(name)
    if arr is not None:
        new = arr.copy()
        new.reshape(-1)[pos] = value
        consumer.input[index] = g.add_const(name, new)
        return
    node = g.producer.get(name)
    if node is not None and node.op_type == "Concat":
        offset = 0
        for k, part in enumerate(node.input):
            n = int(np.prod(g.shape(part) or (1,)))
            if pos < offset + n:
                copy = g.clone(node)
                consumer.input[index] = copy.output[0]
                if n == 1 and _entry_source(g, part, 0) is None:
                    copy.input[k] = g.add_const("shape_entry", np.array([value], np.int64))
                    return
                _rewrite_entry(g, copy, k, pos - offset, value)
                return
            offset += n
    if node is not None and node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze"):
        copy = g.clone(node)
        consumer.input[index] = copy.output[0]
        _rewrite_entry(g, copy, 0, pos, value)
        return
    raise NotUnderstood(consumer, f"reads entry {pos} of {name}, which is computed at run time, where a constant was expected")


def _set_attr(node: Any, name: str, value: list[int]) -> None:
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(onnx.helper.make_attribute(name, value))


def _set_attr_entry(node: Any, name: str, pos: int, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            values = list(a.ints)
            values[pos] = value
            a.CopyFrom(onnx.helper.make_attribute(name, values))


# ---------------------------------------------------------------------------------------------
# Finding units


def has_attention(model: onnx.ModelProto) -> bool:
    """Whether the graph has a Softmax fed by a MatMul of two computed tensors (an attention's scores)."""
    g = _Graph(model, {})
    return any(_attention_softmax(g, node) for node in g.graph.node)


def _attention_softmax(g: _Graph, node: Any) -> bool:
    """A Softmax over (a scaled, masked) MatMul of two computed tensors."""
    if node.op_type != "Softmax":
        return False
    stack, seen = [node.input[0]], 0
    while stack and seen < 8:
        seen += 1
        producer = g.producer.get(stack.pop())
        if producer is None:
            continue
        if producer.op_type == "MatMul" and not any(g.is_const(i) for i in producer.input):
            return True
        if producer.op_type in ELEMENTWISE:
            stack.extend(i for i in producer.input if not g.is_const(i))
    return False


class TensorShapes(dict):
    """Tensor name -> shape; `ints`: the values of the small int tensors (computed shapes, bounds, sizes)."""

    ints: dict[str, np.ndarray]


def tensor_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> TensorShapes:
    """Every tensor's shape when the graph runs on the first two rows of `feeds` (one, where the batch is fixed)."""
    import onnxruntime as ort

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in have and types.get(name):
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
                have.add(name)
    rows = 2
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            rows = dims[0].dim_value
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {k: v[:rows] for k, v in feeds.items()})
    shapes = TensorShapes((k, tuple(v[:rows].shape)) for k, v in feeds.items())
    shapes.update((n, tuple(np.shape(v))) for n, v in zip(names, values, strict=True))
    shapes.ints = {n: np.asarray(v) for n, v in zip(names, values, strict=True) if np.asarray(v).dtype.kind in "iu" and np.size(v) <= 8}
    return shapes


def _linears(g: _Graph) -> dict[str, _Linear]:
    return {n.output[0]: lin for n in g.graph.node if (lin := g.linear(n)) is not None}


def _start(g: _Graph, lin: _Linear, segs: Segs | None) -> dict[str, _Axis]:
    shape = g.shape(lin.out)
    if shape is None:
        raise NotUnderstood(lin.node, "was not run when the graph's shapes were read")
    return {lin.out: _Axis(len(shape) - 1, segs, (0, shape[-1]))}


def find_onnx_encoder(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> OnnxEncoder:
    """The attention units and FFNs of a transformer's ONNX graph, given its tensors' shapes (`tensor_shapes`)."""
    g = _Graph(model, shapes)
    return _find(g, _linears(g))


def _find(g: _Graph, linears: dict[str, _Linear]) -> OnnxEncoder:
    found = OnnxEncoder()
    by_node = {id(lin.node): lin for lin in linears.values()}
    attention: dict[int, list[tuple[_Linear, _Trace]]] = {}
    ffn: dict[int, list[_Linear]] = {}
    why: dict[int, str] = {}  # Softmax -> what stopped the first trace that reached it
    explained: set[int] = set()

    def blame(trace_region: list[Any], reason: str, start: _Linear) -> None:
        for node in trace_region:
            if node.op_type == "Softmax":
                why.setdefault(id(node), f"from the linear {start.node.name or start.out}: {reason}")

    def reach(start: _Linear) -> list[Any]:
        seen, stack, out = set(), [start.out], []
        while stack and len(out) < 200:
            for user in g.consumers.get(stack.pop(), []):
                if id(user) not in seen and id(user) not in by_node and user.op_type not in ("Shape", "Size"):
                    seen.add(id(user))
                    out.append(user)
                    stack.extend(user.output)
        return out

    for lin in linears.values():
        try:
            trace = _Tracer(g, linears).run(_start(g, lin, None))
        except _NOT_FOLLOWED as e:
            blame(reach(lin), _why(e), lin)
            continue
        targets = {id(node) for node, _ in trace.ends}
        if len(targets) != 1:
            if trace.softmaxes:
                blame(trace.softmaxes, f"reaches {len(targets)} weighted MatMuls, where one output projection was expected", lin)
            continue
        target = targets.pop()
        if trace.cores:
            attention.setdefault(target, []).append((lin, trace))
        elif not trace.heads:
            ffn.setdefault(target, []).append(lin)
    used: set[int] = set()
    for target, members in attention.items():
        out, projections = by_node[target], [m for m, _ in members]
        try:
            unit, trace = _attention_unit(g, linears, out, members)
        except _NOT_FOLLOWED as e:
            for _, tr in members:
                blame(tr.softmaxes, _why(e), projections[0])
            continue
        found.attentions.append(unit)
        explained.update(id(s) for s in trace.softmaxes)
        used.update(id(p.node) for p in (*projections, out))
    for target, ups in ffn.items():
        down = by_node[target]
        if id(down.node) in used or any(id(u.node) in used for u in ups):
            continue
        width = g.weight(down).shape[0]  # the channels the down reads; an up may hold several sets (a fused gate | up)
        if any(g.weight(u).shape[1] % width for u in ups):
            continue
        try:
            trace = _Tracer(g, linears, width).run(_ffn_starts(g, ups, width))
        except _NOT_FOLLOWED:
            continue
        if [(id(n), s.segs) for n, s in trace.ends] != [(target, ((width, 1),))] or trace.cores:
            continue
        found.ffns.append(OnnxFfn(ups, down))
    for node in g.graph.node:
        if id(node) not in explained and _attention_softmax(g, node):
            stop = why.get(id(node), "no linear layer with a constant weight of its own reaches it through the heads' reshapes")
            if id(node) not in why and g.shared:
                stop += f" ({'; '.join(dict.fromkeys(g.shared[:2]))})"

            found.unexplained.append(f"the attention Softmax {node.name or node.output[0]} was not understood: {stop}")
    return found


def _ffn_starts(g: _Graph, ups: list[_Linear], width: int) -> dict[str, _Axis]:
    """Each up's output as parts of `width` channels: one for an up or a gate, two for a fused gate | up (Phi-3's gate_up_proj)."""
    return {k: v for u in ups for k, v in _start(g, u, ((width, 1),) * (g.weight(u).shape[1] // width)).items()}


def _attention_unit(
    g: _Graph, linears: dict[str, _Linear], out: _Linear, members: list[tuple[_Linear, _Trace]]
) -> tuple[OnnxAttention, _Trace]:
    """One unit from the projections whose traces end at `out`: its groups (K / V heads), checked by a joint trace."""
    counts, parts = [], []
    for lin, trace in members:
        width = g.weight(lin).shape[1]
        ranges = sorted(trace.heads.items())
        if (
            not ranges
            or ranges[0][0][0] != 0
            or ranges[-1][0][1] != width
            or any(r[0][1] != s[0][0] for r, s in itertools.pairwise(ranges))
        ):
            raise NotUnderstood(
                lin.node, f"has an output of {width} channels that is not split into heads end to end ({[r for r, _ in ranges]})"
            )
        parts.append([(hi - lo, heads) for (lo, hi), heads in ranges])
        counts += [heads for _, heads in parts[-1]]
    groups = math.gcd(*counts)
    if any((size // heads) * heads != size for p in parts for size, heads in p):
        raise NotUnderstood(members[0][0].node, "has heads of unequal widths")
    starts = {}
    for lin, p in zip((m for m, _ in members), parts, strict=True):
        starts.update(_start(g, lin, tuple((groups, size // groups) for size, _ in p)))
    trace = _Tracer(g, linears, groups).run(starts)
    if [id(n) for n, _ in trace.ends] != [id(out.node)]:
        raise NotUnderstood(out.node, "is not the only weighted MatMul the unit's heads reach")
    end = trace.ends[0][1]
    if end.segs is None or len(end.segs) != 1 or end.segs[0][0] != groups:
        raise NotUnderstood(out.node, f"reads the heads as {end.segs}, not as {groups} groups")
    heads = max(h for p in parts for _, h in p)
    head_dim = next(size // h for p in parts for size, h in p if h == heads)
    projections = [m for m, _ in members]
    return OnnxAttention(projections, [[size for size, _ in p] for p in parts], out, groups, heads, head_dim), trace


# ---------------------------------------------------------------------------------------------
# Pruning


def _blocks(segs: Segs, kept: np.ndarray) -> np.ndarray:
    """Indices along an axis of `segs` that the `kept` groups own, part by part."""
    out, offset = [], 0
    for groups, per in segs:
        out += [offset + g * per + np.arange(per) for g in kept]
        offset += groups * per
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _toposort(graph: Any) -> None:
    """The nodes in an order where each comes after its inputs' producers (clones were appended at the end)."""
    nodes = list(graph.node)
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    done, order = set(), []

    def visit(k: int) -> None:
        stack = [(k, False)]
        while stack:
            k, expanded = stack.pop()
            if k in done:
                continue
            if expanded:
                done.add(k)
                order.append(nodes[k])
                continue
            stack.append((k, True))
            for name in nodes[k].input:
                if name not in ready and name in producer and producer[name] not in done:
                    stack.append((producer[name], False))

    for k in range(len(nodes)):
        visit(k)
    del graph.node[:]
    graph.node.extend(order)


def prune_onnx_encoder(
    model: onnx.ModelProto,
    ratio: float,
    needed_by: str,
    round_to: int,
    check: Callable[[onnx.ModelProto, onnx.ModelProto], None],
    activations: Callable[[onnx.ModelProto, list[str]], dict[str, np.ndarray]] | None = None,
    *,
    shapes: dict[str, tuple[int, ...]],
) -> tuple[onnx.ModelProto, Removed]:
    """A copy of the model without `ratio` of every unit's head groups and every FFN's channels (magnitude: L2 of their weights).

    `shapes` are the model's tensors' shapes on real rows (`tensor_shapes`). `check(pruned, reference)` runs both graphs on
    real inputs and raises when they differ; the reference is the original with the removed heads' and channels' rows of
    the output weights zeroed, so the two compute the same when the cut is right.
    """
    pruned, reference = onnx.ModelProto(), onnx.ModelProto()
    pruned.CopyFrom(model)
    reference.CopyFrom(model)
    g, ref = _Graph(pruned, shapes), _Graph(reference, shapes)
    linears = _linears(g)
    encoder = _find(g, linears)
    if not encoder.attentions and not encoder.ffns:
        detail = "; ".join(encoder.unexplained[:2]) or "no Softmax attention and no MatMul -> element-wise -> MatMul FFN"
        raise OptimizerError(
            f"{needed_by}: found no attention unit and no FFN to cut in the ONNX graph ({detail}); register the model's .pt2 to prune it"
        )
    removed = Removed(skipped=list(encoder.unexplained))
    # Activation importance: what each head group adds to the output projection's result, and each FFN channel's
    # activation times its row of the down weight, on real inputs (the tensors read as extra graph outputs).
    seen: dict[str, np.ndarray] = {}
    if activations is not None:
        wanted = [u.out.data for u in encoder.attentions] + [f.down.data for f in encoder.ffns]
        seen = activations(model, wanted)
    for unit in encoder.attentions:
        groups = unit.groups
        keep = kept_count(groups, ratio, 0)
        per_group = unit.heads // groups
        removed.heads_before += unit.heads
        removed.heads_after += keep * per_group
        if keep == groups:
            if groups == 1:
                removed.skipped.append(
                    f"the attention before {unit.out.node.name or unit.out.out} has one K / V head for all its Q heads: nothing to cut"
                )
            continue
        out_w = g.weight(unit.out)
        per = out_w.shape[0] // groups
        if unit.out.data in seen:
            x = seen[unit.out.data].reshape(-1, groups, per)
            scores = np.array([((x[:, h] @ out_w[h * per : (h + 1) * per]) ** 2).sum() for h in range(groups)])
        else:
            scores = (out_w.reshape(groups, per, -1) ** 2).sum((1, 2))
            for lin, part_sizes in zip(unit.projections, unit.parts, strict=True):
                w = g.weight(lin) ** 2
                offset = 0
                for size in part_sizes:
                    scores = scores + w[:, offset : offset + size].reshape(w.shape[0], groups, -1).sum((0, 2))
                    offset += size
        kept = np.sort(np.argsort(-scores, kind="stable")[:keep])
        starts = {}
        for lin, part_sizes in zip(unit.projections, unit.parts, strict=True):
            starts.update(_start(g, lin, tuple((groups, size // groups) for size in part_sizes)))
        try:
            trace = _Tracer(g, linears, keep).run(starts)
            for edit in trace.edits:
                edit()
        except _NOT_FOLLOWED as e:
            raise OptimizerError(
                f"{needed_by}: cutting the attention before {unit.out.node.name}: {_why(e)}; nothing was registered"
            ) from e
        for lin, part_sizes in zip(unit.projections, unit.parts, strict=True):
            cols = _blocks(tuple((groups, size // groups) for size in part_sizes), kept)
            g.set_weight(lin, g.weight(lin)[:, cols])
            g.set_bias(lin, cols)
        rows = _blocks(((groups, per),), kept)
        zeroed = ref.weight(unit.out).copy()
        zeroed[np.setdiff1d(np.arange(out_w.shape[0]), rows)] = 0
        ref.set_weight(unit.out, zeroed)
        g.set_weight(unit.out, out_w[rows])
    for ffn in encoder.ffns:
        down_w = g.weight(ffn.down)
        width = down_w.shape[0]
        keep = kept_count(width, ratio, round_to)
        removed.ffn_before += width
        removed.ffn_after += keep
        if keep == width:
            continue
        if ffn.down.data in seen:
            scores = (seen[ffn.down.data].reshape(-1, width) ** 2).sum(0) * (down_w**2).sum(1)
        else:
            scores = (down_w**2).sum(1) + sum((g.weight(u) ** 2).sum(0).reshape(-1, width).sum(0) for u in ffn.ups)
        channels = np.sort(np.argsort(-scores, kind="stable")[:keep])
        try:
            trace = _Tracer(g, linears, keep).run(_ffn_starts(g, ffn.ups, width))
            for edit in trace.edits:
                edit()
        except _NOT_FOLLOWED as e:
            raise OptimizerError(f"{needed_by}: cutting the FFN before {ffn.down.node.name}: {_why(e)}; nothing was registered") from e
        for up in ffn.ups:
            cols = _blocks(((width, 1),) * (g.weight(up).shape[1] // width), channels)
            g.set_weight(up, g.weight(up)[:, cols])
            g.set_bias(up, cols)
        g.set_weight(ffn.down, down_w[channels])
        zeroed = ref.weight(ffn.down).copy()
        zeroed[np.setdiff1d(np.arange(width), channels)] = 0
        ref.set_weight(ffn.down, zeroed)
    if removed.heads_after == removed.heads_before and removed.ffn_after == removed.ffn_before:
        raise OptimizerError(
            f"{needed_by}: a pruning ratio of {ratio:g} removes no attention head ({removed.heads_before} in {len(encoder.attentions)} units, "
            f"cut by whole K / V groups) and no FFN channel ({removed.ffn_before} in {len(encoder.ffns)} FFNs, kept in multiples of round_to "
            f"{round_to}); raise pruning_ratio"
        )
    _toposort(pruned.graph)
    # Shape inference recorded the old widths on intermediate tensors: they are dropped, ORT infers them again.
    del pruned.graph.value_info[:]
    used = {i for n in pruned.graph.node for i in n.input}
    kept_inits = [t for t in pruned.graph.initializer if t.name in used or t.name in g.inputs]
    del pruned.graph.initializer[:]
    pruned.graph.initializer.extend(kept_inits)
    check(pruned, reference)
    return pruned, removed
