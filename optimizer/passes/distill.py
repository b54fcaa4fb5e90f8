"""Distillation passes: a narrower student learns the teacher's softened outputs (distill-soft) and its feature maps (distill-feature).

The student is derived from the teacher — the same architecture with `width` of its channels,
cut by Torch-Pruning's uniform channel pruning, which keeps the teacher's most important channels
as the student's starting point; for a transformer, a DistilBERT-style student: half the encoder layers (first and last kept),
with `width` of their heads and FFN channels (optimizer/compress/students.py) — or given by the user as a .pt2 (config `student`). It trains
with the shared fine-tuning loop and is served as ONNX by onnxruntime. Train data without labels (an embedding
model's sentences) trains toward the teacher's outputs alone (slimserve.optimizer.finetune.objectives: 1 - cosine + MSE for embeddings,
the softened KL for logits); the objective used is in the variant's notes (`objective`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    setting,
)
from slimserve.optimizer.compress.pruning import prune_channels_, untouched_layers
from slimserve.optimizer.compress.students import (
    LAYER_CHOICES,
    hidden_state_pairs,
    last_attention_pair,
    layer_dropping_student,
    relation_kl,
    value_relation,
)
from slimserve.optimizer.compress.transformer import find_encoder
from slimserve.optimizer.counting.torch_counts import flops_per_sample, parameter_count
from slimserve.optimizer.finetune.augment import input_kind
from slimserve.optimizer.finetune.loop import (
    FineTuneConfig,
    fine_tune_,
    finetune_field,
    first_output,
    nested_finetune,
)
from slimserve.optimizer.finetune.objectives import masked_relative_mse, objective_of, relative_mse, soft_target_kl
from slimserve.optimizer.finetune.padding_free import LengthBatches, TeacherCache, cut_changes_output, sequence_layout
from slimserve.optimizer.formats.export import load_program, program_input_types
from slimserve.optimizer.formats.sequence_axis import TOLERANCE
from slimserve.optimizer.formats.torchlayers import check_layer_names, layers_in_order, lift_layers, output_layers
from slimserve.optimizer.formats.torchmodel import Prepared, finish, output_shapes, prepare

STUDENT_INITS = ("teacher", "random")


@dataclass(frozen=True)
class DistillSoftConfig(PassConfig):
    """Knowledge distillation on softened logits (Hinton et al.): loss = soft_weight × T² × KL(teacher_T ‖ student_T) + hard_weight × CE(labels).

    width: the derived student keeps this share of every conv / linear layer's channels (0.5
    gives about a quarter of the parameters and FLOPs of a conv net); a transformer's student may keep
    1.0 (half the layers, all their heads). student_init: teacher
    (start from the teacher's most important channels) | random (the same narrow architecture,
    re-initialized). student: path of a .pt2 student to train instead (its inputs and outputs
    must match the teacher's; width and student_init are then ignored). keep_layers: how many of a
    transformer's encoder layers the student keeps, spread evenly with the first and last (0: half); layer_choice
    least-harm keeps instead those whose removal hurts least, and merge_dropped starts each kept layer as the mean of
    itself and the dropped layers it stands for. temperature: T.
    soft_weight, hard_weight: the two terms' weights. finetune: the shared loop.
    """

    width: float = setting(0.5, "share of every conv / linear layer's channels the derived student keeps, in (0, 1]")
    student_init: str = setting("teacher", "teacher (start from the teacher's most important channels) | random")
    student: str = setting("", "path of a .pt2 student to train instead (width and student_init are then ignored)")
    keep_layers: int = setting(0, "a transformer's student keeps this many encoder layers, first and last among them (0: half)")
    layer_choice: str = setting(
        "spread",
        "which encoder layers a transformer's student keeps: spread (first and last, evenly between) | least-harm (greedily drops "
        "the layer whose removal changes the output least on 64 train rows)",
    )
    merge_dropped: bool = setting(False, "start each kept encoder layer as the mean of its weights and the dropped layers' it stands for")
    padding_free: bool = setting(
        True,
        "a text model (an attention_mask input, trailing padding) whose program takes any length trains on batches of rows of "
        "similar length, each cut to its longest member, with the teacher's outputs computed once per row at its real length "
        "(without augmentation; with it the teacher runs on every batch); false: every batch at full length",
    )
    temperature: float = setting(4.0, "the softening temperature T")
    soft_weight: float = setting(0.7, "weight of the soft-target term (T^2 x KL to the teacher)")
    hard_weight: float = setting(0.3, "weight of the cross-entropy on the labels")
    finetune: FineTuneConfig = finetune_field(epochs=4, lr=2e-3, description="the shared fine-tuning loop's settings")

    def __post_init__(self) -> None:
        nested_finetune(self)
        if not 0.0 < self.width <= 1.0:
            raise ConfigValueError(f"width must be in (0, 1] (1: a transformer's layer-dropping student at full width), got {self.width}")
        check_choice("student_init", self.student_init, STUDENT_INITS)
        check_choice("layer_choice", self.layer_choice, LAYER_CHOICES)
        if self.keep_layers < 0:
            raise ConfigValueError(f"keep_layers must be 0 (half the encoder layers) or a count of layers, got {self.keep_layers}")
        if not self.temperature > 0:
            raise ConfigValueError(f"temperature must be positive, got {self.temperature}")
        if self.soft_weight < 0 or self.hard_weight < 0 or self.soft_weight + self.hard_weight == 0:
            raise ConfigValueError(
                f"soft_weight and hard_weight must be 0 or more and not both 0, got {self.soft_weight} and {self.hard_weight}"
            )


@dataclass(frozen=True)
class DistillFeatureConfig(DistillSoftConfig):
    """distill-soft plus feature-map matching: feature_weight × MSE(projection(student layer), teacher layer) / mean(teacher layer²).

    layers: the layers whose outputs are matched, each 'name' (the same name in both models) or
    'student_name:teacher_name'; empty: the last `auto_layers` hidden conv / linear layers of
    each model, paired from the end (a transformer's layer-dropping student: every kept layer's hidden
    state against the last teacher layer it stands for). Each pair gets a learned 1x1 convolution (feature maps) or
    linear map (vectors) from the student's channels to the teacher's, trained with the student
    and dropped at export.
    """

    feature_weight: float = setting(1.0, "weight of the feature-matching term")
    layers: tuple[str, ...] = setting(
        (), "layers matched, 'name' or 'student_name:teacher_name'; empty: the last auto_layers hidden layers"
    )
    auto_layers: int = setting(2, "how many hidden layers are matched when layers is empty")
    project_features: bool = setting(
        True, "match hidden states through learned projections; false: directly (the student's hidden states must equal the teacher's)"
    )
    attention_weight: float = setting(
        0.0,
        "weight of MiniLM's deep self-attention term: KL of the last encoder layer's attention distributions and value relations, "
        "teacher to student (transformers; 0: off)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_weight < 0:
            raise ConfigValueError(f"feature_weight must be 0 or more, got {self.feature_weight}")
        if self.attention_weight < 0:
            raise ConfigValueError(f"attention_weight must be 0 or more (0: off), got {self.attention_weight}")
        if not isinstance(self.layers, tuple) or not all(isinstance(v, str) and v and v.count(":") <= 1 for v in self.layers):
            raise ConfigValueError(f"layers must be a list of 'name' or 'student_name:teacher_name', got {self.layers!r}")
        if self.auto_layers < 1:
            raise ConfigValueError(f"auto_layers must be at least 1, got {self.auto_layers}")


# ---------------------------------------------------------------------------------------------
# Students


def derive_student(
    teacher: Any, example: tuple[Any, ...], config: DistillSoftConfig, needed_by: str, probe: tuple[Any, ...] | None = None
) -> tuple[Any, str]:
    """The teacher's architecture with `width` of its channels (Torch-Pruning, magnitude), optionally re-initialized, and what it kept.

    A transformer's student keeps half the encoder layers (first and last) and `width` of their heads and FFN channels (optimizer/compress/students.py).
    """
    if config.keep_layers and find_encoder(teacher) is None:
        raise OptimizerError(
            f"{needed_by}: keep_layers {config.keep_layers} applies to a transformer's encoder layers, and the model has no attention; set keep_layers 0"
        )
    if find_encoder(teacher) is not None:
        student, kept = layer_dropping_student(
            teacher, example, config.width, needed_by, config.keep_layers, config.layer_choice, probe, config.merge_dropped
        )
    elif config.width >= 1.0:
        raise OptimizerError(f"{needed_by}: width 1 keeps every channel of a model without encoder layers to drop; choose a width below 1")
    else:
        student, kept = copy.deepcopy(teacher), f"width {config.width:g}"
        prune_channels_(student, example, 1.0 - config.width, "magnitude", needed_by)
    if config.student_init == "random":
        for m in student.modules():
            if m is not student and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return student, kept


def load_student(path_text: str, teacher_specs: dict, teacher_shapes: list, example: tuple[Any, ...], needed_by: str) -> Any:
    """A user's .pt2 student as a trainable module, after checking it takes the teacher's inputs and gives its outputs."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise OptimizerError(f"{needed_by}: the student file '{path_text}' does not exist")
    program = load_program(Artifact(path, "pt2"), needed_by)
    specs = list(program_input_types(program).values())

    def show(spec: tuple) -> str:
        dtype, shape = spec
        return f"{dtype} [{', '.join('N' if i == 0 or not isinstance(d, int) else str(d) for i, d in enumerate(shape))}]"

    teacher = list(teacher_specs.values())
    if len(specs) != len(teacher) or any(s[0] != t[0] or len(s[1]) != len(t[1]) or s[1][1:] != t[1][1:] for s, t in zip(specs, teacher)):
        raise OptimizerError(
            f"{needed_by}: the student {path.name} takes {', '.join(map(show, specs)) or 'no input'}, "
            f"and the teacher takes {', '.join(map(show, teacher))}; the student must take the teacher's inputs"
        )
    student = lift_layers(program.module(check_guards=False))
    try:
        shapes = output_shapes(student, example)
    except Exception as e:  # the student's own shape guards or ops refuse the teacher's batch
        raise OptimizerError(f"{needed_by}: the student {path.name} fails on the teacher's inputs: {type(e).__name__}: {e}") from e
    if shapes != teacher_shapes:
        raise OptimizerError(
            f"{needed_by}: the student {path.name} returns outputs of shapes {[list(s) for s in shapes]} for a batch of {len(example[0])}, "
            f"and the teacher {[list(s) for s in teacher_shapes]}; the student must give the teacher's outputs"
        )
    student.train()
    return student


# ---------------------------------------------------------------------------------------------
# Feature matching


def feature_pairs(student: Any, teacher: Any, config: DistillFeatureConfig, needed_by: str) -> list[tuple[str, str]]:
    """(student layer, teacher layer) pairs: as named, or the last hidden conv / linear layers of each, paired from the end."""
    if config.layers:
        pairs = [tuple(v.split(":")) if ":" in v else (v, v) for v in config.layers]
        check_layer_names(student, tuple(s for s, _ in pairs), "layers (student side)", needed_by)
        check_layer_names(teacher, tuple(t for _, t in pairs), "layers (teacher side)", needed_by)
        return pairs  # type: ignore[return-value]
    transformer_pairs = hidden_state_pairs(student, teacher)  # a layer-dropping student: every kept layer's hidden state
    if transformer_pairs:
        return transformer_pairs
    hidden_s = [n for n in layers_in_order(student) if n not in output_layers(student)]
    hidden_t = [n for n in layers_in_order(teacher) if n not in output_layers(teacher)]
    n = min(config.auto_layers, len(hidden_s), len(hidden_t))
    if n == 0:
        raise OptimizerError(f"{needed_by}: the models have no hidden conv or linear layer to match; use distill-soft")
    return list(zip(hidden_s[-n:], hidden_t[-n:]))


class FeatureTap:
    """Forward hooks that keep the latest output of each named layer."""

    def __init__(self, module: Any, names: list[str]) -> None:
        self.outputs: dict[str, Any] = {}
        self.handles = [module.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def keep(_module: Any, _args: Any, output: Any) -> None:
            self.outputs[name] = first_output(output)

        return keep

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def make_projections(pairs: list[tuple[str, str]], student: Any, teacher: Any, example: tuple[Any, ...], needed_by: str) -> list[Any]:
    """One learned map per pair from the student's channels to the teacher's: 1x1 conv for feature maps, linear for vectors."""
    import torch
    from torch import nn

    taps = FeatureTap(student, [s for s, _ in pairs]), FeatureTap(teacher, [t for _, t in pairs])
    output_shapes(student, example)
    output_shapes(teacher, example)
    projections = []
    for s, t in pairs:
        fs, ft = taps[0].outputs[s], taps[1].outputs[t]
        if not isinstance(student.get_submodule(s), nn.modules.conv._ConvNd) and fs.dim() > 2:
            # Linear and recurrent layers keep channels last ([N, T, C] in transformers and RNNs): a linear map on the last dim.
            if fs.dim() != ft.dim() or fs.shape[1:-1] != ft.shape[1:-1]:
                raise OptimizerError(
                    f"{needed_by}: student layer '{s}' gives {list(fs.shape[1:])} per sample and teacher layer '{t}' gives "
                    f"{list(ft.shape[1:])}; matched layers need the same shape but for the last dim (channels)"
                )
            proj = nn.Linear(fs.shape[-1], ft.shape[-1], bias=False)
            with torch.no_grad():
                proj.weight.copy_(torch.eye(ft.shape[-1], fs.shape[-1]))
            projections.append(proj)
            continue
        if fs.dim() != ft.dim() or fs.shape[2:] != ft.shape[2:]:
            raise OptimizerError(
                f"{needed_by}: student layer '{s}' gives {list(fs.shape[1:])} per sample and teacher layer '{t}' gives "
                f"{list(ft.shape[1:])}; matched layers need the same rank and spatial size (only channels may differ)"
            )
        if fs.dim() == 2:
            proj = nn.Linear(fs.shape[1], ft.shape[1], bias=False)
        elif fs.dim() in (3, 4, 5):
            proj = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[fs.dim()](fs.shape[1], ft.shape[1], 1, bias=False)
        else:
            raise OptimizerError(f"{needed_by}: layer '{s}' gives a {fs.dim()}-d output, which feature matching does not handle")
        with torch.no_grad():  # start near the identity where the channels line up (a derived student's do)
            weight = torch.zeros_like(proj.weight)
            eye = torch.eye(ft.shape[1], fs.shape[1])
            weight.view(ft.shape[1], fs.shape[1], -1)[:, :, 0] = eye
            proj.weight.copy_(weight)
        projections.append(proj)
    for tap in taps:
        tap.close()
    return projections


# ---------------------------------------------------------------------------------------------
# The passes


def distill(pass_name: str, artifact: Artifact, context: PassContext, config: DistillSoftConfig, features: bool) -> Artifact:
    import torch
    import torch.nn.functional as F

    prepared: Prepared = prepare(artifact, context, pass_name, with_eval=config.finetune.early_stopping > 0, label_free=True)
    teacher, example = prepared.module, prepared.example
    # Without labels the student learns the teacher's outputs alone, by the objective their kind calls for.
    label_free = (
        None
        if prepared.data.labels is not None
        else objective_of(teacher, example, prepared.outputs[0], pass_name, "teacher", config.temperature)
    )
    if label_free is not None:
        objective = label_free.describe()
    else:
        objective = f"{config.soft_weight:g} x KL to the teacher's softened outputs (T={config.temperature:g}) + {config.hard_weight:g} x cross-entropy on the labels"
    if features:
        assert isinstance(config, DistillFeatureConfig)
        how = "through learned projections" if config.project_features else "direct"
        objective += f"; + hidden-state / feature matching (relative MSE, {how})"
        if config.attention_weight > 0:
            objective += f"; + {config.attention_weight:g} x MiniLM attention and value-relation KL of the last layer"
    teacher_shapes = output_shapes(teacher, example)
    if config.student:
        student = load_student(config.student, prepared.specs, teacher_shapes, example, pass_name)
        origin = f"student {Path(config.student).name}"
    else:
        import numpy as np

        probe = tuple(torch.from_numpy(np.ascontiguousarray(x[:64])) for x in prepared.data.inputs)
        student, kept = derive_student(teacher, example, config, pass_name, probe)
        student.train()
        origin = f"student with {kept} ({config.student_init} init)"
    if not config.student and parameter_count(student) >= parameter_count(teacher):
        raise OptimizerError(
            f"{pass_name}: a student at width {config.width:g} is no smaller than {artifact.path.name}, so no variant was made; "
            f"the width could not shrink: {'; '.join(untouched_layers(teacher))}. Give a smaller student as a .pt2 (config student)"
        )
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_params, s_params = parameter_count(teacher), parameter_count(student)
    t_flops, s_flops = flops_per_sample(teacher, example), flops_per_sample(student, example)
    context.progress(
        ProgressEvent(
            stage=pass_name,
            fraction=0.05,
            message=f"{origin}: {s_params} parameters ({100 * s_params / t_params:.1f}% of the teacher's), {100 * s_flops / t_flops:.1f}% of its FLOPs",
        )
    )

    pairs: list[tuple[str, str]] = []
    projections: list[Any] = []
    if features:
        assert isinstance(config, DistillFeatureConfig)
        pairs = feature_pairs(student, teacher, config, pass_name)
        projections = make_projections(pairs, student, teacher, example, pass_name)
        if not config.project_features:
            for proj, (s, t) in zip(projections, pairs):
                if proj.weight.shape[0] != proj.weight.shape[1]:
                    raise OptimizerError(
                        f"{pass_name}: project_features false matches hidden states directly, and student layer '{s}' has "
                        f"{proj.weight.shape[1]} channels where teacher layer '{t}' has {proj.weight.shape[0]}; set project_features true or width 1"
                    )
                proj.weight.requires_grad_(False)
        context.progress(ProgressEvent(stage=pass_name, fraction=0.06, message="matching " + ", ".join(f"{s}->{t}" for s, t in pairs)))
    attention: tuple[tuple[str, str], tuple[str, str]] | None = None
    if features and config.attention_weight > 0:  # type: ignore[attr-defined]
        attention = last_attention_pair(student, teacher, pass_name)
        pairs_with_attention = [*pairs, (attention[0][0], attention[1][0]), (attention[0][1], attention[1][1])]
    else:
        pairs_with_attention = pairs
    taps = (
        (FeatureTap(student, [s for s, _ in pairs_with_attention]), FeatureTap(teacher, [t for _, t in pairs_with_attention]))
        if pairs_with_attention
        else None
    )
    mask_at = list(prepared.specs).index("attention_mask") if "attention_mask" in prepared.specs else None
    if attention is not None and taps is not None:
        output_shapes(student, example)
        output_shapes(teacher, example)
        s_shape, t_shape = (tuple(taps[i].outputs[attention[i][0]].shape[1:]) for i in (0, 1))
        if s_shape != t_shape:
            raise OptimizerError(
                f"{pass_name}: attention_weight compares the last layer's attention per head, and the student's is "
                f"{list(s_shape)} (heads, queries, keys) where the teacher's is {list(t_shape)}; set width 1 (every head kept) or attention_weight 0"
            )
    T, smoothing = config.temperature, config.finetune.label_smoothing
    data = prepared.data.subsample(config.finetune.max_samples, context.seed)
    batches, cache, training = padding_free_training(teacher, student, data, prepared, config, taps, pairs, attention is not None)
    context.progress(ProgressEvent(stage=pass_name, fraction=0.065, message=f"training {training}"))
    masked = mask_at is not None and sequence_layout(prepared.inputs, prepared.specs, data.inputs)[0] is not None

    def hidden_loss(student_state: Any, teacher_state: Any, inputs: tuple[Any, ...]) -> Any:
        """Relative MSE of two hidden states; [batch, seq, ...] ones of a text model on the real tokens only."""
        if masked and mask_at is not None and student_state.dim() >= 3 and student_state.shape[1] == inputs[mask_at].shape[1]:
            return masked_relative_mse(student_state, teacher_state, inputs[mask_at])
        return relative_mse(student_state, teacher_state)

    def loss_fn(model: Any, inputs: tuple[Any, ...], labels: Any, rows: Any = None) -> tuple[Any, Any]:
        if cache is not None:
            teacher_logits = cache.first_output(rows)
        else:
            with torch.no_grad():
                teacher_logits = first_output(teacher(*inputs))
        logits = first_output(model(*inputs))
        if label_free is not None:
            loss = label_free.output_loss(logits, teacher_logits)
        else:
            soft = soft_target_kl(logits, teacher_logits, T)
            loss = config.soft_weight * soft + config.hard_weight * F.cross_entropy(logits, labels, label_smoothing=smoothing)
        if attention is not None and taps is not None:
            mask = inputs[mask_at] if mask_at is not None else None
            (s_probs, s_values), (t_probs, t_values) = attention
            s_out, t_out = taps[0].outputs, taps[1].outputs
            relations = relation_kl(s_out[s_probs], t_out[t_probs], mask) + relation_kl(
                value_relation(s_out[s_values], mask), value_relation(t_out[t_values], mask), mask
            )
            loss = loss + config.attention_weight * relations  # type: ignore[attr-defined]
        if pairs and taps is not None:
            length = inputs[mask_at].shape[1] if mask_at is not None else 0
            feature = sum(
                hidden_loss(proj(taps[0].outputs[s]), cache.state(t, rows, length) if cache is not None else taps[1].outputs[t], inputs)
                for proj, (s, t) in zip(projections, pairs)
            ) / len(pairs)
            loss = loss + config.feature_weight * feature  # type: ignore[attr-defined,operator]
        return loss, logits

    extra = [p for proj in projections for p in proj.parameters() if p.requires_grad]
    try:
        fine_tune_(
            student, data, config.finetune, context, pass_name, loss_fn=loss_fn, extra_params=extra, fraction=(0.07, 0.88), batches=batches
        )
    finally:
        if taps is not None:
            for tap in taps:
                tap.close()
    prepared.module = student
    return finish(
        prepared,
        context,
        artifact,
        f"{artifact.path.stem}-student",
        pass_name,
        dynamic_sequence=True,
        distilled=pass_name,
        student=origin,
        objective=objective,
        training=training,
        params_fraction=f"{s_params / t_params:.4f}",
        flops_fraction=f"{s_flops / t_flops:.4f}",
    )


def padding_free_training(
    teacher: Any,
    student: Any,
    data: Any,
    prepared: Prepared,
    config: DistillSoftConfig,
    taps: tuple[FeatureTap, FeatureTap] | None,
    pairs: list[tuple[str, str]],
    attention: bool,
) -> tuple[LengthBatches | None, TeacherCache | None, str]:
    """Padding-free batches (and the teacher's outputs cached per row) where the model and settings allow, and a line saying how
    training runs and, where it runs padded or with the teacher live, why."""
    import numpy as np
    import torch

    if not config.padding_free:
        return None, None, "padded (padding_free false): every batch at full length, the teacher run on every batch"
    layout, why_not = sequence_layout(prepared.inputs, prepared.specs, data.inputs)
    xs = [torch.from_numpy(np.ascontiguousarray(x)) for x in data.inputs]
    if layout is not None:
        why_not = cut_changes_output(teacher, xs, layout, TOLERANCE) or cut_changes_output(student, xs, layout, TOLERANCE)
    if layout is None and not why_not:
        return None, None, "every batch as given (no token inputs)"
    if layout is None or why_not:
        return None, None, f"padded: {why_not}"
    batches = LengthBatches(layout, config.finetune.batch_size)
    tokens = f"{int(layout.lengths.sum())} of {layout.lengths.size * layout.full} positions are tokens"
    augment = config.finetune.augment
    augmented = augment.kind != "none" and any((input_kind(x) if augment.kind == "auto" else augment.kind) != "none" for x in data.inputs)
    if augmented or attention:
        why = "augmentation changes every batch" if augmented else "the attention term needs the teacher's attention maps"
        return batches, None, f"padding-free ({tokens}); the teacher runs on every batch: {why}"
    cache = TeacherCache(batches)
    names = [t for _, t in pairs]

    def run(inputs: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
        out = first_output(teacher(*inputs))
        return out, {t: taps[1].outputs[t] for t in names} if taps is not None else {}

    teacher.eval()
    cache.fill(run, xs)
    return (
        batches,
        cache,
        (
            f"padding-free ({tokens}); the teacher's outputs cached once per row ({cache.nbytes() / 2**20:.0f} MiB, hidden states in {cache.dtype})"
        ),
    )


class DistillSoftPass(Pass[DistillSoftConfig]):
    """A narrower student trained on the teacher's temperature-softened outputs and the labels."""

    name = "distill-soft"
    trains = True
    label_free = True
    budget_knob = Knob("width", gentle=0.9, aggressive=0.2, unless="student")  # a budget search narrows the student (optimizer.budget)
    config_cls = DistillSoftConfig
    kind = "distill"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        return distill(self.name, artifact, context, self.config, features=False)


class DistillFeaturePass(Pass[DistillFeatureConfig]):
    """distill-soft plus matching of intermediate feature maps through learned projections."""

    name = "distill-feature"
    trains = True
    label_free = True
    budget_knob = Knob("width", gentle=0.9, aggressive=0.2, unless="student")
    config_cls = DistillFeatureConfig
    kind = "distill"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        return distill(self.name, artifact, context, self.config, features=True)
