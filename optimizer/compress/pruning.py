"""Channel pruning with Torch-Pruning's dependency graph, shared by prune-structured and by distillation's derived students."""

from __future__ import annotations

import math
from typing import Any

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.compress.transformer import op_name
from slimserve.optimizer.data import TrainData
from slimserve.optimizer.formats.torchlayers import PRUNABLE, check_layer_names, layers_in_order, output_layers
from slimserve.optimizer.formats.torchmodel import output_shapes

RESHAPES = ("view", "reshape", "_unsafe_view")  # the ops whose target shape a traced program holds as constants

TORCH_PRUNING_PIN = "torch-pruning==1.6.1"
IMPORTANCES = ("magnitude", "taylor", "bn-scale")


def import_torch_pruning(needed_by: str):
    try:
        import torch_pruning
    except ImportError as e:
        raise OptimizerError(f"{needed_by} needs Torch-Pruning on this node ({e}); pip install {TORCH_PRUNING_PIN}") from e
    return torch_pruning


def make_importance(name: str, module: Any, needed_by: str):
    tp = import_torch_pruning(needed_by)
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        raise OptimizerError(
            f"{needed_by}: importance bn-scale ranks channels by their BatchNorm scale, and the model has no BatchNorm; use magnitude or taylor"
        )
    return tp.importance.BNScaleImportance()


def _keep(count: int, drop: Any) -> Any:
    import torch

    dropped = {int(i) for i in drop}
    return torch.tensor([i for i in range(count) if i not in dropped], dtype=torch.long)


def _recurrent_pruner(needed_by: str):
    """A Torch-Pruning pruner for nn.LSTM / nn.GRU of any depth: hidden units of every layer, and the first layer's inputs.

    Torch-Pruning 1.6's own LSTM pruner handles one layer only (it asserts num_layers == 1) and
    reindexes the hidden weights wrongly, so we give it ours. The last layer's hidden units are the
    group Torch-Pruning ranks with the layer that reads them; each inner layer loses as many of its
    own units, the weakest by the L2 norm of their gate rows (nn.LSTM keeps one hidden size for all layers).
    """
    import torch
    from torch import nn

    tp = import_torch_pruning(needed_by)

    def take(layer: nn.Module, name: str, index: Any, dim: int) -> None:
        old = getattr(layer, name)
        setattr(layer, name, nn.Parameter(old.data.index_select(dim, index).contiguous(), requires_grad=old.requires_grad))

    class RecurrentPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            gates = 4 if isinstance(layer, nn.LSTM) else 3
            hidden, layers = layer.hidden_size, layer.num_layers
            last = _keep(hidden, idxs)
            for i in range(layers):
                if i == layers - 1:
                    keep = last
                else:  # an inner layer: its units only feed the next layer, so it keeps its strongest
                    norms = sum(getattr(layer, f"weight_{k}_l{i}").data.view(gates, hidden, -1).pow(2).sum((0, 2)) for k in ("ih", "hh"))
                    keep = torch.sort(torch.topk(norms, len(last)).indices).values
                gate_rows = torch.cat([keep + g * hidden for g in range(gates)])
                take(layer, f"weight_ih_l{i}", gate_rows, 0)
                take(layer, f"weight_hh_l{i}", gate_rows, 0)
                take(layer, f"weight_hh_l{i}", keep, 1)
                if layer.bias:
                    take(layer, f"bias_ih_l{i}", gate_rows, 0)
                    take(layer, f"bias_hh_l{i}", gate_rows, 0)
                if i + 1 < layers:
                    take(layer, f"weight_ih_l{i + 1}", keep, 1)
            layer.hidden_size = len(last)
            layer._init_flat_weights()
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            keep = _keep(layer.input_size, idxs)
            for suffix in ("", "_reverse") if layer.bidirectional else ("",):
                take(layer, f"weight_ih_l0{suffix}", keep, 1)
            layer.input_size = len(keep)
            layer._init_flat_weights()
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.hidden_size * (2 if layer.bidirectional else 1)

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.input_size

    return RecurrentPruner()


def unprunable_recurrent(module: Any) -> dict[str, str]:
    """Recurrent layers whose hidden units prune-structured cannot remove, with the reason."""
    from torch import nn

    found = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.RNNBase) and m.bidirectional:
            found[name] = "it is bidirectional (the two directions' units are interleaved in its output)"
        elif isinstance(m, nn.RNNBase) and not isinstance(m, (nn.LSTM, nn.GRU)):
            found[name] = f"{type(m).__name__} layers are not supported"
        elif isinstance(m, nn.LSTM) and m.proj_size:
            found[name] = "it has projections (proj_size)"
    return found


def untouched_layers(module: Any, ignored: tuple[str, ...] = ()) -> list[str]:
    """What channel pruning leaves as it is, for an error that says why nothing was removed."""
    reasons = [f"{name} ({why})" for name, why in unprunable_recurrent(module).items()]
    reasons += [f"{name} (output layer: keeps the model's outputs)" for name in output_layers(module)]
    reasons += [f"{name} (in exclude)" for name in ignored]
    layers = {n for n, m in module.named_modules() if type(m).__name__ in PRUNABLE}
    from torch import nn

    def owner(name: str) -> Any:
        return module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module

    loose = [n for n, _ in module.named_parameters() if n.rsplit(".", 1)[0] not in layers and type(owner(n)) in (nn.Module, type(module))]
    if loose:
        reasons.append(f"{', '.join(loose[:5])} (weights used by operators that are not conv / linear / recurrent layers)")
    return reasons


def _pruning_failed(module: Any, ignored: tuple[str, ...], needed_by: str, error: Exception) -> OptimizerError:
    return OptimizerError(
        f"{needed_by}: Torch-Pruning cannot remove channels from this model ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
        f"layers it may not follow: {'; '.join(untouched_layers(module, ignored)) or 'none found'}"
    )


# ---------------------------------------------------------------------------------------------
# Reshapes whose constants carry a pruned channel count


def _run_recording(module: Any, example: tuple[Any, ...], visit: Any) -> dict[Any, tuple[int, ...]]:
    """Runs the program node by node on `example`; visit(node, input shape) before each reshape runs, and it may change the node."""
    import torch

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            reshape = n.op == "call_function" and op_name(n) in RESHAPES and isinstance(n.args[0], torch.fx.Node)
            if reshape:
                visit(n, tuple(self.env[n.args[0]].shape))
            result = super().run_node(n)
            if reshape:
                outputs[n] = tuple(result.shape)
            return result

    outputs: dict[Any, tuple[int, ...]] = {}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            Recorder(module).run(*example)
    finally:
        module.train(was_training)
    return outputs


def reshape_shapes(module: Any, example: tuple[Any, ...]) -> dict[Any, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of every view / reshape of a traced program on `example`, before pruning changes them."""
    if getattr(module, "graph", None) is None:
        return {}
    inputs: dict[Any, tuple[int, ...]] = {}
    outputs = _run_recording(module, example, inputs.__setitem__)
    return {node: (shape, outputs[node]) for node, shape in inputs.items()}


def _sizes(node: Any) -> list[Any]:
    sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("size", node.kwargs.get("shape"))
    return list(sizes)


def _groups(before: tuple[int, ...], after: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Input dims and the output dims they become (products equal), for a reshape from `before` to `after`."""
    groups, i, j = [], 0, 0
    while i < len(before) or j < len(after):
        dims_in, dims_out, a, b = [], [], 1, 1
        if i < len(before):
            a, i = a * before[i], i + 1
            dims_in.append(i - 1)
        if j < len(after):
            b, j = b * after[j], j + 1
            dims_out.append(j - 1)
        while a != b:
            if a < b and i < len(before):
                a, i = a * before[i], i + 1
                dims_in.append(i - 1)
            elif b < a and j < len(after):
                b, j = b * after[j], j + 1
                dims_out.append(j - 1)
            else:
                return None
        groups.append((dims_in, dims_out))
    return groups


def _new_sizes(sizes: list[Any], before: tuple[int, ...], after: tuple[int, ...], now: tuple[int, ...]) -> list[Any] | None:
    """The reshape's sizes for an input that is `now` instead of `before` (pruned channels), or None when it cannot tell which constant."""
    groups = _groups(before, after)
    if groups is None or len(now) != len(before):
        return None
    sizes = list(sizes)
    for dims_in, dims_out in groups:
        old = math.prod(before[d] for d in dims_in)
        new = math.prod(now[d] for d in dims_in)
        if old == new:
            continue
        if any(sizes[d] == -1 for d in dims_out):
            continue  # the -1 takes the new size
        constants = [d for d in dims_out if isinstance(sizes[d], int) and not isinstance(sizes[d], bool)]
        changed = [d for d in dims_in if before[d] != now[d]]
        if len(constants) > 1 and len(changed) == 1:  # a split: only the dim that held the whole channel count can follow it
            constants = [d for d in constants if sizes[d] == before[changed[0]]]
        if len(constants) != 1 or (sizes[constants[0]] * new) % old:
            return None
        sizes[constants[0]] = sizes[constants[0]] * new // old
    return sizes


def _feeding_layer(module: Any, node: Any) -> str:
    """The nearest conv / linear / recurrent layer upstream of a node (what exclude should name)."""
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_module" and type(module.get_submodule(current.target)).__name__ in PRUNABLE:
            return current.target
        stack.extend(current.all_input_nodes)
    return "the layer before it"


def rewrite_reshapes_(module: Any, example: tuple[Any, ...], shapes: dict[Any, Any], needed_by: str) -> list[str]:
    """Rewrites the view / reshape constants that carried a pruned channel count ([-1, 1280] -> [-1, 960]); returns the nodes changed.

    Torch-Pruning resizes the layers on both sides of a flatten, but a traced program's reshape keeps its
    old sizes as constants; we run the pruned program on `example` and give each reshape whose input
    changed the sizes that keep its output's layout (the constant of the output dim the channels went to).
    """
    if not shapes:
        return []
    changed: list[str] = []

    def visit(node: Any, now: tuple[int, ...]) -> None:
        if node not in shapes or now == shapes[node][0]:
            return
        before, after = shapes[node]
        sizes = _new_sizes(_sizes(node), before, after, now)
        if sizes is None:
            raise OptimizerError(
                f"{needed_by}: pruning changed the input of {node.name} ({op_name(node)} to {list(_sizes(node))}) from {list(before)} "
                f"to {list(now)}, and its sizes cannot be rewritten for the fewer channels; add {_feeding_layer(module, node)} to exclude"
            )
        if len(node.args) > 1:
            node.args = (node.args[0], type(node.args[1])(sizes), *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, ("size" if "size" in node.kwargs else "shape"): sizes}
        changed.append(node.name)

    _run_recording(module, example, visit)
    if changed:
        module.recompile()
    return changed


def prune_channels_(
    module: Any,
    example: tuple[Any, ...],
    ratio: float,
    importance: str,
    needed_by: str,
    *,
    ignored: tuple[str, ...] = (),
    global_pruning: bool = False,
    steps: int = 1,
    round_to: int = 0,
    gradients: Any = None,
    between_steps: Any = None,
) -> None:
    """Removes `ratio` of the channels of every conv / linear layer but the output layers (Torch-Pruning's dependency graph).

    gradients(): fills .grad for Taylor importance before each step; between_steps(i) runs after step i (fine-tuning).
    """
    tp = import_torch_pruning(needed_by)
    check_layer_names(module, ignored, "exclude", needed_by)
    before = output_shapes(module, example)
    from torch import nn

    recurrent = unprunable_recurrent(module)
    keep = [module.get_submodule(n) for n in (*output_layers(module), *ignored, *recurrent)]
    if not [n for n in layers_in_order(module) if module.get_submodule(n) not in keep]:
        raise OptimizerError(
            f"{needed_by}: no layer is left to prune, so nothing would be removed and no variant was made; "
            f"it could not prune: {'; '.join(untouched_layers(module, ignored))}"
        )
    rnn = _recurrent_pruner(needed_by)
    failures = (IndexError, RuntimeError, AssertionError, ValueError, TypeError)  # Torch-Pruning on a graph it misreads
    try:
        pruner = tp.pruner.MetaPruner(
            module,
            example,
            importance=make_importance(importance, module, needed_by),
            global_pruning=global_pruning,
            pruning_ratio=ratio,
            iterative_steps=steps,
            ignored_layers=keep,
            round_to=round_to or None,
            customized_pruners={nn.LSTM: rnn, nn.GRU: rnn},
        )
    except failures as e:
        raise _pruning_failed(module, ignored, needed_by, e) from e
    for i in range(steps):
        if importance == "taylor" and gradients is not None:
            gradients()
        shapes = reshape_shapes(module, example)
        try:
            pruner.step()
        except failures as e:
            raise _pruning_failed(module, ignored, needed_by, e) from e
        rewrite_reshapes_(module, example, shapes, needed_by)
        module.zero_grad(set_to_none=True)
        if between_steps is not None:
            between_steps(i)
    after = output_shapes(module, example)
    if after != before:
        raise OptimizerError(
            f"{needed_by}: pruning changed the model's output shapes from {before} to {after}; add the output layer to exclude"
        )


def taylor_gradients(module: Any, data: TrainData, batches: int = 4, batch_size: int = 64):
    """A closure that accumulates cross-entropy gradients over a few train batches (Taylor importance needs them)."""
    import torch

    def fill() -> None:
        module.eval()  # BatchNorm statistics stay as they are
        module.zero_grad(set_to_none=True)
        for start in range(0, min(len(data.labels), batches * batch_size), batch_size):
            logits = module(*(torch.from_numpy(x[start : start + batch_size]) for x in data.inputs))
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.labels[start : start + batch_size])).backward()

    return fill
