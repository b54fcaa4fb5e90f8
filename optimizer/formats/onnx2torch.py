"""ONNX models as torch.export programs for the passes that train: onnx2torch's conversion, checked before any training.

A model registered as ONNX is converted with onnx2torch (a maintained converter, pinned in the
[server] extra), and used only if (1) every node has a converter, listed up front so that a
refusal names all the operators at once; (2) the converted module gives onnxruntime's outputs
on the pass's own data; (3) it traces with torch.export and a dynamic batch, so that the trained
module exports back to ONNX and is served by onnxruntime like any other variant.
onnx2torch 1.5.15 knows operators up to opset 17: newer graphs (torch 2.13 writes opset 20) are
converted down with onnx.version_converter first.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimserve.optimizer.base import Artifact, OptimizerError

if TYPE_CHECKING:
    import onnx
    import torch

ONNX2TORCH_PIN = "onnx2torch==1.5.15"
CONVERTER_OPSET = 17  # the newest default-domain opset onnx2torch 1.5.15 has converters for
# onnx2torch imports torchvision for its two detection operators only; where torchvision is missing
# (or is a build that does not match torch), these stay unconvertible and everything else converts.
TORCHVISION_OPS = ("NonMaxSuppression", "RoiAlign")


def _import_onnx2torch(needed_by: str) -> tuple[Any, bool]:
    """(onnx2torch, whether torchvision works); torchvision is replaced while onnx2torch imports when it cannot load."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"], not getattr(sys.modules["onnx2torch"], "_slimserve_without_torchvision", False)
    try:
        import torchvision  # noqa: F401

        have_torchvision = True
    except Exception:  # missing, or a CUDA build next to a CPU torch (RuntimeError: operator torchvision::nms does not exist)
        have_torchvision = False
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "torchvision" or k.startswith("torchvision.")}
    if not have_torchvision:

        def unavailable(*_args: Any, **_kwargs: Any) -> Any:
            raise OptimizerError(f"{', '.join(TORCHVISION_OPS)} need torchvision, which does not load on this node")

        package = types.ModuleType("torchvision")
        package.__path__ = []  # type: ignore[attr-defined]
        ops = types.ModuleType("torchvision.ops")
        ops.roi_align = ops.nms = ops.box_convert = unavailable  # type: ignore[attr-defined]
        package.ops = ops  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": package, "torchvision.ops": ops})
    try:
        import onnx2torch
    except ImportError as e:
        raise OptimizerError(
            f"{needed_by} converts ONNX models to torch with onnx2torch, which is not installed ({e}); pip install {ONNX2TORCH_PIN}"
        ) from e
    finally:
        if not have_torchvision:  # nothing else may see the placeholder (torch.onnx probes for torchvision)
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.ops", None)
        sys.modules.update(saved)
    onnx2torch._slimserve_without_torchvision = not have_torchvision
    return onnx2torch, have_torchvision


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convertible_model(path: Path, needed_by: str) -> onnx.ModelProto:
    """The ONNX model at opset 17 with the rewrites onnx2torch needs, or an OptimizerError naming every operator it cannot convert."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    if _opset(model) > CONVERTER_OPSET:
        try:
            model = version_converter.convert_version(model, CONVERTER_OPSET)
        except Exception as e:  # the version converter raises RuntimeError / ValueError by operator
            raise OptimizerError(
                f"{needed_by}: {path.name} is ONNX opset {_opset(model)}, and converting it to opset {CONVERTER_OPSET} "
                f"(the newest onnx2torch reads) failed: {str(e).splitlines()[0]}; export the model at opset {CONVERTER_OPSET} or register its .pt2"
            ) from e
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape":
            # allowzero=1 differs from the default only where the shape holds a 0; torch's exporter sets it everywhere.
            shape = constants.get(node.input[1]) if len(node.input) > 1 else None
            if shape is None or not (shape == 0).any():
                for attribute in [a for a in node.attribute if a.name == "allowzero"]:
                    node.attribute.remove(attribute)
    _matmul_as_gemm_(model)
    try:  # converters of pooling and shape operators read the shapes of their inputs
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass
    _, have_torchvision = _import_onnx2torch(needed_by)
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph

    graph = OnnxGraph(model.graph)
    opsets = {o.domain: o.version for o in model.opset_import}
    problems: dict[str, str] = {}
    for node in graph.nodes.values():
        op = node.operation_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.operation_type}"
        if op in problems:
            continue
        if node.operation_type in TORCHVISION_OPS and not have_torchvision:
            problems[op] = "needs torchvision, which does not load on this node"
            continue
        try:
            get_converter(domain=node.domain, operation_type=node.operation_type, version=opsets.get(node.domain, 1))(node, graph)
        except NotImplementedError as e:
            problems[op] = "no converter" if str(e).startswith("Converter is not implemented") else str(e)
        except Exception as e:  # a converter that fails on this node's attributes
            problems[op] = f"{type(e).__name__}: {e}"
    if problems:
        listed = "; ".join(f"{op} ({why})" for op, why in problems.items())
        raise OptimizerError(
            f"{needed_by}: {path.name} uses ONNX operators that onnx2torch cannot convert to torch: {listed}; "
            "nothing was trained. Register the model's .pt2 (torch.export.save) to train it, or use quantize-static / graph-ort"
        )
    return model


def _matmul_as_gemm_(model: onnx.ModelProto) -> int:
    """MatMul of a 2-D activation by a constant 2-D weight (and an Add of a constant bias after it) becomes Gemm.

    onnx2torch converts such a Gemm to torch.nn.Linear, which trains and prunes; a MatMul stays a product with a
    fixed buffer (exports that keep weights in Constant nodes, or older TF / Paddle converters, write MatMul + Add).
    Returns how many were rewritten.
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return 0
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
        if v.type.tensor_type.HasField("shape")
    }
    weights = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    drop, rewritten = set(), 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or len(weights[node.input[1]].dims) != 2:
            continue
        if ranks.get(node.input[0]) != 2:
            continue
        columns = weights[node.input[1]].dims[1]
        inputs, out = [node.input[0], node.input[1]], node.output[0]
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Add" and out not in outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            if other in weights and list(weights[other].dims) == [columns]:
                inputs.append(other)
                out = add.output[0]
                drop.add(id(add))
        node.op_type = "Gemm"
        del node.input[:]
        node.input.extend(inputs)
        del node.output[:]
        node.output.append(out)
        rewritten += 1
    if drop:
        kept = [n for n in model.graph.node if id(n) not in drop]
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return rewritten


def _fold_constant_reshapes_(module: torch.fx.GraphModule) -> None:
    """Reshapes to a constant shape become torch.reshape calls: onnx2torch reads the shape tensor's values, which torch.export cannot trace."""
    import torch
    from onnx2torch.node_converters.reshape import OnnxReshape

    for node in list(module.graph.nodes):
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), OnnxReshape) or len(node.args) != 2:
            continue
        shape = node.args[1]
        if not (isinstance(shape, torch.fx.Node) and shape.op == "get_attr"):
            continue
        values = [int(v) for v in module.get_buffer(shape.target).tolist()]
        with module.graph.inserting_before(node):
            if 0 in values:  # ONNX's 0 copies the input's dim there (a detector head's [0, 0, -1]): read at run time
                new = module.graph.call_function(_reshape_copying_zeros, (node.args[0], tuple(values)))
            else:
                new = module.graph.call_function(torch.reshape, (node.args[0], tuple(values)))
        node.replace_all_uses_with(new)
        module.graph.erase_node(node)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()


def _reshape_copying_zeros(x: Any, shape: tuple[int, ...]) -> Any:
    """ONNX Reshape with allowzero 0: a 0 in the target shape keeps the input's dim at that position."""
    import torch

    return torch.reshape(x, [x.shape[i] if v == 0 else v for i, v in enumerate(shape)])


def _prelu_layers_(module: torch.fx.GraphModule) -> None:
    """onnx2torch's PReLU (slope as a constant input) becomes torch.nn.PReLU with the slope as its weight.

    A slope of one value per channel ([C], [C, 1, 1]) or one in all is then a parameter that training updates and that
    channel pruning shrinks with the convolution before it (onnx2torch's own module keeps it as a fixed-size buffer,
    and pruning the convolution left it at the old width).
    """
    import torch
    from onnx2torch.node_converters.activations import OnnxPReLU

    for node in list(module.graph.nodes):
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), OnnxPReLU) or len(node.args) != 2:
            continue
        slope_node = node.args[1]
        if not (isinstance(slope_node, torch.fx.Node) and slope_node.op == "get_attr"):
            continue
        slope = module.get_buffer(slope_node.target) if slope_node.target in dict(module.named_buffers()) else None
        if slope is None or not (slope.numel() == 1 or all(s == 1 for s in slope.shape[1:])):
            continue  # an elementwise slope stays onnx2torch's module
        layer = torch.nn.PReLU(num_parameters=slope.numel())
        layer.weight = torch.nn.Parameter(slope.detach().reshape(-1).clone().float())
        name = f"{node.target}_prelu".replace(".", "_")
        module.add_submodule(name, layer)
        with module.graph.inserting_before(node):
            new = module.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        module.graph.erase_node(node)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()


def check_same_outputs(path: Path, module: Any, feeds: dict[str, np.ndarray], needed_by: str) -> None:
    """The converted module must give onnxruntime's outputs on `feeds` (the pass's own data), within float tolerance."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    with torch.no_grad():
        got = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in feeds.values()))
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    if len(got) != len(expected):
        raise OptimizerError(
            f"{needed_by}: onnx2torch's conversion of {path.name} returns {len(got)} outputs, the ONNX model {len(expected)}; nothing was trained"
        )
    for i, (want, have) in enumerate(zip(expected, got)):
        have = have.detach().numpy()
        scale = float(np.abs(want).max()) if want.size else 0.0
        error = float(np.abs(have.astype(np.float64) - want).max()) if want.shape == have.shape and want.size else float("inf")
        if want.shape != have.shape or error > 1e-4 + 1e-3 * scale:
            raise OptimizerError(
                f"{needed_by}: onnx2torch's conversion of {path.name} differs from onnxruntime on output {i} "
                f"(shape {list(have.shape)} vs {list(want.shape)}, largest difference {error:.3g} at output scale {scale:.3g}); "
                "training the converted model would change it: nothing was trained. Register the model's .pt2 to train it"
            )


def program_from_onnx(artifact: Artifact, feeds: dict[str, np.ndarray], needed_by: str) -> torch.export.ExportedProgram:
    """The ONNX artifact as a torch.export program with a dynamic batch, checked against onnxruntime on `feeds`."""
    from slimserve.optimizer.formats.export import export_dynamic_batch

    model = convertible_model(artifact.path, needed_by)
    onnx2torch, _ = _import_onnx2torch(needed_by)
    try:
        module = onnx2torch.convert(model)
    except Exception as e:  # the up-front check passed, so this is a converter bug on this graph
        raise OptimizerError(
            f"{needed_by}: onnx2torch failed to convert {artifact.path.name}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    module.eval()
    for parameter in module.parameters():  # Gemm without transB converts to a Linear whose weight is a transposed view
        parameter.data = parameter.data.contiguous()
    _fold_constant_reshapes_(module)
    _prelu_layers_(module)
    check_same_outputs(artifact.path, module, feeds, needed_by)
    import torch

    # Two rows, so that torch.export keeps the batch dynamic (a model fixed to batch 1 gives its one row twice).
    example = tuple(torch.from_numpy(np.ascontiguousarray(np.concatenate([a[:2]] * 2)[:2])) for a in feeds.values())
    try:
        return export_dynamic_batch(module, example, needed_by)
    except OptimizerError as e:
        raise OptimizerError(
            f"{needed_by}: {artifact.path.name} converts to torch, but the converted model cannot be traced back with a dynamic batch "
            f"({str(e.__cause__ or e).splitlines()[0][:200]}): graphs that compute shapes at run time (Shape -> Concat -> Reshape, "
            "as transformer exports do) cannot be trained from ONNX here; nothing was trained. Register the model's .pt2 to train it"
        ) from e
