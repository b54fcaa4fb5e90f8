"""The ONNX Runtime session every peer builds, configured as slimserve's runtime configures its own.

Kept free of slimserve imports: it runs inside the peers' virtualenvs, which hold only their server,
onnxruntime and numpy.
"""

from __future__ import annotations

import onnxruntime as ort


def make_session(path: str, intra_op_threads: int = 0, inter_op_threads: int = 0) -> ort.InferenceSession:
    """Same settings as server/runtimes/onnx.py: all graph optimizations, sequential, CPU, idle workers asleep."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
