"""The import step every ONNX pass shares: a foreign graph made ready for the passes, once, before any of them reads it.

Exports from other projects (PaddlePaddle, older TF converters, opset-11 torch exports) differ from slimserve's own:

1. onnx's checker: a graph it rejects is refused with its message, before any pass or runtime reads it.
2. Constant-node weights folded into initializers (`Constant` nodes of the main graph whose value is a tensor);
   the quantizers and onnx2torch only see initializers as weights.
3. The opset upgraded with onnx's version converter where a pass needs it (`min_opset`: quantize-static's
   per-channel DequantizeLinear takes `axis` from opset 13); where the converter fails, the caller is told and
   falls back (quantize-static quantizes per tensor) or refuses.
4. Shape inference (onnx.shape_inference, data propagation on) and constant folding with onnxruntime's own
   graph optimizer at its basic level, written out as a plain ONNX file (ORT_ENABLE_BASIC: constant folding,
   redundant Identity / Dropout / Cast elimination, only standard operators, subgraphs of If / Loop included).

Why not onnxsim or onnxoptimizer: both are native packages this node does not ship; onnxsim folds constants by
running onnxruntime anyway, and onnxoptimizer's passes do no constant folding. onnxruntime is already what
serves the model, so its folding uses the kernels that will run it; nothing new is installed.

`import_onnx` returns a new artifact (noted `imported=<opset>`) and is a no-op on one already imported at that opset.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from slimserve.optimizer.base import Artifact, OptimizerError, PassContext, ProgressEvent, checker_problem

# Control-flow operators whose subgraphs a pass may be unable to enter (quantizers see only the main graph).
SUBGRAPH_OPS = ("If", "Loop", "Scan")


def check_graph(path: Path, needed_by: str) -> None:
    """Refuses a graph onnx's checker rejects: which check failed, and what to do."""
    first = checker_problem(path, empty="invalid graph")
    if first is not None:
        raise OptimizerError(
            f"{needed_by}: {path.name} is not a valid ONNX graph by onnx's checker ({first}); "
            "export it again (a newer exporter or opset), or fix the node it names"
        )


def fold_constant_nodes(model: onnx.ModelProto) -> int:
    """Moves the tensor value of each main-graph Constant node into an initializer of the same name; returns how many."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    keep, folded = [], 0
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None and node.output[0] not in outputs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            folded += 1
        else:
            keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        if model.ir_version < 4:  # initializers that are not graph inputs need IR 4
            model.ir_version = 4
    return folded


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def subgraph_nodes(path: Path) -> list[str]:
    """Names (or op types) of the main graph's nodes that hold subgraphs (If / Loop / Scan)."""
    model = onnx.load(str(path), load_external_data=False)
    return [n.name or n.op_type for n in model.graph.node if n.op_type in SUBGRAPH_OPS]


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model at opset `target` by onnx's version converter; raises OptimizerError with the converter's reason."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as e:  # the converter raises RuntimeError / ValidationError / IndexError on adapters it lacks
        raise OptimizerError(
            f"onnx's version converter cannot bring opset {opset_of(model)} to {target}: {' '.join(str(e).split())[:300]}"
        ) from e
    return converted


def ort_fold(source: Path, target: Path) -> bool:
    """onnxruntime's basic graph optimizations (constant folding and clean-ups) written to `target`; False if ORT cannot."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return target.is_file()


def import_onnx(artifact: Artifact, context: PassContext, needed_by: str, min_opset: int = 0, fold: bool = True) -> Artifact:
    """The artifact's ONNX graph checked, Constant weights folded, opset raised to `min_opset`, shapes inferred, constants folded.

    Raises OptimizerError when the graph is invalid, or when `min_opset` cannot be reached (the caller may catch it and
    fall back). Progress messages say what was done.
    """
    if artifact.format != "onnx":
        return artifact
    done = artifact.notes.get("imported")
    if done is not None and int(done) >= min_opset:
        return artifact
    check_graph(artifact.path, needed_by)
    model = onnx.load(str(artifact.path))
    steps = []
    folded = fold_constant_nodes(model)
    if folded:
        steps.append(f"{folded} Constant-node weights moved to initializers")
    opset = opset_of(model)
    if min_opset and opset < min_opset:
        model = upgrade_opset(model, min_opset)
        steps.append(f"opset {opset} upgraded to {min_opset} (onnx version converter)")
        opset = min_opset
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        steps.append(f"shape inference skipped ({type(e).__name__})")
    raw = _same_name(context, "import-raw", artifact.path.name)
    onnx.save(model, str(raw))
    path = raw
    if fold:
        folded_path = _same_name(context, "imported", artifact.path.name)
        if ort_fold(raw, folded_path) and _same_io(raw, folded_path):
            path = folded_path
            steps.append("constants folded (onnxruntime basic level)")
    if steps:
        context.progress(ProgressEvent(stage=needed_by, fraction=0.05, message="import: " + "; ".join(steps)))
    imported = artifact.derive(path, imported=str(opset))
    return imported


def _same_name(context: PassContext, folder: str, name: str) -> Path:
    """A new path under the workdir that keeps the model's file name, so that later messages name the user's file."""
    for i in range(1000):
        directory = context.workdir / (folder if i == 0 else f"{folder}-{i}")
        if not (directory / name).exists():
            directory.mkdir(parents=True, exist_ok=True)
            return directory / name
    raise OptimizerError(f"no free file name for {name} under {context.workdir}")


def _same_io(a: Path, b: Path) -> bool:
    from slimserve.optimizer.formats.export import onnx_io_names

    try:
        return onnx_io_names(a) == onnx_io_names(b)
    except Exception:
        return False


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a graph's nodes read (recursively through nested subgraphs) that it does not define itself: its outer-scope reads."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    reads = set()
    for node in graph.node:
        reads.update(i for i in node.input if i)
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                reads |= _subgraph_reads(g)
    return reads - defined


def outer_scope_producers(model: onnx.ModelProto) -> list[str]:
    """Main-graph nodes whose outputs If / Loop / Scan subgraphs read from the outer scope.

    ORT's quantizers rewrite the main graph only: quantizing such a producer renames or removes the tensor a
    subgraph still reads (a Relu folded into its QuantizeLinear leaves the branch reading the pre-Relu values),
    so these nodes, and the control-flow nodes themselves, stay FP32.
    """
    reads: set[str] = set()
    holders = []
    for node in model.graph.node:
        graphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        graphs += [g for a in node.attribute for g in a.graphs]
        if graphs:
            holders.append(node.name)
        for g in graphs:
            reads |= _subgraph_reads(g)
    producers = [n.name for n in model.graph.node if reads & set(n.output)]
    return list(dict.fromkeys(producers + holders))


def name_subgraph_nodes_(model: onnx.ModelProto) -> list[str]:
    """Gives every node inside If / Loop / Scan subgraphs a name (quantizers exclude by name) and returns those names."""
    names: list[str] = []
    taken = {n.name for n in model.graph.node if n.name}

    def visit(graph: onnx.GraphProto, prefix: str) -> None:
        for i, node in enumerate(graph.node):
            if not node.name or node.name in taken:
                name = f"{prefix}/{node.op_type}_{i}"
                while name in taken:
                    name += "_"
                node.name = name
            taken.add(node.name)
            names.append(node.name)
            for attr in node.attribute:
                for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    visit(g, f"{node.name}/{attr.name}")

    for node in model.graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                visit(g, f"{node.name or node.op_type}/{attr.name}")
    return names


def fp32_around_subgraphs(model: onnx.ModelProto) -> list[str]:
    """The nodes a quantizer must leave FP32 so that If / Loop / Scan keep working: their subgraphs' nodes, the
    control-flow nodes, and the main-graph nodes whose outputs the subgraphs read (outer_scope_producers). Names them first."""
    from slimserve.optimizer.formats.onnx_graph import name_unnamed_nodes_

    name_unnamed_nodes_(model)
    inner = name_subgraph_nodes_(model)
    return list(dict.fromkeys(outer_scope_producers(model) + inner))


def sort_with_subgraphs(path: Path) -> None:
    """Re-sorts the main graph of the file at `path` so that every node follows what its subgraphs read from the outer scope.

    ORT's quantizers sort the nodes they rewrite by their direct inputs only, and may put an If after a node its
    branches read: onnxruntime still runs it, onnx's checker rejects it. A stable topological sort fixes the order.
    """
    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    if not any(a.type == onnx.AttributeProto.GRAPH or a.graphs for n in nodes for a in n.attribute):
        return
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    needs = []
    for node in nodes:
        reads = set(node.input)
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                reads |= _subgraph_reads(g)
        needs.append(reads)
    produced = {o for n in nodes for o in n.output}
    ordered, pending = [], list(range(len(nodes)))
    while pending:
        ready = [i for i in pending if all(r in available or r not in produced for r in needs[i])]
        if not ready:
            return  # a cycle: leave the order as the quantizer wrote it (the checker then names the node)
        for i in ready:
            ordered.append(nodes[i])
            available.update(nodes[i].output)
        pending = [i for i in pending if i not in set(ready)]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    onnx.save(model, str(path))
