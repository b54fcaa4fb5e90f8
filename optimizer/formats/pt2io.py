"""Safe loading of `torch.export` archives (.pt2): torch's reader with every unpickling path closed."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from typing import Any

import torch

from slimserve.optimizer.base import UnsafeArchiveError


class _NoUnpickling:
    """Stands in for the `pickle` module inside torch's archive reader: every load is refused."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def loads(*_args: Any, **_kwargs: Any) -> Any:
        raise UnsafeArchiveError("the archive holds a pickled Python object (an opaque constant)")

    load = loads


class _SafeTorchC:
    def __getattr__(self, name: str) -> Any:
        return getattr(torch._C, name)

    @staticmethod
    def _pickle_load_obj(*_args: Any, **_kwargs: Any) -> Any:
        raise UnsafeArchiveError("the archive holds a pickled TorchScript object (a custom class constant)")


class _SafeTorch:
    """Stands in for `torch` inside torch's archive reader: every torch.load is weights_only=True."""

    _C = _SafeTorchC()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return torch.load(f, *args, **kwargs)


_LOAD_LOCK = threading.Lock()


def load_exported_program(path: str | Path) -> torch.export.ExportedProgram:
    """torch.export.load with every unpickling path closed.

    torch's reader calls torch.load(weights_only=False) for pickled weights and constants, and
    pickle.loads for opaque objects: either runs arbitrary code from the file. We swap the
    `torch` and `pickle` names those modules see for guards while the archive loads.
    """
    import torch._export.serde.serialize as serialize
    import torch.export.pt2_archive._package as package

    with _LOAD_LOCK:
        saved = (package.torch, package.pickle, serialize.torch)
        package.torch, package.pickle, serialize.torch = _SafeTorch(), _NoUnpickling(), _SafeTorch()
        try:
            return torch.export.load(str(path))
        except pickle.UnpicklingError as e:
            raise UnsafeArchiveError(f"the archive holds a pickled object that weights-only loading refuses: {e}") from e
        finally:
            package.torch, package.pickle, serialize.torch = saved
