"""Unsupervised segmentation metrics: Hungarian-matched pixel accuracy and mIoU (docs/method.md §9).

The evaluation accumulates one confusion matrix ``stats[cluster, class]`` over the **whole** split, then
matches clusters to classes once with the Hungarian algorithm (maximising the matched pixel count)
and reports, in percent,

* accuracy = matched pixels / all valid pixels,
* IoU_c = tp / (tp + fp + fn) per class, and mIoU = the mean over classes whose IoU is not NaN
  (a class absent from both ground truth and prediction is left out), as released.

The linear probe is scored by the same class with ``hungarian=False`` (identity mapping).

Difference from the released ``UnsupervisedMetrics`` (``utils.py:202-277``): the released code masks
out every pixel whose prediction is ``>= n_classes``, so with ``extra_clusters > 0`` the pixels given to
the extra clusters silently vanish from the denominators. Here every valid pixel counts: pixels of
unmatched clusters are errors (they lower accuracy and are false negatives of their true class). With
``extra_clusters = 0`` — every released run — the two agree exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from depthg.utils import DepthGError

__all__ = ["MetricsInputError", "UnsupervisedMetrics", "depth_abs_rel", "depth_delta", "depth_scores", "align_depth"]


class MetricsInputError(DepthGError, ValueError):
    """Predictions or targets that cannot be scored (wrong shape, dtype or range)."""


class UnsupervisedMetrics:
    """Accumulate a (clusters × classes) confusion matrix over a split; score it with or without matching.

    Args:
        n_classes: number of ground-truth classes; targets outside ``[0, n_classes)`` are ignored.
        extra_clusters: clusters beyond ``n_classes`` (over-clustering); predictions must lie in
            ``[0, n_classes + extra_clusters)``.
        hungarian: True → Hungarian matching of clusters to classes (cluster probe); False → identity
            mapping, cluster k is class k (linear probe).

    ``stats`` is the int64 confusion matrix ``(n_clusters, n_classes)``, rows = predictions, columns =
    ground truth; for multi-process evaluation sum it across processes before :meth:`compute`.
    """

    def __init__(self, n_classes: int, extra_clusters: int = 0, hungarian: bool = True) -> None:
        if n_classes <= 0 or extra_clusters < 0:
            raise MetricsInputError(
                f"need n_classes > 0 and extra_clusters >= 0, got n_classes={n_classes}, "
                f"extra_clusters={extra_clusters}"
            )
        self.n_classes = int(n_classes)
        self.extra_clusters = int(extra_clusters)
        self.n_clusters = self.n_classes + self.extra_clusters
        self.hungarian = bool(hungarian)
        self.stats = torch.zeros(self.n_clusters, self.n_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.stats.zero_()

    @torch.no_grad()
    def update(self, preds: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> None:
        """Add a batch: ``preds`` cluster ids and ``targets`` class ids of the same shape (e.g. (B, H, W)).

        Targets outside ``[0, n_classes)`` (-1 = ignore, 255, ...) are skipped. Predictions must be
        integers in ``[0, n_clusters)`` everywhere; anything else is a bug upstream and raises.
        """
        preds = torch.as_tensor(preds)
        targets = torch.as_tensor(targets)
        if preds.shape != targets.shape:
            raise MetricsInputError(
                "preds and targets must have the same shape, got "
                f"{tuple(preds.shape)} and {tuple(targets.shape)}"
            )
        for name, t in (("preds", preds), ("targets", targets)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise MetricsInputError(f"{name}: expected integer class/cluster ids, got dtype {t.dtype}")
        preds = preds.reshape(-1).long()
        targets = targets.reshape(-1).long().to(preds.device)
        if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= self.n_clusters):
            raise MetricsInputError(
                f"preds: cluster ids must lie in [0, {self.n_clusters}), got range "
                f"[{int(preds.min())}, {int(preds.max())}]"
            )
        valid = (targets >= 0) & (targets < self.n_classes)
        index = preds[valid] * self.n_classes + targets[valid]
        counts = torch.bincount(index, minlength=self.n_clusters * self.n_classes)
        self.stats += counts.reshape(self.n_clusters, self.n_classes).cpu()

    def assignment(self) -> np.ndarray:
        """cluster → class for every cluster (``-1`` for clusters left unmatched), int64 array."""
        assign = np.full(self.n_clusters, -1, dtype=np.int64)
        if self.hungarian:
            rows, cols = linear_sum_assignment(self.stats.numpy(), maximize=True)
            assign[rows] = cols
        else:
            assign[: self.n_classes] = np.arange(self.n_classes)
        return assign

    def compute(self) -> dict[str, Any]:
        """Score everything accumulated.

        Returns a dict with
            ``accuracy``, ``miou``: floats in percent;
            ``iou``: list of per-class IoU in percent (``nan`` for a class absent from both
            ground truth and matched prediction), so that ``miou`` = nan-mean of ``iou``;
            ``assignment``: list, cluster → class (-1 = unmatched);
            ``confusion``: int64 tensor ``(n_classes, n_classes)``, rows = predicted class after
            matching, columns = ground truth (the released ``histogram`` orientation); pixels of
            unmatched clusters are not in it (they are in ``cluster_confusion``);
            ``cluster_confusion``: the raw ``(n_clusters, n_classes)`` matrix.
        """
        total = int(self.stats.sum())
        if total == 0:
            raise MetricsInputError("no valid pixels were accumulated (all targets ignored or no update)")
        assign = self.assignment()
        confusion = torch.zeros(self.n_classes, self.n_classes, dtype=torch.int64)
        for cluster, cls in enumerate(assign):
            if cls >= 0:
                confusion[cls] += self.stats[cluster]
        stats = confusion.double()
        tp = torch.diagonal(stats)
        predicted = stats.sum(dim=1)  # pixels given to each class via its matched cluster
        actual = self.stats.double().sum(dim=0)  # every valid pixel of each class, unmatched included
        denom = predicted + actual - tp  # tp + fp + fn
        iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, math.nan))
        present = ~torch.isnan(iou)
        miou = float(iou[present].mean()) * 100 if bool(present.any()) else math.nan
        return {
            "accuracy": float(tp.sum()) / total * 100,
            "miou": miou,
            "iou": (iou * 100).tolist(),
            "assignment": assign.tolist(),
            "confusion": confusion,
            "cluster_confusion": self.stats.clone(),
        }


# ----------------------------------------------------------------------------------------------------
# Depth errors against a reference (AbsRel, delta < 1.25): the standard monocular-depth metrics
# ----------------------------------------------------------------------------------------------------


def _depth_pairs(pred: Any, gt: Any, valid: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """The (prediction, reference) values of the scored pixels, float64, flattened.

    Scored: ``valid`` (if given) and a finite reference > 0 and a finite prediction.
    """
    p = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred, dtype=np.float64)
    g = np.asarray(gt.detach().cpu() if isinstance(gt, torch.Tensor) else gt, dtype=np.float64)
    if p.shape != g.shape:
        raise MetricsInputError(f"depth prediction {p.shape} and reference {g.shape} differ in shape")
    ok = np.isfinite(g) & np.isfinite(p)
    ok[ok] &= g[ok] > 0
    if valid is not None:
        m = np.asarray(valid.detach().cpu() if isinstance(valid, torch.Tensor) else valid, dtype=bool)
        if m.shape != g.shape:
            raise MetricsInputError(f"valid mask {m.shape} and depth {g.shape} differ in shape")
        ok &= m
    if not ok.any():
        raise MetricsInputError("no pixel to score: the mask, the reference (> 0, finite) and the prediction "
                                "(finite) leave none")
    return p[ok], g[ok]


def depth_abs_rel(pred: Any, gt: Any, valid: Any | None = None) -> float:
    """Mean absolute relative error, ``mean(|pred - gt| / gt)`` over the scored pixels (0 = perfect).

    pred, gt: depth maps of one shape (any units, the same for both); valid: optional bool mask.
    Scored pixels: ``valid`` and finite ``gt`` > 0 and finite ``pred``.
    """
    p, g = _depth_pairs(pred, gt, valid)
    return float(np.mean(np.abs(p - g) / g))


def depth_delta(pred: Any, gt: Any, valid: Any | None = None, threshold: float = 1.25) -> float:
    """Threshold accuracy: the fraction of scored pixels with ``max(pred / gt, gt / pred) < threshold``.

    ``threshold`` 1.25 gives the usual delta_1 (1.25**2, 1.25**3 give delta_2, delta_3); in [0, 1], 1 =
    perfect. A prediction <= 0 never counts as within the threshold. Scored pixels as in
    :func:`depth_abs_rel`.
    """
    if not threshold > 1:
        raise MetricsInputError(f"threshold must be > 1, got {threshold}")
    p, g = _depth_pairs(pred, gt, valid)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p > 0, np.maximum(p / g, g / p), np.inf)
    return float(np.mean(ratio < threshold))


def align_depth(pred: Any, gt: Any, valid: Any | None = None, align: str = "none") -> tuple[np.ndarray, dict[str, float]]:
    """Fit a prediction to a reference on the scored pixels and apply the fit to the whole map.

    align:

    - ``"none"``: metric predictions as they are;
    - ``"median"``: multiply the prediction by ``median(gt) / median(pred)`` (for networks that know depth
      only up to scale);
    - ``"inverse_affine"``: fit ``a * pred + b`` to the reference's inverse depth ``1 / gt`` by least squares
      and return ``1 / (a * pred + b)`` (the scale-and-shift-in-disparity protocol for relative networks
      such as MiDaS/DPT and Depth Anything, whose output is affine in inverse depth; the workbench's
      relative maps ``1 - minmax(disparity)`` are too). Where the fit is <= 0 the result is 0 (no depth).

    Returns the aligned map (float64, the shape of ``pred``) and ``{"scale", "shift"}`` (1 and 0 for
    ``"none"``; ``a`` and ``b`` for ``"inverse_affine"``). Scored pixels as in :func:`depth_abs_rel`.
    """
    if align not in ("none", "median", "inverse_affine"):
        raise MetricsInputError(f"align must be 'none', 'median' or 'inverse_affine', got {align!r}")
    full = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred, dtype=np.float64)
    p, g = _depth_pairs(pred, gt, valid)
    if align == "none":
        return full, {"scale": 1.0, "shift": 0.0}
    if align == "median":
        scale = float(np.median(g) / np.median(p))
        if not math.isfinite(scale) or scale <= 0:
            raise MetricsInputError(f"median scaling failed: median prediction {np.median(p):g}")
        return full * scale, {"scale": scale, "shift": 0.0}
    (a, b), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], axis=1), 1.0 / g, rcond=None)
    inv = a * full + b
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(inv > 0, 1.0 / np.where(inv > 0, inv, 1.0), 0.0)  # no positive depth: 0, a miss
    return np.where(np.isfinite(full), out, np.nan), {"scale": float(a), "shift": float(b)}


def depth_scores(pred: Any, gt: Any, valid: Any | None = None, align: str = "none") -> dict[str, float]:
    """AbsRel and delta < 1.25 of a depth map against a reference, after :func:`align_depth`.

    Returns ``abs_rel``, ``delta1``, ``n`` (scored pixels) and the alignment's ``scale`` and ``shift``.
    """
    aligned, fit = align_depth(pred, gt, valid, align)
    p, g = _depth_pairs(aligned, gt, valid)
    return {"abs_rel": depth_abs_rel(p, g), "delta1": depth_delta(p, g), "n": int(g.size), **fit}
