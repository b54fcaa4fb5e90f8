"""prune-structured: whole channels removed with their dependencies (Torch-Pruning), or whole attention heads and FFN
channels of a transformer (optimizer/compress/transformer.py), then fine-tuned; the ONNX file is smaller and faster.

Trains a .pt2 model in torch (optimizer/formats/torchlayers.py rebuilds its layers) with the shared loop (optimizer/finetune/loop.py);
channel pruning is optimizer/compress/pruning.py's, shared with distillation. Without labels it fine-tunes toward the unpruned
model's outputs (optimizer/finetune/objectives.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from slimserve.optimizer.base import (
    Artifact,
    ConfigValueError,
    Knob,
    OptimizerError,
    Pass,
    PassConfig,
    PassContext,
    ProgressEvent,
    check_choice,
    check_fraction,
    check_names,
    setting,
)
from slimserve.optimizer.compress.pruning import IMPORTANCES, prune_channels_, taylor_gradients, untouched_layers
from slimserve.optimizer.compress.transformer import find_encoder, prune_heads_and_ffn_
from slimserve.optimizer.counting.torch_counts import flops_per_sample, parameter_count
from slimserve.optimizer.evaluation.quality import cosine_per_sample
from slimserve.optimizer.finetune.guard import current_guard, guarding
from slimserve.optimizer.finetune.loop import FineTuneConfig, fine_tune_, finetune_field, nested_finetune
from slimserve.optimizer.finetune.objectives import toward_itself
from slimserve.optimizer.formats.torchmodel import finish, prepare


@dataclass(frozen=True)
class PruneStructuredConfig(PassConfig):
    """Channel pruning with Torch-Pruning: whole filters / neurons go, with every layer that depends on them.

    pruning_ratio: share of channels removed from each conv / linear layer, in (0, 1) (the output
    layer keeps its outputs); on the digits CNN 0.5 left a quarter of the FLOPs but lost 2 points,
    0.3 (channels not multiples of 8) kept accuracy but ran no faster on ORT's CPU kernels, so
    the default 0.25 with round_to 8 keeps 24 / 48 channels; with global_pruning the ratio holds for the model as a whole and
    layers lose channels by global rank. importance: magnitude (L2 of each group's weights) |
    taylor (|weight × gradient| on a few train batches) | bn-scale (|BatchNorm γ|, needs BatchNorm).
    iterative_steps: prune in that many steps with fine-tuning between them (finetune.epochs split
    across steps). round_to: keep channel counts multiples of this (0: any; 8 by default: CPU
    convolution kernels work on blocks of 8 channels, so other counts cost time without FLOPs). exclude:
    layer names never pruned. finetune: the shared loop.

    An ONNX transformer (an attention Softmax over a MatMul of two computed tensors; exported by torch.onnx either way, fused
    QKV, grouped-query attention and GLU FFNs included) is pruned in its graph instead (optimizer/compress/onnx_heads.py):
    whole heads (whole K / V groups) and FFN channels sliced out of the weights, by magnitude or by activation (what each
    adds on the registered data), not fine-tuned.
    """

    pruning_ratio: float = setting(0.25, "share of channels removed from each conv / linear layer, in (0, 1)")
    importance: str = setting(
        "magnitude",
        "magnitude (L2 of each group) | taylor (|weight x gradient|) | bn-scale (|BatchNorm gamma|) | "
        "activation (an ONNX transformer's heads and FFN channels by what they add on the data)",
    )
    global_pruning: bool = setting(False, "hold the ratio for the model as a whole, layers losing channels by global rank")
    iterative_steps: int = setting(1, "prune in this many steps with fine-tuning between them")
    round_to: int = setting(8, "keep channel counts multiples of this (0: any; 8 suits CPU convolution kernels)")
    exclude: tuple[str, ...] = setting((), "layer names never pruned")
    finetune: FineTuneConfig = finetune_field(epochs=3, lr=1e-3, description="the shared fine-tuning loop's settings")

    def __post_init__(self) -> None:
        nested_finetune(self)
        check_fraction("pruning_ratio", self.pruning_ratio)
        check_choice("importance", self.importance, (*IMPORTANCES, "activation"))
        if self.iterative_steps < 1:
            raise ConfigValueError(f"iterative_steps must be at least 1, got {self.iterative_steps}")
        if self.round_to < 0:
            raise ConfigValueError(f"round_to must be 0 (off) or more, got {self.round_to}")
        check_names("exclude", self.exclude, "layer names")


class PruneStructuredPass(Pass[PruneStructuredConfig]):
    """Channel pruning with Torch-Pruning's dependency graph (magnitude, Taylor or BN-scale), fine-tuned; a smaller dense ONNX."""

    name = "prune-structured"
    trains = True
    label_free = True
    budget_knob = Knob("pruning_ratio", gentle=0.2, aggressive=0.8)
    config_cls = PruneStructuredConfig
    kind = "prune"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        import dataclasses

        config = self.config
        if artifact.format == "onnx" and onnx_transformer(artifact.path):
            return self._run_onnx(artifact, context)
        if config.importance == "activation":
            raise OptimizerError(
                f"{self.name}: importance activation ranks an ONNX transformer's heads and FFN channels, and {artifact.path.name} is "
                f"{'a .pt2' if artifact.format == 'pt2' else 'an ONNX file without attention this pass can cut'}; use magnitude or taylor"
            )
        prepared = prepare(artifact, context, self.name, with_eval=config.finetune.early_stopping > 0, label_free=True)
        module, example = prepared.module, prepared.example
        params0, flops0 = parameter_count(module), flops_per_sample(module, example)
        loss_fn, objective = None, "cross-entropy on the labels"
        if prepared.data.labels is None:  # no labels: the pruned model learns the unpruned model's outputs (optimizer.objectives)
            if config.importance == "taylor":
                raise OptimizerError(
                    f"{self.name}: taylor importance takes gradients of the loss on the labels, and the train data has no 'labels'; "
                    "use importance magnitude (or bn-scale), or add 'labels' to TRAIN.npz"
                )
            loss_fn, objective = toward_itself(module, example, prepared.outputs[0], self.name)
        steps = config.iterative_steps
        per_step = [config.finetune.epochs // steps + (1 if i < config.finetune.epochs % steps else 0) for i in range(steps)]

        def between(i: int) -> None:
            context.progress(
                ProgressEvent(
                    stage=self.name,
                    fraction=0.05 + 0.9 * i / steps,
                    message=f"step {i + 1}/{steps}: {parameter_count(module)} parameters ({100 * parameter_count(module) / params0:.1f}%), "
                    f"{100 * flops_per_sample(module, example) / flops0:.1f}% of the FLOPs",
                )
            )
            if per_step[i]:
                # Only the last step's fine-tuning may go on while over a budget: the steps before it are not the result.
                with guarding(current_guard() if i == steps - 1 else None):
                    fine_tune_(
                        module,
                        prepared.data,
                        dataclasses.replace(config.finetune, epochs=per_step[i]),
                        context,
                        self.name,
                        loss_fn=loss_fn,
                        fraction=(0.05 + 0.9 * i / steps, 0.9 / steps),
                    )

        removed = ""
        if find_encoder(module) is not None:  # a transformer: whole heads and FFN channels, not Torch-Pruning's channels
            removed = prune_heads_and_ffn_(module, example, config, self.name, taylor_gradients(module, prepared.data), between)
        else:
            prune_channels_(
                module,
                example,
                config.pruning_ratio,
                config.importance,
                self.name,
                ignored=config.exclude,
                global_pruning=config.global_pruning,
                steps=steps,
                round_to=config.round_to,
                gradients=taylor_gradients(module, prepared.data),
                between_steps=between,
            )
        params, flops = parameter_count(module), flops_per_sample(module, example)
        if params >= params0:
            raise OptimizerError(
                f"{self.name} removed nothing from {artifact.path.name} ({params} parameters before and after), so no variant was made; "
                f"it could not prune: {'; '.join(untouched_layers(module, config.exclude))}"
            )
        return finish(
            prepared,
            context,
            artifact,
            f"{artifact.path.stem}-channels",
            self.name,
            pruned=f"structured {config.importance} {config.pruning_ratio:g}" + (f": {removed}" if removed else ""),
            params_fraction=f"{params / params0:.4f}",
            flops_fraction=f"{flops / flops0:.4f}",
            objective=objective,
        )

    def _run_onnx(self, artifact: Artifact, context: PassContext) -> Artifact:
        """An ONNX transformer: whole heads and FFN channels sliced out of its initializers (optimizer/compress/onnx_heads.py), not fine-tuned."""
        import onnx

        from slimserve.optimizer.compress.onnx_heads import prune_onnx_encoder, tensor_shapes

        config = self.config
        refused = [
            (
                config.importance not in ("magnitude", "activation"),
                f"importance {config.importance} needs the model in torch; use activation or magnitude",
            ),
            (config.global_pruning, "global_pruning ranks channels across layers, and every layer keeps the same share here; set it false"),
            (bool(config.exclude), "exclude names layers of the torch model; an ONNX transformer is pruned in every layer"),
            (config.iterative_steps > 1, "iterative_steps fine-tunes between steps, and an ONNX source is not fine-tuned; set it 1"),
        ]
        for bad, why in refused:
            if bad:
                raise OptimizerError(
                    f"{self.name}: {artifact.path.name} is an ONNX transformer, pruned in the graph: {why} (or register its .pt2)"
                )
        feeds = check_feeds(artifact, context, self.name)
        context.progress(ProgressEvent(stage=self.name, fraction=0.2, message="slicing attention heads and FFN channels in the ONNX graph"))
        model = onnx.load(str(artifact.path))
        before = onnx_weight_count(model)
        try:  # the head axis is followed with the tensors' real shapes (TorchScript exports compute their reshapes at run time)
            shapes = tensor_shapes(model, feeds)
        except Exception as e:
            raise OptimizerError(
                f"{self.name}: onnxruntime could not run {artifact.path.name} on the registered data to read its tensors' shapes "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); nothing was registered"
            ) from e
        results: dict[str, float] = {}

        def check(pruned: Any, reference: Any) -> None:
            got, want, source = (run_onnx(m, feeds, self.name) for m in (pruned, reference, model))
            scale = float(np.abs(want).max()) or 1.0
            worst = float(np.abs(got - want).max()) / scale
            if not np.isfinite(worst) or worst > 1e-3:
                raise OptimizerError(
                    f"{self.name}: the pruned graph of {artifact.path.name} does not compute what the original computes without the removed "
                    f"heads and channels (largest difference {worst:.2e} of the output's scale): a reshape or weight was not cut consistently; "
                    "nothing was registered. Register the model's .pt2 to prune it in torch"
                )
            results["cosine"] = float(cosine_per_sample(got.reshape(len(got), -1), source.reshape(len(source), -1)).mean())

        def activations(source: Any, names: list[str]) -> dict[str, np.ndarray]:
            return intermediate_outputs(source, names, feeds, self.name)

        pruned, removed = prune_onnx_encoder(
            model,
            config.pruning_ratio,
            self.name,
            config.round_to,
            check,
            activations if config.importance == "activation" else None,
            shapes=shapes,
        )
        target = context.new_path(f"{artifact.path.stem}-heads", ".onnx")
        onnx.save(pruned, str(target))
        after = onnx_weight_count(pruned)
        context.progress(
            ProgressEvent(
                stage=self.name,
                fraction=1.0,
                message=f"{removed.describe()}; cosine {results['cosine']:.4f} to the unpruned model on {len(next(iter(feeds.values())))} rows, "
                "not fine-tuned (register the .pt2 to fine-tune)",
            )
        )
        return artifact.derive(
            target,
            format="onnx",
            runtime="onnxruntime",
            pruned=f"structured {config.importance} {config.pruning_ratio:g}: {removed.describe()} (ONNX graph, not fine-tuned)",
            params_fraction=f"{after / before:.4f}",
            cosine_to_source=f"{results['cosine']:.4f}",
            **({"not_pruned": "; ".join(removed.skipped)} if removed.skipped else {}),
        )


def onnx_transformer(path: Any) -> bool:
    """Whether the ONNX file has attention (a Softmax over a MatMul of two computed tensors): optimizer/compress/onnx_heads.py cuts it,
    or says which node it did not understand."""
    import onnx

    from slimserve.optimizer.compress.onnx_heads import has_attention

    return has_attention(onnx.load(str(path)))


def onnx_weight_count(model: Any) -> int:
    """Float weights in initializers and in Constant nodes."""
    from onnx import TensorProto

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats)


def check_feeds(artifact: Artifact, context: PassContext, needed_by: str) -> dict[str, np.ndarray]:
    """Up to 32 real rows to compare the pruned graph with the original on: the calibration, evaluation or train data, the first registered."""
    from slimserve.optimizer.data import model_arrays
    from slimserve.optimizer.formats.export import onnx_input_types

    role = next((r for r in ("calibration", "data", "train") if r in context.datasets), None)
    if role is None:
        raise OptimizerError(
            f"{needed_by} checks the pruned graph against the original on real inputs, and the model was registered without data; "
            "register it again with --data, --calibration or --train"
        )
    specs = onnx_input_types(artifact.path)
    arrays = model_arrays(context.dataset(role, needed_by), specs, role, needed_by)
    return {k: v[:32] for k, v in arrays.items()}


def intermediate_outputs(model: Any, names: list[str], feeds: dict[str, np.ndarray], needed_by: str) -> dict[str, np.ndarray]:
    """The named tensors of the graph on the feeds (added as extra graph outputs of a copy)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(names, feeds)
    return dict(zip(names, (np.asarray(v, dtype=np.float32) for v in values)))  # float32: [rows, seq, FFN width] per layer


def run_onnx(model: Any, feeds: dict[str, np.ndarray], needed_by: str) -> np.ndarray:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, feeds)[0], dtype=np.float64)
    except Exception as e:  # ORT refuses a graph whose shapes no longer agree
        raise OptimizerError(
            f"{needed_by}: onnxruntime cannot run the pruned graph ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "nothing was registered. Register the model's .pt2 to prune it in torch"
        ) from e
