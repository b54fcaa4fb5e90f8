"""Conversion of torch.export archives (.pt2) to ONNX that keeps the served input and output names and a dynamic batch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext

if TYPE_CHECKING:  # torch loads on first use: registering the passes stays cheap
    import torch

BATCH_DIM = "batch"  # the name ONNX files we write give to dim 0 of every input (and of outputs that share it)


def onnx_io_names(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The graph's input names (initializers excluded) and output names, read without loading external weights."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = tuple(i.name for i in model.graph.input if i.name not in initializers)
    return inputs, tuple(o.name for o in model.graph.output)


def onnx_input_types(path: Path) -> dict[str, tuple[np.dtype, tuple[int | str, ...]]]:
    """Per graph input: its numpy dtype and its shape (an int for a fixed dim, the dim's name or '' otherwise)."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    specs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim)
        specs[value.name] = (dtype, shape)
    return specs


def load_program(artifact: Artifact, needed_by: str) -> torch.export.ExportedProgram:
    """The artifact's torch.export program, loaded without unpickling anything."""
    from slimserve.optimizer.formats.pt2io import UnsafeArchiveError, load_exported_program

    try:
        return load_exported_program(artifact.path)
    except UnsafeArchiveError as e:
        raise OptimizerError(
            f"{needed_by}: {artifact.path.name} cannot be loaded safely: {e}; export it again with torch.export.save"
        ) from e
    except Exception as e:  # torch raises many types for a damaged or foreign archive
        raise OptimizerError(f"{needed_by}: {artifact.path.name} is not a readable torch.export archive: {e}") from e


def user_input_names(program: torch.export.ExportedProgram) -> list[str]:
    return list(program.graph_signature.user_inputs)


def served_names(artifact: Artifact, program: torch.export.ExportedProgram, needed_by: str) -> tuple[list[str], list[str]]:
    """The names clients use: the artifact's, else the program's inputs and output_0..N."""
    n_in, n_out = len(program.graph_signature.user_inputs), len(program.graph_signature.user_outputs)
    inputs = list(artifact.input_names) or user_input_names(program)
    outputs = list(artifact.output_names) or [f"output_{i}" for i in range(n_out)]
    if len(inputs) != n_in or len(outputs) != n_out:
        raise OptimizerError(
            f"{needed_by}: the model is served with {len(inputs)} input(s) and {len(outputs)} output(s), "
            f"but {artifact.path.name} takes {n_in} and returns {n_out}; register the model again"
        )
    return inputs, outputs


def _input_placeholders(program: torch.export.ExportedProgram) -> list[Any]:
    names = set(program.graph_signature.user_inputs)
    return [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]


def has_dynamic_batch(program: torch.export.ExportedProgram) -> bool:
    """True when dim 0 of every tensor input is symbolic."""
    import torch

    for node in _input_placeholders(program):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() > 0 and isinstance(value.shape[0], int):
            return False
    return True


def program_input_types(program: torch.export.ExportedProgram) -> dict[str, tuple[np.dtype, tuple[int | str, ...]]]:
    """Like onnx_input_types, for a torch.export program's user inputs (symbolic dims as '')."""
    import torch

    specs = {}
    for node in _input_placeholders(program):
        value = node.meta["val"]
        dtype = np.dtype(torch.empty((), dtype=value.dtype).numpy().dtype)
        specs[node.name] = (dtype, tuple(d if isinstance(d, int) else "" for d in value.shape))
    return specs


def example_inputs(program: torch.export.ExportedProgram, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Zeros shaped like the program's inputs, with `batch` rows."""
    import torch

    examples = []
    for node in _input_placeholders(program):
        value = node.meta["val"]
        shape = [batch] + [int(d) for d in value.shape[1:]] if value.dim() > 0 else []
        examples.append(torch.zeros(shape, dtype=value.dtype))
    return tuple(examples)


def export_dynamic_batch(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], needed_by: str, sequence: tuple[int, ...] = ()
) -> torch.export.ExportedProgram:
    """torch.export with dim 0 of every input dynamic (and dim 1 of the inputs at `sequence`, one shared length), or an error that
    says how to make the model exportable."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    length = torch.export.Dim("sequence", min=2, max=1 << 16)
    shapes = tuple(({0: batch, 1: length} if i in sequence else {0: batch}) if a.dim() > 0 else None for i, a in enumerate(args))
    try:
        return torch.export.export(module, args, dynamic_shapes=shapes)
    except Exception as e:  # torch.export raises its own types for data-dependent or specialized shapes
        raise OptimizerError(
            f"{needed_by}: the model cannot be exported with a dynamic batch dimension ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "export it with torch.export.export(..., dynamic_shapes=({0: torch.export.Dim('batch')},)) and register it again"
        ) from e


def _name_batch_dim(model: onnx.ModelProto) -> None:
    """Renames the exporter's symbol for dim 0 of the inputs (s77, ...) to 'batch' across the graph."""
    symbols = {
        v.type.tensor_type.shape.dim[0].dim_param
        for v in model.graph.input
        if v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].dim_param
    }
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = BATCH_DIM


def export_program_to_onnx(
    program: torch.export.ExportedProgram, path: Path, input_names: list[str], output_names: list[str], needed_by: str
) -> Path:
    """Writes the program as one ONNX file (weights inside) whose inputs and outputs carry the served names."""
    import torch

    try:
        onnx_program = torch.onnx.export(
            program,
            (),
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            external_data=False,
            verbose=False,
        )
        onnx_program.save(str(path), external_data=False)
    except Exception as e:  # the exporter raises its own types for unsupported operators
        raise OptimizerError(
            f"{needed_by}: torch.onnx.export cannot convert the model to ONNX: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    model = onnx.load(str(path))
    _name_batch_dim(model)
    onnx.save(model, str(path))
    inputs, outputs = onnx_io_names(path)
    if list(inputs) != list(input_names) or list(outputs) != list(output_names):
        raise OptimizerError(
            f"{needed_by}: the ONNX export named its tensors {list(inputs)} -> {list(outputs)}, "
            f"expected {list(input_names)} -> {list(output_names)}"
        )
    return Path(path)


def to_onnx(artifact: Artifact, context: PassContext) -> Artifact:
    """The artifact as ONNX: itself when it already is, else its .pt2 exported (names kept, batch dynamic)."""
    if artifact.format == "onnx":
        return artifact
    needed_by = "export to ONNX"
    program = load_program(artifact, needed_by)
    inputs, outputs = served_names(artifact, program, needed_by)
    if not has_dynamic_batch(program):
        # Re-trace without the archive's fixed-batch guard; shapes baked into the graph make this fail loudly.
        program = export_dynamic_batch(program.module(check_guards=False), example_inputs(program), needed_by)
    target = context.new_path(artifact.path.stem, ".onnx")
    export_program_to_onnx(program, target, inputs, outputs, needed_by)
    return Artifact(
        path=target,
        format="onnx",
        runtime="onnxruntime",
        input_names=tuple(inputs),
        output_names=tuple(outputs),
        notes={**artifact.notes, "converted_from": "pt2"},
    )
