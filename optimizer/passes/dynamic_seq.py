"""`graph-dynamic-seq`: a text model exported at a fixed sequence length made to accept any length, so that the server
runs each request at its real length (padding-free serving, server/batching/sequence.py).

The ONNX graph's sequence dimension becomes the symbol `sequence` on the token inputs (`input_ids`, `attention_mask`,
`token_type_ids`, or the ones named in the config) and on the outputs whose axis 1 had that length; shape
annotations of intermediate values are dropped (ONNX Runtime infers them again), and a Reshape whose constant target
holds the length on axis 1 copies it from its input instead (target 0). A .pt2 is exported to ONNX first.

Before anything is kept the new graph runs on the evaluation rows, each cut to its real length, against the fixed-length
model at full length: every output (sequence outputs on the real positions) must agree within 1e-4 relative, else the
pass refuses with the output, the length and the difference. Weights are unchanged.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.optimizer.base import Artifact, ConfigValueError, OptimizerError, Pass, PassConfig, PassContext, ProgressEvent, setting
from slimserve.optimizer.formats.sequence_axis import MASK_NAME, SEQUENCE_NAMES, TOLERANCE, relative_difference, trailing_lengths

SYMBOL = "sequence"
# Operators whose constant operand of the fixed length (a position embedding folded by the exporter, an attention bias)
# is cut to the real length: elementwise broadcasting ones, and Gather's indices (position ids).
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Pow", "Equal", "Less", "Greater", "And", "Or", "Max", "Min"})
ROWS_CHECKED = 16  # evaluation rows run one by one at their real length


@dataclass(frozen=True)
class DynamicSeqConfig(PassConfig):
    """inputs: the token inputs with the sequence on axis 1 (empty: input_ids, attention_mask, token_type_ids as present);
    mask: the attention mask among them (its ones give each row's real length)."""

    inputs: tuple[str, ...] = setting(
        (), "token inputs with the sequence on axis 1 (empty: input_ids, attention_mask, token_type_ids as present)"
    )
    mask: str = setting(MASK_NAME, "the attention mask among the inputs (its ones give each row's real length)")

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            object.__setattr__(self, "inputs", tuple(n.strip() for n in self.inputs.split(",") if n.strip()))
        if self.inputs and self.mask not in self.inputs:
            raise ConfigValueError(f"mask {self.mask!r} must be one of the inputs {list(self.inputs)}")


def fixed_sequence(path, inputs: tuple[str, ...] = (), mask: str = MASK_NAME) -> tuple[list[str], int] | None:
    """The token inputs of an ONNX file and their fixed sequence length; None when it has none fixed (already dynamic,
    no mask, not INT64 [batch, seq])."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return _sequence_inputs(model, inputs, mask)


def _sequence_inputs(model, inputs: tuple[str, ...], mask: str) -> tuple[list[str], int] | None:
    from onnx import TensorProto

    by_name = {i.name: i for i in model.graph.input}
    names = list(inputs) or [n for n in SEQUENCE_NAMES if n in by_name]
    if mask not in names or any(n not in by_name for n in names):
        return None
    lengths = set()
    for name in names:
        t = by_name[name].type.tensor_type
        dims = t.shape.dim
        if t.elem_type != TensorProto.INT64 or len(dims) != 2 or not dims[1].HasField("dim_value"):
            return None
        lengths.add(dims[1].dim_value)
    return (names, lengths.pop()) if len(lengths) == 1 else None


def rewrite(model, names: list[str], length: int) -> tuple[int, int]:
    """Makes the sequence dimension symbolic in place; returns how many Reshape targets now take the real length and how many
    constants of the fixed length are now cut to the real one."""
    for value in model.graph.input:
        if value.name in names:
            value.type.tensor_type.shape.dim[1].dim_param = SYMBOL
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value") and dims[1].dim_value == length:
            dims[1].dim_param = SYMBOL
    del model.graph.value_info[:]
    return _cut_constants(model, names[0], length)


def _cut_constants(model, token_input: str, length: int) -> tuple[int, int]:
    """Reshape targets with the fixed length on axis 1 take the real length instead (a Concat around it), and constants
    with the fixed length on some axes that meet the sequence (elementwise, or as Gather's indices) are sliced to it;
    the real length is read from the token input's shape: what a model exported with a dynamic axis computes.
    Returns (targets, constants) rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    values = {t.name: t for t in graph.initializer}
    made_by = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
            values[node.output[0]] = node.attribute[0].t
            made_by[node.output[0]] = node.output[0]
    uses: dict[str, list[tuple[object, int]]] = {}
    targets: dict[str, list[object]] = {}
    for node in graph.node:
        if node.op_type == "Reshape" and len(node.input) >= 2 and node.input[1] in values:
            target = numpy_helper.to_array(values[node.input[1]])
            if target.ndim == 1 and len(target) >= 2 and target[1] == length:
                targets.setdefault(node.input[1], []).append(node)
            continue
        for i, name in enumerate(node.input):
            meets = (node.op_type in ELEMENTWISE and len(shapes.get(name, ())) >= 2) or (node.op_type == "Gather" and i == 1)
            if meets and name in shapes and length in shapes[name]:
                uses.setdefault(name, []).append((node, i))
    if not uses and not targets:
        return 0, 0
    prefix = "graph_dynamic_seq"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_axis1"),
            numpy_helper.from_array(np.array([0], np.int64), f"{prefix}_zero"),
        ]
    )
    for axis in {a for name in uses for a, d in enumerate(shapes[name]) if d == length}:
        graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), f"{prefix}_at{axis}"))
    first = [
        helper.make_node("Shape", [token_input], [f"{prefix}_shape"]),
        helper.make_node("Gather", [f"{prefix}_shape", f"{prefix}_axis1"], [f"{prefix}_length"], axis=0),
    ]
    after: dict[str, list] = {}
    for name, reshapes in targets.items():
        target = numpy_helper.to_array(values[name]).astype(np.int64)
        head, tail, out = f"{prefix}_{name}_head", f"{prefix}_{name}_tail", f"{prefix}_{name}_target"
        graph.initializer.extend([numpy_helper.from_array(target[:1], head), numpy_helper.from_array(target[2:], tail)])
        first.append(helper.make_node("Concat", [head, f"{prefix}_length", tail], [out], axis=0))
        for node in reshapes:
            node.input[1] = out
    for name, consumers in uses.items():
        current, made = name, []
        for axis, d in enumerate(shapes[name]):
            if d == length:
                out = f"{prefix}_{name}_{axis}"
                made.append(helper.make_node("Slice", [current, f"{prefix}_zero", f"{prefix}_length", f"{prefix}_at{axis}"], [out]))
                current = out
        for node, i in consumers:
            node.input[i] = current
        (after.setdefault(made_by[name], []) if name in made_by else first).extend(made)
    nodes = list(first)
    for node in graph.node:
        nodes.append(node)
        if node.output and node.output[0] in after:
            nodes.extend(after[node.output[0]])
    del graph.node[:]
    graph.node.extend(nodes)
    return len(targets), len(uses)


def check_any_length(fixed_path, dynamic_path, rows: dict[str, np.ndarray], names: list[str], mask: str, length: int) -> int:
    """Runs each row at its real length on the new graph against the fixed one at full length; returns the rows checked.
    Raises OptimizerError naming the output, the length and the difference when they disagree beyond TOLERANCE."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    fixed = ort.InferenceSession(str(fixed_path), options, providers=["CPUExecutionProvider"])
    # the new graph as a file, or as serialized bytes (the server's runtime rewrites in memory)
    graph = dynamic_path if isinstance(dynamic_path, bytes) else str(dynamic_path)
    dynamic = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in fixed.get_inputs()]
    lengths = trailing_lengths(rows[mask])
    if lengths is None:
        raise OptimizerError(
            f"graph-dynamic-seq: the evaluation data's '{mask}' is not a 0/1 mask of trailing padding with a token in every row; "
            "register data padded at the end, as tokenizers pad"
        )
    checked = 0
    for i in range(min(ROWS_CHECKED, len(lengths))):
        real = int(lengths[i])
        feed = {n: rows[n][i : i + 1] for n in feed_names}
        want = dict(zip([o.name for o in fixed.get_outputs()], fixed.run(None, feed)))
        cut = {n: (np.ascontiguousarray(v[:, :real]) if n in names else v) for n, v in feed.items()}
        try:
            got = dict(zip([o.name for o in dynamic.get_outputs()], dynamic.run(None, cut)))
        except Exception as e:
            first = str(e).splitlines()[0][:300]
            raise OptimizerError(
                f"graph-dynamic-seq: the graph still needs {length} positions: at length {real} ONNX Runtime fails ({first}); "
                "export the model with a dynamic sequence axis (torch.export Dim / dynamic_axes {1: 'sequence'})"
            ) from None
        for name, full in want.items():
            if not np.issubdtype(full.dtype, np.floating):
                continue
            out = got[name]
            if full.ndim >= 2 and full.shape[1] == length:
                full, out = full[:, :real], out[:, :real]
            difference = relative_difference(full, out)
            if difference > TOLERANCE:
                raise OptimizerError(
                    f"graph-dynamic-seq: output '{name}' differs by {difference:.2e} (relative, > {TOLERANCE:g}) at length {real} "
                    f"from the model at its fixed length {length}; the model reads its padding or bakes the length in, so it "
                    "is served at full length (register it as it is)"
                )
        checked += 1
    return checked


# Files up to this size are rewritten in memory by the server's runtime (protobuf serializes at most 2 GB).
IN_MEMORY_MAX_BYTES = 1 << 30


def any_length_in_memory(path) -> tuple[bytes, str] | None:
    """A fixed-length text export (ONNX, weights inside) rewritten to take any length, checked exactly on made-up rows
    against the file: the serialized graph and what was done, or None (nothing to rewrite, too large, or refused: the
    file is then served as it is). What the server's ONNX runtime loads, so that the same file serves padding-free."""
    import onnx

    path = Path(path)
    if path.suffix != ".onnx" or path.stat().st_size > IN_MEMORY_MAX_BYTES:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(MASK_NAME.encode()) < 0:  # not a text model: no need to parse it
            return None
    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return None
    found = _sequence_inputs(model, (), MASK_NAME)
    initializers = {t.name for t in model.graph.initializer}
    if found is None or any(i.name not in found[0] and i.name not in initializers for i in model.graph.input):
        return None  # not a model of token inputs alone: made-up rows could not feed it
    names, length = found
    reshapes, constants = rewrite(model, names, length)
    graph = model.SerializeToString()
    check_any_length(path, graph, made_up_rows(names, MASK_NAME, length), names, MASK_NAME, length)
    return (
        graph,
        f"{', '.join(names)} take any length (was {length}; {reshapes} reshape(s), {constants} constant(s) cut, checked on 3 rows)",
    )


def made_up_rows(names: list[str], mask: str, length: int) -> dict[str, np.ndarray]:
    """Three rows of a quarter, half and all of `length` real tokens (ids 1..99, any vocabulary has them)."""
    rng = np.random.default_rng(0)
    real = [max(1, length // 4), max(1, length // 2), length]
    rows = {}
    for name in names:
        if name == mask:
            rows[name] = (np.arange(length)[None] < np.array(real)[:, None]).astype(np.int64)
        elif name == "token_type_ids":
            rows[name] = np.zeros((len(real), length), np.int64)
        else:
            rows[name] = rng.integers(1, 100, (len(real), length), dtype=np.int64)
    return rows


class DynamicSeqPass(Pass[DynamicSeqConfig]):
    """Makes a text model exported at a fixed sequence length accept any length (checked on the eval data), so each request runs at its real length."""

    name = "graph-dynamic-seq"
    kind = "graph"
    config_cls = DynamicSeqConfig

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        import onnx

        from slimserve.optimizer.passes.graph import _as_onnx

        cfg = self.config
        source = _as_onnx(artifact, context, self.name)
        model = onnx.load(str(source.path))
        found = _sequence_inputs(model, cfg.inputs, cfg.mask)
        if found is None:
            wanted = ", ".join(cfg.inputs) or " / ".join(SEQUENCE_NAMES)
            raise OptimizerError(
                f"graph-dynamic-seq: {artifact.path.name} has no token inputs ({wanted}, with the mask '{cfg.mask}') of one fixed "
                "length, INT64 [batch, seq]: nothing to make dynamic (a model that already takes any length is served "
                "padding-free as it is); name the inputs with inputs: [...] and mask: ..."
            )
        names, length = found
        reshapes, constants = rewrite(model, names, length)
        target = context.new_path(artifact.path.stem + "-dynseq", ".onnx")
        onnx.save(model, str(target))
        rows = context.dataset("data", self.name) if "data" in context.datasets else made_up_rows(names, cfg.mask, length)
        missing = [n for n in names if n not in rows]
        if missing:
            raise OptimizerError(
                f"graph-dynamic-seq: the evaluation data has no {', '.join(repr(m) for m in missing)}; it needs every token input"
            )
        context.progress(ProgressEvent(stage=self.name, fraction=0.5, message=f"checking {', '.join(names)} at their real lengths"))
        checked = check_any_length(source.path, target, rows, names, cfg.mask, length)
        context.progress(
            ProgressEvent(
                stage=self.name, fraction=1.0, message=f"any length: {checked} rows agree at their real length (fixed was {length})"
            )
        )
        return source.derive(
            target, dynamic_sequence=f"{','.join(names)} (was {length}; {reshapes} reshape(s), {constants} constant(s) cut)"
        )


def any_length_first(source: Artifact, work: PassContext, progress: PassContext, stage: str) -> tuple[Artifact, str]:
    """The artifact later passes start from: a fixed-length text export (ONNX) made any length by this pass, checked
    exactly, so the variants they make run each request at its real length when served (`auto`'s ONNX candidates, and a
    recipe whose first pass is a graph pass: optimizer/pipeline.py). (source, "") when there is nothing to rewrite;
    (source, "kept fixed: why") when the pass refuses, said in `progress` under `stage` too; else (made, "any length: ...")."""
    if source.format != "onnx" or fixed_sequence(source.path) is None:
        return source, ""
    progress.progress(ProgressEvent(stage=stage, fraction=0.0, message="graph-dynamic-seq: a fixed sequence length, made any length"))
    try:
        made = DynamicSeqPass(DynamicSeqConfig()).run(source, work)
    except OptimizerError as e:
        progress.progress(ProgressEvent(stage=stage, fraction=0.0, message=str(e)))
        return source, f"kept fixed: {e}"
    return made, f"any length: {made.notes.get('dynamic_sequence', '')}"
