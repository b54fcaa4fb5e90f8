"""Trainable torch modules from torch.export programs (or ONNX converted to one), and their way back to served ONNX; a training pass's start and finish.

A .pt2 program's graph calls functional ATen ops (aten.conv2d(x, weight, bias)); training with
train/eval behaviour (BatchNorm statistics, dropout) and Torch-Pruning's dependency graph both need
real layers. `trainable_module` rebuilds the program as an fx.GraphModule whose convolutions,
linear layers, norms and embeddings are nn.Modules again, under their original names
("features.0"), so that a user can name layers in a config and Torch-Pruning can resize them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimizer.base import Artifact, OptimizerError, PassContext, ProgressEvent
from optimizer.data import InputSpecs, TrainData, load_train_data, model_arrays
from optimizer.export import (
    export_dynamic_batch,
    export_program_to_onnx,
    load_program,
    onnx_input_types,
    onnx_io_names,
    program_input_types,
    served_names,
)

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


def source_program(
    artifact: Artifact, context: PassContext, needed_by: str
) -> tuple[torch.export.ExportedProgram, list[str], list[str], InputSpecs]:
    """The artifact as a torch.export program, its served input and output names, and its input specs.

    A .pt2 is loaded as it is; an ONNX model is converted by onnx2torch and checked against
    onnxruntime on the first rows of the train data (optimizer.onnx2torch_convert), before any training.
    """
    if artifact.format == "pt2":
        program = load_program(artifact, needed_by)
        inputs, outputs = served_names(artifact, program, needed_by)
        return program, inputs, outputs, dict(zip(inputs, program_input_types(program).values()))
    from optimizer.onnx2torch_convert import convertible_model, program_from_onnx

    names_in, names_out = onnx_io_names(artifact.path)
    inputs, outputs = list(artifact.input_names) or list(names_in), list(artifact.output_names) or list(names_out)
    specs = dict(zip(inputs, onnx_input_types(artifact.path).values()))
    convertible_model(artifact.path, needed_by)  # unknown operators are refused before the data is read
    if "train" not in context.datasets:
        load_train_data(context, inputs, specs, needed_by)  # raises the usual 'needs train data' error
    arrays = model_arrays(context.dataset("train", needed_by), specs, "train", needed_by)
    feeds = {graph_name: arrays[name][:32] for graph_name, name in zip(names_in, inputs)}
    return program_from_onnx(artifact, feeds, needed_by), inputs, outputs, specs


def trainable_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The program as a trainable module whose convolutions, linear layers, norms and embeddings are nn.Modules."""
    module = lift_layers(program.module(check_guards=False))
    module.train()
    return module


def remove_dropout_(module: torch.nn.Module) -> None:
    """Drops the dropout layers fine-tuning inserted (they are identities at inference)."""
    from torch import nn

    if not hasattr(module, "graph"):
        return
    for node in list(module.graph.nodes):
        if node.op == "call_module" and isinstance(module.get_submodule(node.target), nn.Dropout):
            node.replace_all_uses_with(node.args[0])
            module.graph.erase_node(node)
            module.delete_submodule(node.target)
    module.graph.lint()
    module.recompile()


def export_module_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    context: PassContext,
    stem: str,
    inputs: list[str],
    outputs: list[str],
    needed_by: str,
) -> Path:
    """Exports the trained module (eval mode, dynamic batch) as one ONNX file with the served names."""
    remove_dropout_(module)
    module.eval()
    program = export_dynamic_batch(module, example, needed_by)
    target = context.new_path(stem, ".onnx")
    return export_program_to_onnx(program, target, inputs, outputs, needed_by)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_sample(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> float:
    """FLOPs of one sample, counted as evaluation counts a .pt2 (optimizer.counting_torch)."""
    from optimizer.counting_torch import count_module_flops

    was_training = module.training
    module.eval()
    flops = count_module_flops(module, tuple(x[:1] for x in example))
    module.train(was_training)
    return flops


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


def output_shapes(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> list[tuple[int, ...]]:
    import torch

    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(*example)
    module.train(was_training)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [tuple(o.shape) for o in outs]


# ---------------------------------------------------------------------------------------------
# A training pass's start (module, data, example batch) and finish (served ONNX)


@dataclass
class Prepared:
    """A training pass's starting point: the model with real layers, its names, data and an example batch."""

    module: Any
    inputs: list[str]
    outputs: list[str]
    data: TrainData
    example: tuple[Any, ...]
    classes: int | None
    specs: InputSpecs


def prepare(artifact: Artifact, context: PassContext, needed_by: str, with_eval: bool = False) -> Prepared:
    """Loads the model (.pt2, or ONNX converted to torch) as a trainable module and its train data (and, with_eval, evaluation data for early stopping)."""
    import torch

    program, inputs, outputs, specs = source_program(artifact, context, needed_by)
    module = trainable_module(program)
    data = load_train_data(context, inputs, specs, needed_by, with_eval=with_eval)
    example = tuple(torch.from_numpy(np.ascontiguousarray(x[:2])) for x in data.inputs)
    shapes = output_shapes(module, example)
    classes = shapes[0][-1] if len(shapes[0]) == 2 else None
    if classes is not None and len(data.labels) and data.labels.max() >= classes:
        raise OptimizerError(f"{needed_by}: 'labels' holds class {int(data.labels.max())}, and the model has {classes} outputs")
    return Prepared(module, inputs, outputs, data, example, classes, specs)


def finish(prepared: Prepared, context: PassContext, artifact: Artifact, stem: str, needed_by: str, **notes: str) -> Artifact:
    context.progress(ProgressEvent(stage=needed_by, fraction=0.97, message="exporting ONNX"))
    target = export_module_onnx(prepared.module, prepared.example, context, stem, prepared.inputs, prepared.outputs, needed_by)
    return Artifact(
        path=target,
        format="onnx",
        runtime="onnxruntime",
        input_names=tuple(prepared.inputs),
        output_names=tuple(prepared.outputs),
        notes={**artifact.notes, **notes},
    )
