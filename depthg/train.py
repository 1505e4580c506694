"""Train a DepthG / STEGO segmentation head on a frozen backbone -- one plain PyTorch loop.

Read it top to bottom (nanoGPT style): ``train(cfg)`` does

1. set up (optional) DDP; seed everything *after* the data/cache preparation below (building a cache
   draws from the global RNG, reusing one does not);
2. prepare the data once: depth cache -> five-crops -> kNN (``depthg.data.prepare_training_data``);
3. load the frozen backbone; optionally precompute its features of all training crops
   (``depthg.features``: the backbone is frozen and the crops are fixed, so this is exact);
4. build the segmentation head, the cluster probe and the linear probe with their own Adam optimisers
   (head lr 5e-4, probes 5e-3, no schedule; docs/method.md §5);
5. per iteration: read the batch and its kNN positives, perturb the
   correlation-target features with Dropout2d(p) independently of the head's own dropouts, pick the
   sampling grids (random or depth-guided FPS), compute the STEGO + DepthG losses with the depth weight
   and shift of this step and the probe losses on the *detached* code, backward, step all three
   optimisers;
6. evaluate on the validation split every ``eval_every`` steps (hard cluster argmax and linear probe,
   no CRF, no flip -- the released training-time validation, docs/method.md §9), log to
   ``output_dir/log.jsonl`` (+ TensorBoard when installed), checkpoint atomically.

Resumability. Every source of randomness is explicit and saved in the checkpoint: the data order is a
pure function of (seed, epoch) -- a generator-driven permutation per epoch, not a stateful DataLoader
shuffle -- and the sampling / dropout / negative-permutation generators, the global torch RNG (head
dropout) and NumPy/Python states are restored on ``resume=True``. A run killed after a checkpoint and
resumed reaches bit-identical weights (tests/test_train.py).

Schedules are pure functions of the iteration (``DepthDecaySchedule.at``, ``SampleCountSchedule.at``);
their units follow ``cfg.mode`` (see ``depthg.config``).

Model selection. The released code keeps the checkpoint with the best cluster mIoU *on the evaluation
split* (docs/fidelity.md §4). We report both: ``final`` (the last step's weights) and
``best_on_val`` (selected on the validation split, hence optimistic), labelled as such in results.json.

Multi-GPU / multi-process (``torchrun --nproc_per_node=N -m depthg train ...``): DDP with gloo on CPU and
nccl on CUDA. ``batch_size`` is the *global* batch; rank r takes rows [r*b, (r+1)*b) of the global batch
(b = batch_size / N), the sampling grids and the target-dropout masks are drawn for the global batch from
the same generator on every rank and sliced, and DDP averages the gradients. Since every STEGO/DepthG loss
term is a mean over equally sized per-image blocks, the averaged gradient equals the single-process
gradient *exactly* when (a) the head's dropout is off (its masks come from each rank's own RNG stream)
(b) the negative term is off or irrelevant (negatives are permutations within the rank's shard, as
in any per-GPU STEGO batch), and (c) the centring is per image (``centering="paper"`` or ``"none"``): the
released form adds back the mean of F over the *whole batch*, which differs between a rank's shard and
the global batch (so the released code's own multi-GPU runs were not batch-size invariant either).
tests/test_train.py checks this equivalence on 2 CPU processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from depthg import losses as L
from depthg import sampling as S
from depthg.backbone import load_backbone
from depthg.build import (
    Segmenter,
    TrainError,
    amp_context,
    build_models,
    depth_normalization,
    load_checkpoint,
    n_classes_of,
    training_dataset,
    validation_dataset,
)
from depthg.config import Config
from depthg.data.prepare import dataset_digest, load_knn, prepare_training_data
from depthg.data.transforms import resize_center_crop
from depthg.evaluate import evaluate_model
from depthg.features import Precision, backbone_features, backbone_fingerprint, build_feature_cache
from depthg.lhp import LocalHiddenPositives
from depthg.utils import atomic_torch_save, atomic_write, get_device, inside

__all__ = ["train", "TrainError", "batch_indices", "Segmenter", "load_checkpoint", "build_models", "broadcast_flag",
           "collective_device"]


# ----------------------------------------------------------------------------------------------------
# distributed helpers
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


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


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


# ----------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# training data sources
# ----------------------------------------------------------------------------------------------------


class CropSource:
    """Training crops read from disk; features computed by the frozen backbone each step."""

    def __init__(self, dataset: Any, backbone: nn.Module, res: int, mode: str, device: torch.device,
                 amp: Precision) -> None:
        self.dataset = dataset
        self.backbone = backbone
        self.transform = partial(resize_center_crop, res=res, mode=mode)
        self.device = device
        self.amp = amp

    def __len__(self) -> int:
        return len(self.dataset)

    def fetch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        items = [self.transform(self.dataset[int(i)]) for i in indices]
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
        return {k: v.to(self.device) for k, v in self.cache.batch(indices).items()}


def channel_dropout(feats: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Dropout2d with a precomputed (B, C) keep-mask already scaled by 1/(1-p)."""
    return feats if mask is None else feats * mask[:, :, None, None].to(device=feats.device, dtype=feats.dtype)


def dropout_masks(batch: int, channels: int, p: float, generator: torch.Generator) -> torch.Tensor | None:
    if p <= 0:
        return None
    keep = (torch.rand(batch, channels, generator=generator) >= p).float()
    return keep / (1.0 - p)


# ----------------------------------------------------------------------------------------------------
# checkpoints and RNG state
# ----------------------------------------------------------------------------------------------------


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def _rng_state(gens: dict[str, torch.Generator]) -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any], gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_state(state["numpy"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    for k, g in gens.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RESUMABLE_CHANGES = {"steps", "threads", "eval_every", "checkpoint_every", "log_every", "device", "num_workers",
                     "output_dir", "eval_batch_size", "eval_max_images", "eval_crf", "eval_flip", "name"}


# ----------------------------------------------------------------------------------------------------
# the training run
# ----------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=_json_default) + "\n")


def _trim_log(path: Path, step: int) -> None:
    """Keep only the log records of steps <= ``step`` (all of them go for a fresh run, step 0)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    if step == 0:
        keep = []
    with atomic_write(path, "w") as handle:
        handle.write("".join(line + "\n" for line in keep))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar part of an evaluation result (for logs)."""
    out: dict[str, Any] = {}
    for group in ("cluster", "linear"):
        if group in metrics:
            out[f"{group}_accuracy"] = metrics[group]["accuracy"]
            out[f"{group}_miou"] = metrics[group]["miou"]
    return out


#: What a run writes into its output_dir (``tb`` is a folder; ``checkpoint_*_eval*`` are evaluate's outputs).
RUN_FILES = ("config.yaml", "log.jsonl", "checkpoint_last.pt", "checkpoint_best.pt", "results.json", "tb")


def _run_files(out_dir: Path) -> list[Path]:
    """The files and folders of a previous run in ``out_dir`` (nothing else there counts or is touched)."""
    if not out_dir.is_dir():
        return []
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    return found + sorted(out_dir.glob("checkpoint_*_eval*"))


def check_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an ``output_dir`` that is a file, or that holds another run unless ``resume`` / ``overwrite``
    says what to do with it. Touches nothing."""
    if resume and overwrite:
        raise TrainError("give either resume (continue the run in output_dir) or overwrite (replace it), not both")
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"config key 'output_dir' = {str(out_dir)!r}: it is a file; expected a folder for the run")
    found = _run_files(out_dir)
    if found and not resume and not overwrite:
        raise TrainError(
            f"output_dir {out_dir} holds another run ({', '.join(p.name for p in found)}); pass --resume (resume=True) "
            "to continue it, --overwrite (overwrite=True) to replace it, or choose another output_dir"
        )


def train(cfg: Config, resume: bool = False, *, progress: bool = True, data: dict[str, Any] | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Train the head described by ``cfg``; return final and best-on-validation metrics and paths.

    ``cfg.threads`` sets torch's CPU thread count for the run (restored afterwards); see :func:`_train`.
    """
    previous = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume, progress=progress, data=data, overwrite=overwrite)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: Config, resume: bool = False, *, progress: bool = True, data: dict[str, Any] | None = None,
           overwrite: bool = False) -> dict[str, Any]:
    """The run itself (:func:`train` only manages the thread count).

    Args:
        cfg: the run's configuration (``depthg.config.Config``).
        resume: continue from ``output_dir/checkpoint_last.pt`` at its step (bit-identical continuation).
        progress: show a tqdm bar.
        data: optional output of ``prepare_training_data(cfg)`` (skip preparation, e.g. in the ablation).
        overwrite: replace a previous run in ``output_dir``. Without it (or ``resume``) a folder holding
            another run is refused; either way nothing in it is touched until the config, the checkpoint
            to resume and the data preparation have all passed.

    Writes ``output_dir/{config.yaml, log.jsonl, checkpoint_last.pt, checkpoint_best.pt, results.json}``.
    """
    t_start = time.time()
    device = get_device(cfg.device)
    dinfo = init_distributed(device)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
        torch.cuda.set_device(device)
    if cfg.batch_size % dinfo.world_size:
        raise TrainError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({dinfo.world_size})")
    local_b = cfg.batch_size // dinfo.world_size
    out_dir = Path(cfg.output_dir)
    ckpt_last, ckpt_best = out_dir / "checkpoint_last.pt", out_dir / "checkpoint_best.pt"
    # The run folder: checked here, written only after validation and data preparation have passed.
    check_run_folder(out_dir, resume, overwrite)
    if cfg.data_dir is not None and inside(out_dir, cfg.data_dir):
        raise TrainError(f"output_dir {out_dir} is inside the dataset folder data_dir={cfg.data_dir}; "
                         "nothing is written into a dataset: choose an output_dir outside it")
    ckpt = None
    if resume:
        if not ckpt_last.is_file():
            raise TrainError(f"resume=True but there is no checkpoint at {ckpt_last}")
        ckpt = load_checkpoint(ckpt_last)
        changed = {k for k, v in ckpt["config"].items() if cfg.to_dict().get(k) != v} - RESUMABLE_CHANGES
        if changed:
            raise TrainError(f"cannot resume {ckpt_last}: config keys changed since it was written: {sorted(changed)}")
        if int(ckpt["step"]) > cfg.steps:
            raise TrainError(f"cannot resume {ckpt_last} at step {int(ckpt['step'])} with steps={cfg.steps}: "
                             "the checkpoint is already past the end; raise steps")

    # 2. frozen backbone, then the data (rank 0 prepares; the others wait, then read the same files).
    backbone = load_backbone(cfg.backbone, cfg.weights, **cfg.backbone_kwargs).to(device)
    amp, scaler = amp_context(cfg, device)
    if data is None:
        if dinfo.is_main:
            data = prepare_training_data(cfg, backbone=backbone, progress=progress)
        _barrier(dinfo)
        if not dinfo.is_main:
            data = prepare_training_data(cfg, backbone=backbone, progress=False)
    crops = training_dataset(cfg, data)
    nns, _ = load_knn(data["knn_path"])
    if nns.shape[0] != len(crops) or nns.shape[1] < cfg.num_neighbors + 1:
        raise TrainError(f"kNN file {data['knn_path']} has shape {nns.shape}; expected ({len(crops)}, >= "
                         f"{cfg.num_neighbors + 1}): lower num_neighbors or raise knn_k")
    # What the run trains on, recorded in every checkpoint: a resume must continue on the same data and
    # backbone, and evaluation must use the backbone the head was trained on.
    run_data = {"content": dataset_digest(crops), "knn_sha256": hashlib.sha256(nns.tobytes()).hexdigest(),
                "backbone_sha256": backbone_fingerprint(backbone)}
    val_set = validation_dataset(cfg, data["data_dir"])
    n_classes = n_classes_of(val_set)

    # 3. optional feature cache: the backbone is frozen and the crops fixed, so caching is exact (fp16).
    if cfg.feature_cache:
        # keyed by the crops' content (file hashes; or source identity + class mapping without crops)
        info = {"backbone": cfg.backbone, "backbone_kwargs": cfg.backbone_kwargs,
                "res": cfg.res, "mode": cfg.mode, "depth_normalization": depth_normalization(cfg, data),
                "content": dataset_digest(crops), "split": cfg.train_split}
        transform = partial(resize_center_crop, res=cfg.res, mode=cfg.mode)
        cache_root = Path(cfg.cache_dir) / "features"
        if dinfo.is_main:
            cache = build_feature_cache(backbone, crops, cache_root, info, device=device, transform=transform,
                                        progress=progress, precision=amp)
        _barrier(dinfo)
        if not dinfo.is_main:
            cache = build_feature_cache(backbone, crops, cache_root, info, device=device, transform=transform,
                                        progress=False, precision=amp)
        source: Any = CachedSource(cache, device)
    else:
        source = CropSource(crops, backbone, cfg.res, cfg.mode, device, amp)
    if cfg.lhp and cfg.lhp_strategy == "attention" and cfg.feature_cache:
        raise TrainError("lhp_strategy='attention' needs the backbone's attention each step: set feature_cache=false")

    # 1. seeds: global RNGs (head dropout) per rank, explicit generators for everything else. Seeded
    # here, *after* the data and cache preparation: those steps draw from the global torch RNG only when
    # they actually build something (e.g. the kNN DataLoader's base seed), so seeding before them made
    # the head-dropout stream depend on whether the caches already existed (first run vs later runs).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + dinfo.rank)
    gens = {
        "sample": torch.Generator().manual_seed(cfg.seed + 1),  # grids, FPS starts (global batch, shared)
        "dropout": torch.Generator().manual_seed(cfg.seed + 2),  # target dropout masks (global, shared)
        "loss": torch.Generator().manual_seed(cfg.seed + 3 + 1000 * dinfo.rank),  # negatives (per rank)
    }

    # 4. head + probes + optimisers.
    model = build_models(cfg, backbone.embed_dim, n_classes).to(device)
    lhp = None
    if cfg.lhp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 7)
            lhp = LocalHiddenPositives(cfg.dim, strategy=cfg.lhp_strategy, quantile=cfg.lhp_quantile, mode=cfg.mode,
                                       fov_deg=cfg.fov_deg).to(device)
        model.add_module("lhp", lhp)
    head_params = list(model.head.parameters()) + (list(lhp.parameters()) if lhp is not None else [])
    opt_head = torch.optim.Adam(head_params, lr=cfg.lr)
    opt_cluster = torch.optim.Adam(model.cluster.parameters(), lr=cfg.probe_lr)
    opt_linear = torch.optim.Adam(model.linear.parameters(), lr=cfg.probe_lr)
    optimizers = {"head": opt_head, "cluster": opt_cluster, "linear": opt_linear}
    ddp_model: nn.Module = model
    if dinfo.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loss_fn = L.DepthGLoss(
        pos_intra_weight=cfg.pos_intra_weight, pos_intra_shift=cfg.pos_intra_shift,
        pos_inter_weight=cfg.pos_inter_weight, pos_inter_shift=cfg.pos_inter_shift,
        neg_inter_weight=cfg.neg_inter_weight, neg_inter_shift=cfg.neg_inter_shift,
        neg_samples=cfg.neg_samples, centering=cfg.centering, zero_clamp=cfg.zero_clamp,
        depth_similarity=cfg.depth_similarity, fov_deg=cfg.fov_deg, mode=cfg.mode,
    )
    depth_sched = L.DepthDecaySchedule(cfg.depth_weight, cfg.depth_shift, cfg.depth_decay_factor, cfg.depth_decay_every, mode=cfg.mode)
    sample_sched = S.SampleCountSchedule(cfg.feature_samples, factor=cfg.sample_decay_factor,
                                         every=cfg.sample_decay_every, min_side=cfg.sample_min_side, mode=cfg.mode)

    # 5. resume.
    step = 0
    best: dict[str, Any] = {"step": None, "metric": -math.inf, "metrics": None}
    resumed_losses: dict[str, float] = {}
    if ckpt is not None:  # resume (checked at the start)
        changed_data = [k for k, v in (ckpt.get("data") or {}).items() if run_data.get(k) != v]
        if changed_data:
            raise TrainError(f"cannot resume {ckpt_last}: the training data changed since it was written "
                             f"({', '.join(changed_data)} differ); start a new run (another output_dir or --overwrite)")
        model.load_state_dict(ckpt["model"])
        for k, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"][dinfo.rank] if len(ckpt["rng"]) == dinfo.world_size else ckpt["rng"][0]
        _set_rng_state(rng, gens)
        step, best = int(ckpt["step"]), ckpt["best"]
        if best["metric"] is None:
            best["metric"] = -math.inf
        resumed_losses = dict(ckpt.get("last_train_losses") or {})
        ckpt = None
    if dinfo.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:  # validation and preparation passed: now the previous run's files go
            for old in _run_files(out_dir):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        cfg.save(out_dir / "config.yaml")
        _trim_log(out_dir / "log.jsonl", step)  # a fresh run starts a new log; a resumed one drops later lines
    writer = _tensorboard(out_dir) if dinfo.is_main else None

    def evaluate_now(flip: bool, crf: bool) -> dict[str, Any]:
        model.eval()
        # Evaluation must not move the training RNG streams (its DataLoader draws a base seed from the
        # global torch RNG), so eval_every stays result-neutral (RESUMABLE_CHANGES).
        with torch.random.fork_rng(devices=[]):
            metrics = evaluate_model(backbone, model.head, model.cluster, model.linear, val_set, res=cfg.eval_res,
                                     mode=cfg.mode, flip=flip, crf=crf, batch_size=cfg.eval_batch_size,
                                     device=device, max_images=cfg.eval_max_images, progress=False, amp=amp)
        model.train()
        return metrics

    def save_checkpoint(path: Path, at_step: int, best_so_far: dict[str, Any]) -> None:
        """Atomic checkpoint; the RNG states of every rank are gathered so that DDP resumes exactly."""
        states = [_rng_state(gens)]
        if dinfo.enabled:
            gathered: list[Any] = [None] * dinfo.world_size
            dist.all_gather_object(gathered, states[0])
            states = gathered
        if dinfo.is_main:
            metric = best_so_far["metric"]
            atomic_torch_save({
                "format": "depthg-train-v1", "step": at_step, "config": cfg.to_dict(),
                "model": model.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": states,
                "best": {**best_so_far, "metric": None if metric == -math.inf else metric},
                "in_dim": backbone.embed_dim, "n_classes": n_classes, "last_train_losses": last_losses,
                "data": run_data,
            }, path)

    def validate(at_step: int, best_so_far: dict[str, Any]) -> dict[str, Any]:
        """Fast validation (no flip, no CRF) on rank 0; best checkpoint on improvement."""
        improved = False
        if dinfo.is_main:
            metrics = evaluate_now(flip=False, crf=False)
            summary = _summary(metrics)
            _write_jsonl(out_dir / "log.jsonl", {"step": at_step, "time": time.time() - t_start, "val": summary})
            if writer is not None:
                for k, v in summary.items():
                    writer.add_scalar(f"val/{k}", v, at_step)
            # The released checkpoint callback monitors cluster mIoU, on Potsdam cluster accuracy;
            # the same monitor here keeps "best" comparable.
            monitor = "accuracy" if cfg.dataset == "potsdam" else "miou"
            if metrics["cluster"][monitor] > best_so_far["metric"]:
                improved = True
                best_so_far = {"step": at_step, "metric": metrics["cluster"][monitor], "metric_name": monitor,
                               "metrics": summary}
        if dinfo.enabled:  # rank 0 decided; NCCL needs the flag on the rank's CUDA device
            improved = broadcast_flag(improved, device)
        if improved:
            save_checkpoint(ckpt_best, at_step, best_so_far)
        return best_so_far

    # 6. the loop.
    model.train()
    patch = backbone.patch_size
    grid_hw = (cfg.res // patch, cfg.res // patch)
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc=cfg.name,
               disable=not (progress and dinfo.is_main), dynamic_ncols=True)
    last_losses: dict[str, float] = resumed_losses  # a run resumed after its last step keeps the last logged ones
    for it in bar:
        # -- batch: this rank's rows of the global batch, anchors and their kNN positives
        idx, pos = batch_indices(it, len(source), cfg.batch_size, cfg.seed, nns, cfg.num_neighbors)
        rows = slice(dinfo.rank * local_b, (dinfo.rank + 1) * local_b)
        batch = source.fetch(torch.cat([idx[rows], pos[rows]]))
        feats, feats_pos = batch["feats"].float().split(local_b)
        label = batch["label"][:local_b]
        depth = depth_pos = None
        if "depth" in batch:
            depth, depth_pos = batch["depth"].split(local_b)

        # -- correlation targets: Dropout2d on the features, independent of the head's dropouts
        masks = dropout_masks(2 * cfg.batch_size, feats.shape[1], cfg.dropout, gens["dropout"])
        if masks is not None:
            m_anchor, m_pos = masks[: cfg.batch_size][rows], masks[cfg.batch_size :][rows]
        else:
            m_anchor = m_pos = None
        target, target_pos = channel_dropout(feats, m_anchor), channel_dropout(feats_pos, m_pos)

        # -- where the losses look: random (STEGO) or depth-guided FPS grids, (x, y), align_corners=True
        n_side = sample_sched.at(it)
        grid1, grid2 = _grids(cfg, S, n_side, grid_hw, depth, depth_pos, gens["sample"], rows, device)

        # -- forward: head on anchors and positives together, probes on the detached anchor code
        with amp():
            out = ddp_model(torch.cat([feats, feats_pos]), label)
        code, code_pos = out["code"].float().split(local_b)
        depth_weight, depth_shift = depth_sched.at(it)
        terms = _call_loss(loss_fn, target, target_pos, code, code_pos, depth, depth_pos, grid1, grid2,
                           depth_weight, depth_shift, gens["loss"], cfg)
        loss = terms["total"]
        if lhp is not None:
            loss = _lhp_loss(cfg, S, lhp, loss, target, target_pos, code, code_pos, depth, depth_pos, backbone,
                             batch, n_side, grid_hw, depth_weight, depth_shift, gens, rows, device, loss_fn, terms)
        total = loss + out["cluster_loss"] + out["linear_loss"]

        # -- backward, three optimiser steps
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            for opt in optimizers.values():
                scaler.step(opt)
            scaler.update()
        else:
            total.backward()
            for opt in optimizers.values():
                opt.step()
        step = it + 1

        # -- logging, evaluation, checkpoints
        if step % cfg.log_every == 0 or step == cfg.steps:
            # Reading the losses is a device sync: do it once (one tolist) and only on logging steps.
            named = {**terms, "cluster": out["cluster_loss"], "linear": out["linear_loss"]}
            values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).tolist()
            last_losses = dict(zip(named, values))
            last_losses.update(n_side=n_side, depth_weight=float(depth_weight))
            if dinfo.is_main:
                bar.set_postfix({k: f"{v:.3f}" for k, v in last_losses.items()
                                 if k in ("total", "pos_intra", "pos_inter", "neg_inter", "depth")})
                _write_jsonl(out_dir / "log.jsonl", {"step": step, "time": time.time() - t_start, "train": last_losses})
                if writer is not None:
                    for k, v in last_losses.items():
                        writer.add_scalar(f"train/{k}", v, step)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            best = validate(step, best)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint(ckpt_last, step, best)
    bar.close()
    save_checkpoint(ckpt_last, step, best)

    # 7. final evaluation with the full protocol of cfg (flip, CRF) of the final and the best weights.
    result: dict[str, Any] = {}
    if dinfo.is_main:
        final_metrics = evaluate_now(flip=cfg.eval_flip, crf=cfg.eval_crf)
        best_metrics = None
        if best["step"] is not None and ckpt_best.is_file():
            if best["step"] == step:
                best_metrics = final_metrics
            else:
                current = {k: v.clone() for k, v in model.state_dict().items()}
                model.load_state_dict(load_checkpoint(ckpt_best)["model"])
                best_metrics = evaluate_now(flip=cfg.eval_flip, crf=cfg.eval_crf)
                model.load_state_dict(current)
        result = {
            "name": cfg.name, "mode": cfg.mode, "steps": step, "wall_time_s": time.time() - t_start,
            "protocol": {"flip": cfg.eval_flip, "crf": cfg.eval_crf, "eval_res": cfg.eval_res, "split": cfg.val_split},
            "final": {"step": step, "note": "weights after the last step (no model selection)",
                      "metrics": final_metrics},
            "best_on_val": {"step": best["step"], "selected_by": "validation cluster mIoU (no flip, no CRF)",
                            "note": "selected on the validation split itself, as the released code does: "
                                    "optimistic, not a held-out number",
                            "metrics": best_metrics},
            "last_train_losses": last_losses,
            "paths": {"output_dir": str(out_dir), "checkpoint_last": str(ckpt_last),
                      "checkpoint_best": str(ckpt_best) if best["step"] is not None and ckpt_best.is_file() else None,
                      "log": str(out_dir / "log.jsonl"), **{k: str(v) for k, v in data.items()}},
            "config": cfg.to_dict(),
        }
        with atomic_write(out_dir / "results.json", "w") as handle:
            json.dump(result, handle, indent=2, default=_json_default)
        if writer is not None:
            writer.close()
    if dinfo.initialised_here:
        dist.destroy_process_group()
    return result


# ----------------------------------------------------------------------------------------------------
# step helpers
# ----------------------------------------------------------------------------------------------------


def _grids(cfg: Config, S: Any, n_side: int, grid_hw: tuple[int, int], depth: torch.Tensor | None,
           depth_pos: torch.Tensor | None, gen: torch.Generator, rows: slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grids for anchors and positives, drawn for the *global* batch and sliced to this rank."""
    if cfg.depth_sampling == "random":
        g1 = S.random_grid(cfg.batch_size, n_side, generator=gen)[rows]
        g2 = S.random_grid(cfg.batch_size, n_side, generator=gen)[rows]
        return g1.to(device), g2.to(device)
    if depth is None or depth_pos is None:
        raise TrainError("depth_sampling='fps' needs depth for every training crop (prepare the depth cache)")
    start1: int | torch.Tensor = 0
    start2: int | torch.Tensor = 0
    if cfg.fps_random_start and cfg.mode == "paper":
        n_cells = grid_hw[0] * grid_hw[1]
        start1 = torch.randint(0, n_cells, (cfg.batch_size,), generator=gen)[rows].to(depth.device)
        start2 = torch.randint(0, n_cells, (cfg.batch_size,), generator=gen)[rows].to(depth.device)
    g1 = S.fps_grid(depth, grid_hw, n_side, fov_deg=cfg.fov_deg, mode=cfg.mode, start=start1)
    g2 = S.fps_grid(depth_pos, grid_hw, n_side, fov_deg=cfg.fov_deg, mode=cfg.mode, start=start2)
    return g1.to(device), g2.to(device)


def _call_loss(loss_fn: nn.Module, target: torch.Tensor, target_pos: torch.Tensor, code: torch.Tensor,
               code_pos: torch.Tensor, depth: torch.Tensor | None, depth_pos: torch.Tensor | None,
               grid1: torch.Tensor, grid2: torch.Tensor, depth_weight: float, depth_shift: float,
               gen: torch.Generator, cfg: Config) -> dict[str, torch.Tensor]:
    if not cfg.use_depth:
        depth_weight = 0.0
    return loss_fn(target, target_pos, code, code_pos, depth, depth_pos, grid1, grid2,
                   depth_weight=depth_weight, depth_shift=depth_shift, generator=gen)


def _lhp_loss(cfg: Config, S: Any, lhp: nn.Module, loss: torch.Tensor, target: torch.Tensor, target_pos: torch.Tensor,
              code: torch.Tensor, code_pos: torch.Tensor, depth: torch.Tensor | None, depth_pos: torch.Tensor | None,
              backbone: nn.Module, batch: dict[str, torch.Tensor], n_side: int, grid_hw: tuple[int, int],
              depth_weight: float, depth_shift: float, gens: dict[str, torch.Generator], rows: slice,
              device: torch.device, loss_fn: nn.Module, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Local hidden positives (docs/method.md §7): the loss again on propagated codes with new grids."""
    attention = None
    if cfg.lhp_strategy == "attention":
        with torch.no_grad():
            attention = backbone.patch_attention(batch["img"][: code.shape[0]])
    code_lhp = lhp(code, depth=depth, attention=attention)
    code_pos_lhp = lhp.project(code_pos) if hasattr(lhp, "project") else code_pos
    g1, g2 = _grids(cfg, S, n_side, grid_hw, depth, depth_pos, gens["sample"], rows, device)
    lhp_terms = _call_loss(loss_fn, target, target_pos, code_lhp, code_pos_lhp, depth, depth_pos, g1, g2,
                           depth_weight * cfg.lhp_depth_weight, depth_shift, gens["loss"], cfg)
    for k, v in lhp_terms.items():
        terms[f"lhp_{k}"] = v
    main = (1.0 - cfg.lhp_weight) * loss if cfg.lhp_weight_balance else loss
    return main + cfg.lhp_weight * lhp_terms["total"]


def _tensorboard(out_dir: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(out_dir / "tb"))
    except Exception:  # tensorboard not installed: JSON lines only
        return None
