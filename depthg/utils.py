"""Small shared helpers: errors, atomic writes, safe checkpoint loading, devices and seeds.

Every file the workbench writes goes through :func:`atomic_write` or :func:`atomic_torch_save`: the data
lands under a temporary name in the same folder and is renamed into place, so a killed run never leaves
a half-written file behind (design.md, Conventions).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch


class DepthGError(Exception):
    """Base class of the workbench's own errors (bad input, missing files, unsafe checkpoints)."""


class UnsafeCheckpointError(DepthGError, pickle.UnpicklingError):
    """A checkpoint needs arbitrary unpickling; the workbench refuses to execute it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a ``torch.save`` file with ``weights_only=True``.

    Files that would need arbitrary unpickling (custom classes, lambdas, ...) are refused with
    :class:`UnsafeCheckpointError`; nothing in them is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling, which can execute code "
            f"(torch.load weights_only=True said: {str(err).splitlines()[0]}). Re-save it as a plain "
            "state_dict of tensors or as .safetensors."
        ) from None


def get_device(pref: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(pref, torch.device):
        return pref
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DepthGError(f"device={pref!r} was requested but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (used to tie results JSONs to checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
