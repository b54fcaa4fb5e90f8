"""Third-party noise filtered once, at its source: the libraries the optimizer and the runtimes call log and warn about
their own internals (torch's ONNX exporter per export, ONNX Runtime's quantizer per tensor, torch's pytree deprecation
per archive load), none of which a slimserve user can act on. `quiet_third_party()` is called by the `slimserve` entry
points and the server; it is idempotent. Anything else a library logs at WARNING or above still shows.
"""

from __future__ import annotations

import logging
import warnings

# Loggers that narrate their passes at INFO (onnxscript's optimizer, onnx_ir's pass manager, torch's exporter steps).
CHATTY = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "torchao", "torch_pruning")
# (logger, message prefix) dropped whatever the level
DROPPED = (
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),  # 4 lines per export, torchvision's ops
    ("root", "Quantization parameters for tensor"),  # onnxruntime.quantization logs one per tensor through logging.info
)
# (message regex, category) of warnings that are the libraries' business
WARNINGS = ((r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),)  # torch's pytree, per exported program loaded

_installed = False


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party() -> None:
    """Installs the filters once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in CHATTY:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
    for name, prefix in DROPPED:
        (logging.getLogger() if name == "root" else logging.getLogger(name)).addFilter(_Drop(prefix))
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
