"""Small demonstrations for the teaching notebooks: the losses on one pair of crops (notebook 03) and the
evaluation on a few images (notebook 04).

:func:`optimise_pair` trains a segmentation head on two overlapping crops, each the other's positive,
with :class:`depthg.method.losses.DepthGLoss`, and returns the loss curves and the code correlation before and
after. Two crops are far too few to learn anything general: it shows the *direction* of the forces the
loss terms exert on the code similarity S, not a result.

:func:`patch_majority` is the best a prediction made per backbone patch can do (each patch gets its most
frequent class), which shows why thin classes score near zero; :func:`fit_probes` fits the cluster probe
(k-means, no labels) and the linear probe (labels) of :mod:`depthg.method.head` on frozen features, full
batch and seeded, so the two can be compared with the evaluation's own metric.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from depthg.method.head import ClusterProbe, LinearProbe
from depthg.method.losses import DepthGLoss, LossInputs, tensor_correlation

__all__ = ["optimise_pair", "patch_majority", "fit_probes"]


def optimise_pair(
    loss_fn: DepthGLoss,
    head: nn.Module,
    feats: torch.Tensor,
    depth: torch.Tensor,
    grids: torch.Tensor,
    steps: int,
    lr: float,
    depth_weight: float,
    depth_shift: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Adam steps of ``head`` on one pair of crops; every term of ``loss_fn`` as in training.

    Args:
        loss_fn: the objective (weights, shifts, depth similarity, mode).
        head: maps features (2, C, h, w) to codes (2, D, h, w); trained in place.
        feats: backbone features of the two crops (2, C, h, w); crop 1 is crop 0's positive and back.
        depth: their depth maps (2, 1, H, W).
        grids: the sample coordinates of each crop (2, S, S, 2).
        steps, lr: number of Adam steps and learning rate.
        depth_weight, depth_shift: w_depth and b_depth, held fixed (no decay in so few steps).
        seed: seeds the negative permutations and the head's dropout (the global torch generator is forked
            and restored, so the result depends on ``seed`` alone and the caller's random state is unchanged).

    Returns:
        ``{"records": [{"step", "pos_intra", "pos_inter", "neg_inter", "depth", "total"}, ...],
        "S_before": (h, w, h, w), "S_after": (h, w, h, w)}``: the unweighted loss terms per step and the
        dense code correlation of crop 0 with crop 1 before and after (head in eval mode, no dropout).
    """
    if feats.dim() != 4 or feats.shape[0] != 2:
        raise ValueError(f"optimise_pair needs the features of exactly two crops (2, C, h, w), got {tuple(feats.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)

    def code_correlation() -> torch.Tensor:
        head.eval()
        with torch.no_grad():
            code = head(feats)
        head.train()
        return tensor_correlation(code[:1], code[1:])[0]

    pos = torch.tensor([1, 0])  # each crop is the other's positive
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head's dropout
        before = code_correlation()
        records = []
        for step in range(steps):
            code = head(feats)
            x = LossInputs(feats, feats[pos], code, code[pos], depth, depth[pos])
            terms = loss_fn(x, (grids, grids[pos]), depth_weight=depth_weight, depth_shift=depth_shift,
                            generator=gen)
            opt.zero_grad()
            terms["total"].backward()
            opt.step()
            records.append({"step": step + 1, **{k: float(v.detach()) for k, v in terms.items()}})
    return {"records": records, "S_before": before, "S_after": code_correlation()}


def patch_majority(labels: torch.Tensor, patch: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label every ``patch`` x ``patch`` block of ``labels`` (B, H, W; -1 = ignore) with its most frequent
    class: the best possible prediction at the backbone's patch resolution.

    Returns the prediction at (B, H, W), made as the evaluation makes its predictions (the per-block class
    shares upsampled bilinearly, then the most likely class; -1 where no block around holds a valid pixel),
    and the shares (B, n_classes, H/patch, W/patch), which act as patch-level scores.
    """
    if labels.ndim != 3 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer (B, H, W) tensor, got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[-1] % patch or labels.shape[-2] % patch:
        raise ValueError(f"image size {tuple(labels.shape[-2:])} is not a multiple of the patch size {patch}")
    valid = (labels >= 0) & (labels < n_classes)
    onehot = F.one_hot(labels.clamp(0, n_classes - 1), n_classes) * valid[..., None]
    shares = F.avg_pool2d(onehot.permute(0, 3, 1, 2).float(), patch)
    up = F.interpolate(shares, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    return torch.where(up.sum(1) > 0, up.argmax(1), torch.full_like(labels, -1)), shares


def fit_probes(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 300, lr: float = 0.05,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Fit a cluster probe (spherical k-means with ``n_classes`` centroids, no labels) and a linear probe
    (cross-entropy on ``labels``) on frozen features (B, C, h, w), full batch, ``steps`` Adam steps. The
    linear probe is fitted against the labels read at twice the feature grid's resolution (nearest), which is
    many times cheaper than the full resolution and loses little.

    Returns their predictions at the labels' size (B, H, W), both from bilinearly upsampled scores:
    ``"cluster"`` holds cluster ids (to be matched to classes by the Hungarian algorithm), ``"linear"`` class ids.
    """
    cluster = ClusterProbe(feats.shape[1], n_classes, generator=seed)
    linear = LinearProbe(feats.shape[1], n_classes, generator=seed + 1)
    opt = torch.optim.Adam([*cluster.parameters(), *linear.parameters()], lr=lr)
    stride = max(1, labels.shape[-1] // (2 * feats.shape[-1]))
    coarse = labels[:, stride // 2::stride, stride // 2::stride]
    for _ in range(steps):
        loss = cluster(feats)[0] + linear.loss(feats, coarse)
        opt.zero_grad()
        loss.backward()
        opt.step()
    size = tuple(labels.shape[-2:])
    with torch.no_grad():
        cluster_scores = F.interpolate(cluster(feats, alpha=2.0)[1], size=size, mode="bilinear", align_corners=False)
        linear_scores = F.interpolate(linear(feats), size=size, mode="bilinear", align_corners=False)
    return {"cluster": cluster_scores.argmax(1), "linear": linear_scores.argmax(1)}
