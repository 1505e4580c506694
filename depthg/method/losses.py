"""STEGO's correlation losses and DepthG's depth-feature loss (equations S1-S5, R1-R5 of docs/method.md §12).

This is the paper's reading; the released negatives and depth pairing live in :mod:`depthg.method.released`.
The loss owns its defaults: :class:`CorrelationTerms`' weights and shifts, the depth similarities
(:data:`DEPTH_SIMILARITIES`) and paper mode's default one (:data:`PAPER_DEPTH_SIMILARITY`);
``depthg.config`` reads them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from depthg.method.released import constant_depth_similarity, transposed_pairs
from depthg.method.sampling import grid_points, sample
from depthg.utils import DepthGError

Centering = Literal["paper", "released", "none"]
#: every spatial centring of the feature correlation :func:`correlation_loss` accepts.
CENTERINGS: tuple[str, ...] = ("paper", "released", "none")
SimilarityKind = Literal["released", "product", "distance", "centred", "quantile"]
#: every depth similarity :func:`depth_similarity` accepts (docs/method.md §4.3 gives each formula).
DEPTH_SIMILARITIES: tuple[str, ...] = ("released", "product", "distance", "centred", "quantile")
#: paper mode's default depth similarity, chosen on the miniature reproduction's development world
#: (docs/method.md §4.3).
PAPER_DEPTH_SIMILARITY: SimilarityKind = "centred"
#: depth (metres) beyond which ``quantile`` moves points back along their ray (estimators saturate near 80 m).
WORKING_RANGE = 80.0
#: the per-image pair-distance quantile ``quantile`` uses as its unit distance.
DISTANCE_QUANTILE = 0.5
_EPS = 1e-10


class LossError(DepthGError, ValueError):
    """Bad input to a loss (shape or option)."""


def _check_4d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise LossError(f"{name} must be a (B, C, h, w) tensor, got {shape}")


def _check_centering(centering: str) -> None:
    if centering not in CENTERINGS:
        raise LossError(f"centering must be 'paper', 'released' or 'none', got {centering!r}")


# ----------------------------------------------------------------------------------------------------
# Correlations and the STEGO loss
# ----------------------------------------------------------------------------------------------------


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every location pair: (B, C, h, w) x (B, C, i, j) -> (B, h, w, i, j).

    Channels are L2-normalised with eps 1e-10, as STEGO (with one channel this is sign(x), docs/fidelity.md §3.1).
    """
    _check_4d("a", a)
    _check_4d("b", b)
    if a.shape[:2] != b.shape[:2]:
        raise LossError(f"tensor_correlation needs the same (B, C), got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.einsum("nchw,ncij->nhwij", F.normalize(a, dim=1, eps=_EPS), F.normalize(b, dim=1, eps=_EPS))


@torch.no_grad()
def feature_correlation(f1: torch.Tensor, f2: torch.Tensor, centering: Centering = "paper") -> torch.Tensor:
    """F^SC, the frozen features' correlation target (B, h, w, i, j) of two sampled maps (B, C, h, w), (B, C, i, j).

    ``centering``: ``"paper"`` subtracts F's mean over (i, j) per query; ``"released"`` then adds back F's
    global mean (docs/fidelity.md §3.7); ``"none"`` keeps the cosine similarities as they are.
    """
    _check_centering(centering)
    fd = tensor_correlation(f1, f2)
    if centering == "paper":
        fd = fd - fd.mean(dim=(3, 4), keepdim=True)
    elif centering == "released":
        old_mean = fd.mean()
        fd = fd - fd.mean(dim=(3, 4), keepdim=True)
        fd = fd - fd.mean() + old_mean
    return fd


def correlation_loss(
    feats: tuple[torch.Tensor, torch.Tensor],
    codes: tuple[torch.Tensor, torch.Tensor],
    shift: float,
    centering: Centering = "paper",
    zero_clamp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """STEGO's loss -mean (F^SC - shift) * clamp(S, 0) for one pair of sampled maps (docs/method.md §3.2-3.3).

    Args:
        feats: (f1, f2) backbone features (B, C, h, w), (B, C, i, j); F gets no gradient (frozen backbone).
        codes: (c1, c2) codes (B, D, h, w), (B, D, i, j) at the same locations.
        shift: b, the attraction/repulsion threshold.
        centering: how F is centred (:func:`feature_correlation`).
        zero_clamp: clamp S at 0; False uses the released lower bound -9999.

    Returns:
        (scalar loss, S (B, h, w, i, j)).
    """
    (f1, f2), (c1, c2) = feats, codes
    fd = feature_correlation(f1, f2, centering)
    cd = tensor_correlation(c1, c2)
    clamped = cd.clamp(min=0.0) if zero_clamp else cd.clamp(min=-9999.0)
    loss = -(clamped * (fd - shift)).mean()
    return loss, cd


# ----------------------------------------------------------------------------------------------------
# Depth similarity and the depth-feature loss (docs/method.md §4.3 gives each option's formula)
# ----------------------------------------------------------------------------------------------------


def _pair_distances(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance of every point pair: (B, 3, h, w) x (B, 3, i, j) -> (B, hw, ij)."""
    if p1.shape[1] != 3 or p2.shape[1] != 3:
        raise LossError("this depth similarity expects sampled 3D points (B, 3, h, w), got "
                        f"{tuple(p1.shape)} and {tuple(p2.shape)}")
    a = p1.flatten(2).transpose(1, 2)  # (B, hw, 3)
    c = p2.flatten(2).transpose(1, 2)  # (B, ij, 3)
    return (a.unsqueeze(2) - c.unsqueeze(1)).square().sum(-1).sqrt()  # exact, no matmul trick


def _released_similarity(p1: torch.Tensor, p2: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Depth maps (B, 1, H, W) -> the constant D (B, S, S, S, S) of ``depthg.method.released``, ``size = (S, S)``."""
    if size is None:
        raise LossError("depth_similarity(kind='released') needs size=(S, S) to resize the depth to")
    if p1.shape[1] != 1 or p2.shape[1] != 1:
        raise LossError("depth_similarity(kind='released') expects depth maps (B, 1, H, W)")
    return constant_depth_similarity(p1, p2, size)


def _product_similarity(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Sampled depths (B, 1, h, w), (B, 1, i, j) -> D = z1_hw * z2_ij (B, h, w, i, j), z standardised per image."""
    if p1.shape[1] != 1 or p2.shape[1] != 1:
        raise LossError("depth_similarity(kind='product') expects sampled depths (B, 1, h, w)")

    def standardise(d: torch.Tensor) -> torch.Tensor:
        flat = d.flatten(1)
        return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)).view_as(d)

    z1, z2 = standardise(p1), standardise(p2)
    return torch.einsum("nhw,nij->nhwij", z1[:, 0], z2[:, 0])


def _closeness_similarity(p1: torch.Tensor, p2: torch.Tensor, centred: bool) -> torch.Tensor:
    """``distance`` (or ``centred``): 3D points (B, 3, h, w), (B, 3, i, j) -> D (B, h, w, i, j).

    D = 1 - |P_hw - P_ij| / (the image's largest pair distance); ``centred`` subtracts its mean over (i, j).
    """
    b, _, h, w = p1.shape
    i, j = p2.shape[-2:]
    dist = _pair_distances(p1, p2)  # (B, hw, ij)
    sim = 1.0 - dist / dist.flatten(1).amax(1).clamp_min(_EPS).view(b, 1, 1)
    if centred:
        sim = sim - sim.mean(dim=2, keepdim=True)  # mean over the other image's locations (i, j)
    return sim.view(b, h, w, i, j)


def _quantile_similarity(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """3D points -> D = clamp(1 - |P_hw - P_ij| / q, -1, 1) (B, h, w, i, j), q the median pair distance,
    points beyond :data:`WORKING_RANGE` moved back along their ray first."""
    b, _, h, w = p1.shape
    i, j = p2.shape[-2:]
    # move points beyond the working range back along their ray (Z is channel 2, Z = depth)
    p1 = p1 * (WORKING_RANGE / p1[:, 2:3].clamp_min(_EPS)).clamp(max=1.0)
    p2 = p2 * (WORKING_RANGE / p2[:, 2:3].clamp_min(_EPS)).clamp(max=1.0)
    dist = _pair_distances(p1, p2)  # (B, hw, ij)
    # the image's typical (median) pair distance is the unit
    scale = torch.quantile(dist.flatten(1), DISTANCE_QUANTILE, dim=1).clamp_min(_EPS).view(b, 1, 1)
    return (1.0 - dist / scale).clamp(-1.0, 1.0).view(b, h, w, i, j)


def depth_similarity(
    p1: torch.Tensor,
    p2: torch.Tensor,
    kind: SimilarityKind = PAPER_DEPTH_SIMILARITY,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Pairwise depth similarity D (B, h, w, i, j) of the depth-feature loss, under ``no_grad``.

    Inputs by ``kind``: ``"released"`` full depth maps (B, 1, H, W) resized to ``size``; ``"product"``
    sampled depths (B, 1, h, w); ``"distance"``, ``"centred"``, ``"quantile"`` sampled 3D points (B, 3, h, w).
    """
    _check_4d("p1", p1)
    _check_4d("p2", p2)
    with torch.no_grad():
        if kind == "released":
            return _released_similarity(p1, p2, size)
        if kind == "product":
            return _product_similarity(p1, p2)
        if kind in ("distance", "centred"):
            return _closeness_similarity(p1, p2, centred=kind == "centred")
        if kind == "quantile":
            return _quantile_similarity(p1, p2)
        raise LossError(f"kind must be one of {list(DEPTH_SIMILARITIES)}, got {kind!r}")


def pull_push_fractions(depth_sim: torch.Tensor, shift: float) -> dict[str, float]:
    """Fractions of all entries of ``depth_sim`` (B, h, w, i, j) that the depth term pulls together
    (D > shift) and pushes apart (D < shift): ``{"pulled": ..., "pushed": ...}``."""
    if not isinstance(depth_sim, torch.Tensor) or depth_sim.numel() == 0:
        raise LossError("pull_push_fractions needs a non-empty similarity tensor")
    n = depth_sim.numel()
    return {"pulled": int((depth_sim > shift).sum()) / n, "pushed": int((depth_sim < shift).sum()) / n}


def sampled_depth_similarity(depth: torch.Tensor, grid: torch.Tensor, grid_hw: tuple[int, int],
                             kind: SimilarityKind = PAPER_DEPTH_SIMILARITY, fov_deg: float = 90.0,
                             intrinsics: torch.Tensor | None = None) -> torch.Tensor:
    """D (B, S, S, S, S) of one crop's depth (B, 1, H, W) at its sampled locations ``grid`` (B, S, S, 2).

    The depth is pooled to ``grid_hw`` (as FPS does) and read, or unprojected (each crop's ``intrinsics``
    (B, 4), else ``fov_deg``) and read, at the code's own coordinates; ``released`` ignores ``grid`` and
    resizes the whole map to S x S.
    """
    _check_4d("depth", depth)
    n_h, n_w = grid.shape[1:3]
    if kind == "released":
        return depth_similarity(depth, depth, "released", size=(n_h, n_w))
    if kind == "product":
        values = sample(F.adaptive_avg_pool2d(depth, grid_hw), grid)
    else:
        pts = grid_points(depth, grid_hw, fov_deg, intrinsics)
        values = sample(pts.transpose(1, 2).reshape(depth.shape[0], 3, *grid_hw), grid)
    return depth_similarity(values, values, kind)


def depth_feature_loss(code_s: torch.Tensor, depth_sim: torch.Tensor, shift: float) -> torch.Tensor:
    """-mean clamp(S_intra, 0) * (D - shift) (docs/method.md §4.2) for the anchor's sampled code
    ``code_s`` (B, D, S, S) and ``depth_sim`` (B, S, S, S, S) at the same locations."""
    cd = tensor_correlation(code_s, code_s)
    if depth_sim.shape != cd.shape:
        raise LossError(f"depth_sim must have the code correlation's shape {tuple(cd.shape)}, got "
                        f"{tuple(depth_sim.shape)}")
    return -(cd.clamp(min=0.0) * (depth_sim - shift)).mean()


# ----------------------------------------------------------------------------------------------------
# Permutations for the negatives
# ----------------------------------------------------------------------------------------------------


def derangement(size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A uniformly random permutation without fixed points (rejection sampling; ~e draws expected)."""
    if size < 2:
        raise LossError(f"negatives need a batch of at least 2 images, got {size}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    arange = torch.arange(size, device=gen_device)
    while True:
        perm = torch.randperm(size, generator=generator, device=gen_device)
        if not bool((perm == arange).any()):
            return perm.to(device) if device is not None else perm


def derangement_negatives(f1: torch.Tensor, c1: torch.Tensor, feats: torch.Tensor, code: torch.Tensor,
                          grid2: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's negatives: the anchors' samples ``f1``, ``c1`` (B, C, S, S) permuted by a
    :func:`derangement`. ``feats``, ``code``, ``grid2`` are for the released ``super_perm_negatives``."""
    perm = derangement(feats.shape[0], generator, device=feats.device)
    return f1[perm], c1[perm]


#: ``negatives(f1, c1, feats, code, grid2, generator) -> (f_neg, c_neg)``, one pairing of :class:`DepthGLoss`.
Negatives = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------------
# The full objective
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorrelationTerms:
    """Weights (lambda) and shifts (b) of STEGO's three terms, the negatives per step, the S3 centring
    (:func:`correlation_loss`) and the code clamp (docs/method.md §3.4). Field names are config keys.

    The defaults are the released default config's (the COCO-Stuff ViT-S/8 run, docs/method.md §11) with
    the released centring; ``depthg.config.Config`` takes its defaults of these keys from here, so
    ``CorrelationTerms()`` is the loss a default config builds.
    """

    pos_intra_weight: float = 0.58
    pos_intra_shift: float = 0.07
    pos_inter_weight: float = 0.36
    pos_inter_shift: float = 0.025
    neg_inter_weight: float = 0.7000000000000001  # the released value, in full (not 0.7)
    neg_inter_shift: float = 0.761
    neg_samples: int = 5
    centering: Centering = "released"
    zero_clamp: bool = True

    def __post_init__(self) -> None:
        if self.neg_samples < 0:
            raise LossError(f"neg_samples must be >= 0, got {self.neg_samples}")
        _check_centering(self.centering)

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "CorrelationTerms":
        """The config's values of these keys (``overrides`` replace some)."""
        return cls(**{**{f.name: getattr(cfg, f.name) for f in fields(cls)}, **overrides})


@dataclass(frozen=True)
class LossInputs:
    """What one :class:`DepthGLoss` call compares, anchors first, then their kNN positives.

    ``feats``, ``feats_pos``: (B, C, h, w) correlation-target (backbone) features; ``code``, ``code_pos``:
    (B, D, h, w) the head's codes on the same grid; ``depth``, ``depth_pos``: (B, 1, H, W) or (B, H, W) depth,
    larger = farther, or None when the depth term is off (only the anchor's enters the depth term, as released);
    ``intrinsics``, ``intrinsics_pos``: (B, 4) ``[fx, fy, cx, cy]`` of the anchors' and the positives' cameras
    in the depth maps' pixels, for the 3D depth similarities (None: the pinhole of the loss's ``fov_deg``).
    """

    feats: torch.Tensor
    feats_pos: torch.Tensor
    code: torch.Tensor
    code_pos: torch.Tensor
    depth: torch.Tensor | None = None
    depth_pos: torch.Tensor | None = None
    intrinsics: torch.Tensor | None = None  # (B, 4) the anchors' cameras in depth pixels; None: fov_deg
    intrinsics_pos: torch.Tensor | None = None  # (B, 4) the positives' cameras


class DepthGLoss(nn.Module):
    """STEGO's three correlation terms plus DepthG's depth-feature term (docs/method.md §3.4, §5).

    total = w_intra * pos_intra + w_inter * pos_inter + w_neg * neg_inter + depth_weight * depth. The depth
    weight and shift decay (:class:`depthg.method.schedules.DepthDecaySchedule`), so :meth:`forward` takes them at every step.

    Args:
        terms: the STEGO terms' settings.
        depth_similarity: one of :data:`DEPTH_SIMILARITIES` (:func:`depth_similarity`).
        fov_deg: field of view of the pinhole unprojection of the 3D similarities.
        negatives: :func:`derangement_negatives`, or the released ``super_perm_negatives``.
        transposed_depth_pairs: pair the ``released`` similarity with the transposed read-out's codes
            (``depthg.method.released.transposed_pairs``).
    """

    def __init__(
        self,
        terms: CorrelationTerms = CorrelationTerms(),
        depth_similarity: SimilarityKind = PAPER_DEPTH_SIMILARITY,
        fov_deg: float = 90.0,
        negatives: Negatives = derangement_negatives,
        transposed_depth_pairs: bool = False,
    ) -> None:
        super().__init__()
        if depth_similarity not in DEPTH_SIMILARITIES:
            raise LossError(f"depth_similarity must be one of {list(DEPTH_SIMILARITIES)}, got {depth_similarity!r}")
        self.terms = terms
        self.depth_similarity: SimilarityKind = depth_similarity
        self.fov_deg = float(fov_deg)
        self.negatives = negatives
        self.transposed_depth_pairs = bool(transposed_depth_pairs)

    def extra_repr(self) -> str:
        return (f"centering={self.terms.centering}, depth_similarity={self.depth_similarity}, "
                f"negatives={getattr(self.negatives, '__name__', self.negatives)}, "
                f"neg_samples={self.terms.neg_samples}")

    def depth_term(self, code_s: torch.Tensor, depth: torch.Tensor, grid: torch.Tensor,
                   grid_hw: tuple[int, int], shift: float, intrinsics: torch.Tensor | None = None) -> torch.Tensor:
        """The depth-feature loss of the anchor's code ``code_s`` (B, D, S, S) sampled at ``grid``."""
        sim = sampled_depth_similarity(depth, grid, grid_hw, self.depth_similarity, self.fov_deg, intrinsics)
        if self.depth_similarity == "released" and self.transposed_depth_pairs:
            sim = transposed_pairs(sim)  # code[h, w] meets depth[w, h] (docs/fidelity.md §3.2)
        return depth_feature_loss(code_s, sim.to(code_s.dtype), shift)

    def forward(
        self,
        x: LossInputs,
        grids: tuple[torch.Tensor, torch.Tensor],
        depth_weight: float = 0.0,
        depth_shift: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms of one step.

        Args:
            x: the anchors' and positives' features, codes and depth (:class:`LossInputs`).
            grids: (grid1, grid2), each (B, S, S, 2) (x, y) sample coordinates (``align_corners=True``) of the
                anchors and the positives.
            depth_weight, depth_shift: w_depth(t), b_depth(t) at this step.
            generator: draws the negative permutations.

        Returns:
            the unweighted ``pos_intra``, ``pos_inter``, ``neg_inter`` (mean over the pairings) and
            ``depth`` (0 when ``depth_weight`` is 0), and the weighted ``total``.
        """
        feats, feats_pos, code, code_pos, depth = x.feats, x.feats_pos, x.code, x.code_pos, x.depth
        grid1, grid2 = grids
        for name, t in (("feats", feats), ("feats_pos", feats_pos), ("code", code), ("code_pos", code_pos)):
            _check_4d(name, t)
        if grid1.shape != grid2.shape:
            raise LossError(f"grid1 and grid2 must have the same shape, got {tuple(grid1.shape)} and "
                            f"{tuple(grid2.shape)}")
        t = self.terms
        f1, c1 = sample(feats, grid1), sample(code, grid1)
        f2, c2 = sample(feats_pos, grid2), sample(code_pos, grid2)
        kw = dict(centering=t.centering, zero_clamp=t.zero_clamp)

        pos_intra, _ = correlation_loss((f1, f1), (c1, c1), t.pos_intra_shift, **kw)
        pos_inter, _ = correlation_loss((f1, f2), (c1, c2), t.pos_inter_shift, **kw)

        neg_terms = []
        for _ in range(t.neg_samples):
            fn, cn = self.negatives(f1, c1, feats, code, grid2, generator)
            neg_terms.append(correlation_loss((f1, fn), (c1, cn), t.neg_inter_shift, **kw)[0])
        neg_inter = torch.stack(neg_terms).mean() if neg_terms else code.new_zeros(())

        if depth_weight != 0.0:
            if depth is None:
                raise LossError("depth_weight is non-zero but depth is None")
            depth_loss = self.depth_term(c1, depth, grid1, tuple(code.shape[-2:]), depth_shift, x.intrinsics)
        else:
            depth_loss = code.new_zeros(())

        total = (t.pos_intra_weight * pos_intra + t.pos_inter_weight * pos_inter
                 + t.neg_inter_weight * neg_inter + depth_weight * depth_loss)
        return {"pos_intra": pos_intra, "pos_inter": pos_inter, "neg_inter": neg_inter,
                "depth": depth_loss, "total": total}
