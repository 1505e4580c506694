"""Local hidden positives: propagate each cell's code to its neighbours in 3D or in attention, then project.

docs/method.md §7 gives the method, docs/fidelity.md §3.12 the released variants (:mod:`depthg.method.released`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from depthg.method.sampling import Unproject, depth_to_points
from depthg.utils import DepthGError

#: how the propagation finds each cell's neighbours: nearest in 3D, or most attended by the backbone.
LHP_STRATEGIES: tuple[str, ...] = ("depth", "attention")
_EPS = 1e-10


class LHPError(DepthGError, ValueError):
    """Bad input to :class:`LocalHiddenPositives`."""


def row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q, dim=-1, keepdim=True)`` (linear) by two ``kthvalue`` calls, for inputs beyond
    ``torch.quantile``'s 2**24 elements (B * 784**2 at B = 32)."""
    n = x.shape[-1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = x.kthvalue(lo + 1, dim=-1, keepdim=True).values
    if hi == lo or pos == lo:
        return v_lo
    v_hi = x.kthvalue(hi + 1, dim=-1, keepdim=True).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


def _row_minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(_EPS)


def strongest_attention(att: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Attention mask (B, hw, hw): the entries at or above the row's (1 - quantile) quantile."""
    return att >= threshold


def weighted_mean(mixed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum (B, D, hw) divided by the sum of each row's weights (B, hw, hw): a weighted mean."""
    return mixed / weights.sum(-1).clamp_min(_EPS).unsqueeze(1)


@dataclass(frozen=True)
class LhpChoices:
    """The LHP steps that differ between the paper (the defaults) and the released code
    (``depthg.build.Fidelity.lhp``): the depth unprojection (B, 1, h, w) -> (B, hw, 3), which attention
    entries are kept (att, threshold) -> mask, and the normalisation (mixed, weights) -> (B, D, hw)."""

    unproject: Unproject = depth_to_points
    keep_attention: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = strongest_attention
    normalise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = weighted_mean


class LocalHiddenPositives(nn.Module):
    """Depth- or attention-guided propagation of the code, then a 1x1 MLP projection (docs/method.md §7).

    Args:
        dim: code dimension D.
        strategy: ``"depth"`` (nearest cells in 3D) or ``"attention"`` (most attended cells).
        quantile: fraction of each row kept.
        fov_deg: field of view for the depth unprojection.
        choices: the paper's functions or the released ones (:class:`LhpChoices`).
    """

    def __init__(
        self,
        dim: int,
        strategy: Literal["depth", "attention"] = "depth",
        quantile: float = 0.01,
        fov_deg: float = 90.0,
        choices: LhpChoices = LhpChoices(),
    ) -> None:
        super().__init__()
        if strategy not in LHP_STRATEGIES:
            raise LHPError(f"strategy must be 'depth' or 'attention', got {strategy!r}")
        if not 0.0 < quantile < 1.0:
            raise LHPError(f"quantile must be in (0, 1), got {quantile}")
        self.dim, self.strategy, self.quantile, self.fov_deg = dim, strategy, quantile, fov_deg
        self.unproject, self.keep_attention = choices.unproject, choices.keep_attention
        self.normalise = choices.normalise
        self.projection = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, strategy={self.strategy}, quantile={self.quantile}"

    @torch.no_grad()
    def propagation_weights(
        self,
        grid_hw: tuple[int, int],
        depth: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The (B, hw, hw) weights W (row p: how much of cell q's code flows into p) from ``depth``
        (B, 1, H, W), pooled to ``grid_hw``, or ``attention`` (B, hw, hw) of ``Backbone.patch_attention``."""
        h, w = grid_hw
        if self.strategy == "depth":
            if depth is None or depth.dim() != 4 or depth.shape[1] != 1:
                raise LHPError(f"strategy='depth' needs depth (B, 1, H, W), got "
                               f"{None if depth is None else tuple(depth.shape)}")
            pooled = F.adaptive_avg_pool2d(depth if depth.is_floating_point() else depth.float(), (h, w))
            pts = self.unproject(pooled, self.fov_deg)
            dist = torch.cdist(pts, pts, compute_mode="donot_use_mm_for_euclid_dist")
            dist = _row_minmax(dist)
            keep = dist <= row_quantile(dist, self.quantile)
            return (1.0 - dist) * keep
        if attention is None or attention.dim() != 3 or attention.shape[1:] != (h * w, h * w):
            raise LHPError(f"strategy='attention' needs attention (B, {h * w}, {h * w}), got "
                           f"{None if attention is None else tuple(attention.shape)}")
        att = _row_minmax(attention if attention.is_floating_point() else attention.float())
        threshold = row_quantile(att, 1.0 - self.quantile)
        return att * self.keep_attention(att, threshold)

    def propagate(self, code: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The code (B, D, h, w) mixed under ``weights`` (B, hw, hw), normalised by ``self.normalise``."""
        b, d, h, w = code.shape
        flat = code.flatten(2)  # (B, D, hw)
        weights = weights.to(code.dtype)
        mixed = torch.bmm(flat, weights.transpose(1, 2))  # (B, D, hw): sum_q W[p, q] code[:, q]
        return self.normalise(mixed, weights).view(b, d, h, w)

    def project(self, code: torch.Tensor) -> torch.Tensor:
        """The MLP projection alone (what the positive image gets)."""
        return self.projection(code)

    def forward(
        self,
        code: torch.Tensor,
        depth: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Propagate ``code`` (B, D, h, w) with the strategy's weights and project it -> (B, D, h, w)."""
        if code.dim() != 4 or code.shape[1] != self.dim:
            raise LHPError(f"code must be (B, {self.dim}, h, w), got {tuple(code.shape)}")
        weights = self.propagation_weights(tuple(code.shape[-2:]), depth=depth, attention=attention)
        return self.project(self.propagate(code, weights))
