"""ONNX Runtime: one InferenceSession per variant, on the best execution provider the node has."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as InvalidArgumentError

from slimserve.client.datatypes import DATATYPE_TO_NUMPY
from slimserve.server.errors import InvalidArgument
from slimserve.server.runtimes.base import Runtime, RuntimeConfig, TensorSpec
from slimserve.server.runtimes.ort_threads import CALL_LOAD, ThreadChoice, choose, keep, node_cores, probe_feed, read_kept

log = logging.getLogger(__name__)

# Preference order when the caller names none: TensorRT, then CUDA, then the CPU.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# ORT names its element types after numpy's, except these two; derived from the one datatype table.
_ORT_NAMES = {"float32": "float", "float64": "double"}
ORT_TYPE_TO_DATATYPE = {
    f"tensor({_ORT_NAMES.get(dtype.name, dtype.name)})": name for name, dtype in DATATYPE_TO_NUMPY.items() if name != "BYTES"
} | {"tensor(string)": "BYTES"}


# Thread choices measured in this process, by file (device, inode, size, modification time: an upload moved into the
# repository after its check keeps them) and the cores there were.
_MEASURED: dict[tuple[int, int, int, int, int], ThreadChoice] = {}


def choose_providers(config: RuntimeConfig, available: list[str] | None = None) -> list[str]:
    """The execution providers to ask for, best first, limited to what this onnxruntime build has."""
    available = list(available if available is not None else ort.get_available_providers())
    if config.device == "cpu":
        wanted = ["CPUExecutionProvider"]
    elif config.providers:
        wanted = list(config.providers)
    else:
        wanted = list(PROVIDER_PREFERENCE)
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def session_options(config: RuntimeConfig, intra_op_threads: int | None = None) -> ort.SessionOptions:
    """Options of a session; `intra_op_threads` overrides the config's (the measured choice tries counts of its own)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads if intra_op_threads is None else intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT's warnings would flood the server log
    # Idle ORT workers spin by default, burning the cores that the event loop and gRPC need
    # (measured: ~0.6 of 2 cores at 16 callers on the digits CNN). A server wants them asleep.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def spec_of(node: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TYPE_TO_DATATYPE.get(node.type)
    if datatype is None:
        raise ValueError(f"tensor '{node.name}' has type {node.type}, which the Open Inference Protocol cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape)


def as_text(name: str, array: np.ndarray) -> np.ndarray:
    """ONNX string tensors hold text: BYTES elements are decoded as UTF-8 (ORT would str() raw bytes)."""
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"input '{name}': BYTES element {i} is not UTF-8 text, which ONNX string tensors need") from None
        flat_out[i] = item
    return out


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def load(self) -> None:
        providers = choose_providers(self.config)
        graph: str | bytes = str(self.path)
        self.any_length = ""  # how a fixed-length text export was made to take any length in memory ('' when it was not)
        if self.config.any_length:
            made = self._any_length()
            if made is not None:
                graph, self.any_length = made

        def make(threads: int) -> ort.InferenceSession:
            return ort.InferenceSession(graph, sess_options=session_options(self.config, threads), providers=providers)

        # A wide session's one-thread twin: set when all cores pay for a lone call, so that calls follow the load.
        self.narrow: ort.InferenceSession | None = None
        self.wide_calls = self.narrow_calls = 0  # calls run on each (approximate under threads: for logs and tests)
        if self.config.intra_op_threads > 0:
            self.session, self.thread_choice = make(self.config.intra_op_threads), ThreadChoice(self.config.intra_op_threads, "set")
        elif providers[0] != "CPUExecutionProvider":  # GPU providers: the CPU only feeds them; the static share as before
            threads = self.config.threads_per_call
            self.session, self.thread_choice = make(threads), ThreadChoice(threads, "GPU provider: cores ÷ compute threads")
        else:
            self.session, self.thread_choice = self._measured(make)
        where = "/".join(self.path.parts[-3:])  # <model>/<variant>/<file> in a repository: every variant file has one name
        log.info("%s: %d intra-op thread(s): %s", where, self.thread_choice.threads, self.thread_choice.reason)
        actual = self.session.get_providers()
        # onnxruntime-gpu falls back to the CPU silently when CUDA cannot start; say so once.
        if providers[0] != "CPUExecutionProvider" and actual[0] != providers[0]:
            log.warning("%s: asked for %s, onnxruntime runs it on %s", self.path, providers[0], actual[0])
        self.inputs = [spec_of(n) for n in self.session.get_inputs()]
        self.outputs = [spec_of(n) for n in self.session.get_outputs()]

    def _any_length(self) -> tuple[bytes, str] | None:
        """A fixed-length text export (input_ids / attention_mask INT64 [batch, 128]) as a graph that takes any length,
        checked exactly against the file (optimizer/passes/dynamic_seq.py): the batcher then runs each request at its real
        length. None, and the file as it is, when there is nothing to rewrite or the check refuses."""
        from slimserve.optimizer.base import OptimizerError
        from slimserve.optimizer.passes.dynamic_seq import any_length_in_memory

        try:
            made = any_length_in_memory(self.path)
        except OptimizerError as e:
            log.info("%s: served at its fixed length: %s", self.path.name, e)
            return None
        except Exception as e:  # an unusual graph the rewrite does not cover: the file as it is, never a failed load
            log.warning("%s: served at its fixed length: the rewrite failed (%s: %s)", self.path.name, type(e).__name__, str(e)[:200])
            return None
        if made is not None:
            log.info("%s: %s", self.path.name, made[1])
        return made

    def _measured(self, make: Callable[[int], ort.InferenceSession]) -> tuple[ort.InferenceSession, ThreadChoice]:
        """A session with the threads measured for this file: timed at its first load, then kept beside the file
        (`<file>.threads.json`) and in this process, so a reload, a restart or another replica times nothing."""
        stat = self.path.stat()
        cores = node_cores()
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, cores)
        known = _MEASURED.get(key)
        said = "measured at an earlier load of this file"
        if known is None:
            known = read_kept(self.path, cores)
            said = f"kept in {self.path.name}.threads.json"
            if known is not None:
                _MEASURED[key] = known
        if known is not None:
            if known.threads > 1:
                self.narrow = make(1)
            return make(known.threads), replace(known, reason=f"{known.reason}; {said}")
        narrow: list[ort.InferenceSession] = []
        session, choice = choose(make, lambda s: probe_feed(s, ORT_TYPE_TO_DATATYPE), cores, narrow)
        _MEASURED[key] = choice
        if self.config.keep_threads:  # a read-only replica writes nothing into the repository
            keep(self.path, cores, choice)
        if narrow:
            self.narrow = narrow[0]
            choice = replace(
                choice, reason=f"{choice.reason}; calls follow the load: {choice.threads} threads alone, 1 with others in flight"
            )
        return session, choice

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or [o.name for o in self.outputs]
        feed = {k: as_text(k, v) if v.dtype == object else v for k, v in inputs.items()}
        try:
            if self.narrow is None:
                results = self.session.run(names, feed)
            else:
                wide = CALL_LOAD.enter()
                try:
                    if wide:
                        self.wide_calls += 1
                        results = self.session.run(names, feed)
                    else:
                        self.narrow_calls += 1
                        results = self.narrow.run(names, feed)
                finally:
                    CALL_LOAD.leave()
        except InvalidArgumentError as e:  # inputs that pass the specs but not the graph (e.g. dims that must agree)
            raise InvalidArgument(f"the model refused the inputs: {str(e).splitlines()[0][:500]}") from None
        return dict(zip(names, results))

    def unload(self) -> None:
        self.session = self.narrow = None

    @property
    def intra_op_threads(self) -> int:
        """The threads one call of this session uses: the flag's count, or the count measured at load."""
        return self.thread_choice.threads

    @property
    def config_parameters(self) -> dict[str, str]:
        # Triton's onnxruntime backend reads its thread count from this ModelConfig parameter.
        return {"intra_op_thread_count": str(self.thread_choice.threads)} if getattr(self, "thread_choice", None) else {}

    @property
    def device(self) -> str:
        session = getattr(self, "session", None)
        if session is None:
            return "unloaded"
        return {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}.get(session.get_providers()[0], "cpu")

    @property
    def inline_safe(self) -> bool:
        return self.device == "cpu"  # the CPU provider has no per-shape build step

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())
