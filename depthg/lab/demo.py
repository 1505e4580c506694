"""Small demonstrations of the losses on a single pair of crops (used by notebook 03).

:func:`optimise_pair` trains a segmentation head on two overlapping crops, each the other's positive,
with :class:`depthg.method.losses.DepthGLoss`, and returns the loss curves and the code correlation before and
after. Two crops are far too few to learn anything general: it shows the *direction* of the forces the
loss terms exert on the code similarity S, not a result.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from depthg.method.losses import DepthGLoss, LossInputs, tensor_correlation

__all__ = ["optimise_pair"]


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
