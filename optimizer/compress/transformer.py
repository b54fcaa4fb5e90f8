"""Removing attention heads and FFN channels from the transformer encoders slimserve.optimizer.compress.encoder finds in a lifted program.

A lifted program (optimizer/formats/torchlayers.py) is an fx graph whose Linear layers are modules again, but
whose attention reshapes carry the head count as constants ([B, S, 4, 32]). Torch-Pruning's head
pruning updates a module attribute (`num_heads`) that an eager forward reads at run time; in a traced
program nothing reads it, and its dependency graph does not rewrite the constants, so the attention
breaks or keeps its old shape. We find the units in the graph instead (slimserve.optimizer.compress.encoder); we cut
their weights and rewrite the shape constants of the attention's own nodes, then check the result
against the original with the removed heads' and channels' contributions zeroed. A GLU FFN loses the same rows of its
gate and up projections and the same columns of its down projection.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

from slimserve.optimizer.base import OptimizerError
from slimserve.optimizer.compress.encoder import SHAPE_OPS, Attention, Encoder, find_encoder, op_name

__all__ = [
    "Encoder",
    "Removed",
    "find_encoder",
    "op_name",
    "prune_encoder_",
    "prune_heads_and_ffn_",
]  # the first three: optimizer.encoder's


# ---------------------------------------------------------------------------------------------
# Removing heads and FFN channels


def _take_(layer: Any, rows: Any = None, cols: Any = None) -> None:
    from torch import nn

    weight = layer.weight.data
    if rows is not None:
        weight = weight.index_select(0, rows)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.data.index_select(0, rows).clone())
        layer.out_features = len(rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
        layer.in_features = len(cols)
    layer.weight = nn.Parameter(weight.contiguous().clone())


def _head_scores(module: Any, unit: Attention, taylor: bool) -> Any:
    """Per-head importance: L2 of the head's projection rows and output-projection columns, or |weight × gradient| (Taylor)."""
    h, hd = unit.heads, unit.heads * unit.head_dim
    out = module.get_submodule(unit.out).weight
    pieces = [(out.t(), None if out.grad is None else out.grad.t())]
    for name in unit.projections:
        w = module.get_submodule(name).weight
        g = w.grad
        if unit.fused:  # in_proj rows are [q; k; v], each head-major
            pieces += [(w[i * hd : (i + 1) * hd], None if g is None else g[i * hd : (i + 1) * hd]) for i in range(3)]
        else:
            pieces.append((w, g))
    total = 0
    for w, g in pieces:
        value = (w.data * g).abs() if taylor and g is not None else w.data.pow(2)
        total = total + value.reshape(h, -1).sum(-1)
    return total


def _rewrite_shapes_(graph: Any, unit: Attention, keep_heads: int) -> None:
    """Head count and width constants of the unit's own shape nodes, to the pruned sizes (shared nodes are copied, not changed)."""
    import torch

    old_h, old_w, new_w = unit.heads, unit.heads * unit.head_dim, keep_heads * unit.head_dim

    def fix(value: Any, user: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return keep_heads if value == old_h else new_w if value == old_w else value
        if isinstance(value, (list, tuple)):
            return type(value)(fix(v, user) for v in value)
        if isinstance(value, torch.fx.Node) and value.op == "call_function" and value.target is operator.mul:
            a, b = value.args
            if isinstance(b, int) and b in (old_h, old_w):
                with graph.inserting_before(user):
                    return graph.call_function(operator.mul, (a, keep_heads if b == old_h else new_w))
        return value

    for node in unit.region:
        if op_name(node) in SHAPE_OPS:
            node.args = tuple(fix(a, node) if i > 0 else a for i, a in enumerate(node.args))


@dataclass
class Removed:
    """What prune_encoder_ removed, for the pass's report."""

    heads_before: int = 0
    heads_after: int = 0
    ffn_before: int = 0
    ffn_after: int = 0
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.heads_after < self.heads_before:
            parts.append(f"attention heads {self.heads_before} -> {self.heads_after}")
        if self.ffn_after < self.ffn_before:
            parts.append(f"FFN channels {self.ffn_before} -> {self.ffn_after}")
        return ", ".join(parts) or "nothing"


def kept_count(count: int, ratio: float, round_to: int) -> int:
    """How many of `count` heads or channels stay at a pruning `ratio`, a multiple of `round_to` where that fits (also
    the ONNX pruner's rule, compress/onnx_heads.py)."""
    keep = count - int(count * ratio)
    if round_to > 1 and count >= 2 * round_to:
        keep = max(round_to, round(keep / round_to) * round_to)
    return max(1, min(count, keep))


def prune_encoder_(
    module: Any,
    example: tuple[Any, ...],
    ratio: float,
    needed_by: str,
    *,
    importance: str = "magnitude",
    ignored: tuple[str, ...] = (),
    round_to: int = 0,
) -> Removed:
    """Removes `ratio` of the heads of every attention unit and of the channels of every FFN (round_to: FFN widths multiples of it).

    Checked before it returns: the pruned program gives the outputs of the original with the removed heads'
    and channels' output-projection columns zeroed, so a shape constant rewritten wrongly is refused, not served.
    """
    import torch

    if importance not in ("magnitude", "taylor"):
        raise OptimizerError(
            f"{needed_by}: importance {importance} is not defined for attention heads and FFN channels; use magnitude or taylor"
        )
    encoder = find_encoder(module)
    if encoder is None:
        raise OptimizerError(f"{needed_by}: the model has no multi-head attention to prune")
    reference = copy.deepcopy(module)
    taylor = importance == "taylor"
    removed = Removed()
    for unit in encoder.attentions:
        if set(ignored) & {*unit.projections, unit.out}:
            removed.skipped.append(f"{unit.layer or unit.out} attention (in exclude)")
            continue
        keep = kept_count(unit.heads, ratio, 0)
        removed.heads_before += unit.heads
        removed.heads_after += keep
        if keep == unit.heads:
            continue
        order = torch.argsort(_head_scores(module, unit, taylor), descending=True)
        heads = torch.sort(order[:keep]).values
        d = unit.head_dim
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads.tolist()])
        if unit.fused:
            _take_(module.get_submodule(unit.projections[0]), rows=torch.cat([cols + i * unit.heads * d for i in range(3)]))
        else:
            for name in unit.projections:
                _take_(module.get_submodule(name), rows=cols)
        dropped = torch.tensor([c for c in range(unit.heads * d) if c not in set(cols.tolist())], dtype=torch.long)
        reference.get_submodule(unit.out).weight.data[:, dropped] = 0
        _take_(module.get_submodule(unit.out), cols=cols)
        _rewrite_shapes_(module.graph, unit, keep)
    for ffn in encoder.ffns:
        if set(ignored) & {*ffn.projections, ffn.down}:
            removed.skipped.append(f"{ffn.layer or ffn.up} FFN (in exclude)")
            continue
        ups, down = [module.get_submodule(n) for n in ffn.projections], module.get_submodule(ffn.down)
        width = ups[0].out_features
        keep = kept_count(width, ratio, round_to)
        removed.ffn_before += width
        removed.ffn_after += keep
        if keep == width:
            continue
        if taylor and all(u.weight.grad is not None for u in ups) and down.weight.grad is not None:
            scores = sum((u.weight.data * u.weight.grad).abs().sum(1) for u in ups) + (down.weight.data * down.weight.grad).abs().sum(0)
        else:
            scores = sum(u.weight.data.pow(2).sum(1) for u in ups) + down.weight.data.pow(2).sum(0)
        channels = torch.sort(torch.argsort(scores, descending=True)[:keep]).values
        dropped_mask = torch.ones(width, dtype=torch.bool)
        dropped_mask[channels] = False
        reference.get_submodule(ffn.down).weight.data[:, dropped_mask] = 0
        for u in ups:  # a GLU's gate and up lose the same rows: their product is what down reads
            _take_(u, rows=channels)
        _take_(down, cols=channels)
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.recompile()
    _check_equivalent(module, reference, example, needed_by)
    return removed


def _check_equivalent(module: Any, reference: Any, example: tuple[Any, ...], needed_by: str) -> None:
    import torch

    from slimserve.optimizer.finetune.loop import first_output

    modes = module.training, reference.training
    module.eval()
    reference.eval()
    try:
        with torch.no_grad():
            want = first_output(reference(*example))
            got = first_output(module(*example))
    except Exception as e:  # a shape constant the rewrite missed or changed wrongly
        raise OptimizerError(
            f"{needed_by}: the attention's reshapes could not be rewritten for fewer heads ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "prune FFN channels only by listing the attention projections in exclude"
        ) from e
    finally:
        module.train(modes[0])
        reference.train(modes[1])
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max().clamp(min=1.0))):
        raise OptimizerError(
            f"{needed_by}: after removing heads the model no longer computes what the original does without them "
            "(a shape constant shared with another dimension, e.g. a sequence length equal to the head count); "
            "prune FFN channels only by listing the attention projections in exclude"
        )


def prune_heads_and_ffn_(module: Any, example: tuple[Any, ...], config: Any, needed_by: str, gradients: Any, between_steps: Any) -> str:
    """prune-structured on a transformer: `config.pruning_ratio` of the heads and FFN channels, in `config.iterative_steps` steps.

    Returns what was removed ('attention heads 16 -> 12, FFN channels 2048 -> 1536'); refuses what it cannot do before any change.
    """
    from slimserve.optimizer.formats.torchlayers import check_layer_names

    if config.global_pruning:
        raise OptimizerError(
            f"{needed_by}: global_pruning ranks channels across layers, and a transformer's heads and FFN channels are pruned "
            "by the same share in every layer (the hidden size stays, every residual needs it); set global_pruning false"
        )
    if config.importance not in ("magnitude", "taylor"):
        raise OptimizerError(
            f"{needed_by}: importance {config.importance} does not apply to attention heads and FFN channels; use magnitude or taylor"
        )
    check_layer_names(module, config.exclude, "exclude", needed_by)
    steps, ratio = config.iterative_steps, config.pruning_ratio
    encoder = find_encoder(module)
    assert encoder is not None
    ignored = set(config.exclude)
    units = [a for a in encoder.attentions if not ignored & {*a.projections, a.out}]
    ffns = [module.get_submodule(f.up).out_features for f in encoder.ffns if not ignored & {*f.projections, f.down}]
    heads = sum(a.heads for a in units)
    if heads == sum(kept_count(a.heads, ratio, 0) for a in units) and sum(ffns) == sum(kept_count(w, ratio, config.round_to) for w in ffns):
        raise OptimizerError(
            f"{needed_by}: a pruning ratio of {ratio:g} removes no attention head ({heads} in {len(units)} units) and no FFN channel "
            f"({sum(ffns)} in {len(ffns)} FFNs, kept in multiples of round_to {config.round_to}), so no variant was made; raise pruning_ratio"
            + (
                f" (exclude keeps {len(encoder.attentions) - len(units)} attention units and {len(encoder.ffns) - len(ffns)} FFNs)"
                if ignored
                else ""
            )
        )
    reports = []
    for i in range(steps):
        done, target = ratio * i / steps, ratio * (i + 1) / steps
        if config.importance == "taylor":
            gradients()
        reports.append(
            prune_encoder_(
                module,
                example,
                1.0 - (1.0 - target) / (1.0 - done),
                needed_by,
                importance=config.importance,
                ignored=config.exclude,
                round_to=config.round_to,
            )
        )
        module.zero_grad(set_to_none=True)
        between_steps(i)
    total = Removed(reports[0].heads_before, reports[-1].heads_after, reports[0].ffn_before, reports[-1].ffn_after, reports[0].skipped)
    return total.describe()
