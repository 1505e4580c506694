"""Shared helpers: errors, atomic writes and builds, file identity, safe checkpoint loading, devices, the
repository root.

Every file is written under a temporary name and renamed into place (:func:`atomic_write`); derived
folders are built under a lock (:func:`build_lock`) in ``<folder>.partial`` and swapped in whole
(:func:`publish_dir`), so a killed run or a second process never leaves or sees half an artefact.
A command holds its output folder for as long as it runs (:func:`folder_lock`) and never writes over what it
did not make (:func:`owned_output`); JSON it writes is strict (:func:`json_text`); a source file is known by
its content (:func:`file_digest`); large files reserve their disk space first (:func:`allocate_file`).
Long CPU work runs on worker processes that cannot deadlock the run (:func:`pool_map`); each stage of a run
records where its time went (:func:`timed`, :class:`StageClock`).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import re
import shlex
import shutil
import sys
import tempfile
import time
import zipfile
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
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


def command_line(program: str, argv: Sequence[str] | None = None) -> str:
    """The shell command that reruns ``program`` (e.g. ``"python benchmarks/gpu.py"``) with ``argv`` (default:
    this process's arguments), for a report: each word quoted for a POSIX shell, and a path under the home
    folder written ``~/...``, so the report can be pasted back and names no one's machine."""
    home = str(Path.home())
    words = []
    for word in sys.argv[1:] if argv is None else argv:
        if word == home:
            words.append("~")
        elif word.startswith(home + os.sep):
            # the tilde stays unquoted before the first slash, so the shell still expands it
            words.append("~/" + shlex.quote(word[len(home) + 1:]))
        else:
            words.append(shlex.quote(word))
    return " ".join([program, *words])


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


# ------------------------------------------------------------------------------------------------
# Worker processes
# ------------------------------------------------------------------------------------------------
_POOL_SHARED: Any = None  # in a worker of :func:`pool_map`: the ``shared`` value its pool was started with


def _pool_init(shared: Any) -> None:
    """A worker's start: keep ``shared``; one torch thread (the pool is the parallelism)."""
    global _POOL_SHARED
    _POOL_SHARED = shared
    torch.set_num_threads(1)


def _pool_call(fn: Callable[[Any, _T], _R], item: _T) -> _R:
    return fn(_POOL_SHARED, item)


def _pool_ready(_shared: Any, _item: Any) -> int:
    return os.getpid()


#: How long :func:`pool_map`'s workers may take to start (a fresh interpreter importing torch; seconds).
POOL_START_TIMEOUT_S = 120.0


def pool_context(preload: Iterable[str] = ()) -> multiprocessing.context.BaseContext:
    """The start method of :func:`pool_map`'s workers: "forkserver" where the platform has it (workers are forked
    from a fresh server process that imported ``preload`` once, never from a process whose torch threads are
    running), else "spawn". ``preload`` counts only when the server is started (the first pool of a process)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: kill its workers (a hung one too), cancel what has not started, wait for nothing."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool: ProcessPoolExecutor, fn: Callable[[Any, _T], _R], x: _T) -> Future[_R]:
    """``pool.submit``; a worker process that cannot be started breaks the pool (errors of ``fn`` itself do not)."""
    try:
        return pool.submit(_pool_call, fn, x)
    except OSError as err:
        raise BrokenProcessPool(f"cannot start a worker process ({err})") from err


def pool_map(fn: Callable[[Any, _T], _R], items: Iterable[_T], workers: int = 0, *, shared: Any = None,
             timeout_s: float | None = None, what: str = "tasks") -> Iterator[_R]:
    """``fn(shared, x)`` for each ``x`` of ``items``, yielded in the order of ``items``; on ``workers`` processes
    when ``workers`` > 1, else in this process (the same function: the same results).

    ``fn`` is a module-level function (workers import it by name; its module is preloaded by the fork server,
    :func:`pool_context`); ``shared`` (a dataset, settings) is sent once to each worker, ``items`` one by one
    and lazily: at most ``2 * workers`` are in flight, so neither inputs nor results pile up. No deadlock: a
    worker that dies, a pool that does not start within :data:`POOL_START_TIMEOUT_S`, or a task not done
    within ``timeout_s`` seconds ends the pool (its workers are killed) and the unfinished items run in this
    process, with one line on stderr. Workers import the caller's main module, as with every 'spawn' or
    'forkserver' pool: a script calling this needs an ``if __name__ == "__main__":`` guard.
    """
    if workers <= 1:
        for x in items:
            yield fn(shared, x)
        return
    taken: deque[_T] = deque()  # items drawn from `items` and not yet yielded, in order
    futures: deque[Future[_R]] = deque()  # their results, one per item that reached the pool
    source = iter(items)
    pool = ProcessPoolExecutor(workers, mp_context=pool_context([fn.__module__]), initializer=_pool_init,
                               initargs=(shared,))
    healthy = False
    try:
        _submit(pool, _pool_ready, None).result(timeout=POOL_START_TIMEOUT_S)
        for x in source:
            # the item is recorded before it is submitted: a pool found broken by this submit still owes it
            taken.append(x)
            futures.append(_submit(pool, fn, x))
            while len(futures) >= 2 * workers:
                yield futures[0].result(timeout=timeout_s)
                futures.popleft()
                taken.popleft()
        while futures:
            yield futures[0].result(timeout=timeout_s)
            futures.popleft()
            taken.popleft()
        healthy = True
    except (BrokenProcessPool, FutureTimeout) as err:
        why = f"no result within {timeout_s} s" if isinstance(err, FutureTimeout) else f"{type(err).__name__}: {err}"
        if isinstance(err, FutureTimeout) and not taken:
            why = (f"not started within {POOL_START_TIMEOUT_S:.0f} s; a script that starts worker processes needs an "
                   "`if __name__ == \"__main__\":` guard, as its workers import it")
        note(f"{what}: the pool of {workers} worker processes failed ({why}); finishing in this process")
        _kill_pool(pool)
        for x in taken:
            yield fn(shared, x)
        for x in source:
            yield fn(shared, x)
    finally:
        if healthy:
            pool.shutdown(wait=True)
        else:  # failed, or the caller stopped early: nothing more is wanted from the workers
            _kill_pool(pool)


# ------------------------------------------------------------------------------------------------
# Where the time went
# ------------------------------------------------------------------------------------------------
@dataclass
class StageMark:
    """What a stage reports about itself while it runs: ``cached`` = it found its artefact up to date."""

    cached: bool = False


@dataclass
class _OpenStage:
    label: str
    start: float
    rename: dict[str, str]
    mark: StageMark
    inner: float = 0.0  # seconds of the stages run inside this one


@dataclass
class StageClock:
    """Wall seconds per stage of one run, in the order the stages first ran, recorded by :func:`timed` where
    each stage runs. A stage run inside another counts for itself: its time is taken off the outer stage.

    ``clock = StageClock().start()`` (or ``with StageClock() as clock``) makes it the clock that :func:`timed`
    records into (in this thread), ``clock.stop()`` ends that; ``clock.summary()`` is the one-line account.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)  # stage -> every run of it found its artefact
    t0: float = field(default_factory=lambda: time.perf_counter())
    _open: list[_OpenStage] = field(default_factory=list)
    _token: Any = None

    def start(self) -> "StageClock":
        self._token = _ACTIVE_CLOCK.set(self)
        return self

    def stop(self) -> None:
        if self._token is not None:
            _ACTIVE_CLOCK.reset(self._token)
            self._token = None

    def __enter__(self) -> "StageClock":
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def enter(self, stage: str, rename: dict[str, str] | None) -> _OpenStage:
        outer = self._open[-1] if self._open else None
        label = outer.rename.get(stage, stage) if outer is not None else stage
        opened = _OpenStage(label, time.perf_counter(), dict(rename or {}), StageMark())
        self._open.append(opened)
        self.seconds.setdefault(label, 0.0)  # the summary lists the stages in the order they started
        return opened

    def exit(self, opened: _OpenStage) -> None:
        elapsed = time.perf_counter() - opened.start
        self._open.remove(opened)
        if self._open:
            self._open[-1].inner += elapsed
        self.seconds[opened.label] = self.seconds.get(opened.label, 0.0) + elapsed - opened.inner
        self.cached[opened.label] = self.cached.get(opened.label, True) and opened.mark.cached

    def summary(self) -> str:
        """``time: depth 0.0 s (cached), five-crop 3.1 s, ..., other 1.2 s (total 55.0 s)``."""
        total = time.perf_counter() - self.t0
        parts = [f"{name} {_seconds(s)}" + (" (cached)" if self.cached.get(name) else "")
                 for name, s in self.seconds.items()]
        parts.append(f"other {_seconds(max(total - sum(self.seconds.values()), 0.0))}")
        return f"time: {', '.join(parts)} (total {_seconds(total)})"


_ACTIVE_CLOCK: contextvars.ContextVar[StageClock | None] = contextvars.ContextVar("depthg_stage_clock", default=None)


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min"


@contextlib.contextmanager
def timed(stage: str, rename: dict[str, str] | None = None) -> Iterator[StageMark]:
    """Record the block's wall time as ``stage`` in the active :class:`StageClock` (nothing without one); set
    ``mark.cached = True`` on the yielded mark when the stage found its artefact up to date. ``rename`` relabels
    stages run inside this one (``{"evaluation": "validation"}``). Also a decorator: ``@timed("kNN")``."""
    clock = _ACTIVE_CLOCK.get()
    if clock is None:
        yield StageMark()
        return
    opened = clock.enter(stage, rename)
    try:
        yield opened.mark
    finally:
        clock.exit(opened)
@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` (None: left as it is) inside the block, restored afterwards."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def file_identity(path: str | os.PathLike) -> list[Any]:
    """``[size, sha256]`` of a file: what a cache records about a source to notice that it changed.

    The content digest (:func:`file_digest`) catches an edit that keeps the size and the modification time
    (``touch -r``, archives with fixed times); a file that was only touched keeps its identity.
    """
    return [int(os.stat(path).st_size), file_digest(path)]


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


def transient_bar_leave() -> bool:
    """``leave`` for a progress bar that only matters while it runs (an evaluation pass, a cache build).

    In a terminal it is erased when done (False). Under a Jupyter kernel ``tqdm.auto`` draws a widget, and a
    closed widget leaves an output behind that a saved notebook cannot draw again ("Error displaying widget:
    model not found"), so there the finished bar stays (True) and is saved with the notebook.
    """
    from tqdm import auto, notebook

    return issubclass(auto.tqdm, notebook.tqdm)


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


# ------------------------------------------------------------------------------------------------
# Strict JSON: what every results file and the CLI's stdout are written with
# ------------------------------------------------------------------------------------------------
def json_ready(value: Any) -> Any:
    """``value`` as plain JSON values: NaN and +-inf become None (null: "no value", e.g. the IoU of a class
    absent from the split), numpy and torch scalars and arrays plain numbers and lists, paths strings, anything
    else its ``str``."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return json_ready(value.tolist())
    return str(value)


def json_text(value: Any, indent: int | None = 2, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (:func:`json_ready`): no ``NaN`` or ``Infinity``, which strict parsers reject."""
    return json.dumps(json_ready(value), indent=indent, allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2, **kwargs: Any) -> Path:
    """Write :func:`json_text` of ``value`` to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path, "w") as handle:
        handle.write(json_text(value, indent=indent, **kwargs) + "\n")
    return Path(path)


def read_json_strict(text: str, where: str) -> Any:
    """Parse JSON text, refusing a key given twice in one object (the second would silently win) and the
    non-standard constants NaN and Infinity. Raises :class:`DepthGError` naming ``where``."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise DepthGError(f"{where}: the key {key!r} is given twice; keep one")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise DepthGError(f"{where}: {name} is not valid JSON; write null or a number")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as err:
        raise DepthGError(f"{where} is not valid JSON: {err}") from None


# ------------------------------------------------------------------------------------------------
# Output folders: one command at a time, never over what a command did not make
# ------------------------------------------------------------------------------------------------
class FolderBusyError(DepthGError, BlockingIOError):
    """Another command holds the folder a command wants to write into."""


class OutputNotOwnedError(DepthGError, FileExistsError):
    """An output path holds files the command did not make."""


#: the lock file :func:`folder_lock` keeps inside a folder (never counted as a file of the folder)
FOLDER_LOCK = ".depthg-lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``folder`` for one command: a second command on it is refused at once (not made to wait), so two
    runs never write into one folder. The folder is created when missing, and removed again at the end when
    the command left nothing in it. The lock is the kernel's (``flock``): a killed command releases it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputNotOwnedError(f"the {what} {folder} is a file; expected a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / FOLDER_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderBusyError(f"another command is writing into the {what} {folder} (it holds {folder / FOLDER_LOCK}); "
                              "wait for it to finish, or choose another folder") from None
    try:
        yield folder
    finally:
        lock.release()
        if created and [p.name for p in folder.iterdir()] == [FOLDER_LOCK]:
            (folder / FOLDER_LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()


#: the name of a temporary file of :func:`atomic_write` (``tempfile.mkstemp``: ``.<name>.<8 random>.tmp``)
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def owned_output(path: str | os.PathLike, what: str, ours: str | Callable[[Path], bool]) -> Path:
    """``path``, when a command may write there: it does not exist, is an empty folder, or is ``ours`` -- a
    folder holding the marker (or manifest) file named ``ours``, or a file or folder the predicate ``ours``
    accepts. Anything else holds files the command did not make: :class:`OutputNotOwnedError`, nothing touched.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    if path.is_dir():  # the lock and the temporary files of atomic_write (a killed write) do not count
        names = sorted(p.name for p in path.iterdir() if p.name != FOLDER_LOCK and not _TEMPORARY.fullmatch(p.name))
        if not names:
            return path
        mine = (path / ours).is_file() if isinstance(ours, str) else ours(path)
        held = f"{len(names)} file(s) ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
    else:
        mine = not isinstance(ours, str) and ours(path)
        held = "a file"
    if not mine:
        marker = f" (no {ours})" if isinstance(ours, str) else ""
        raise OutputNotOwnedError(f"refusing to write the {what} {path}: it holds {held} that this command did not "
                                  f"make{marker}; choose another path, or move those files away")
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left in ``folder`` when its process was killed
    (``.<name>.<random>.tmp``). Only for a folder the caller holds (:func:`folder_lock`), where no other
    process is writing."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file() and _TEMPORARY.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


# ------------------------------------------------------------------------------------------------
# Content digests of source files, and what they cost
# ------------------------------------------------------------------------------------------------
#: digests of files hashed in this process (or read from a memo file): "device:inode" -> (size, modification
#: time, inode change time; sha256). Keyed by the inode, so a folder renamed into place keeps its entries.
_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}
_NEW_DIGESTS: set[str] = set()  # keys learnt since the memo was last saved
#: a file changed more recently than this is hashed again next time: a second write within the same clock tick
#: would leave every time stamp as it was (git calls such entries "racy")
_RACY_NS = 2_000_000_000


def _memo_key(st: os.stat_result) -> tuple[str, tuple[int, ...]]:
    return f"{st.st_dev}:{st.st_ino}", (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, hashed once per version of the file.

    The digest is remembered with the file's device, inode, size, modification time and inode change time:
    while all of them stay the same the file is not read again. Any write changes the inode change time, which
    no tool sets back (``touch -r``, ``cp -p`` and archives restore only the modification time), so an edited
    file is always hashed again. What this costs on a Cityscapes-sized tree: ``benchmarks/digest.py``.
    """
    st = os.stat(path)
    key, sig = _memo_key(st)
    known = _DIGESTS.get(key)
    if known is not None and known[0] == sig:
        return known[1]
    value = sha256_file(path)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        _DIGESTS[key] = (sig, value)
        _NEW_DIGESTS.add(key)
    return value


def remember_digest(path: str | os.PathLike, value: str) -> None:
    """Record the SHA-256 ``value`` of a file the caller has just written itself (under its folder's lock, where
    nothing else writes), so checking it later does not read it again."""
    key, sig = _memo_key(os.stat(path))
    _DIGESTS[key] = (sig, value)
    _NEW_DIGESTS.add(key)


#: the file in ``cache_dir`` where the digests of the files a preparation read are kept (:func:`load_digests`)
DIGEST_MEMO = "file_digests.json"


def load_digests(memo: str | os.PathLike) -> None:
    """Remember the digests stored in ``memo`` (written by :func:`save_digests`); a missing or unreadable memo
    only means that files are hashed again."""
    try:
        data = json.loads(Path(memo).read_text())
        entries = data["files"] if data.get("algorithm") == "sha256" else {}
        for key, (*sig, value) in entries.items():
            _DIGESTS.setdefault(str(key), (tuple(int(v) for v in sig), str(value)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return


def save_digests(memo: str | os.PathLike) -> None:
    """Store the digests known to this process in ``memo``, so the next process does not hash unchanged
    files again; skipped when nothing new was learnt, and where ``memo`` cannot be written (a read-only cache)."""
    if not _NEW_DIGESTS:
        return
    files = {key: [*sig, value] for key, (sig, value) in _DIGESTS.items()}
    with contextlib.suppress(OSError):
        with atomic_write(memo, "w") as handle:
            json.dump({"algorithm": "sha256", "files": files}, handle)
        _NEW_DIGESTS.clear()


# ------------------------------------------------------------------------------------------------
# Disk space
# ------------------------------------------------------------------------------------------------
class DiskFullError(DepthGError, OSError):
    """Not enough free disk space for a file a command is about to write."""


def allocate_file(path: str | os.PathLike, nbytes: int, what: str) -> Path:
    """Create ``path`` with ``nbytes`` of disk space reserved (zeros), before anything is written into it, so a
    full disk is a clear error now, not a crash (SIGBUS) when a memory map later touches a page that has no
    block. Where the file system cannot reserve space, the free space is checked instead."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            if not hasattr(os, "posix_fallocate"):
                raise OSError(errno.EOPNOTSUPP, "posix_fallocate is not available")
            if nbytes > 0:
                os.posix_fallocate(fd, 0, nbytes)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS) or \
                    shutil.disk_usage(path.parent).free < nbytes:
                raise _disk_full(path, nbytes, what, err) from None
            os.ftruncate(fd, nbytes)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


def _disk_full(path: Path, nbytes: int, what: str, err: OSError) -> OSError:
    """The error for a reservation that failed: :class:`DiskFullError` when the disk is full, else ``err``."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
        return err
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(f"not enough disk space for the {what} {path}: it needs {nbytes / 2**30:.2f} GiB, "
                         f"{free / 2**30:.2f} GiB are free; free some space or choose another folder")
