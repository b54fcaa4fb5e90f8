"""Padding-free serving of transformers: a request runs at its real length, not at the length its client padded to.

A text model with a sequence axis and an attention mask (`input_ids` / `attention_mask` / `token_type_ids`, INT64
`[batch, seq]`, detected by name, or declared at register) gets a `SequencePlan`. Before a request is batched, its
trailing padding is cut: every sequence input keeps the first `keep` positions, where `keep` is the longest real length
of its rows (the mask's ones) rounded up to a multiple of `BUCKET`, so that requests of similar length share a batching
key and merge (`assembly.batch_key` keys on the shapes) while a batch is never padded to a much longer member. The
outputs whose axis 1 is the sequence are padded back with zeros to the length the client sent (the positions a client
padded are not text: sentence-transformers and Text Embeddings Inference ignore them too). Pooled outputs
(`[batch, hidden]`) come back as computed.

A request whose mask is not 0/1 with trailing padding (a left-padded batch, a row with no token, a mask of other
values) is served at the length it was sent, as before. `verify` checks at load that cutting changes nothing beyond
`TOLERANCE` on made-up rows; a model that fails it (one that reads padded positions) is served padded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from slimserve.optimizer.formats.sequence_axis import (
    BUCKET,
    MASK_NAME,
    SEQUENCE_NAMES,
    TOLERANCE,
    declaration_problem,
    kept_length,
    relative_difference,
    trailing_lengths,
)
from slimserve.server.errors import InvalidArgument
from slimserve.server.runtimes.base import TensorSpec

log = logging.getLogger(__name__)

# A graph that quantizes activations per call (dynamic INT8) cannot cut exactly: the cut must keep this cosine to the
# padded answer in every row (`verify`).
QUANTIZED_COSINE = 0.98
# ONNX operators whose scales come from each call's activations, padded positions included.
PER_CALL_QUANTIZATION = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLSTM"})

# BUCKET (optimizer/formats/sequence_axis.py, where `auto`'s timing reads it too): real lengths are rounded up to a multiple
# of it, so requests of similar length merge into one batch, at a cost of at most 7 positions a request (MiniLM on
# sentences of 29 tokens on average: 3.8x faster per request than padded to 128, `python -m bench.bench_sequence`, which
# cuts as the server does). Not tuned: 8 is a guess between merging and waste.


@dataclass(frozen=True)
class SequencePlan:
    """Which inputs carry the sequence on axis 1, the mask among them, and the outputs padded back on axis 1."""

    inputs: tuple[str, ...]
    mask: str
    outputs: tuple[str, ...]
    bucket: int = BUCKET

    def cut(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, int] | None:
        """The inputs cut to their real length (rounded up to the bucket), the length sent and the length kept; None when
        nothing is cut (no padding to drop, or a mask that is not 0/1 trailing padding: served as sent)."""
        mask = inputs.get(self.mask)
        if mask is None or mask.ndim != 2 or mask.shape[0] < 1:
            return None
        full = mask.shape[1]
        if full <= self.bucket:
            return None
        lengths = trailing_lengths(mask)
        if lengths is None:
            return None
        keep = kept_length(lengths, full, self.bucket)
        if keep >= full:
            return None
        cut = dict(inputs)
        for name in self.inputs:
            array = inputs.get(name)
            if array is None or array.shape[:2] != mask.shape:  # shapes the input check let through but that disagree
                return None
            cut[name] = np.ascontiguousarray(array[:, :keep])
        return cut, full, keep

    def pad_back(self, outputs: dict[str, np.ndarray], full: int, keep: int) -> dict[str, np.ndarray]:
        """Outputs along the sequence padded back with zeros from `keep` to `full` positions on axis 1."""
        if not self.outputs:
            return outputs
        padded = dict(outputs)
        for name in self.outputs:
            array = outputs.get(name)
            if isinstance(array, np.ndarray) and array.ndim >= 2 and array.shape[1] == keep:
                out = np.zeros((array.shape[0], full, *array.shape[2:]), dtype=array.dtype)
                out[:, :keep] = array
                padded[name] = out
        return padded


def plan_for(
    inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec], declared: dict | None = None, where: str = ""
) -> SequencePlan | None:
    """The plan of a runtime's tensors: the declared sequence inputs and mask, else those named as in `SEQUENCE_NAMES`.

    A declaration that does not fit the tensors raises InvalidArgument naming the input and its shape; detected names
    that do not fit (not INT64 [batch, seq], a fixed sequence length) give no plan: the model is served padded."""
    inputs, outputs = list(inputs), list(outputs)
    by_name = {s.name: s for s in inputs}
    if declared:
        names = tuple(declared.get("inputs") or ())
        mask = str(declared.get("mask") or "")
        check_declared(by_name, names, mask)
    else:
        names = tuple(n for n in SEQUENCE_NAMES if n in by_name)
        mask = MASK_NAME
        if mask not in names:
            return None
        unfit = [f"'{n}' {_describe(by_name[n])}" for n in names if not _is_sequence(by_name[n])]
        if unfit:
            log.info("%s: not served padding-free: %s (wanted INT64 [batch, seq])", where or "model", "; ".join(unfit))
            return None
    fixed = [f"'{n}' {_describe(by_name[n])}" for n in names if by_name[n].shape[1] != -1]
    if fixed:
        log.info(
            "%s: not served padding-free: a fixed sequence length on %s; `graph-dynamic-seq` makes it accept any length",
            where or "model",
            ", ".join(fixed),
        )
        return None
    along = tuple(s.name for s in outputs if len(s.shape) >= 2 and s.shape[1] == -1)
    return SequencePlan(names, mask, along)


def check_declared(by_name: dict[str, TensorSpec], names: tuple[str, ...], mask: str) -> None:
    """A declared sequence: every input exists and is INT64 [batch, seq], the mask one of them."""
    problem = declaration_problem({n: (s.datatype, s.shape) for n, s in by_name.items()}, names, mask)
    if problem:
        raise InvalidArgument(f"sequence: {problem}")


def _is_sequence(spec: TensorSpec) -> bool:
    return len(spec.shape) == 2 and spec.datatype == "INT64"


def _describe(spec: TensorSpec) -> str:
    return f"{spec.datatype} [{','.join(str(d) for d in spec.shape)}]"


def verify(
    predict: Callable[[dict[str, np.ndarray], list[str] | None], dict[str, np.ndarray]],
    plan: SequencePlan,
    length: int = 64,
    quantized: bool = False,
) -> str:
    """Why cutting is wrong for this model ('' when it is not): two made-up rows of 11 and 5 tokens padded to `length`,
    run padded and cut; every output compared (sequence outputs on the real positions) within `TOLERANCE`.

    `quantized`: the graph quantizes activations with scales measured on each call (dynamic INT8), so the padded
    positions move every scale and no cut is exact; the cut answer then needs a cosine of `QUANTIZED_COSINE` to the
    padded one in every row, within INT8's own noise (MiniLM dynamic INT8: cut and padded are equally close to FP32,
    mean cosine 0.992 both), while a model that reads its padding moves far more."""
    rng = np.random.default_rng(0)
    rows, real = 2, (11, 5)
    feed = {}
    for name in plan.inputs:
        if name == plan.mask:
            feed[name] = np.zeros((rows, length), dtype=np.int64)
            for i, n in enumerate(real):
                feed[name][i, :n] = 1
        elif name == "token_type_ids":
            feed[name] = np.zeros((rows, length), dtype=np.int64)
        else:  # ids: small ones, which any vocabulary has
            feed[name] = rng.integers(1, 100, size=(rows, length), dtype=np.int64)
    cut = plan.cut(feed)
    if cut is None:
        return ""
    trimmed, full, keep = cut
    try:
        padded_out = predict(feed, None)
        cut_out = plan.pad_back(predict(trimmed, None), full, keep)
    except Exception as e:  # made-up ids the model refuses (a smaller vocabulary): no evidence either way
        return f"made-up token rows failed ({type(e).__name__}: {str(e)[:200]})"
    for name, want in padded_out.items():
        got = cut_out.get(name)
        if not isinstance(want, np.ndarray) or not np.issubdtype(want.dtype, np.floating):
            continue
        if name in plan.outputs and want.ndim >= 2:
            want, got = want[:, : max(real)], got[:, : max(real)]
            mask = np.zeros(want.shape[:2], dtype=bool)
            for i, n in enumerate(real):
                mask[i, :n] = True
            want, got = want[mask], got[mask]
        if quantized:
            a, b = want.reshape(len(want), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            cosine = float(((a * b).sum(1) / np.where(norms > 0, norms, 1.0)).min())
            if cosine < QUANTIZED_COSINE:
                return f"output '{name}' keeps a cosine of only {cosine:.4f} to the padded answer when its padding is cut (< {QUANTIZED_COSINE:g})"
            continue
        difference = relative_difference(want, got)
        if difference > TOLERANCE:
            return f"output '{name}' differs by {difference:.2e} (relative) when its padding is cut (> {TOLERANCE:g})"
    return ""


def quantizes_per_call(path) -> bool:
    """Whether an ONNX file quantizes activations with per-call scales (dynamic INT8); False for other formats."""
    if str(path).endswith(".onnx"):
        try:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # the runtime loaded it: a file onnx cannot parse here is no evidence either way
            return False
        return any(node.op_type in PER_CALL_QUANTIZATION for node in model.graph.node)
    return False
