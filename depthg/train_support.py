"""What the training loop stands on: processes, where the run writes, data order, feature sources, RNG
state and the run folder. :mod:`depthg.train` reads top to bottom (build, step, loop) and calls these.

- processes: the (optional) DDP process group that ``torchrun`` describes, and :class:`Place`, where this
  rank runs and writes;
- data order: each iteration's batch is a pure function of (seed, iteration) (:func:`batch_indices`);
- feature sources: the frozen backbone's features of the training crops, from the feature cache or
  recomputed each step (:func:`feature_source`);
- RNG state: every random stream, saved into and restored from checkpoints (exact resume);
- the run folder: what a run writes, refusing a folder that holds another run (or files no run made), holding
  it for the whole run, opening it for writing, and replacing a run only once the new one has passed a step.

docs/training.md describes the set-up order, resume and multi-process runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from depthg.build import Fidelity, TrainError, load_checkpoint
from depthg.config import Config
from depthg.data.prepare import CroppedDataset, dataset_digest, load_knn
from depthg.data.transforms import PAPER_RESIZE, Resize, resize_center_crop
from depthg.features import CacheOptions, backbone_features, build_feature_cache
from depthg.precision import Precision
from depthg.utils import (FolderBusyError, atomic_write, folder_lock, get_device, inside, map_threads, note, owned_output,
                          remove_stale_temporaries, write_json)

__all__ = [
    "DistInfo", "init_distributed", "collective_device", "broadcast_flag", "rank0_first", "Place", "setup_place",
    "batch_indices", "load_neighbours", "CropSource", "CachedSource", "feature_source", "rng_state",
    "set_rng_state", "RESUMABLE_CHANGES", "RUN_FILES", "RUN_MARKER", "KEPT_RUN_FILES", "ReplaceOwn", "run_files",
    "is_run_folder", "run_owner", "check_run_folder", "checkpoint_to_resume", "RunFolder", "trim_log", "json_default",
    "tensorboard",
]


# ----------------------------------------------------------------------------------------------------
# processes: one, or the DDP group torchrun describes; where this rank runs and writes
# ----------------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that torchrun (or a test) described in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    initialised_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        initialised_here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), initialised_here)


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where a tensor handed to a collective must live: NCCL moves only CUDA tensors, gloo CPU tensors."""
    if backend == "nccl":
        if device.type != "cuda":
            raise TrainError(f"the nccl backend moves only CUDA tensors, but the run's device is {device}")
        return device
    return torch.device("cpu")


def broadcast_flag(value: bool, device: torch.device, src: int = 0) -> bool:
    """Rank ``src``'s boolean on every rank (``value`` itself without a process group).

    The flag travels as a one-element tensor on :func:`collective_device` of the group's backend, so the
    same call works under gloo (CPU) and NCCL (the rank's CUDA device).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return value
    flag = torch.tensor([int(value)], device=collective_device(dist.get_backend(), device))
    dist.broadcast(flag, src)
    return bool(flag.item())


def rank0_first(dinfo: DistInfo, make: Callable[[], Any]) -> Any:
    """``make()`` on rank 0 first; the other ranks wait, then call it and find rank 0's files."""
    if dinfo.is_main:
        made = make()
    if dinfo.enabled:
        dist.barrier()
    if not dinfo.is_main:
        made = make()
    return made


@dataclass
class Place:
    """Where the run executes and writes: device, process group, this rank's batch rows, run folder."""

    device: torch.device
    dinfo: DistInfo
    local_b: int  # this rank's share b of the global batch
    rows: slice  # this rank's rows of the global batch: [rank * b, (rank + 1) * b)
    out_dir: Path
    progress: bool  # progress bars (rank 0 only)

    @property
    def ckpt_last(self) -> Path:
        return self.out_dir / "checkpoint_last.pt"

    @property
    def ckpt_best(self) -> Path:
        return self.out_dir / "checkpoint_best.pt"


def setup_place(cfg: Config, progress: bool) -> Place:
    """Device and (optional) DDP process group; the global batch must split evenly over the ranks."""
    device = get_device(cfg.device)
    dinfo = init_distributed(device)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
        torch.cuda.set_device(device)
    if cfg.batch_size % dinfo.world_size:
        raise TrainError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({dinfo.world_size})")
    local_b = cfg.batch_size // dinfo.world_size
    rows = slice(dinfo.rank * local_b, (dinfo.rank + 1) * local_b)
    return Place(device, dinfo, local_b, rows, Path(cfg.output_dir), progress and dinfo.is_main)


# ----------------------------------------------------------------------------------------------------
# data order: a pure function of (seed, step)
# ----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int, num_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    ranks = torch.randint(1, num_neighbors + 1, (n,), generator=gen)
    return perm, ranks


def batch_indices(step: int, n: int, batch_size: int, seed: int, nns: np.ndarray, num_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch of iteration ``step``: (anchor indices, kNN-positive indices), each (batch_size,).

    Epoch e visits a permutation of the N crops drawn from a generator seeded by (seed, e); the last
    incomplete batch is dropped. Each crop's positive is its neighbour of rank 1..num_neighbors drawn
    uniformly (rank 0 is the crop itself).
    """
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"batch_size={batch_size} is larger than the training set ({n} crops)")
    epoch, within = divmod(step, steps_per_epoch)
    perm, ranks = _epoch_order(seed, epoch, n, num_neighbors)
    idx = perm[within * batch_size : (within + 1) * batch_size]
    pos = torch.from_numpy(np.asarray(nns)[idx.numpy(), ranks[idx].numpy()].astype(np.int64))
    return idx, pos


def load_neighbours(cfg: Config, data: dict[str, Any], n_crops: int) -> np.ndarray:
    """The (N, k+1) kNN table of the training crops, checked against N and ``num_neighbors``."""
    nns, _ = load_knn(data["knn_path"])
    if nns.shape[0] != n_crops or nns.shape[1] < cfg.num_neighbors + 1:
        raise TrainError(f"kNN file {data['knn_path']} has shape {nns.shape}; expected ({n_crops}, >= "
                         f"{cfg.num_neighbors + 1}): lower num_neighbors or raise knn_k")
    return nns


# ----------------------------------------------------------------------------------------------------
# feature sources: the frozen backbone's features of the training crops
# ----------------------------------------------------------------------------------------------------
class CropSource:
    """Training crops read from disk; features computed by the frozen backbone each step."""

    def __init__(self, dataset: Any, backbone: nn.Module, res: int, device: torch.device, amp: Precision,
                 resize: Resize = PAPER_RESIZE, workers: int = 0) -> None:
        self.dataset = dataset
        self.backbone = backbone
        self.transform = partial(resize_center_crop, res=res, resize=resize)
        self.device = device
        self.amp = amp
        self.workers = workers  # threads reading and resizing the crops (0 = this thread)

    def __len__(self) -> int:
        return len(self.dataset)

    def fetch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        items = map_threads(lambda i: self.transform(self.dataset[i]), indices.tolist(), self.workers)
        img = torch.stack([it["img"] for it in items]).to(self.device)
        feats = backbone_features(self.backbone, img, self.amp)  # the feature cache's function and policy
        out = {"feats": feats, "img": img, "label": torch.stack([it["label"] for it in items]).to(self.device)}
        if "depth" in items[0]:
            out["depth"] = torch.stack([it["depth"] for it in items]).float().to(self.device)
        return out


class CachedSource:
    """Training crops' features, depth and labels from the feature cache (depthg.features)."""

    def __init__(self, cache: Any, device: torch.device) -> None:
        self.cache = cache
        self.device = device

    def __len__(self) -> int:
        return len(self.cache)

    def fetch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        # moved as stored (float16 features, int16 labels) and widened on the device: half the bytes to copy
        raw = self.cache.batch(indices, as_stored=True)
        out = {k: v.to(self.device) for k, v in raw.items()}
        out["feats"] = out["feats"].float()
        if "label" in out:
            out["label"] = out["label"].long()
        return out


def feature_source(cfg: Config, fid: Fidelity, place: Place, crops: Any, backbone: nn.Module,
                   amp: Precision) -> CropSource | CachedSource:
    """The training features: precomputed once (exact: the backbone is frozen and the crops are fixed)
    when ``feature_cache`` is on, else the backbone's forward on the crops each step; both resize the crops
    with the run's fidelity (``fid.resize``)."""
    resize = fid.resize
    if not cfg.feature_cache:
        return CropSource(crops, backbone, cfg.res, place.device, amp, resize, workers=cfg.num_workers)
    # keyed by the crops' content (file hashes; or source identity + class mapping without crops) and by the
    # depth values they hold (a five-crop set's normalisation; full images hold the cache's own values)
    depth_values = crops.depth_normalization if isinstance(crops, CroppedDataset) else "none"
    info = {"backbone": cfg.backbone, "backbone_kwargs": cfg.backbone_kwargs,
            "res": cfg.res, "mode": resize.name, "depth_normalization": depth_values,
            "content": dataset_digest(crops), "split": cfg.train_split}
    transform = partial(resize_center_crop, res=cfg.res, resize=resize)
    options = CacheOptions(device=place.device, transform=transform, progress=place.progress, precision=amp,
                           workers=cfg.num_workers)
    make = partial(build_feature_cache, backbone, crops, Path(cfg.cache_dir) / "features", info, options)
    return CachedSource(rank0_first(place.dinfo, make), place.device)


# ----------------------------------------------------------------------------------------------------
# RNG state: every random stream, for exact resume
# ----------------------------------------------------------------------------------------------------
def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def rng_state(gens: dict[str, torch.Generator]) -> dict[str, Any]:
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": [py[0], list(py[1]), py[2]],
        "generators": {k: g.get_state() for k, g in gens.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_state(state["numpy"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    for k, g in gens.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# the run folder
# ----------------------------------------------------------------------------------------------------
#: the marker of a run folder: what made the run (its owner, :class:`ReplaceOwn`)
RUN_MARKER = ".depthg-run.json"
#: What a run writes into its output_dir (``tb`` is a folder; ``checkpoint_*_eval*`` are evaluate's outputs).
RUN_FILES = (RUN_MARKER, "config.yaml", "log.jsonl", "checkpoint_last.pt", "checkpoint_best.pt", "results.json", "tb")
#: the files that make a run worth keeping: without them a run folder holds an unfinished run (config and
#: log of a run stopped before its first checkpoint), which a new run may replace without being told to
KEPT_RUN_FILES = ("checkpoint_last.pt", "checkpoint_best.pt", "results.json")
#: where a replaced run waits (inside its folder) until the run replacing it has passed its first step
REPLACED = ".depthg-replaced"
#: config keys a resumed run may change: where and how fast it runs, how often it logs, evaluates and saves
#: (evaluation never moves the training RNG streams), and how long it trains.
RESUMABLE_CHANGES = {"steps", "threads", "eval_every", "checkpoint_every", "log_every", "device", "num_workers",
                     "output_dir", "eval_batch_size", "eval_max_images", "eval_crf", "eval_flip", "name", "crf_workers"}


@dataclass(frozen=True)
class ReplaceOwn:
    """``train(cfg, overwrite=ReplaceOwn(owner))``: replace the run in output_dir only when ``owner`` made it
    (the notebooks' default: a rerun replaces the notebook's own previous run, never another one). The run
    written is marked with ``owner``."""

    owner: str


def run_files(out_dir: Path) -> list[Path]:
    """The files and folders of a previous run in ``out_dir`` (nothing else there counts or is touched)."""
    if not out_dir.is_dir():
        return []
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    return found + sorted(out_dir.glob("checkpoint_*_eval*"))


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a training run: its marker, or (runs written before the marker) a config and a log."""
    return (folder / RUN_MARKER).is_file() or ((folder / "config.yaml").is_file() and (folder / "log.jsonl").is_file())


def run_owner(out_dir: Path) -> str | None:
    """Who made the run in ``out_dir`` (its marker's ``owner``); None when it does not say."""
    try:
        owner = json.loads((out_dir / RUN_MARKER).read_text()).get("owner")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


def check_run_folder(out_dir: Path, resume: bool, overwrite: bool | ReplaceOwn) -> None:
    """Refuse an ``output_dir`` that is a file, that holds files no run made, or that holds another run unless
    ``resume`` / ``overwrite`` says what to do with it (a run stopped before its first checkpoint is replaced
    without being told). Touches nothing."""
    if resume and overwrite:
        raise TrainError("give either resume (continue the run in output_dir) or overwrite (replace it), not both")
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"config key 'output_dir' = {str(out_dir)!r}: it is a file; expected a folder for the run")
    owned_output(out_dir, "run folder (output_dir)", lambda folder: is_run_folder(folder) or (folder / REPLACED).is_dir())
    found = run_files(out_dir)
    if resume or not any(p.name in KEPT_RUN_FILES for p in found):
        return
    if not overwrite:
        raise TrainError(
            f"output_dir {out_dir} holds another run ({', '.join(p.name for p in found)}); pass --resume (resume=True) "
            "to continue it, --overwrite (overwrite=True) to replace it, or choose another output_dir"
        )
    if isinstance(overwrite, ReplaceOwn) and run_owner(out_dir) != overwrite.owner:
        made_by = run_owner(out_dir) or "another command"
        raise TrainError(f"output_dir {out_dir} holds a run made by {made_by}, not by {overwrite.owner}, which replaces "
                         "only its own runs: choose another output_dir, or pass overwrite=True to replace it")


def checkpoint_to_resume(cfg: Config, place: Place, resume: bool, overwrite: bool | ReplaceOwn) -> dict[str, Any] | None:
    """Check the run folder (touching nothing) and, on ``resume``, load and check its last checkpoint."""
    out_dir = place.out_dir
    check_run_folder(out_dir, resume, overwrite)
    if cfg.data_dir is not None and inside(out_dir, cfg.data_dir):
        raise TrainError(f"output_dir {out_dir} is inside the dataset folder data_dir={cfg.data_dir}; "
                         "nothing is written into a dataset: choose an output_dir outside it")
    if not resume:
        return None
    if not place.ckpt_last.is_file():
        raise TrainError(f"resume=True but there is no checkpoint at {place.ckpt_last}")
    ckpt = load_checkpoint(place.ckpt_last)
    changed = {k for k, v in ckpt["config"].items() if cfg.to_dict().get(k) != v} - RESUMABLE_CHANGES
    if changed:
        raise TrainError(f"cannot resume {place.ckpt_last}: config keys changed since it was written: {sorted(changed)}")
    if int(ckpt["step"]) > cfg.steps:
        raise TrainError(f"cannot resume {place.ckpt_last} at step {int(ckpt['step'])} with steps={cfg.steps}: "
                         "the checkpoint is already past the end; raise steps")
    return ckpt


class RunFolder:
    """``output_dir`` for one training call: held by rank 0 from the first check to the last file
    (:func:`depthg.utils.folder_lock`: a second run into the folder is refused), written by :meth:`open`.

    A run being replaced is moved aside into ``output_dir/.depthg-replaced`` when the new run opens the
    folder, and removed only when the new run has passed its first step (:meth:`first_step_passed`); a new run
    that fails before that (or was killed: the next command on the folder finds it) puts it back.
    """

    def __init__(self, place: Place) -> None:
        self.place, self.out_dir = place, place.out_dir
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "RunFolder":
        error = None
        if self.place.dinfo.is_main:
            try:
                self._stack.enter_context(folder_lock(self.out_dir, "run folder (output_dir)"))
            except FolderBusyError as err:
                error = err
        if self.place.dinfo.enabled and not broadcast_flag(error is None, self.place.device):
            raise error or TrainError(f"output_dir {self.out_dir} is held by another command (rank 0 was refused)")
        if error is not None:
            raise error
        if self.place.dinfo.is_main:
            self._restore_replaced("a run that replaced it was stopped before its first step")
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        try:
            if kind is not None and self.place.dinfo.is_main:
                self._restore_replaced("the run replacing it failed before its first step")
        finally:
            self._stack.close()

    def open(self, cfg: Config, step: int, owner: str | None) -> Any:
        """Rank 0 writes the run folder: a previous run moved aside, marker and config saved, log trimmed to
        ``step``; returns its TensorBoard writer (None on other ranks or without tensorboard)."""
        out_dir = self.out_dir
        if not self.place.dinfo.is_main:
            return None
        remove_stale_temporaries(out_dir)  # left by a killed checkpoint write; nothing else writes here now
        if step == 0 and run_files(out_dir):  # a new run: the previous one waits aside until the first step
            aside = out_dir / REPLACED
            aside.mkdir()
            for old in run_files(out_dir):
                os.replace(old, aside / old.name)
        if step == 0 or not (out_dir / RUN_MARKER).is_file():
            write_json(out_dir / RUN_MARKER, {"kind": "depthg training run", "owner": owner, "name": cfg.name})
        cfg.save(out_dir / "config.yaml")
        trim_log(out_dir / "log.jsonl", step)  # a fresh run starts a new log; a resumed one drops later lines
        return tensorboard(out_dir)

    def first_step_passed(self) -> None:
        """The new run passed its first step: the run it replaces is removed."""
        if self.place.dinfo.is_main and (self.out_dir / REPLACED).is_dir():
            shutil.rmtree(self.out_dir / REPLACED)

    def _restore_replaced(self, why: str) -> None:
        """Put a run waiting aside back in place of the files of the run that replaced it."""
        aside = self.out_dir / REPLACED
        if not aside.is_dir():
            return
        for new in run_files(self.out_dir):
            shutil.rmtree(new) if new.is_dir() else new.unlink()
        for old in aside.iterdir():
            os.replace(old, self.out_dir / old.name)
        aside.rmdir()
        note(f"run folder {self.out_dir}: the previous run is back in place ({why})")


def trim_log(path: Path, step: int) -> None:
    """Keep only the log records of steps <= ``step`` (all of them go for a fresh run, step 0)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines() if step > 0 else []
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_write(path, "w") as handle:
        handle.write("".join(line + "\n" for line in keep))


def json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def tensorboard(out_dir: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``out_dir/tb``, or None when tensorboard is not installed (the run
    then logs to ``log.jsonl`` only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        return None
    return SummaryWriter(str(out_dir / "tb"))
