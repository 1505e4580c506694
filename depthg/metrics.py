"""Segmentation metrics (Hungarian-matched accuracy and mIoU over one split-wide confusion matrix,
docs/method.md §9) and depth errors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from depthg.utils import DepthGError

__all__ = ["MetricsInputError", "UnsupervisedMetrics", "category_scores", "depth_abs_rel", "depth_delta", "depth_scores", "align_depth"]


class MetricsInputError(DepthGError, ValueError):
    """Predictions or targets that cannot be scored (wrong shape, dtype or range)."""


class UnsupervisedMetrics:
    """Accumulate the int64 ``stats`` (n_classes + extra_clusters, n_classes) confusion matrix (rows =
    predictions) over a split and score it with Hungarian matching (cluster probe) or with cluster k =
    class k (``hungarian=False``, linear probe). Pixels of unmatched extra clusters count as errors.
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

    @torch.no_grad()
    def update(self, preds: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> None:
        """Add integer ``preds`` (cluster ids) and ``targets`` (class ids, out-of-range ones skipped) of one shape."""
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

        Returns ``accuracy`` and ``miou`` (percent), ``iou`` (per class, percent, nan for a class absent
        from ground truth and prediction), ``assignment`` (cluster → class, -1 = unmatched), ``confusion``
        ``(n_classes, n_classes)`` after matching (rows = predicted class) and the raw ``cluster_confusion``.
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


def category_scores(result: dict[str, Any], categories: list[str]) -> dict[str, Any]:
    """IoU of coarser categories from a :meth:`UnsupervisedMetrics.compute` result, one category per class
    (``categories[k]`` of class k): the matched confusion summed over the classes of each category, so a pixel
    given to another class of its own category counts as right. Returns ``miou`` (percent, over categories
    present) and ``iou_per_category`` (percent, nan when absent)."""
    confusion, raw = result["confusion"], result["cluster_confusion"]
    if len(categories) != confusion.shape[0]:
        raise MetricsInputError(f"categories: expected one per class ({confusion.shape[0]}), got {len(categories)}")
    names = list(dict.fromkeys(categories))  # in order of first appearance
    member = torch.zeros(len(categories), len(names), dtype=torch.float64)
    member[torch.arange(len(categories)), torch.tensor([names.index(c) for c in categories])] = 1.0
    stats = member.T @ confusion.double() @ member  # (categories, categories), rows = predicted
    tp = torch.diagonal(stats)
    actual = raw.double().sum(dim=0) @ member  # every valid pixel, unmatched clusters included
    denom = stats.sum(dim=1) + actual - tp
    iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, math.nan))
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean()) * 100 if bool(present.any()) else math.nan
    return {"miou": miou, "iou_per_category": {n: float(v) * 100 for n, v in zip(names, iou)}}


def _as_array(x: Any, dtype: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=dtype)


def _depth_pairs(pred: Any, gt: Any, valid: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 (prediction, reference) of the scored pixels: ``valid``, finite gt > 0, finite pred."""
    p, g = _as_array(pred, np.float64), _as_array(gt, np.float64)
    if p.shape != g.shape:
        raise MetricsInputError(f"depth prediction {p.shape} and reference {g.shape} differ in shape")
    ok = np.isfinite(g) & np.isfinite(p)
    ok[ok] &= g[ok] > 0
    if valid is not None:
        m = _as_array(valid, bool)
        if m.shape != g.shape:
            raise MetricsInputError(f"valid mask {m.shape} and depth {g.shape} differ in shape")
        ok &= m
    if not ok.any():
        raise MetricsInputError("no pixel to score: the mask, the reference (> 0, finite) and the prediction "
                                "(finite) leave none")
    return p[ok], g[ok]


def depth_abs_rel(pred: Any, gt: Any, valid: Any | None = None) -> float:
    """Mean absolute relative error ``mean(|pred - gt| / gt)`` over the scored pixels (0 = perfect)."""
    p, g = _depth_pairs(pred, gt, valid)
    return float(np.mean(np.abs(p - g) / g))


def depth_delta(pred: Any, gt: Any, valid: Any | None = None, threshold: float = 1.25) -> float:
    """Fraction of scored pixels with ``max(pred / gt, gt / pred) < threshold`` (a prediction <= 0 never does)."""
    if not threshold > 1:
        raise MetricsInputError(f"threshold must be > 1, got {threshold}")
    p, g = _depth_pairs(pred, gt, valid)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p > 0, np.maximum(p / g, g / p), np.inf)
    return float(np.mean(ratio < threshold))


def align_depth(pred: Any, gt: Any, valid: Any | None = None, align: str = "none") -> tuple[np.ndarray, dict[str, float]]:
    """Fit a prediction to a reference on the scored pixels and apply the fit to the whole map.

    ``align``: ``"none"`` (metric predictions), ``"median"`` (scale by ``median(gt) / median(pred)``) or
    ``"inverse_affine"`` (least-squares ``a * pred + b ≈ 1 / gt``, returning ``1 / (a * pred + b)``, 0
    where that is <= 0: the protocol for relative networks whose output is affine in inverse depth).
    Returns the aligned float64 map and ``{"scale", "shift"}``.
    """
    if align not in ("none", "median", "inverse_affine"):
        raise MetricsInputError(f"align must be 'none', 'median' or 'inverse_affine', got {align!r}")
    full = _as_array(pred, np.float64)
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
    """``abs_rel``, ``delta1``, ``n`` (scored pixels), ``scale`` and ``shift`` after :func:`align_depth`."""
    aligned, fit = align_depth(pred, gt, valid, align)
    p, g = _depth_pairs(aligned, gt, valid)
    return {"abs_rel": depth_abs_rel(p, g), "delta1": depth_delta(p, g), "n": int(g.size), **fit}
