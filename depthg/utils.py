"""Shared helpers: errors, atomic writes and builds, file identity, safe checkpoint loading, devices, the
repository root.

Every file is written under a temporary name and renamed into place (:func:`atomic_write`); derived
folders are built under a lock (:func:`build_lock`) in ``<folder>.partial`` and swapped in whole
(:func:`publish_dir`), so a killed run or a second process never leaves or sees half an artefact.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, TypeVar

import torch
from filelock import FileLock, Timeout


class DepthGError(Exception):
    """Base class of the workbench's own errors (bad input, missing files, unsafe checkpoints)."""


class UnsafeCheckpointError(DepthGError, pickle.UnpicklingError):
    """A checkpoint needs arbitrary unpickling; the workbench refuses to execute it."""


class CheckpointReadError(DepthGError, OSError):
    """A checkpoint file is truncated, corrupted or not a ``torch.save`` file at all."""


def note(message: str) -> None:
    """One line for the user on stderr (stdout stays clean for the CLI's JSON output)."""
    print(message, file=sys.stderr, flush=True)


_T = TypeVar("_T")
_R = TypeVar("_R")


def map_threads(fn: Callable[[_T], _R], items: Iterable[_T], workers: int = 0) -> list[_R]:
    """``[fn(x) for x in items]``, on ``workers`` threads when ``workers`` > 1 (same results, same order).

    For loading images: PNG decoding and torch's resizing release the GIL, so a GPU step that reads its
    crops from disk is not held up by one core.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; rename it onto ``path`` on success, remove it on error."""
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
    """Load a ``torch.save`` file with ``weights_only=True``; arbitrary unpickling raises UnsafeCheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    kind = _torch_file_kind(path)
    if kind != "ok":
        raise CheckpointReadError(f"cannot read checkpoint {path}: {kind}; expected a file written by torch.save")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Unsupported global" not in str(err):
            # a damaged pickle stream, not a refused class
            raise CheckpointReadError(f"cannot read checkpoint {path}: corrupted ({str(err).splitlines()[0]})") from None
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling, which can execute code "
            f"(torch.load weights_only=True said: {str(err).splitlines()[0]}). Re-save it as a plain "
            "state_dict of tensors or as .safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointReadError(f"cannot read checkpoint {path}: truncated or corrupted ({first})") from None


def _torch_file_kind(path: Path) -> str:
    """"ok" for a complete zip archive or legacy pickle, else what the file is instead (empty, truncated, text)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return f"a truncated zip archive ({size} bytes; the archive's end record is missing)"
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"a damaged zip archive ({err})"
        if bad is not None:
            return f"a damaged zip archive (member {bad} fails its CRC check)"
        return "ok"
    if head[:1] == b"\x80":  # a legacy (non-zip) torch.save pickle stream
        return "ok"
    return "not a torch checkpoint (it does not start like a torch.save file; a YAML/JSON/text file?)"


def file_identity(path: str | os.PathLike) -> list[int]:
    """``[size, mtime_ns]`` of a file: what a cache records about a source to notice that it changed."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def digest(value: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable value (sorted keys): a stable key of what made an artefact."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def build_lock(target: str | os.PathLike, what: str = "artefact") -> Iterator[None]:
    """Hold the inter-process lock ``<target>.lock`` while building ``target``; a second process waits.

    Not re-entrant across lock objects, so nested builds must lock different targets.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        note(f"waiting for another process that is building the {what} {target} ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def partial_dir(target: str | os.PathLike) -> Path:
    """The folder a build of ``target`` writes into before :func:`publish_dir` renames it into place."""
    target = Path(target)
    return target.with_name(target.name + ".partial")


def publish_dir(built: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder ``built`` to ``target`` (under :func:`build_lock`), never mixing old and new."""
    built, target = Path(built), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` is ``folder`` or lies below it (after resolving links and ``..``)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or p.is_relative_to(f)


def repo_root() -> Path:
    """The workbench's repository root (the folder holding ``depthg/`` and ``pyproject.toml``); the
    current directory when the package is installed elsewhere. Relative model paths are resolved here,
    so a notebook (run in ``notebooks/``) and the command line (run in the root) find the same folder."""
    root = Path(__file__).resolve().parents[1]  # depthg/utils.py -> the folder holding depthg/
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (used to tie results JSONs to checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
