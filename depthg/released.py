"""What the released code (leonsick/depthg@c284180) computes where it departs from the paper: one function each.

The paper path is the plain code of ``depthg.sampling``, ``depthg.losses``, ``depthg.lhp`` and
``depthg.data.transforms``. ``depthg.build.Fidelity`` picks, once per run, either that code or the
functions here; ``mode="released"`` picks all of them. docs/fidelity.md gives, for each one, the
released file:line and its measured consequence.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import accumulate, repeat

import torch
import torch.nn.functional as F

from depthg.sampling import sample

__all__ = [
    "RELEASED_MAX_STEPS", "STEPS_PER_ITERATION", "RELEASED_ITERATIONS", "global_steps_to_iterations",
    "radians_unprojection", "transposed_readout", "super_perm", "super_perm_negatives",
    "constant_depth_similarity", "transposed_pairs", "pil_nearest_indices", "pil_nearest_resize",
    "weakest_attention", "divide_by_cell_count",
]

# ----------------------------------------------------------------------------------------------------
# three global steps per iteration (docs/fidelity.md §3.9)
# ----------------------------------------------------------------------------------------------------

#: the released ``max_steps``, in PyTorch-Lightning global steps.
RELEASED_MAX_STEPS = 7000
#: global steps per training iteration: one per optimiser (head, linear probe, cluster probe).
STEPS_PER_ITERATION = 3
#: the released training length in iterations: ceil(7000 / 3) = 2334.
RELEASED_ITERATIONS = math.ceil(RELEASED_MAX_STEPS / STEPS_PER_ITERATION)


def global_steps_to_iterations(every: int) -> int:
    """The iteration interval of a released ``global_step % every == 0`` rule (0 stays 0: off).

    The released trainer steps three optimisers per iteration and PyTorch-Lightning 2.0.1 counts each, so
    ``global_step = 3 * iteration`` and the rule fires every ``every / gcd(3, every)`` iterations:
    250 -> 250, 300 -> 100, 400 -> 400 (docs/fidelity.md §3.9). The presets give their decay intervals
    in iterations through this function; the schedules count iterations only.
    """
    if every <= 0:
        return every
    return every // math.gcd(STEPS_PER_ITERATION, every)


# ----------------------------------------------------------------------------------------------------
# depth-guided sampling (docs/fidelity.md §3.3, §3.4)
# ----------------------------------------------------------------------------------------------------


def radians_unprojection(depth: torch.Tensor, fov_deg: float = 90.0) -> torch.Tensor:
    """The released ``depth2points``: (B, 1, h, w) depth -> (B, h*w, 3) points, row-major.

    The released code passes the field of view in degrees to a tangent that takes radians
    (kappa = 2 tan(45 rad) = 3.2396 for 90, instead of 2.0), puts the principal point at w/2 (half a
    cell off the grid's centre) and scales only Z, by ``far = 5``: X = kappa d (c - w/2)/w,
    Y = kappa d (r - h/2)/h, Z = -5 d (docs/fidelity.md §3.4). The paper path is
    :func:`depthg.sampling.depth_to_points`.
    """
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
    """The released FPS read-out: (B, n_side**2) flat cell indices -> (B, n_side, n_side, 2) grid.

    The released code marks the picks in a mask, reads them back in raster order and stores
    (row/h * 2 - 1, col/w * 2 - 1), while ``grid_sample`` reads (x, y): cell (r, c) is read at
    (row c (h-1)/w, col r (w-1)/h), transposed and pulled towards the origin; on 28 x 28 the pick
    (5, 20) is read at (19.29, 4.82) (docs/fidelity.md §3.3). The paper path is
    :func:`depthg.sampling.indices_to_grid`, which reads exactly the picked cells.
    """
    indices = indices.long().sort(dim=1).values  # raster order, as the mask's nonzero entries
    rows = torch.div(indices, w, rounding_mode="floor").to(torch.float32)
    cols = (indices % w).to(torch.float32)
    grid = torch.stack([rows / h * 2.0 - 1.0, cols / w * 2.0 - 1.0], dim=-1)
    return grid.view(indices.shape[0], n_side, n_side, 2)


# ----------------------------------------------------------------------------------------------------
# the loss (docs/fidelity.md §3.1, §3.2, §3.6)
# ----------------------------------------------------------------------------------------------------


def super_perm(size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The released negative permutation (size,): a randperm whose fixed points are moved by one (mod size).

    No image is its own negative, but an index can appear twice, so it is not a permutation: at B = 32
    about 3 % of the crops are nobody's negative in each pairing (docs/fidelity.md §3.6).
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(size, generator=generator, device=gen_device)
    perm = torch.where(perm == torch.arange(size, device=gen_device), (perm + 1) % size, perm)
    return perm.to(device) if device is not None else perm


def super_perm_negatives(f1: torch.Tensor, c1: torch.Tensor, feats: torch.Tensor, code: torch.Tensor,
                         grid2: torch.Tensor,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One released negative pairing: features and codes (B, C, S, S) of crop ``super_perm[k]`` for anchor k.

    The negatives are read from the full maps ``feats``, ``code`` (B, C, h, w) at the *positive's*
    locations ``grid2``, not at locations of their own (docs/fidelity.md §3.6). ``f1``, ``c1`` (the
    anchors' samples) are unused here; the paper path :func:`depthg.losses.derangement_negatives`
    permutes them.
    """
    perm = super_perm(feats.shape[0], generator, device=feats.device)
    return sample(feats[perm], grid2), sample(code[perm], grid2)


def constant_depth_similarity(depth1: torch.Tensor, depth2: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The released depth correlation: (B, 1, H, W) depth maps -> D (B, S, S, S, S), ``size = (S, S)``.

    The released code resizes each whole map to a regular S x S grid (bilinear, ``align_corners=True``),
    not to the sampled locations, and correlates it through the features' normalise-then-einsum helper.
    Normalising over one channel gives sign(d), so D is exactly 1 wherever both depths are positive and 0
    where one is 0: the term carries no depth information and only pulls (docs/fidelity.md §3.1).
    """
    d1 = F.interpolate(depth1, size=size, mode="bilinear", align_corners=True)
    d2 = F.interpolate(depth2, size=size, mode="bilinear", align_corners=True)
    n1, n2 = F.normalize(d1, dim=1, eps=1e-10), F.normalize(d2, dim=1, eps=1e-10)
    return torch.einsum("nchw,ncij->nhwij", n1, n2)


def transposed_pairs(sim: torch.Tensor) -> torch.Tensor:
    """D (B, h, w, i, j) -> D (B, w, h, j, i): the released pairing of codes with the regular depth grid.

    The released FPS read-out transposes the grid the codes are read at, while the depth term stays on
    the regular grid, so code[h, w] meets depth[w, h]. It matters only where the resized depth has exact
    zeros (docs/fidelity.md §3.2).
    """
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
    """Source index (n_out,) int64 of every output pixel of PIL's NEAREST resize along one axis.

    PIL places output pixel k at ``s/2 + s + ... + s`` (k additions of s = n_in / n_out in double
    precision) and copies source pixel ``int(p_k)``; where ``(k + 0.5) s`` is an exact integer the
    accumulated rounding decides the side, so this differs from torch's ``nearest-exact`` for 18.7 % of
    a Cityscapes frame's pixels at 224 px (docs/fidelity.md §3.8).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    return torch.tensor(_pil_nearest_tuple(int(n_in), int(n_out)), dtype=torch.long)


def pil_nearest_resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The released resize of image, label and depth alike: (..., H, W) -> (..., h, w), PIL's NEAREST rule.

    The released code resizes the RGB image with nearest neighbour too, which aliases it
    (docs/fidelity.md §3.8). A pure gather: every output value is a copy of one input value, dtype kept.
    """
    rows = pil_nearest_indices(t.shape[-2], size[0]).to(t.device)
    cols = pil_nearest_indices(t.shape[-1], size[1]).to(t.device)
    return t.index_select(-2, rows).index_select(-1, cols)


# ----------------------------------------------------------------------------------------------------
# local hidden positives (docs/fidelity.md §3.12)
# ----------------------------------------------------------------------------------------------------


def weakest_attention(att: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The released attention mask (B, hw, hw): keeps the entries at or *below* the row's (1 - q) quantile.

    The released code zeroes the top ``q`` of each row and keeps the weakest rest, the opposite of hidden
    positives (docs/fidelity.md §3.12); the paper path keeps the most attended cells.
    """
    return att <= threshold


def divide_by_cell_count(mixed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The released propagation's normaliser: the weighted sum (B, D, hw) divided by hw, not by the weights.

    Dividing by the number of cells (784 at 28 x 28) shrinks the code about 100x, so the projection's bias
    dominates (docs/fidelity.md §3.12); the paper path divides by the sum of the weights.
    """
    return mixed / weights.shape[-1]
