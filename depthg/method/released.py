"""What the released code (leonsick/depthg@c284180) computes where it departs from the paper: one function each.

``depthg.build.Fidelity`` picks these or the paper's functions once per run; docs/fidelity.md gives each
one's released file:line and measured consequence.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import accumulate, repeat

import torch
import torch.nn.functional as F

from depthg.method.sampling import sample

__all__ = [
    "RELEASED_MAX_STEPS", "STEPS_PER_ITERATION", "RELEASED_ITERATIONS", "global_steps_to_iterations",
    "radians_unprojection", "transposed_readout", "super_perm", "super_perm_negatives",
    "constant_depth_similarity", "transposed_pairs", "pil_nearest_indices", "pil_nearest_resize",
    "weakest_attention", "divide_by_cell_count",
]

# ----------------------------------------------------------------------------------------------------
# three global steps per iteration; § numbers below are those of docs/fidelity.md (§3.9)
# ----------------------------------------------------------------------------------------------------

#: the released ``max_steps``, in PyTorch-Lightning global steps.
RELEASED_MAX_STEPS = 7000
#: global steps per training iteration: one per optimiser (head, linear probe, cluster probe).
STEPS_PER_ITERATION = 3
#: the released training length in iterations: ceil(7000 / 3) = 2334.
RELEASED_ITERATIONS = math.ceil(RELEASED_MAX_STEPS / STEPS_PER_ITERATION)


def global_steps_to_iterations(every: int) -> int:
    """The iteration interval ``every / gcd(3, every)`` of a released ``global_step % every == 0`` rule
    (global_step = 3 * iteration; 0 stays 0, off)."""
    if every <= 0:
        return every
    return every // math.gcd(STEPS_PER_ITERATION, every)


# ----------------------------------------------------------------------------------------------------
# depth-guided sampling (docs/fidelity.md §3.3, §3.4)
# ----------------------------------------------------------------------------------------------------


def radians_unprojection(depth: torch.Tensor, fov_deg: float = 90.0) -> torch.Tensor:
    """The released ``depth2points`` (B, 1, h, w) -> (B, h*w, 3): X = kappa d (c - w/2)/w,
    Y = kappa d (r - h/2)/h, Z = -5 d with kappa = 2 tan(fov) of the degrees taken as radians (§3.4)."""
    b, _, h, w = depth.shape
    d = depth[:, 0]
    rows = torch.arange(h, device=depth.device, dtype=depth.dtype).view(1, h, 1)
    cols = torch.arange(w, device=depth.device, dtype=depth.dtype).view(1, 1, w)
    kappa = 2.0 * math.tan(fov_deg / 2.0)  # radians on purpose: the released bug
    x = kappa * d * (cols - w / 2.0) / w
    y = kappa * d * (rows - h / 2.0) / h
    z = -5.0 * d
    return torch.stack([x.expand(b, h, w), y.expand(b, h, w), z], dim=-1).reshape(b, h * w, 3)


def transposed_readout(indices: torch.Tensor, h: int, w: int, n_side: int) -> torch.Tensor:
    """The released FPS read-out (B, n_side**2) -> (B, n_side, n_side, 2): picks in raster order stored as
    (row/h * 2 - 1, col/w * 2 - 1), which ``grid_sample`` reads as (x, y), transposed (§3.3)."""
    indices = indices.long().sort(dim=1).values  # raster order, as the mask's nonzero entries
    rows = torch.div(indices, w, rounding_mode="floor").to(torch.float32)
    cols = (indices % w).to(torch.float32)
    grid = torch.stack([rows / h * 2.0 - 1.0, cols / w * 2.0 - 1.0], dim=-1)
    return grid.view(indices.shape[0], n_side, n_side, 2)


# ----------------------------------------------------------------------------------------------------
# the loss (docs/fidelity.md §3.1, §3.2, §3.6)
# ----------------------------------------------------------------------------------------------------


def super_perm(size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The released negatives (size,): a randperm whose fixed points move by one (mod size), so an index
    can repeat (§3.6)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(size, generator=generator, device=gen_device)
    perm = torch.where(perm == torch.arange(size, device=gen_device), (perm + 1) % size, perm)
    return perm.to(device) if device is not None else perm


def super_perm_negatives(f1: torch.Tensor, c1: torch.Tensor, feats: torch.Tensor, code: torch.Tensor,
                         grid2: torch.Tensor,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One released pairing (B, C, S, S): crop ``super_perm[k]``'s ``feats`` and ``code`` (B, C, h, w) read at
    the positive's locations ``grid2`` (§3.6); ``f1``, ``c1`` are for the paper's negatives."""
    perm = super_perm(feats.shape[0], generator, device=feats.device)
    return sample(feats[perm], grid2), sample(code[perm], grid2)


def constant_depth_similarity(depth1: torch.Tensor, depth2: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The released depth correlation (B, 1, H, W) -> D (B, S, S, S, S): each map resized to ``size`` and
    L2-normalised over its one channel, i.e. sign(d), so D is 1 wherever both depths are positive (§3.1)."""
    d1 = F.interpolate(depth1, size=size, mode="bilinear", align_corners=True)
    d2 = F.interpolate(depth2, size=size, mode="bilinear", align_corners=True)
    n1, n2 = F.normalize(d1, dim=1, eps=1e-10), F.normalize(d2, dim=1, eps=1e-10)
    return torch.einsum("nchw,ncij->nhwij", n1, n2)


def transposed_pairs(sim: torch.Tensor) -> torch.Tensor:
    """D (B, h, w, i, j) -> (B, w, h, j, i): code[h, w] meets depth[w, h], as with the transposed read-out (§3.2)."""
    return sim.permute(0, 2, 1, 4, 3)


# ----------------------------------------------------------------------------------------------------
# image resize (docs/fidelity.md §3.8)
# ----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _pil_nearest_tuple(n_in: int, n_out: int) -> tuple[int, ...]:
    scale = n_in / n_out  # source pixels per output pixel, a Python (C double) float as in PIL
    # centre of output pixel k in source coordinates, by repeated addition as PIL's scaling loop does it
    positions = accumulate(repeat(scale, n_out - 1), initial=scale * 0.5)
    # truncation picks the source pixel; the clamp only guards the last pixel
    return tuple(min(int(p), n_in - 1) for p in positions)


def pil_nearest_indices(n_in: int, n_out: int) -> torch.Tensor:
    """Source index (n_out,) int64 of every output pixel of PIL's NEAREST resize along one axis: pixel k sits
    at s/2 plus k additions of s = n_in / n_out in doubles and copies source ``int(p_k)`` (§3.8)."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    return torch.tensor(_pil_nearest_tuple(int(n_in), int(n_out)), dtype=torch.long)


def pil_nearest_resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The released resize of image, label and depth alike (..., H, W) -> (..., h, w): PIL's NEAREST gather."""
    rows = pil_nearest_indices(t.shape[-2], size[0]).to(t.device)
    cols = pil_nearest_indices(t.shape[-1], size[1]).to(t.device)
    return t.index_select(-2, rows).index_select(-1, cols)


# ----------------------------------------------------------------------------------------------------
# local hidden positives (docs/fidelity.md §3.12)
# ----------------------------------------------------------------------------------------------------


def weakest_attention(att: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The released attention mask (B, hw, hw): the entries at or *below* the row's (1 - q) quantile (§3.12)."""
    return att <= threshold


def divide_by_cell_count(mixed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The released normaliser: the weighted sum (B, D, hw) divided by hw, not by the weights (§3.12)."""
    return mixed / weights.shape[-1]
