"""Real layers from a torch.export program's functional calls, and the layer queries of the pruning passes.

A .pt2 program's graph calls functional ATen ops (aten.conv2d(x, weight, bias)); training with
train/eval behaviour (BatchNorm statistics, dropout) and Torch-Pruning's dependency graph both need
real layers. `lift_layers` rebuilds the program as an fx.GraphModule whose convolutions, linear layers,
norms, embeddings and recurrent layers are nn.Modules again, under their original names ("features.0"),
so that a user can name layers in a config and Torch-Pruning can resize them. `PRUNABLE`, `weight_names`,
`layers_in_order` and `output_layers` then name those layers.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from slimserve.optimizer.base import OptimizerError

if TYPE_CHECKING:
    import torch


def _layer(node: Any, tensors: dict[str, Any]) -> tuple[Any, list[str], list[Any]] | None:
    """(new nn.Module, attribute targets it takes over, args of the call_module node) for a lifted op, else None."""
    import torch
    from torch import nn

    aten = torch.ops.aten

    def attr(arg: Any) -> str | None:
        return arg.target if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else None

    def param(target: str | None) -> nn.Parameter | None:
        if target is None:
            return None
        value = tensors[target]
        return value if isinstance(value, nn.Parameter) else nn.Parameter(value.detach().clone(), requires_grad=value.is_floating_point())

    target, args = node.target, list(node.args)
    convs = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d}
    if target in convs:
        w, b = attr(args[1]), attr(args[2]) if len(args) > 2 else None
        if w is None or (len(args) > 2 and args[2] is not None and b is None):
            return None
        weight = tensors[w]
        stride, padding, dilation, groups = (args + [None, None, None, 1, 0, 1, 1][len(args) :])[3:7]
        if isinstance(padding, str):
            return None
        out_ch, in_per_group = weight.shape[:2]
        layer = convs[target](
            in_per_group * groups,
            out_ch,
            tuple(weight.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=b is not None,
        )
        layer.weight = param(w)
        if b is not None:
            layer.bias = param(b)
        return layer, [t for t in (w, b) if t], [args[0]]
    if target == aten.linear.default:
        w, b = attr(args[1]), attr(args[2]) if len(args) > 2 else None
        if w is None or (len(args) > 2 and args[2] is not None and b is None):
            return None
        layer = nn.Linear(tensors[w].shape[1], tensors[w].shape[0], bias=b is not None)
        layer.weight = param(w)
        if b is not None:
            layer.bias = param(b)
        return layer, [t for t in (w, b) if t], [args[0]]
    if target == aten.batch_norm.default:
        w, b, mean, var = (attr(a) for a in args[1:5])
        if mean is None or var is None or (args[1] is not None and w is None) or (args[2] is not None and b is None):
            return None
        momentum, eps = float(args[6]), float(args[7])
        channels = tensors[mean].shape[0]
        ndim = node.meta["val"].dim() if "val" in node.meta else 4
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(ndim)
        if cls is None:
            return None
        layer = cls(channels, eps=eps, momentum=momentum, affine=w is not None)
        if w is not None:
            layer.weight, layer.bias = param(w), param(b)
        layer.running_mean = tensors[mean].detach().clone()
        layer.running_var = tensors[var].detach().clone()
        return layer, [t for t in (w, b, mean, var) if t], [args[0]]
    if target == aten.layer_norm.default:
        shape = list(args[1])
        w, b = (attr(args[2]) if len(args) > 2 else None), (attr(args[3]) if len(args) > 3 else None)
        if w is None or b is None:
            return None
        layer = nn.LayerNorm(shape, eps=float(args[4]) if len(args) > 4 else 1e-5)
        layer.weight, layer.bias = param(w), param(b)
        return layer, [w, b], [args[0]]
    if target in (aten.lstm.input, aten.gru.input):
        return _recurrent_layer(node, args, tensors, param)
    if target == aten.prelu.default:  # nn.PReLU (an ONNX PRelu converted by slimserve.optimizer.formats.onnx2torch)
        w = attr(args[1])
        if w is None or tensors[w].dim() != 1:
            return None
        layer = nn.PReLU(num_parameters=tensors[w].numel())
        layer.weight = param(w)
        return layer, [w], [args[0]]
    if target == aten.embedding.default:
        w = attr(args[0])
        if w is None or (len(args) > 2 and args[2] not in (-1, None)):
            return None
        weight = tensors[w]
        layer = nn.Embedding(weight.shape[0], weight.shape[1])
        layer.weight = param(w)
        return layer, [w], [args[1]]
    return None


def _recurrent_layer(node: Any, args: list[Any], tensors: dict[str, Any], param: Any) -> tuple[Any, list[str], list[Any]] | None:
    """aten.lstm / aten.gru with weights from attributes as nn.LSTM / nn.GRU; zero initial states are left to the layer."""
    import torch
    from torch import nn

    lstm = node.target == torch.ops.aten.lstm.input
    data, hx, params, has_biases, num_layers, dropout, _train, bidirectional, batch_first = args[:9]
    targets = [p.target if isinstance(p, torch.fx.Node) and p.op == "get_attr" else None for p in params]
    per_layer = (4 if has_biases else 2) * (2 if bidirectional else 1)
    if None in targets or len(targets) != per_layer * num_layers:
        return None  # weights computed in the graph, or projections (proj_size): left as the functional op
    weight_ih = tensors[targets[0]]
    gates = 4 if lstm else 3
    layer = (nn.LSTM if lstm else nn.GRU)(
        weight_ih.shape[1],
        weight_ih.shape[0] // gates,
        num_layers=num_layers,
        bias=bool(has_biases),
        batch_first=bool(batch_first),
        dropout=float(dropout),
        bidirectional=bool(bidirectional),
    )
    for name, target in zip(layer._flat_weights_names, targets):
        setattr(layer, name, param(target))
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    zeros = all(isinstance(h, torch.fx.Node) and h.target == torch.ops.aten.zeros.default for h in states)
    call_args = [data] if zeros else [data, tuple(states) if lstm else states[0]]
    return layer, targets, call_args  # type: ignore[return-value]


def recurrent_outputs(result: Any) -> tuple[Any, ...]:
    """nn.LSTM's (out, (h, c)) / nn.GRU's (out, h) as aten.lstm's (out, h, c) / aten.gru's (out, h)."""
    out, hidden = result
    return (out, *hidden) if isinstance(hidden, tuple) else (out, hidden)


def _module_path(targets: list[str], taken: set[str], fallback: str) -> str:
    """The layer's original path ('features.0' for 'features.0.weight'), unique in the new module."""
    base = targets[0].rsplit(".", 1)[0] if targets and "." in targets[0] else fallback
    path, i = base, 1
    while path in taken:
        path = f"{base}_{i}"
        i += 1
    taken.add(path)
    return path


def lift_layers(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `graph_module` whose functional conv / linear / norm / embedding calls are nn.Module layers."""
    import torch
    from torch import nn

    old = graph_module
    tensors: dict[str, Any] = {}
    for name, value in [*old.named_parameters(), *old.named_buffers()]:
        tensors[name] = value
    for node in old.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = old
            for part in node.target.split("."):
                value = getattr(value, part)
            tensors[node.target] = value

    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(old.graph._codegen)  # keeps the program's pytree calling convention (a tensor out, not a tuple)
    root: dict[str, Any] = {}
    env: dict[Any, Any] = {}
    taken: set[str] = set()
    claimed: set[str] = set()
    for node in old.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # the archive's shape guards: the new module is exported again with its own
        lifted = _layer(node, tensors) if node.op == "call_function" else None
        if lifted is not None:
            layer, targets, args = lifted
            path = _module_path(targets, taken, f"layer_{len(taken)}")
            root[path] = layer
            claimed.update(targets)
            mapped = tuple(
                tuple(env[x] for x in a) if isinstance(a, tuple) else env[a] if isinstance(a, torch.fx.Node) else a for a in args
            )
            new = graph.call_module(path, mapped)
            if isinstance(layer, nn.RNNBase):
                new = graph.call_function(recurrent_outputs, (new,))
            new.meta = dict(node.meta)
            env[node] = new
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    # Attributes no layer took over (an embedding's table read by another op, constants) stay as they were.
    for node in list(graph.nodes):
        if node.op == "get_attr":
            if not node.users:
                graph.erase_node(node)
                continue
            value = tensors[node.target]
            if (
                isinstance(value, torch.Tensor)
                and not isinstance(value, nn.Parameter)
                and value.is_floating_point()
                and node.target in dict(old.named_parameters())
            ):
                value = nn.Parameter(value.detach().clone())
            root[node.target] = value
    graph.lint()
    module = torch.fx.GraphModule(root, graph)
    module.graph.eliminate_dead_code()  # the zero initial states of recurrent layers that now make their own
    module.recompile()
    return module


PRUNABLE = ("Conv1d", "Conv2d", "Conv3d", "Linear", "LSTM", "GRU")
RECURRENT = ("LSTM", "GRU")


def weight_names(layer: torch.nn.Module) -> list[str]:
    """The weight matrices a layer multiplies by: `weight`, or a recurrent layer's input and hidden weights of every layer."""
    if type(layer).__name__ in RECURRENT:
        return [n for n in layer._flat_weights_names if n.startswith("weight_")]  # type: ignore[union-attr]
    return ["weight"]


def layers_in_order(module: torch.nn.Module) -> list[str]:
    """Names of the conv and linear layers in the order the graph calls them (else the module order)."""
    graph = getattr(module, "graph", None)
    names: list[str] = []
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and type(module.get_submodule(node.target)).__name__ in PRUNABLE and node.target not in names:
                names.append(node.target)
        return names
    return [n for n, m in module.named_modules() if type(m).__name__ in PRUNABLE]


def output_layers(module: torch.nn.Module) -> list[str]:
    """The conv / linear layers whose outputs reach the model's outputs without passing another such layer."""
    import torch

    graph = getattr(module, "graph", None)
    if graph is None:
        names = layers_in_order(module)
        return names[-1:]
    found: list[str] = []
    output = next(n for n in graph.nodes if n.op == "output")
    stack, seen = list(output.all_input_nodes), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and type(module.get_submodule(node.target)).__name__ in PRUNABLE:
            found.append(node.target)
            continue
        stack.extend(n for n in node.all_input_nodes if isinstance(n, torch.fx.Node))
    return found


def check_layer_names(module: torch.nn.Module, names: tuple[str, ...], field: str, needed_by: str) -> None:
    known = layers_in_order(module)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise OptimizerError(f"{needed_by}: {field} names no layer {', '.join(repr(u) for u in unknown)} (layers: {', '.join(known)})")
