"""Trainable torch modules from torch.export programs (or ONNX converted to one), and their way back to served ONNX; a training pass's start and finish.

`source_program` gives the model as a program (a .pt2 loaded safely, or an ONNX file converted);
`trainable_module` lifts its functional calls into real layers (optimizer/formats/torchlayers.py);
`prepare` adds the train data and an example batch, and `finish` exports the trained module as ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext, ProgressEvent
from slimserve.optimizer.data import InputSpecs, TrainData, load_train_data, model_arrays
from slimserve.optimizer.formats.export import (
    export_dynamic_batch,
    export_program_to_onnx,
    load_program,
    onnx_input_types,
    onnx_io_names,
    program_input_types,
    served_names,
)
from slimserve.optimizer.formats.torchlayers import lift_layers

if TYPE_CHECKING:
    import torch


def source_program(
    artifact: Artifact, context: PassContext, needed_by: str
) -> tuple[torch.export.ExportedProgram, list[str], list[str], InputSpecs]:
    """The artifact as a torch.export program, its served input and output names, and its input specs.

    A .pt2 is loaded as it is; an ONNX model is converted by onnx2torch and checked against
    onnxruntime on the first rows of the train data (slimserve.optimizer.formats.onnx2torch), before any training.
    """
    if artifact.format == "pt2":
        program = load_program(artifact, needed_by)
        inputs, outputs = served_names(artifact, program, needed_by)
        return program, inputs, outputs, dict(zip(inputs, program_input_types(program).values()))
    from slimserve.optimizer.formats.onnx2torch import convertible_model, program_from_onnx
    from slimserve.optimizer.formats.onnx_import import import_onnx

    names_in, names_out = onnx_io_names(artifact.path)
    inputs, outputs = list(artifact.input_names) or list(names_in), list(artifact.output_names) or list(names_out)
    specs = dict(zip(inputs, onnx_input_types(artifact.path).values()))
    refuse_foreign_layout(specs, needed_by)
    convertible_model(artifact.path, needed_by)  # unknown operators are refused before the data is read
    if "train" not in context.datasets:
        load_train_data(context, inputs, specs, needed_by)  # raises the usual 'needs train data' error
    # Constant-node weights become initializers, so that they convert to parameters that train and prune.
    artifact = import_onnx(artifact, context, needed_by, fold=False)
    arrays = model_arrays(context.dataset("train", needed_by), specs, "train", needed_by)
    # A batch fixed to 1 (or B) is checked against onnxruntime on that many rows; the converted module takes any batch.
    fixed = {s[0] for _, s in specs.values() if s and isinstance(s[0], int) and s[0] > 0}
    rows = min(fixed) if fixed else 32
    feeds = {graph_name: arrays[name][:rows] for graph_name, name in zip(names_in, inputs)}
    return program_from_onnx(artifact, feeds, needed_by), inputs, outputs, specs


def refuse_foreign_layout(specs: InputSpecs, needed_by: str) -> None:
    """The training passes batch samples on axis 0 of every input; a state on another axis or a per-model scalar is refused here."""
    from slimserve.optimizer.data import PER_MODEL, batch_axis, shown

    odd = {name: (shape, batch_axis(shape)) for name, (_, shape) in specs.items() if batch_axis(shape) != 0}
    if odd:
        listed = ", ".join(
            f"{name} {shown(shape, axis)} ({'one value per model' if axis is PER_MODEL else f'samples on axis {axis}'})"
            for name, (shape, axis) in odd.items()
        )
        raise OptimizerError(
            f"{needed_by} trains the model in torch on inputs batched on axis 0, and this model's {listed} is not; nothing was "
            "trained. graph-ort, quantize-dynamic and quantize-static take any input layout; to train, register a .pt2 whose "
            "inputs are all batched on axis 0"
        )


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
    sequence: tuple[int, ...] = (),
) -> Path:
    """Exports the trained module (eval mode, dynamic batch; dynamic length on the inputs at `sequence`) as one ONNX file with the served names."""
    remove_dropout_(module)
    module.eval()
    program = export_dynamic_batch(module, example, needed_by, sequence)
    target = context.new_path(stem, ".onnx")
    return export_program_to_onnx(program, target, inputs, outputs, needed_by)


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


def prepare(artifact: Artifact, context: PassContext, needed_by: str, with_eval: bool = False, label_free: bool = False) -> Prepared:
    """Loads the model (.pt2, or ONNX converted to torch) as a trainable module and its train data (and, with_eval, evaluation data for early stopping).

    label_free: the pass can train without labels (slimserve.optimizer.finetune.objectives), so train data without them is taken (data.labels None).
    """
    import torch

    program, inputs, outputs, specs = source_program(artifact, context, needed_by)
    module = trainable_module(program)
    data = load_train_data(context, inputs, specs, needed_by, with_eval=with_eval, labels_required=not label_free)
    example = tuple(torch.from_numpy(np.ascontiguousarray(x[:2])) for x in data.inputs)
    shapes = output_shapes(module, example)
    classes = shapes[0][-1] if len(shapes[0]) == 2 else None
    if classes is not None and data.labels is not None and len(data.labels) and data.labels.max() >= classes:
        raise OptimizerError(f"{needed_by}: 'labels' holds class {int(data.labels.max())}, and the model has {classes} outputs")
    return Prepared(module, inputs, outputs, data, example, classes, specs)


def dynamic_sequence_inputs(prepared: Prepared) -> tuple[int, ...]:
    """The token inputs (input_ids, attention_mask, token_type_ids) whose length the source model declares free ([batch, seq] symbolic)."""
    from slimserve.optimizer.formats.sequence_axis import SEQUENCE_NAMES

    return tuple(
        i
        for i, name in enumerate(prepared.inputs)
        if name in SEQUENCE_NAMES and len(prepared.specs[name][1]) == 2 and not isinstance(prepared.specs[name][1][1], int)
    )


def finish(
    prepared: Prepared, context: PassContext, artifact: Artifact, stem: str, needed_by: str, dynamic_sequence: bool = False, **notes: str
) -> Artifact:
    """Exports the trained module as the variant's ONNX file; dynamic_sequence: token inputs of a free length stay free (else the
    example's length is fixed)."""
    context.progress(ProgressEvent(stage=needed_by, fraction=0.97, message="exporting ONNX"))
    sequence = dynamic_sequence_inputs(prepared) if dynamic_sequence else ()
    target = export_module_onnx(prepared.module, prepared.example, context, stem, prepared.inputs, prepared.outputs, needed_by, sequence)
    return Artifact(
        path=target,
        format="onnx",
        runtime="onnxruntime",
        input_names=tuple(prepared.inputs),
        output_names=tuple(prepared.outputs),
        notes={**artifact.notes, **notes},
    )
