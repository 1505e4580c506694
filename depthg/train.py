"""Train a DepthG / STEGO segmentation head on a frozen backbone -- one plain PyTorch loop.

Read it top to bottom (nanoGPT style): :func:`train` is the whole run; *build* (:func:`build_run`: config ->
a :class:`Run` of objects), *step* (:func:`train_step`: batch -> targets -> grids -> head -> losses ->
backward), *loop* (:func:`train_loop`: logging, validation, checkpoints) and the final evaluation follow in
that order, resume last. Every random stream is explicit and checkpointed, so a resumed run is
bit-identical; the paper-or-released choices are made once per run (one ``depthg.build.Fidelity``, handed
down). What the loop stands on (processes, data order, feature sources, RNG state, the run folder) is in
:mod:`depthg.train_support`. docs/training.md describes the set-up order, resume, model selection and
multi-process (DDP) runs.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from depthg.build import (
    Fidelity,
    Segmenter,
    TrainError,
    build_backbone,
    build_loss,
    build_models,
    fidelity,
    load_checkpoint,
    n_classes_of,
    training_cameras,
    training_dataset,
    validation_dataset,
)
from depthg.config import Config
from depthg.data.prepare import dataset_digest, prepare_training_data
from depthg.evaluate import EvalOptions, evaluate_model
from depthg.features import backbone_fingerprint
from depthg.method.lhp import LocalHiddenPositives
from depthg.method.losses import DepthGLoss, LossInputs
from depthg.method.sampling import fps_grid, random_grid
from depthg.method.schedules import DepthDecaySchedule, SampleCountSchedule
from depthg.precision import Precision, amp_context
from depthg.train_support import (
    CachedSource,
    CropSource,
    Place,
    ReplaceOwn,
    RunFolder,
    batch_indices,
    broadcast_flag,
    checkpoint_to_resume,
    collective_device,
    feature_source,
    load_neighbours,
    rank0_first,
    rng_state,
    set_rng_state,
    setup_place,
)
from depthg.utils import StageClock, atomic_torch_save, json_text, note, timed, torch_threads, write_json

__all__ = ["train", "TrainError", "ReplaceOwn", "Run", "build_run", "train_step", "train_loop", "final_results",
           "selection_metric", "channel_dropout", "dropout_masks"]


# ----------------------------------------------------------------------------------------------------
# the run: build -> loop -> final evaluation
# ----------------------------------------------------------------------------------------------------
def train(cfg: Config, resume: bool = False, *, progress: bool = True, data: dict[str, Any] | None = None,
          overwrite: bool | ReplaceOwn = False) -> dict[str, Any]:
    """Train the head described by ``cfg`` (build -> loop -> final evaluation); return the final and the
    best-on-validation metrics and paths.

    Args:
        cfg: the run's configuration (``depthg.config.Config``); ``cfg.threads`` sets torch's CPU thread
            count for the run (restored afterwards).
        resume: continue from ``output_dir/checkpoint_last.pt`` at its step (bit-identical continuation).
        progress: show a tqdm bar.
        data: optional output of ``prepare_training_data(cfg)`` (skip preparation, e.g. in the ablation).
        overwrite: replace a previous run in ``output_dir`` (True; ``ReplaceOwn(owner)``: only a run ``owner``
            made). Without it (or ``resume``) a folder holding another run is refused (one stopped before its
            first checkpoint is simply replaced), and so is a folder holding files no run made. Nothing in the
            folder is touched until the config, the checkpoint to resume and the data preparation have passed;
            the replaced run is removed once the new one has passed its first step, and put back if it fails
            before.

    Writes ``output_dir/{config.yaml, log.jsonl, checkpoint_last.pt, checkpoint_best.pt, results.json}``; the
    folder is held for the whole call (a second run into it is refused). A loss or weight that becomes NaN or
    infinite stops the run with a :class:`TrainError` naming the step and the last good checkpoint (kept).
    """
    # every stage records its wall time where it runs (depthg.utils.timed)
    with torch_threads(cfg.threads), StageClock() as clock:
        state = LoopState(t_start=time.time())
        # build: config -> objects; every check runs before anything is written into the run folder
        place = setup_place(cfg, progress)
        checkpoint_to_resume(cfg, place, resume, overwrite)  # fails fast, before the folder is held
        with RunFolder(place) as folder:  # held until the last file is written
            ckpt = checkpoint_to_resume(cfg, place, resume, overwrite)
            run = build_run(cfg, place, data)
            if ckpt is not None:
                restore(run, state, ckpt)
                ckpt = None  # free the checkpoint's tensors before the loop
            owner = overwrite.owner if isinstance(overwrite, ReplaceOwn) else None
            state.writer = folder.open(cfg, state.step, owner)
            state.on_first_step = folder.first_step_passed
            # loop: train_step, logging, validation, checkpoints
            with timed("training", rename={"evaluation": "validation"}):
                train_loop(run, state)
            # final evaluation of the last and the best weights with the full protocol (rank 0)
            with timed("final evaluation", rename={"evaluation": "final evaluation"}):
                result = final_results(run, state) if place.dinfo.is_main else {}
            folder.first_step_passed()  # a run of 0 steps replaces the old one here
        if place.progress:  # one line: where the time went
            note(f"depthg: {clock.summary()}")
        if place.dinfo.initialised_here:
            dist.destroy_process_group()
        return result


# ----------------------------------------------------------------------------------------------------
# build: config -> the run's objects
# ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a training run is made of, built once from the config by :func:`build_run`."""

    cfg: Config
    place: Place
    # the frozen side: backbone, its precision, the training features and the validation split
    backbone: nn.Module
    amp: Precision
    scaler: torch.amp.GradScaler | None  # fp16 only
    data: dict[str, Any]  # prepare_training_data's paths
    source: CropSource | CachedSource
    nns: np.ndarray  # (N, >= num_neighbors + 1) kNN indices of the training crops, rank 0 = itself
    cameras: torch.Tensor | None  # (N, 4) each crop's [fx, fy, cx, cy] at res (unprojection="camera"), else None
    run_data: dict[str, str]  # fingerprints of data and backbone, recorded in every checkpoint
    val_set: Any
    n_classes: int
    # the trained side
    model: Segmenter
    ddp_model: nn.Module  # ``model`` itself, or its DDP wrapper
    lhp: LocalHiddenPositives | None
    optimizers: Optimizers
    # the objective, its schedules (pure functions of the iteration) and the random streams
    fidelity: Fidelity  # the paper's or the released computation of each difference (depthg.build)
    loss_fn: DepthGLoss
    depth_sched: DepthDecaySchedule
    sample_sched: SampleCountSchedule
    gens: Generators
    grid_hw: tuple[int, int]  # (h, w) feature-grid size of a training crop


def build_run(cfg: Config, place: Place, data: dict[str, Any] | None) -> Run:
    """Fidelity, backbone, data, feature source, seeds, models, optimisers, loss and schedules, in this order.

    The seeds are set *after* the data and cache preparation: those steps draw from the global torch RNG
    only when they actually build something (e.g. the kNN DataLoader's base seed), so seeding before them
    would make the head-dropout stream depend on whether the caches already existed.
    """
    fid = fidelity(cfg)  # the run's one set of paper-or-released choices, handed to everything below
    # frozen backbone, then the data (rank 0 prepares; the others wait, then read the same files)
    backbone = build_backbone(cfg, place.device)
    amp, scaler = amp_context(cfg, place.device)
    if data is None:
        data = rank0_first(place.dinfo, partial(prepare_training_data, cfg, backbone=backbone,
                                                progress=place.progress))
    crops = training_dataset(cfg, fid, data)
    nns = load_neighbours(cfg, data, len(crops))
    # What the run trains on, recorded in every checkpoint: a resume must continue on the same data and
    # backbone, and evaluation must use the backbone the head was trained on.
    run_data = {"content": dataset_digest(crops), "knn_sha256": hashlib.sha256(nns.tobytes()).hexdigest(),
                "backbone_sha256": backbone_fingerprint(backbone)}
    val_set = validation_dataset(cfg, data["data_dir"])
    n_classes = n_classes_of(val_set)
    source = feature_source(cfg, fid, place, crops, backbone, amp)
    cameras = training_cameras(cfg, crops)

    gens = _seed_everything(cfg, place.dinfo.rank)
    model, lhp, optimizers = _trainable(cfg, fid, backbone.embed_dim, n_classes, place.device)
    ddp_model: nn.Module = model
    if place.dinfo.enabled:
        device_ids = [place.device.index] if place.device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    loss_fn, depth_sched, sample_sched = _objective(cfg, fid)
    patch = backbone.patch_size
    return Run(cfg=cfg, place=place, backbone=backbone, amp=amp, scaler=scaler, data=data, source=source, nns=nns, cameras=cameras,
               run_data=run_data, val_set=val_set, n_classes=n_classes, model=model, ddp_model=ddp_model, lhp=lhp,
               optimizers=optimizers, fidelity=fid, loss_fn=loss_fn, depth_sched=depth_sched, sample_sched=sample_sched,
               gens=gens, grid_hw=(cfg.res // patch, cfg.res // patch))


@dataclass
class Generators:
    """The run's explicit random streams; the global torch RNG drives only the head's dropout."""

    sample: torch.Generator  # grids and FPS starts, drawn for the global batch (the same on every rank)
    dropout: torch.Generator  # target dropout masks, drawn for the global batch (the same on every rank)
    loss: torch.Generator  # negative permutations (one stream per rank)

    def named(self) -> dict[str, torch.Generator]:
        """The streams by name, as the checkpoint stores them."""
        return {"sample": self.sample, "dropout": self.dropout, "loss": self.loss}


def _seed_everything(cfg: Config, rank: int) -> Generators:
    """Seed the global RNGs (head dropout, per rank) and make the explicit generators for everything else."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)
    return Generators(sample=torch.Generator().manual_seed(cfg.seed + 1),
                      dropout=torch.Generator().manual_seed(cfg.seed + 2),
                      loss=torch.Generator().manual_seed(cfg.seed + 3 + 1000 * rank))


@dataclass
class Optimizers:
    """One Adam per trained part (docs/method.md §5): head (+ LHP projection), cluster probe, linear probe."""

    head: torch.optim.Optimizer
    cluster: torch.optim.Optimizer
    linear: torch.optim.Optimizer

    def named(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers by name, in stepping order, as the checkpoint stores them."""
        return {"head": self.head, "cluster": self.cluster, "linear": self.linear}


def _trainable(cfg: Config, fid: Fidelity, in_dim: int, n_classes: int,
               device: torch.device) -> tuple[Segmenter, LocalHiddenPositives | None, Optimizers]:
    """Head + probes (+ the LHP projection, seeded on its own stream) and their Adam optimisers."""
    model = build_models(cfg, in_dim, n_classes).to(device)
    lhp = None
    if cfg.lhp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 7)
            lhp = LocalHiddenPositives(cfg.dim, strategy=cfg.lhp_strategy, quantile=cfg.lhp_quantile,
                                       fov_deg=cfg.fov_deg, choices=fid.lhp).to(device)
        model.add_module("lhp", lhp)
    # the LHP projection trains with the head, at the head's learning rate
    head_params = list(model.head.parameters()) + (list(lhp.parameters()) if lhp is not None else [])
    optimizers = Optimizers(head=torch.optim.Adam(head_params, lr=cfg.lr),
                            cluster=torch.optim.Adam(model.cluster.parameters(), lr=cfg.probe_lr),
                            linear=torch.optim.Adam(model.linear.parameters(), lr=cfg.probe_lr))
    return model, lhp, optimizers


def _objective(cfg: Config, fid: Fidelity) -> tuple[DepthGLoss, DepthDecaySchedule, SampleCountSchedule]:
    """The STEGO + DepthG loss, the depth weight/shift schedule and the sample-count schedule."""
    loss_fn = build_loss(cfg, fid)
    depth_sched = DepthDecaySchedule(cfg.depth_weight, cfg.depth_shift, cfg.depth_decay_factor,
                                       cfg.depth_decay_every, after_step=cfg.decay_after_step)
    sample_sched = SampleCountSchedule(cfg.feature_samples, factor=cfg.sample_decay_factor,
                                         every=cfg.sample_decay_every, min_side=cfg.sample_min_side,
                                         after_step=cfg.decay_after_step, at_start=cfg.sample_decay_at_start)
    return loss_fn, depth_sched, sample_sched


# ----------------------------------------------------------------------------------------------------
# one training step
# ----------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """This rank's share (b rows) of one global batch: the anchors and their kNN positives.

    ``feats``, ``feats_pos``: (b, C, h, w) frozen backbone features (float32); ``label``: (b, H, W) the
    anchors' labels (probes only); ``depth``, ``depth_pos``: (b, H, W) or None; ``img``: (2b, 3, H, W) the
    crops, anchors first (per-step features only, else None); ``cameras``: the anchors' and positives' (b, 4)
    ``[fx, fy, cx, cy]`` with ``unprojection="camera"``.
    """

    feats: torch.Tensor
    feats_pos: torch.Tensor
    label: torch.Tensor
    depth: torch.Tensor | None
    depth_pos: torch.Tensor | None
    img: torch.Tensor | None
    cameras: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # (b, 4) each, or None: fov


@dataclass
class StepOut:
    """What a step hands to logging: every loss term (on the device, not synchronised) and its schedules."""

    losses: dict[str, torch.Tensor]
    n_side: int
    depth_weight: float


def train_step(run: Run, it: int) -> StepOut:
    """Iteration ``it``: batch -> correlation targets -> grids -> head -> losses -> backward -> optimisers.

    Shapes per rank (b = batch_size / world size): features (b, C, h, w), codes (b, D, h, w), depth
    (b, H, W), grids (b, n_side, n_side, 2); the losses are scalars.
    """
    cfg, b = run.cfg, run.place.local_b
    # -- batch: this rank's rows of the global batch, anchors and their kNN positives
    batch = fetch_batch(run, it)

    # -- correlation targets: Dropout2d on the features, independent of the head's own dropouts
    target, target_pos = correlation_targets(run, batch)

    # -- where the losses look: random (STEGO) or depth-guided FPS grids, (x, y), align_corners=True
    n_side = run.sample_sched.at(it)
    grids = sampling_grids(run, n_side, batch.depth, batch.depth_pos, batch.cameras)

    # -- forward: head on anchors and positives together, probes on the detached anchor code
    with run.amp():
        out = run.ddp_model(torch.cat([batch.feats, batch.feats_pos]), batch.label)
    code, code_pos = out["code"].float().split(b)

    # -- losses: STEGO + DepthG with this step's depth weight and shift
    depth_weight, depth_shift = run.depth_sched.at(it)
    x = LossInputs(target, target_pos, code, code_pos, batch.depth, batch.depth_pos, *batch.cameras)
    terms = depthg_loss(run, x, grids, depth_weight, depth_shift)
    loss = terms["total"]
    # -- local hidden positives (docs/method.md §7): the loss again on propagated codes with new grids
    if run.lhp is not None:
        lhp_terms = lhp_loss(run, x, batch.img, n_side, depth_weight * cfg.lhp_depth_weight, depth_shift)
        terms.update({f"lhp_{k}": v for k, v in lhp_terms.items()})
        main = (1.0 - cfg.lhp_weight) * loss if cfg.lhp_weight_balance else loss
        loss = main + cfg.lhp_weight * lhp_terms["total"]
    total = loss + out["cluster_loss"] + out["linear_loss"]

    # -- backward, three optimiser steps (through the GradScaler under fp16)
    optimizers = list(run.optimizers.named().values())
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(total).backward()
        for opt in optimizers:
            run.scaler.step(opt)
        run.scaler.update()
    else:
        total.backward()
        for opt in optimizers:
            opt.step()
    # -- every loss term for logging (read only on logging steps: reading them is a device sync)
    losses = {**terms, "cluster": out["cluster_loss"], "linear": out["linear_loss"]}
    return StepOut(losses, n_side, depth_weight)


def fetch_batch(run: Run, it: int) -> Batch:
    """This rank's rows of the global batch of iteration ``it`` (a pure function of seed and ``it``)."""
    cfg, b, rows = run.cfg, run.place.local_b, run.place.rows
    idx, pos = batch_indices(it, len(run.source), cfg.batch_size, cfg.seed, run.nns, cfg.num_neighbors)
    # one fetch for anchors and positives: rows [0, b) are the anchors, [b, 2b) their positives
    raw = run.source.fetch(torch.cat([idx[rows], pos[rows]]))
    feats, feats_pos = raw["feats"].split(b)  # float32 from both sources
    depth = depth_pos = None
    if "depth" in raw:
        depth, depth_pos = raw["depth"].split(b)
    cameras: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if run.cameras is not None:
        cameras = run.cameras[torch.cat([idx[rows], pos[rows]])].to(feats.device).split(b)
    return Batch(feats, feats_pos, raw["label"][:b], depth, depth_pos, raw.get("img"), cameras)


def correlation_targets(run: Run, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor and positive features after Dropout2d(cfg.dropout), masks drawn for the global batch."""
    cfg, rows = run.cfg, run.place.rows
    masks = dropout_masks(2 * cfg.batch_size, batch.feats.shape[1], cfg.dropout, run.gens.dropout)
    if masks is not None:
        m_anchor, m_pos = masks[: cfg.batch_size][rows], masks[cfg.batch_size :][rows]
    else:
        m_anchor = m_pos = None
    return channel_dropout(batch.feats, m_anchor), channel_dropout(batch.feats_pos, m_pos)


def channel_dropout(feats: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Dropout2d with a precomputed (B, C) keep-mask already scaled by 1/(1-p)."""
    return feats if mask is None else feats * mask[:, :, None, None].to(device=feats.device, dtype=feats.dtype)


def dropout_masks(batch: int, channels: int, p: float, generator: torch.Generator) -> torch.Tensor | None:
    if p <= 0:
        return None
    keep = (torch.rand(batch, channels, generator=generator) >= p).float()
    return keep / (1.0 - p)


def sampling_grids(run: Run, n_side: int, depth: torch.Tensor | None, depth_pos: torch.Tensor | None,
                   cameras: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, n_side, n_side, 2) sampling grids for anchors and positives, drawn for the *global* batch and
    sliced to this rank: uniform random (STEGO) or farthest-point sampling on the depth (DepthG), the depth
    unprojected with each crop's camera (``cameras``: (b, 4) each) or at ``fov_deg``."""
    cfg, rows, device, gen, fid = run.cfg, run.place.rows, run.place.device, run.gens.sample, run.fidelity
    if cfg.depth_sampling == "random":  # anchors' grids first, then the positives' (one stream)
        g1, g2 = (random_grid(cfg.batch_size, n_side, generator=gen)[rows].to(device) for _ in range(2))
        return g1, g2
    if depth is None or depth_pos is None:
        raise TrainError("depth_sampling='fps' needs depth for every training crop (prepare the depth cache)")
    starts: list[int | torch.Tensor] = [0, 0]
    if cfg.fps_random_start and not fid.fps_fixed_start:
        n_cells = run.grid_hw[0] * run.grid_hw[1]
        starts = [torch.randint(0, n_cells, (cfg.batch_size,), generator=gen)[rows].to(depth.device) for _ in range(2)]
    g1, g2 = (fps_grid(d, run.grid_hw, n_side, cfg.fov_deg, start, fid.fps, intrinsics=k).to(device)
              for d, start, k in zip((depth, depth_pos), starts, cameras))
    return g1, g2


def depthg_loss(run: Run, x: LossInputs, grids: tuple[torch.Tensor, torch.Tensor], depth_weight: float,
                depth_shift: float) -> dict[str, torch.Tensor]:
    """The STEGO + DepthG loss terms (``"total"`` among them); the depth term is off without ``use_depth``."""
    if not run.cfg.use_depth:
        depth_weight = 0.0
    return run.loss_fn(x, grids, depth_weight=depth_weight, depth_shift=depth_shift, generator=run.gens.loss)


def lhp_loss(run: Run, x: LossInputs, img: torch.Tensor | None, n_side: int, depth_weight: float,
             depth_shift: float) -> dict[str, torch.Tensor]:
    """Local hidden positives (docs/method.md §7): the loss terms on the propagated codes, new grids."""
    assert run.lhp is not None
    attention = None
    if run.cfg.lhp_strategy == "attention":
        with torch.no_grad():
            attention = run.backbone.patch_attention(img[: x.code.shape[0]])
    code_lhp = run.lhp(x.code, depth=x.depth, attention=attention)
    code_pos_lhp = run.lhp.project(x.code_pos)
    grids = sampling_grids(run, n_side, x.depth, x.depth_pos, (x.intrinsics, x.intrinsics_pos))
    return depthg_loss(run, replace(x, code=code_lhp, code_pos=code_pos_lhp), grids, depth_weight, depth_shift)


# ----------------------------------------------------------------------------------------------------
# the loop: steps, logging, validation, checkpoints
# ----------------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """What the loop changes: the step, the best validation so far, the last logged losses, the log writer."""

    t_start: float
    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"step": None, "metric": -math.inf, "metrics": None})
    last_losses: dict[str, float] = field(default_factory=dict)
    writer: Any = None  # TensorBoard SummaryWriter on rank 0 when installed
    bad_step: torch.Tensor | None = None  # on the device: the first step whose losses were not finite (0: none)
    checkpoint_step: int | None = None  # the step of the last checkpoint_last.pt written (or resumed from)
    on_first_step: Callable[[], None] | None = None  # called once the run has passed its first step


def train_loop(run: Run, state: LoopState) -> None:
    """Steps ``state.step`` .. ``cfg.steps``; log, validate and checkpoint on their schedules."""
    cfg = run.cfg
    run.model.train()
    state.bad_step = torch.zeros((), dtype=torch.int64, device=run.place.device)
    first = state.step + 1
    bar = tqdm(range(state.step, cfg.steps), initial=state.step, total=cfg.steps, desc=cfg.name,
               disable=not run.place.progress, dynamic_ncols=True)
    for it in bar:
        out = train_step(run, it)
        state.step = step = it + 1
        note_finite(state, out)
        log_now = step % cfg.log_every == 0 or step == cfg.steps
        eval_now = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.steps)
        save_now = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and step < cfg.steps
        if step == first or log_now or eval_now or save_now:
            check_finite(run, state)  # a device sync: only where the loop reads values anyway
        if step == first and state.on_first_step is not None:
            state.on_first_step()
        if log_now:
            log_losses(run, state, out, bar)
        if eval_now:
            validate(run, state)
        if save_now:
            save_checkpoint(run, state, run.place.ckpt_last)
    bar.close()
    save_checkpoint(run, state, run.place.ckpt_last)


def note_finite(state: LoopState, out: StepOut) -> None:
    """Remember (on the device, without a sync) the first step whose losses are not all finite."""
    assert state.bad_step is not None
    finite = torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in out.losses.values()])).all()
    state.bad_step = torch.where((state.bad_step == 0) & ~finite, state.step, state.bad_step)


def check_finite(run: Run, state: LoopState) -> None:
    """Stop a diverged run: a :class:`TrainError` naming the first step whose loss was NaN or infinite and the
    last good checkpoint (kept as it is). Reads the device flag of :func:`note_finite` (every rank)."""
    if state.bad_step is None:
        return
    bad = state.bad_step
    if run.place.dinfo.enabled:  # every rank stops at the same check
        bad = bad.to(collective_device(dist.get_backend(), run.place.device))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    step = int(bad.item())
    if step:
        raise TrainError(diverged(run, state, f"a loss became NaN or infinite at step {step}"))


def check_finite_weights(run: Run, state: LoopState) -> None:
    """Refuse to save weights that are NaN or infinite (every rank: the weights are the same on each)."""
    tensors = [(k, v) for k, v in run.model.state_dict().items() if v.is_floating_point()]
    finite = torch.stack([torch.isfinite(v).all() for _, v in tensors]).tolist()
    if not all(finite):
        name = tensors[finite.index(False)][0]
        raise TrainError(diverged(run, state, f"the weight {name!r} became NaN or infinite by step {state.step}"))


def diverged(run: Run, state: LoopState, what: str) -> str:
    """The message of a diverged run: what, where it stopped, the last good checkpoint."""
    cfg, ckpt = run.cfg, run.place.ckpt_last
    kept = (f"the last good checkpoint is {ckpt} (step {state.checkpoint_step}), kept as it is"
            if state.checkpoint_step is not None else "no checkpoint had been written yet")
    return (f"training diverged: {what} (lr={cfg.lr:g}, probe_lr={cfg.probe_lr:g}); {kept}. Nothing more was "
            "written; start again with a lower lr or probe_lr")


def log_losses(run: Run, state: LoopState, out: StepOut, bar: Any) -> None:
    """Read the step's losses (every rank) and log them (rank 0: progress bar, log.jsonl, TensorBoard)."""
    # Reading the losses is a device sync: do it once (one tolist) and only on logging steps.
    values = torch.stack([v.detach().float().reshape(()) for v in out.losses.values()]).tolist()
    state.last_losses = dict(zip(out.losses, values))
    state.last_losses.update(n_side=out.n_side, depth_weight=float(out.depth_weight))
    if not run.place.dinfo.is_main:
        return
    bar.set_postfix({k: f"{v:.3f}" for k, v in state.last_losses.items()
                     if k in ("total", "pos_intra", "pos_inter", "neg_inter", "depth")})
    _log(run, state, "train", state.last_losses)


def _log(run: Run, state: LoopState, group: str, values: dict[str, Any]) -> None:
    """Rank 0: a ``log.jsonl`` record {"step", "time", group: values} and TensorBoard scalars ``group/<key>``."""
    record = {"step": state.step, "time": time.time() - state.t_start, group: values}
    with open(run.place.out_dir / "log.jsonl", "a") as handle:
        handle.write(json_text(record, indent=None) + "\n")
    if state.writer is not None:
        for k, v in values.items():
            state.writer.add_scalar(f"{group}/{k}", v, state.step)


def evaluate_now(run: Run, flip: bool, crf: bool) -> dict[str, Any]:
    """Evaluate the current head and probes on the validation split (the training RNG streams untouched)."""
    cfg, model = run.cfg, run.model
    model.eval()
    # Evaluation must not move the training RNG streams (its DataLoader draws a base seed from the
    # global torch RNG), so eval_every stays result-neutral (RESUMABLE_CHANGES).
    opts = EvalOptions.of(cfg, run.fidelity, flip=flip, crf=crf, progress=False)
    with torch.random.fork_rng(devices=[]):
        metrics = evaluate_model(run.backbone, model, run.val_set, opts, device=run.place.device, amp=run.amp)
    model.train()
    return metrics


def selection_metric(cfg: Config) -> str:
    """The cluster metric that selects ``checkpoint_best`` on validation: ``"miou"``, on Potsdam
    ``"accuracy"``, as the released checkpoint callback monitors them (so "best" stays comparable)."""
    return "accuracy" if cfg.dataset == "potsdam" else "miou"


#: how results.json names each selection metric
METRIC_NAMES = {"accuracy": "cluster accuracy", "miou": "cluster mIoU"}


def validate(run: Run, state: LoopState) -> None:
    """Fast validation (no flip, no CRF) on rank 0; the best checkpoint is written on improvement."""
    improved = False
    if run.place.dinfo.is_main:
        metrics = evaluate_now(run, flip=False, crf=False)
        summary = _summary(metrics)
        _log(run, state, "val", summary)
        monitor = selection_metric(run.cfg)
        if metrics["cluster"][monitor] > state.best["metric"]:
            improved = True
            state.best = {"step": state.step, "metric": metrics["cluster"][monitor], "metric_name": monitor,
                          "metrics": summary}
    if run.place.dinfo.enabled:  # rank 0 decided; NCCL needs the flag on the rank's CUDA device
        # (only rank 0 tracks state.best: it alone writes checkpoints)
        improved = broadcast_flag(improved, run.place.device)
    if improved:
        save_checkpoint(run, state, run.place.ckpt_best)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar part of an evaluation result (for logs)."""
    out: dict[str, Any] = {}
    for group in ("cluster", "linear"):
        if group in metrics:
            out[f"{group}_accuracy"] = metrics[group]["accuracy"]
            out[f"{group}_miou"] = metrics[group]["miou"]
    return out


def save_checkpoint(run: Run, state: LoopState, path: Path) -> None:
    """Atomic checkpoint at ``state.step``; the RNG states of every rank are gathered so that DDP resumes exactly.
    Weights that are not finite are never written (:func:`check_finite_weights`)."""
    check_finite(run, state)
    check_finite_weights(run, state)
    dinfo = run.place.dinfo
    states = [rng_state(run.gens.named())]
    if dinfo.enabled:
        gathered: list[Any] = [None] * dinfo.world_size
        dist.all_gather_object(gathered, states[0])
        states = gathered
    if dinfo.is_main:
        metric = state.best["metric"]
        atomic_torch_save({
            "format": "depthg-train-v1", "step": state.step, "config": run.cfg.to_dict(),
            "model": run.model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in run.optimizers.named().items()},
            "scaler": run.scaler.state_dict() if run.scaler is not None else None, "rng": states,
            "best": {**state.best, "metric": None if metric == -math.inf else metric},
            "in_dim": run.backbone.embed_dim, "n_classes": run.n_classes, "last_train_losses": state.last_losses,
            "data": run.run_data,
        }, path)
    if path == run.place.ckpt_last:
        state.checkpoint_step = state.step


# ----------------------------------------------------------------------------------------------------
# the final evaluation
# ----------------------------------------------------------------------------------------------------
def final_results(run: Run, state: LoopState) -> dict[str, Any]:
    """Rank 0: the last and the best weights under the full protocol of cfg (flip, CRF) -> results.json."""
    cfg, place, best, step = run.cfg, run.place, state.best, state.step
    final_metrics = evaluate_now(run, flip=cfg.eval_flip, crf=cfg.eval_crf)
    has_best = best["step"] is not None and place.ckpt_best.is_file()
    best_metrics = None
    if has_best:
        if best["step"] == step:
            best_metrics = final_metrics
        else:  # evaluate the best checkpoint's weights, then put the last ones back
            current = {k: v.clone() for k, v in run.model.state_dict().items()}
            run.model.load_state_dict(load_checkpoint(place.ckpt_best)["model"])
            best_metrics = evaluate_now(run, flip=cfg.eval_flip, crf=cfg.eval_crf)
            run.model.load_state_dict(current)
    result = {
        "name": cfg.name, "mode": cfg.mode, "steps": step, "wall_time_s": time.time() - state.t_start,
        "protocol": {"flip": cfg.eval_flip, "crf": cfg.eval_crf, "eval_res": cfg.eval_res, "split": cfg.val_split},
        "final": {"step": step, "note": "weights after the last step (no model selection)",
                  "metrics": final_metrics},
        "best_on_val": {"step": best["step"],
                        "selected_by": f"validation {METRIC_NAMES[selection_metric(cfg)]} (no flip, no CRF)",
                        "note": "selected on the validation split itself, as the released code does: "
                                "optimistic, not a held-out number",
                        "metrics": best_metrics},
        "last_train_losses": state.last_losses,
        "paths": {"output_dir": str(place.out_dir), "checkpoint_last": str(place.ckpt_last),
                  "checkpoint_best": str(place.ckpt_best) if has_best else None,
                  "log": str(place.out_dir / "log.jsonl"), **{k: str(v) for k, v in run.data.items()}},
        "config": cfg.to_dict(),
    }
    write_json(place.out_dir / "results.json", result)  # strict: an IoU without a value is null, not NaN
    if state.writer is not None:
        state.writer.close()
    return result


# ----------------------------------------------------------------------------------------------------
# resume: continue a run from its last checkpoint
# ----------------------------------------------------------------------------------------------------
def restore(run: Run, state: LoopState, ckpt: dict[str, Any]) -> None:
    """Continue from ``ckpt``: weights, optimisers, scaler, every RNG stream, step, best and last losses."""
    changed_data = [k for k, v in (ckpt.get("data") or {}).items() if run.run_data.get(k) != v]
    if changed_data:
        raise TrainError(f"cannot resume {run.place.ckpt_last}: the training data changed since it was written "
                         f"({', '.join(changed_data)} differ); start a new run (another output_dir or --overwrite)")
    run.model.load_state_dict(ckpt["model"])
    for k, opt in run.optimizers.named().items():
        opt.load_state_dict(ckpt["optimizers"][k])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    # each rank continues its own streams (or rank 0's when the world size changed)
    dinfo = run.place.dinfo
    rng = ckpt["rng"][dinfo.rank] if len(ckpt["rng"]) == dinfo.world_size else ckpt["rng"][0]
    set_rng_state(rng, run.gens.named())
    state.step, state.best = int(ckpt["step"]), ckpt["best"]
    state.checkpoint_step = state.step
    if state.best["metric"] is None:
        state.best["metric"] = -math.inf
    # a run resumed after its last step keeps the last logged losses
    state.last_losses = dict(ckpt.get("last_train_losses") or {})
