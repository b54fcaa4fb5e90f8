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

from dataclasses import dataclass

import numpy as np

from slimserve.optimizer.base import Artifact, ConfigValueError, OptimizerError, Pass, PassConfig, PassContext, ProgressEvent
from slimserve.optimizer.catalog import register
from slimserve.optimizer.formats.sequence_axis import MASK_NAME, SEQUENCE_NAMES, TOLERANCE, relative_difference, trailing_lengths

SYMBOL = "sequence"
ROWS_CHECKED = 16  # evaluation rows run one by one at their real length


@dataclass(frozen=True)
class DynamicSeqConfig(PassConfig):
    """inputs: the token inputs with the sequence on axis 1 (empty: input_ids, attention_mask, token_type_ids as present);
    mask: the attention mask among them (its ones give each row's real length)."""

    inputs: tuple[str, ...] = ()
    mask: str = MASK_NAME

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


def rewrite(model, names: list[str], length: int) -> int:
    """Makes the sequence dimension symbolic in place; returns how many Reshape targets were made to copy it."""
    from onnx import numpy_helper

    for value in model.graph.input:
        if value.name in names:
            value.type.tensor_type.shape.dim[1].dim_param = SYMBOL
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value") and dims[1].dim_value == length:
            dims[1].dim_param = SYMBOL
    del model.graph.value_info[:]
    constants = {t.name: t for t in model.graph.initializer}
    constants |= {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        tensor = constants[node.input[1]]
        target = numpy_helper.to_array(tensor)
        if target.ndim == 1 and len(target) >= 2 and target[1] == length:
            target = target.copy()
            target[1] = 0  # Reshape: 0 copies the input's dimension
            tensor.CopyFrom(numpy_helper.from_array(target, tensor.name))
            rewritten += 1
    return rewritten


def check_any_length(fixed_path, dynamic_path, rows: dict[str, np.ndarray], names: list[str], mask: str, length: int) -> int:
    """Runs each row at its real length on the new graph against the fixed one at full length; returns the rows checked.
    Raises OptimizerError naming the output, the length and the difference when they disagree beyond TOLERANCE."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    fixed = ort.InferenceSession(str(fixed_path), options, providers=["CPUExecutionProvider"])
    dynamic = ort.InferenceSession(str(dynamic_path), options, providers=["CPUExecutionProvider"])
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


@register
class DynamicSeqPass(Pass):
    name = "graph-dynamic-seq"
    config_cls = DynamicSeqConfig
    summary = "makes a text model exported at a fixed sequence length accept any length (checked on the eval data), so each request runs at its real length"

    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        import onnx

        from slimserve.optimizer.passes.graph import _as_onnx

        cfg: DynamicSeqConfig = self.config
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
        reshapes = rewrite(model, names, length)
        target = context.new_path(artifact.path.stem + "-dynseq", ".onnx")
        onnx.save(model, str(target))
        rows = context.dataset("data", self.name) if "data" in context.datasets else made_up_rows(names, cfg.mask, length)
        missing = [n for n in names if n not in rows]
        if missing:
            raise OptimizerError(f"graph-dynamic-seq: the evaluation data has no {', '.join(repr(m) for m in missing)}; it needs every token input")
        context.progress(ProgressEvent(stage=self.name, fraction=0.5, message=f"checking {', '.join(names)} at their real lengths"))
        checked = check_any_length(source.path, target, rows, names, cfg.mask, length)
        context.progress(
            ProgressEvent(stage=self.name, fraction=1.0, message=f"any length: {checked} rows agree at their real length (fixed was {length})")
        )
        return source.derive(target, dynamic_sequence=f"{','.join(names)} (was {length}; {reshapes} reshape(s) rewritten)")
