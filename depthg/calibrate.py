"""Shift calibration: measure a backbone's feature correlations on a dataset and propose STEGO's shifts.

STEGO's loss attracts a pair of locations when their frozen-feature correlation F exceeds the term's shift
b and repels it below (docs/method.md §3.3), so the shifts only mean something against the distribution of
F that *this* backbone produces on *this* data. :func:`measure_correlations` samples F the way training
does -- the same crops, sample grids, kNN partners and centring -- for the three pairings of the loss:

* ``self``: a crop with itself at the same sampled locations (the ``pos_intra`` term),
* ``knn``: a crop with one of its kNN partners (``pos_inter``),
* ``random``: a crop with another crop of the batch (``neg_inter``),

and :func:`propose_shifts` turns them into shifts by the rule in its docstring, which uses no labels.
Where the data has labels (a development world), :meth:`CorrelationStats.pulled` also reports which
share of the pulled pairs show the same class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from depthg.build import TrainError, build_backbone, fidelity, training_cameras, training_dataset
from depthg.config import Config
from depthg.data.prepare import prepare_training_data
from depthg.method.losses import derangement, feature_correlation
from depthg.method.sampling import fps_grid, random_grid, sample
from depthg.precision import amp_context
from depthg.train_support import feature_source, load_neighbours, setup_place

__all__ = ["PAIRINGS", "SHIFT_KEYS", "NULL_QUANTILE", "CorrelationStats", "measure_correlations", "propose_shifts",
           "pairing_shifts", "pulled_rows", "calibration_report", "fps_class_shares"]

#: the loss's three pairings, in the order of their config keys
PAIRINGS = ("self", "knn", "random")
#: the config key of each pairing's shift
SHIFT_KEYS = {"self": "pos_intra_shift", "knn": "pos_inter_shift", "random": "neg_inter_shift"}
#: the rule's one constant: a pair is attracted when F exceeds this quantile of the random-pair F
NULL_QUANTILE = 0.9


@dataclass
class CorrelationStats:
    """Sampled F values per pairing (flat float arrays) and, with labels, whether each pair shows one class."""

    values: dict[str, np.ndarray]
    same_class: dict[str, np.ndarray] | None
    centering: str
    n_crops: int
    n_side: int

    def quantiles(self, qs: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.9, 0.95)) -> dict[str, dict[str, float]]:
        """Per pairing: the mean and the given quantiles of F."""
        return {k: {"mean": float(v.mean()), **{f"q{round(q * 100):02d}": float(np.quantile(v, q)) for q in qs}}
                for k, v in self.values.items()}

    def pulled(self, shifts: dict[str, float]) -> dict[str, dict[str, float | None]]:
        """Per pairing: the share of pairs the shift attracts (F > b) and, with labels, the share of those
        showing the same class (``purity``) against the share among all pairs (``same_class``)."""
        out: dict[str, dict[str, float | None]] = {}
        for k, v in self.values.items():
            mask = v > shifts[k]
            row: dict[str, float | None] = {"shift": float(shifts[k]), "pulled": float(mask.mean())}
            if self.same_class is not None:
                same = self.same_class[k]
                row["same_class"] = float(same.mean())
                row["purity"] = float(same[mask].mean()) if mask.any() else None
            out[k] = row
        return out


def _cell_labels(label: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Labels (B, H, W) -> the label at the centre pixel of each feature cell (B, 1, h, w), float."""
    b, height, width = label.shape
    h, w = grid_hw
    rows = ((torch.arange(h) + 0.5) * height / h).long().clamp_max(height - 1)
    cols = ((torch.arange(w) + 0.5) * width / w).long().clamp_max(width - 1)
    return label[:, rows][:, :, cols].float()[:, None]


def _same_class(l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) labels of two samples -> (B, S^2, S^2) pairs of one (valid) class."""
    a, b = l1.flatten(1), l2.flatten(1)
    return (a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)


@dataclass
class _TrainingView:
    """What training reads, built as :func:`depthg.train.build_run` builds it: the crops, their feature
    source (the feature cache where the config has one), the kNN table and the run's fidelity."""

    crops: Any
    source: Any
    nns: np.ndarray
    fid: Any


def _training_view(cfg: Config, data: dict[str, Any] | None, progress: bool) -> _TrainingView:
    place = setup_place(cfg, progress)
    fid = fidelity(cfg)
    backbone = build_backbone(cfg, place.device)
    amp, _ = amp_context(cfg, place.device)
    data = data if data is not None else prepare_training_data(cfg, backbone=backbone, progress=progress)
    crops = training_dataset(cfg, fid, data)
    nns = load_neighbours(cfg, data, len(crops))
    return _TrainingView(crops, feature_source(cfg, fid, place, crops, backbone, amp), nns, fid)


def _pair_values(source: Any, rows: torch.Tensor, others: torch.Tensor, same_grid: bool, cfg: Config,
                 gen: torch.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """F of crops ``rows`` with crops ``others`` at random grids (one grid for both when ``same_grid``), and
    whether each pair shows one class (None without labels)."""
    a = source.fetch(rows)
    b = a if same_grid else source.fetch(others)
    g1 = random_grid(len(rows), cfg.feature_samples, generator=gen)
    g2 = g1 if same_grid else random_grid(len(rows), cfg.feature_samples, generator=gen)
    f1, f2 = a["feats"].cpu(), b["feats"].cpu()
    fd = feature_correlation(sample(f1, g1), sample(f2, g2), cfg.centering)
    if "label" not in a:
        return fd.flatten().numpy(), None
    grid_hw = tuple(f1.shape[-2:])
    l1 = F.grid_sample(_cell_labels(a["label"].cpu(), grid_hw), g1, mode="nearest", align_corners=True)
    l2 = F.grid_sample(_cell_labels(b["label"].cpu(), grid_hw), g2, mode="nearest", align_corners=True)
    return fd.flatten().numpy(), _same_class(l1, l2).flatten().numpy()


@torch.no_grad()
def measure_correlations(cfg: Config, *, data: dict[str, Any] | None = None, progress: bool = True,
                         max_crops: int = 2048, chunk: int = 64) -> CorrelationStats:
    """Sample F for the self, kNN and random pairings of ``cfg``'s training crops (at most ``max_crops``,
    taken in order), one grid of ``feature_samples``² random locations per crop and pairing, centred as
    ``cfg.centering``; kNN partners of rank 1..``num_neighbors`` and random partners (a derangement) are
    drawn from a generator seeded with ``cfg.seed``, so the same config gives the same numbers (``chunk``
    crops at a time bound the memory)."""
    view = _training_view(cfg, data, progress)
    source, nns = view.source, view.nns
    n = min(len(source), max_crops)
    gen = torch.Generator().manual_seed(cfg.seed)
    anchors = torch.arange(n)
    ranks = torch.randint(1, cfg.num_neighbors + 1, (n,), generator=gen)
    partners = {"self": anchors, "knn": torch.from_numpy(nns[anchors.numpy(), ranks.numpy()].astype(np.int64)),
                "random": derangement(n, gen)}
    values: dict[str, list[np.ndarray]] = {k: [] for k in PAIRINGS}
    same: dict[str, list[np.ndarray]] = {k: [] for k in PAIRINGS}
    for start in range(0, n, chunk):
        rows = anchors[start:start + chunk]
        for kind in PAIRINGS:
            v, s = _pair_values(source, rows, partners[kind][rows], kind == "self", cfg, gen)
            values[kind].append(v)
            if s is not None:
                same[kind].append(s)
    labelled = all(same[k] for k in PAIRINGS)
    return CorrelationStats({k: np.concatenate(v) for k, v in values.items()},
                            {k: np.concatenate(v) for k, v in same.items()} if labelled else None,
                            cfg.centering, n, cfg.feature_samples)


@torch.no_grad()
def fps_class_shares(cfg: Config, *, data: dict[str, Any] | None = None, progress: bool = True,
                     max_crops: int = 2048, chunk: int = 64) -> dict[str, dict[str, float]]:
    """Where depth-guided FPS looks, per class: the class's share of the feature cells of the training crops
    (``cells``, what random sampling picks on average) and of the ``feature_samples``² cells FPS picks in each
    crop (``fps``), with the config's unprojection (``fov_deg`` or each crop's camera), start and fidelity;
    ``ratio`` = fps / cells. A cell's class is the label at its centre pixel."""
    view = _training_view(cfg, data, progress)
    cameras = training_cameras(cfg, view.crops)
    names = list(getattr(view.crops, "class_names", []))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = min(len(view.source), max_crops)
    cells = picks = None
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        batch = view.source.fetch(rows)
        if "depth" not in batch or "label" not in batch:
            raise TrainError("fps_class_shares needs the training crops' depth and labels")
        grid_hw = tuple(batch["feats"].shape[-2:])
        labels = _cell_labels(batch["label"].cpu(), grid_hw)  # (b, 1, h, w)
        first: int | torch.Tensor = 0
        if cfg.fps_random_start and not view.fid.fps_fixed_start:
            first = torch.randint(0, grid_hw[0] * grid_hw[1], (len(rows),), generator=gen)
        k = cameras[rows] if cameras is not None else None
        grid = fps_grid(batch["depth"].cpu(), grid_hw, cfg.feature_samples, cfg.fov_deg, first, view.fid.fps, k)
        picked = F.grid_sample(labels, grid, mode="nearest", align_corners=True)
        size = max(len(names), int(labels.max()) + 1)
        c = torch.bincount(labels[labels >= 0].long(), minlength=size).double()
        p = torch.bincount(picked[picked >= 0].long(), minlength=size).double()
        cells, picks = (c, p) if cells is None else (cells + c, picks + p)
    cell_share, pick_share = cells / cells.sum(), picks / picks.sum()
    return {(names[i] if i < len(names) else str(i)): {
        "cells": float(cell_share[i]), "fps": float(pick_share[i]),
        "ratio": float(pick_share[i] / cell_share[i]) if cell_share[i] > 0 else float("nan")}
        for i in range(len(cell_share))}


def propose_shifts(stats: CorrelationStats, quantile: float = NULL_QUANTILE) -> dict[str, float]:
    """The shifts of the three terms, from the measured distributions, without labels.

    Rule: pairs of locations in two random images are, for the most part, of different things, so their
    correlations are the *null* distribution of F. A pair is attracted only when its F is higher than
    ``quantile`` (0.9) of that null: every term takes the shift b = Q_0.9(F_random), so about 90 % of the
    random pairs are repelled, and a self or kNN pair is pulled when it is as similar as only the top 10 %
    of unrelated pairs. The same centring is used for measuring and training (``cfg.centering``).
    Rounded to 3 decimals.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    b = round(float(np.quantile(stats.values["random"], quantile)), 3)
    return {SHIFT_KEYS[k]: b for k in PAIRINGS}


def pairing_shifts(shifts: Config | Mapping[str, float]) -> dict[str, float]:
    """{pairing: b} of a config's three shifts, or of shifts keyed by config key (what propose_shifts gives)."""
    return {k: float(shifts[key] if isinstance(shifts, Mapping) else getattr(shifts, key))
            for k, key in SHIFT_KEYS.items()}


def pulled_rows(stats: CorrelationStats, shift_sets: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per (set of shifts, pairing): b, the share of pairs pulled and, with labels, the same-class
    share among the pulled pairs and among all pairs (percent, 1 decimal). ``shift_sets`` = {label: {pairing: b}}
    (:func:`pairing_shifts`)."""
    rows = []
    for label, shifts in shift_sets.items():
        for kind, row in stats.pulled(shifts).items():
            pct = {k: None if row.get(k) is None else round(100 * row[k], 1)
                   for k in ("pulled", "purity", "same_class")}
            rows.append({"shifts": label, "pairs": kind, "b": row["shift"], "pulled %": pct["pulled"],
                         "same class among pulled %": pct["purity"], "same class among all %": pct["same_class"]})
    return rows


def calibration_report(cfg: Config, stats: CorrelationStats, quantile: float = NULL_QUANTILE) -> dict[str, Any]:
    """What ``python -m depthg calibrate`` prints: the distributions, the proposal and the share of pairs each
    set of shifts pulls (with label purity where labels exist), for the config's shifts and the proposal."""
    proposed = propose_shifts(stats, quantile)
    return {
        "centering": stats.centering, "n_crops": stats.n_crops, "samples_per_crop": stats.n_side ** 2,
        "distributions": stats.quantiles(),
        "rule": f"every shift = quantile {quantile} of the random-pair F (no labels)",
        "proposed": proposed,
        "overrides": " ".join(f"{k}={v}" for k, v in proposed.items()),
        "pulled": {"config": stats.pulled(pairing_shifts(cfg)), "proposed": stats.pulled(pairing_shifts(proposed))},
        "labels_used": "only to report purity" if stats.same_class is not None else "none",
    }
