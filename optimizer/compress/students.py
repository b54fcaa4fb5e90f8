"""DistilBERT-style students of a transformer: the teacher with every other encoder layer, and the hidden states to match.

DistilBERT (Sanh et al., 2019) initialises its student "by taking one layer out of two" of the
teacher; we take half the layers spread evenly from the first to the last (0, 3, 5 of 6), because the last
layer is what a pooled embedding reads: on MiniLM-L6, before any training, layers 0, 2, 4 keep a mean cosine
of 0.39 to the teacher's embeddings, 0, 3, 5 keep 0.72 (40 real sentences). A lifted program has no layer list to slice, so we delimit each encoder layer in the graph
by the module hierarchy torch.export records on every node (`nn_module_stack`): a layer is the nodes
run inside 'encoder.layers.2'; its hidden state comes in from outside and one tensor leaves it.
Dropping a layer sends its input where its output went; the kept layers keep the teacher's weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.compress.transformer import Encoder, find_encoder, prune_encoder_


@dataclass
class Block:
    """One encoder layer in the graph: the hidden state that enters it and the one tensor that leaves it."""

    layer: str
    entry: Any
    exit: Any


def _in_layer(node: Any, layer: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    if any(value[0] == layer for value in stack.values() if isinstance(value, tuple) and value):
        return True
    return node.op == "call_module" and str(node.target).startswith(layer + ".")


def _tensor_shape(node: Any) -> tuple | None:
    value = node.meta.get("val")
    return tuple(value.shape) if value is not None and hasattr(value, "shape") else None


def layer_blocks(module: Any, encoder: Encoder, needed_by: str) -> list[Block]:
    """Each encoder layer's entry and exit, or a refusal naming the layer that cannot be delimited."""
    blocks = []
    for layer in encoder.layers:
        nodes = {n for n in module.graph.nodes if _in_layer(n, layer)}
        exits = [n for n in nodes if _tensor_shape(n) is not None and any(u not in nodes for u in n.users)]
        entries = {a for n in nodes for a in n.all_input_nodes if a not in nodes and a.op != "get_attr"}
        shape = _tensor_shape(exits[0]) if len(exits) == 1 else None
        hidden = [a for a in entries if shape is not None and _tensor_shape(a) == shape]
        if len(exits) != 1 or len(hidden) != 1:
            raise OptimizerError(
                f"{needed_by}: cannot delimit encoder layer '{layer}' in the program (found {len(exits)} tensors leaving it and "
                f"{len(hidden)} hidden states entering it; a layer-dropping student needs one of each, and the module names torch.export "
                "records: an ONNX file converted to torch has none); give a smaller student as a .pt2 (config student)"
            )
        blocks.append(Block(layer, hidden[0], exits[0]))
    return blocks


def drop_layers_(module: Any, blocks: list[Block], drop: set[str]) -> None:
    """Removes the named layers: what read a dropped layer's output reads its input instead."""
    replaced: dict[Any, Any] = {}
    for block in blocks:
        if block.layer not in drop:
            continue
        source = block.entry
        while source in replaced:
            source = replaced[source]
        block.exit.replace_all_uses_with(source)
        replaced[block.exit] = source
    # fx keeps unused dropout calls (random, so "impure"): the dropped layers' ops go by hand, in reverse order
    for node in reversed(list(module.graph.nodes)):
        if node.op in ("call_function", "call_module", "get_attr") and not node.users and "assert" not in str(node.target):
            module.graph.erase_node(node)
    module.delete_all_unused_submodules()
    module.graph.lint()
    module.recompile()


def kept_layers(layers: list[str], count: int) -> list[str]:
    """`count` of the layers, spread evenly from the first to the last (both kept): 3 of 6 are 0, 3, 5; 4 of 6 are 0, 2, 3, 5."""
    n = len(layers)
    return [layers[int(i * (n - 1) / max(1, count - 1) + 0.5)] for i in range(count)] if count > 1 else [layers[-1]]


LAYER_CHOICES = ("spread", "least-harm")


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value


def least_harm_layers(teacher: Any, layers: list[str], probe: tuple[Any, ...], count: int, needed_by: str) -> list[str]:
    """`count` of the layers, chosen greedily: one at a time, the layer whose removal keeps the output closest to the teacher's (mean cosine on `probe`) goes."""
    import torch

    with torch.no_grad():
        reference = _first(teacher(*probe)).flatten(1).float()
    kept = list(layers)
    while len(kept) > count:
        scores = []
        for layer in kept:
            candidate = copy.deepcopy(teacher)
            encoder = find_encoder(candidate)
            assert encoder is not None
            drop_layers_(candidate, layer_blocks(candidate, encoder, needed_by), set(layers) - set(kept) | {layer})
            with torch.no_grad():
                out = _first(candidate(*probe)).flatten(1).float()
            scores.append((float(torch.nn.functional.cosine_similarity(out, reference).mean()), layer))
        kept.remove(max(scores)[1])
    return kept


def merge_dropped_(student: Any, teacher: Any, layers: list[str], keep: list[str]) -> int:
    """Each kept layer's weights become the mean of its own and those of the dropped layers it stands for (up to the next kept one;
    layers before the first kept one go to it). Returns how many tensors were averaged."""
    import torch

    groups: dict[str, list[str]] = {name: [] for name in keep}
    owner = keep[0]
    for name in layers:
        owner = name if name in groups else owner
        groups[owner].append(name)
    source = dict(teacher.state_dict())
    merged = 0
    with torch.no_grad():
        for key, tensor in student.state_dict().items():
            layer = next((k for k in keep if key.startswith(k + ".")), None)
            if layer is None or len(groups[layer]) < 2 or not tensor.is_floating_point():
                continue
            suffix = key[len(layer) :]
            peers = [source.get(name + suffix) for name in groups[layer]]
            if all(p is not None and p.shape == tensor.shape for p in peers):
                tensor.copy_(torch.stack(peers).mean(0))
                merged += 1
    return merged


def layer_dropping_student(
    teacher: Any,
    example: tuple[Any, ...],
    width: float,
    needed_by: str,
    keep_layers: int = 0,
    choice: str = "spread",
    probe: tuple[Any, ...] | None = None,
    merge: bool = False,
) -> tuple[Any, str]:
    """The teacher with `keep_layers` of its layers (0: half; its own weights), and with `width` of each kept layer's heads and FFN channels.

    choice: spread (first and last kept, the others evenly between) | least-harm (`least_harm_layers` on the `probe` rows,
    the example's when none). merge: each kept layer starts as the mean of itself and the dropped layers it stands for.
    Returns the student and a line saying what it kept.
    """
    from slimserve.optimizer.formats.torchmodel import output_shapes

    student = copy.deepcopy(teacher)
    encoder = find_encoder(student)
    if encoder is None:
        raise OptimizerError(f"{needed_by}: the model has no multi-head attention, so no layer-dropping student")
    if len(encoder.layers) < 2:
        raise OptimizerError(
            f"{needed_by}: the model has {len(encoder.layers)} encoder layer(s) with attention named by index "
            f"({', '.join(encoder.layers) or 'none'}), so there is no layer to drop; give a smaller student as a .pt2 (config student)"
        )
    n = len(encoder.layers)
    if keep_layers < 0 or keep_layers > n or (keep_layers == n and width >= 1.0):
        raise OptimizerError(
            f"{needed_by}: keep_layers {keep_layers} does not make a smaller student of a model with {n} encoder layers "
            f"({', '.join(encoder.layers)}); choose 1 to {n - 1} (0: half, {(n + 1) // 2})"
            + (f", or {n} with a width below 1" if keep_layers == n else "")
        )
    blocks = layer_blocks(student, encoder, needed_by)
    count = keep_layers or (n + 1) // 2
    if choice == "least-harm":
        keep = least_harm_layers(teacher, encoder.layers, probe if probe is not None else example, count, needed_by)
    else:
        keep = kept_layers(encoder.layers, count)
    before = output_shapes(student, example)
    drop_layers_(student, blocks, set(encoder.layers) - set(keep))
    if output_shapes(student, example) != before:
        raise OptimizerError(f"{needed_by}: dropping encoder layers changed the model's output shapes; give a student as a .pt2")
    kept = f"layers {', '.join(keep)} of {len(encoder.layers)}" + (" (least harm)" if choice == "least-harm" else "")
    if merge and merge_dropped_(student, teacher, encoder.layers, keep):
        kept += ", dropped layers averaged into their kept neighbours"
    if width < 1.0:
        removed = prune_encoder_(student, example, 1.0 - width, needed_by, round_to=8)
        if removed.heads_after < removed.heads_before or removed.ffn_after < removed.ffn_before:
            kept += f"; {removed.describe()}"
    return student, kept


def exit_module(module: Any, layer: str) -> str:
    """The name of a module whose output is the layer's hidden state; an identity is inserted when an op (not a module) ends the layer."""
    from torch import nn

    encoder = find_encoder(module)
    assert encoder is not None
    block = next(b for b in layer_blocks(module, encoder, "distill-feature") if b.layer == layer)
    if block.exit.op == "call_module":
        return str(block.exit.target)
    name = f"{layer}.hidden_state"
    module.add_submodule(name, nn.Identity())
    graph = module.graph
    with graph.inserting_after(block.exit):
        tap = graph.call_module(name, (block.exit,))
    tap.meta = dict(block.exit.meta)
    block.exit.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
    module.recompile()
    return name


def hidden_state_pairs(student: Any, teacher: Any) -> list[tuple[str, str]]:
    """(student module, teacher module) whose outputs are matching hidden states, when the student's layers are some of the teacher's.

    Student layer k stands for teacher layers k .. (the next kept one - 1), so it matches the last of them
    (DistilBERT's layer mapping); empty when the two do not share layer names.
    """
    s_enc, t_enc = find_encoder(student), find_encoder(teacher)
    if s_enc is None or t_enc is None or not s_enc.layers or not set(s_enc.layers) < set(t_enc.layers):
        return []
    positions = [t_enc.layers.index(name) for name in s_enc.layers]
    pairs = []
    for i, (name, start) in enumerate(zip(s_enc.layers, positions)):
        end = positions[i + 1] - 1 if i + 1 < len(positions) else len(t_enc.layers) - 1
        if end < start:
            return []
        pairs.append((exit_module(student, name), exit_module(teacher, t_enc.layers[end])))
    return pairs


def _tap_after(module: Any, node: Any, name: str) -> None:
    """Inserts an identity module `name` after `node`, so a forward hook sees its value."""
    from torch import nn

    module.add_submodule(name, nn.Identity())
    with module.graph.inserting_after(node):
        tap = module.graph.call_module(name, (node,))
    tap.meta = dict(node.meta)
    node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)


def attention_modules(module: Any, layer: str, needed_by: str) -> tuple[str, str]:
    """Modules whose outputs are a layer's attention probabilities [B, heads, S, S] and values [B, heads, S, d] (MiniLM's two relations).

    The probabilities are the layer's one softmax over the keys; the values are what that softmax multiplies
    (through a dropout, if any). Identity modules are inserted to tap them; a refusal names the layer otherwise.
    """
    probs_name, values_name = f"{layer}.attention_probs", f"{layer}.attention_values"
    names = {n for n, _ in module.named_modules()}
    if probs_name in names and values_name in names:
        return probs_name, values_name
    softmaxes = [
        n
        for n in module.graph.nodes
        if n.op == "call_function" and "softmax" in str(n.target) and _in_layer(n, layer) and len(_tensor_shape(n) or ()) == 4
    ]
    matmul = None
    if len(softmaxes) == 1:
        probs = softmaxes[0]
        follow = probs
        while len(follow.users) == 1 and "matmul" not in str(next(iter(follow.users)).target):
            follow = next(iter(follow.users))  # dropout / clone / contiguous between the softmax and the product
            if follow.op != "call_function" or not _in_layer(follow, layer):
                break
        matmul = next((u for u in follow.users if "matmul" in str(u.target) and u.args[0] is follow), None)
    values = matmul.args[1] if matmul is not None else None
    if values is None or len(_tensor_shape(values) or ()) != 4:
        raise OptimizerError(
            f"{needed_by}: cannot find the attention of encoder layer '{layer}' in the program (found {len(softmaxes)} softmax(es) over "
            "[batch, heads, seq, seq] and need one that multiplies the values); set attention_weight 0"
        )
    _tap_after(module, softmaxes[0], probs_name)
    _tap_after(module, values, values_name)
    module.recompile()
    return probs_name, values_name


def last_attention_pair(student: Any, teacher: Any, needed_by: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """The (probabilities, values) taps of the student's last encoder layer and of the teacher's (MiniLM transfers the last layer's)."""
    s_enc, t_enc = find_encoder(student), find_encoder(teacher)
    if s_enc is None or t_enc is None or not s_enc.layers or not t_enc.layers:
        raise OptimizerError(
            f"{needed_by}: attention_weight needs a transformer student and teacher (encoder layers with attention); set attention_weight 0"
        )
    return attention_modules(student, s_enc.layers[-1], needed_by), attention_modules(teacher, t_enc.layers[-1], needed_by)


def relation_kl(student: Any, teacher: Any, query_mask: Any | None) -> Any:
    """KL(teacher ‖ student) of two [B, heads, S, S] distributions over the last axis, averaged over heads and real query rows."""
    import torch

    kl = (torch.xlogy(teacher, teacher) - teacher * torch.log(student.clamp_min(1e-12))).sum(-1)  # [B, heads, S]
    if query_mask is None:
        return kl.mean()
    weight = query_mask[:, None, :].to(kl.dtype)
    return (kl * weight).sum() / (weight.sum() * kl.shape[1]).clamp_min(1.0)


def value_relation(values: Any, key_mask: Any | None) -> Any:
    """MiniLM's value relation: softmax(V Vᵀ / √d) per head over the (real) keys."""
    import torch

    scores = values @ values.transpose(-1, -2) / values.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(key_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return scores.softmax(-1)
