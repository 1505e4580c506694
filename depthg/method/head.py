"""STEGO segmentation head, cluster probe and linear probe: the only trainable parts (docs/method.md §5).

Both probes are trained by the trainer on detached codes, so nothing flows back into the head.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from depthg.utils import DepthGError

__all__ = ["ClusterProbe", "LinearProbe", "SegmentationHead", "spherical_kmeans"]


class HeadInputError(DepthGError, ValueError):
    """A tensor handed to a head or probe has the wrong shape or type."""


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """An int seed becomes a CPU generator; None means the global RNG (PyTorch's default init)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def _reset_conv_(conv: nn.Conv2d, generator: torch.Generator | None) -> None:
    """``nn.Conv2d.reset_parameters``' distributions drawn from ``generator`` (reproducible from a seed)."""
    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
    if conv.bias is not None:
        fan_in = conv.weight.shape[1] * conv.weight[0, 0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(conv.bias, -bound, bound, generator=generator)


def _check_map(name: str, x: torch.Tensor, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise HeadInputError(f"{name}: expected a (B, {channels}, h, w) tensor, got {shape}")


class SegmentationHead(nn.Module):
    """STEGO's projection head: ``code = L(drop1(f)) + N(drop2(f))`` on the feature grid.

    L is a 1×1 conv ``in_dim → dim``; N is 1×1 conv ``in_dim → in_dim``, ReLU, 1×1 conv ``in_dim → dim``;
    drop1 and drop2 are independent channel dropouts (``Dropout2d``), active only in training.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        dropout: float = 0.1,
        *,
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        if in_dim <= 0 or dim <= 0:
            raise HeadInputError(f"in_dim and dim must be positive, got in_dim={in_dim}, dim={dim}")
        if not 0.0 <= dropout < 1.0:
            raise HeadInputError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.dim = in_dim, dim
        self.drop1 = nn.Dropout2d(dropout)
        self.drop2 = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, kernel_size=1),
        )
        gen = _as_generator(generator)
        if gen is not None:
            for conv in (self.linear, self.nonlinear[0], self.nonlinear[2]):
                _reset_conv_(conv, gen)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim, h, w)`` features → ``(B, dim, h, w)`` code."""
        _check_map("feats", feats, self.in_dim)
        return self.linear(self.drop1(feats)) + self.nonlinear(self.drop2(feats))


class ClusterProbe(nn.Module):
    """Spherical k-means with ``n_classes + extra_clusters`` learnable centroids (``randn`` init, as released).

    Minimising ``-mean max_k cos(code, μ_k)`` by gradient is mini-batch spherical k-means.
    """

    def __init__(
        self,
        dim: int,
        n_classes: int,
        extra_clusters: int = 0,
        *,
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or n_classes <= 0 or extra_clusters < 0:
            raise HeadInputError(
                f"need dim > 0, n_classes > 0, extra_clusters >= 0; got {dim}, {n_classes}, {extra_clusters}"
            )
        self.dim, self.n_classes, self.extra_clusters = dim, n_classes, extra_clusters
        self.n_clusters = n_classes + extra_clusters
        self.clusters = nn.Parameter(torch.randn(self.n_clusters, dim, generator=_as_generator(generator)))

    def cosine(self, code: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every code vector with every centroid: ``(B, n_clusters, h, w)``."""
        _check_map("code", code, self.dim)
        centroids = F.normalize(self.clusters, dim=1)
        return torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1), centroids)

    def forward(self, code: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, probs)`` for a ``(B, dim, h, w)`` code.

        ``alpha=None`` (training): one-hot ``(B, K, h, w)`` assignment, ``loss = -mean max_k cos``.
        ``alpha`` given (evaluation, 2): ``log_softmax(alpha · cos)`` and the soft loss
        ``-mean Σ_k softmax(alpha · cos)_k · cos_k``.
        """
        cos = self.cosine(code)
        if alpha is None:
            best, idx = cos.max(dim=1)
            probs = F.one_hot(idx, self.n_clusters).permute(0, 3, 1, 2).to(cos.dtype)
            return -best.mean(), probs
        logits = alpha * cos
        loss = -(logits.softmax(dim=1) * cos).sum(dim=1).mean()
        return loss, logits.log_softmax(dim=1)

    @classmethod
    def from_centroids(cls, centroids: torch.Tensor, n_classes: int | None = None) -> "ClusterProbe":
        """A probe whose centroids are ``centroids`` (K, dim), e.g. from :func:`spherical_kmeans`;
        ``n_classes`` (default K) of them are classes, the rest extra clusters."""
        if centroids.ndim != 2:
            raise HeadInputError(f"centroids: expected a (K, dim) tensor, got {tuple(centroids.shape)}")
        k, dim = centroids.shape
        n_classes = k if n_classes is None else n_classes
        probe = cls(dim, n_classes, extra_clusters=k - n_classes, generator=0)
        with torch.no_grad():
            probe.clusters.copy_(centroids)
        return probe


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the cosine distance 1 - cos of unit rows ``x`` (N, C) -> (k, C) rows of x."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    chosen = [first]
    dist = (1.0 - x @ x[first]).clamp_min(0.0)
    for _ in range(k - 1):
        weight = dist.square()
        # all points coincide with a centre: any point will do
        pick = int(torch.multinomial(weight / weight.sum(), 1, generator=generator)) if weight.sum() > 0 \
            else int(torch.randint(len(x), (1,), generator=generator))
        chosen.append(pick)
        dist = torch.minimum(dist, (1.0 - x @ x[pick]).clamp_min(0.0))
    return x[chosen].clone()


def spherical_kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100,
                     restarts: int = 5) -> torch.Tensor:
    """Spherical k-means of the rows of ``x`` (N, C): ``k`` unit centroids (k, C) that maximise
    ``sum_n max_j cos(x_n, mu_j)``.

    Each of ``restarts`` runs seeds with k-means++ (on 1 - cos) from ``generator``, then alternates
    assignment and re-normalised means until the assignment stops changing (at most ``iters`` rounds); an
    emptied cluster keeps its centroid. The run with the highest objective wins. Computed in float64, so
    the result depends only on ``x`` and the generator's state.
    """
    if x.ndim != 2 or not 1 <= k <= len(x):
        raise HeadInputError(f"spherical_kmeans needs x (N, C) with N >= k >= 1, got {tuple(x.shape)} and k={k}")
    unit = F.normalize(x.detach().to(torch.float64), dim=1)
    best, best_score = unit[:k], -math.inf
    for _ in range(restarts):
        centroids = _kmeans_pp(unit, k, generator)
        assign = None
        for _ in range(iters):
            new_assign = (unit @ centroids.T).argmax(dim=1)
            if assign is not None and torch.equal(new_assign, assign):
                break
            assign = new_assign
            sums = torch.zeros_like(centroids).index_add_(0, assign, unit)
            keep = sums.norm(dim=1) == 0  # an emptied cluster keeps its centroid
            centroids = torch.where(keep[:, None], centroids, F.normalize(sums, dim=1))
        score = float((unit @ centroids.T).amax(dim=1).sum())
        if score > best_score:
            best, best_score = centroids, score
    return best.to(x.dtype if x.is_floating_point() else torch.float32)


class LinearProbe(nn.Module):
    """A 1×1 convolution ``dim → n_classes`` on the detached code, trained with cross-entropy."""

    def __init__(self, dim: int, n_classes: int, *, generator: torch.Generator | int | None = None) -> None:
        super().__init__()
        if dim <= 0 or n_classes <= 0:
            raise HeadInputError(f"need dim > 0 and n_classes > 0, got {dim}, {n_classes}")
        self.dim, self.n_classes = dim, n_classes
        self.conv = nn.Conv2d(dim, n_classes, kernel_size=1)
        gen = _as_generator(generator)
        if gen is not None:
            _reset_conv_(self.conv, gen)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes, h, w)`` on the code's grid."""
        _check_map("code", code, self.dim)
        return self.conv(code)

    def loss(self, code: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits upsampled bilinearly to ``label`` (B, H, W), over labels in range.

        With no valid pixel the loss is an exact 0 that keeps the graph (the released code gives NaN).
        """
        if label.ndim != 3 or label.shape[0] != code.shape[0] or label.is_floating_point():
            raise HeadInputError(
                f"label: expected an integer (B, H, W) tensor with B={code.shape[0]}, got "
                f"{tuple(label.shape)} {label.dtype}"
            )
        logits = self(code)
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        label = label.long()
        valid = (label >= 0) & (label < self.n_classes)
        if not bool(valid.any()):
            return logits.sum() * 0.0
        flat_logits = logits.permute(0, 2, 3, 1)[valid]
        return F.cross_entropy(flat_logits, label[valid])
