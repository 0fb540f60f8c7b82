"""The one reader of pickle-based files: ``safe_torch_load`` (``torch.save`` files) and
``safe_pickle_load`` (plain pickles), both limited to data.

``torch.load(weights_only=True)`` already refuses every global outside torch's own tensor
rebuilding; checkpoints in the mmcv layout (and the revisited ground truth) also hold numpy arrays,
dtypes and scalars, so exactly those numpy *data* globals are allowed (``numpy_data_globals``,
under numpy 1.x and 2.x module names), never a prefix such as ``numpy.*`` (which takes in
``numpy.testing._private.utils.runstring``, an ``exec``). Anything else is refused with
``UnsafeFileError`` naming the file and the global; nothing of the file runs.
"""

from __future__ import annotations

import codecs
import collections
import functools
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from dinolab.errors import DinolabError

__all__ = ["UnsafeFileError", "numpy_data_globals", "safe_pickle_load", "safe_torch_load"]

# numpy dtype characters whose classes may appear in a pickle: bool, ints, floats, complex, bytes, str,
# void (structured), datetime/timedelta; never "O" (object arrays hold arbitrary pickled objects)
_NUMPY_DTYPE_CHARS = "?bhilqBHILQefdgFDGSUVMm"


class UnsafeFileError(DinolabError, ValueError):
    """A file pickles a global outside the data allow-list (it could run code when unpickled)."""


def numpy_data_globals() -> dict[str, Any]:
    """The numpy globals that only rebuild data, by the dotted name a pickle uses for them: ndarray
    reconstruction, ``ndarray``, ``dtype`` and its classes, and scalars, under numpy 1.x
    (``numpy.core``) and 2.x (``numpy._core``) module paths."""
    return dict(_numpy_data_globals())


@functools.lru_cache(maxsize=1)
def _numpy_data_globals() -> dict[str, Any]:
    import numpy as np

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}._reconstruct"], out[f"{mod}.scalar"] = core._reconstruct, core.scalar
    for char in _NUMPY_DTYPE_CHARS:
        cls = type(np.dtype(char))
        out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return out


def _torch_safe_globals() -> list[Any]:
    """``numpy_data_globals`` in the form ``torch.serialization.safe_globals`` takes: an object under
    its own name, or ``(object, name)`` for an alias (torch >= 2.6; older torch skips aliases)."""
    aliases = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 6)
    out = []
    for name, obj in _numpy_data_globals().items():
        if f"{obj.__module__}.{obj.__qualname__}" == name:
            out.append(obj)
        elif aliases:
            out.append((obj, name))
    return out


def _refused_globals(path: str | os.PathLike, exc: Exception) -> list[str]:
    """Globals a refused file pickles outside the allow-list (from its pickle, else from the message)."""
    allowed = _numpy_data_globals()
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001  (not a zip checkpoint)
        found = []
    refused = [g for g in found if g not in allowed]
    return refused or [a or b for a, b in re.findall(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(exc))]


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    error: type[DinolabError] = DinolabError, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with only numpy *data* globals allowed
    (``numpy_data_globals``): tensors, containers, plain Python values, numpy arrays / dtypes / scalars.

    Raises ``UnsafeFileError`` naming the file and the refused global(s) when the file pickles
    anything else (nothing of it runs), and ``error`` (one line, naming the file) when it is
    missing, truncated or not a torch file. ``mmap`` memory-maps the tensors of a zip checkpoint.
    """
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = _refused_globals(path, e)
        if refused:
            raise UnsafeFileError(
                f"refusing to load {path}: it pickles {', '.join(refused[:4])}, which is not plain data "
                "(only tensors, containers, numbers, strings and numpy arrays/dtypes/scalars are read; "
                "unpickling anything else could run code)") from None
        raise error(f"cannot read {path} as a checkpoint: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001  (truncated zips, not a torch file, unreadable file ...)
        raise error(f"cannot read {path} as a checkpoint: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# the data constructors torch's weights_only unpickler allows by default (protocol 2 pickles bytes
# as _codecs.encode(str, "latin1")); a plain pickle gets the same ones
_PICKLE_BUILTINS = {"_codecs.encode": codecs.encode, "builtins.set": set, "builtins.frozenset": frozenset,
                    "builtins.complex": complex, "builtins.bytearray": bytearray,
                    "collections.OrderedDict": collections.OrderedDict}


class _DataUnpickler(pickle.Unpickler):
    """A plain ``pickle`` reader that resolves only ``numpy_data_globals`` and ``_PICKLE_BUILTINS``."""

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        obj = _PICKLE_BUILTINS.get(key) or _numpy_data_globals().get(key)
        if obj is None:
            raise UnsafeFileError(key)
        return obj


def safe_pickle_load(path: str | os.PathLike) -> Any:
    """A plain pickle file (not a ``torch.save`` file) read with the same allow-list as
    ``safe_torch_load``; ``UnsafeFileError`` for any other global, ``DinolabError`` when unreadable."""
    try:
        return _DataUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except UnsafeFileError as e:
        raise UnsafeFileError(f"refusing to load {path}: it pickles {e}, which is not plain data (only "
                              "containers, numbers, strings and numpy arrays/dtypes/scalars are read; "
                              "unpickling anything else could run code)") from None
    except Exception as e:  # noqa: BLE001  (truncated, not a pickle, unreadable ...)
        raise DinolabError(f"cannot read {path} as a pickle file: {_first_line(e)}") from None
