"""Loading checkpoint files without running code from them.

A ``torch.save`` file is a pickle: loaded without ``weights_only`` it can run any code its author put in it.
Everything here loads with safetensors or ``torch.load(weights_only=True)``, whose unpickler only rebuilds
tensors, containers and primitive types, plus the few NumPy types a NumPy RNG state needs (a ``uint32``
array and its dtype; no function of NumPy that could run code).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds objects outside the ``weights_only`` allowlist; it was not loaded."""


def _numpy_allowlist() -> list[Any]:
    """What ``np.random.get_state()`` pickles to: ndarray reconstruction, ndarray, dtype and the uint32 dtype."""
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed np.core to np._core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed.append(type(np.dtype(np.uint32)))
    return allowed


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """Loads a ``.safetensors`` or ``torch.save`` file to CPU without executing anything from it.

    Args:
        path (str | Path): the file.
        mmap (bool): memory-map tensors (``torch.save`` files only). Default: False

    Returns:
        Any: the stored object (a dict of CPU tensors for safetensors).

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file needs globals outside the allowlist (e.g. an embedded payload).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals(_numpy_allowlist()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message is long; keep the line that names the offending global.
        detail = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects a weights-only load does not allow ({detail or 'see torch'}). "
            "Checkpoints are only loaded with weights_only=True; re-save the file as plain tensors/containers "
            "(or safetensors) from a trusted environment"
        ) from None
