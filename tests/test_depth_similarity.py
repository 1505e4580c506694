"""Depth similarities that pull and push (centred, quantile), the pull/push count, the paper default.

Every similarity is checked against a brute-force double loop over point pairs written independently of
the vectorised code in depthg.method.losses.
"""

from __future__ import annotations

import math

import pytest
import torch

from depthg.config import Config, ConfigError
from depthg.method.losses import (
    DEPTH_SIMILARITIES,
    DISTANCE_QUANTILE,
    PAPER_DEPTH_SIMILARITY,
    WORKING_RANGE,
    DepthGLoss,
    LossError,
    depth_feature_loss,
    depth_similarity,
    pull_push_fractions,
)
from depthg.method.sampling import depth_to_points, random_grid, sample


def _points(b: int = 2, h: int = 3, w: int = 4, seed: int = 0, far: float = 0.0) -> torch.Tensor:
    """Random camera-space points (B, 3, h, w) with Z in [1, 60]; the first row's points are moved
    along their rays by ``far`` in Z (a pinhole point is depth times its ray)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64) * 20 - 10
    p[:, 2] = 1 + torch.rand(b, h, w, generator=g, dtype=torch.float64) * 59
    p[:, :, 0] = p[:, :, 0] * ((p[:, 2:3, 0] + far) / p[:, 2:3, 0])
    return p


def _brute_distance(p: torch.Tensor) -> list[list[list[float]]]:
    """dist[b][q][r] = |P_q - P_r| by explicit loops over flattened locations."""
    b, _, h, w = p.shape
    flat = p.reshape(b, 3, h * w)
    out = []
    for n in range(b):
        rows = []
        for q in range(h * w):
            rows.append([math.sqrt(sum((float(flat[n, c, q]) - float(flat[n, c, r])) ** 2 for c in range(3)))
                         for r in range(h * w)])
        out.append(rows)
    return out


def _brute_quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of a list (numpy/torch 'linear' definition)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def test_options_are_listed_once_and_agree_with_the_config():
    assert {"released", "product", "distance", "centred", "quantile"} <= set(DEPTH_SIMILARITIES)
    assert PAPER_DEPTH_SIMILARITY in DEPTH_SIMILARITIES and PAPER_DEPTH_SIMILARITY != "released"
    # the config accepts exactly the loss's options: it reads them from depthg.method.losses
    for kind in DEPTH_SIMILARITIES:
        assert Config(depth_similarity=kind).depth_similarity == kind
    with pytest.raises(ConfigError, match="depth_similarity"):
        Config(depth_similarity="nearest")


def test_centred_matches_brute_force():
    p = _points(far=150.0)
    b, _, h, w = p.shape
    dist = _brute_distance(p)
    got = depth_similarity(p, p, "centred").reshape(b, h * w, h * w)
    for n in range(b):
        big = max(max(row) for row in dist[n])
        for q in range(h * w):
            sims = [1 - d / big for d in dist[n][q]]
            mean = sum(sims) / len(sims)
            for r in range(h * w):
                assert abs(float(got[n, q, r]) - (sims[r] - mean)) < 1e-9
    # every query's row has zero mean: its closer-than-average partners are pulled, the others pushed
    torch.testing.assert_close(got.mean(-1), torch.zeros(b, h * w, dtype=got.dtype), atol=1e-12, rtol=0)


def test_quantile_matches_brute_force_with_working_range():
    p = _points(far=150.0, seed=1)  # the first row is beyond the working range
    b, _, h, w = p.shape
    assert float(p[:, 2].max()) > WORKING_RANGE
    # clip by hand: a point beyond the range moves along its ray to Z = WORKING_RANGE
    clipped = p.clone()
    for n in range(b):
        for y in range(h):
            for x in range(w):
                z = float(p[n, 2, y, x])
                if z > WORKING_RANGE:
                    clipped[n, :, y, x] = p[n, :, y, x] * (WORKING_RANGE / z)
    dist = _brute_distance(clipped)
    got = depth_similarity(p, p, "quantile").reshape(b, h * w, h * w)
    for n in range(b):
        scale = _brute_quantile([d for row in dist[n] for d in row], DISTANCE_QUANTILE)
        for q in range(h * w):
            for r in range(h * w):
                expected = min(1.0, max(-1.0, 1 - dist[n][q][r] / scale))
                assert abs(float(got[n, q, r]) - expected) < 1e-9
    assert got.min() >= -1 and got.max() <= 1


def test_quantile_ignores_how_far_the_far_points_are():
    # the sky at 100 m or at 200 m is the same sky once the working range caps it
    near, far = _points(far=100.0, seed=2), _points(far=200.0, seed=2)
    torch.testing.assert_close(depth_similarity(near, near, "quantile"), depth_similarity(far, far, "quantile"))
    # while distance's scale (the largest pair distance) is set by it
    assert not torch.allclose(depth_similarity(near, near, "distance"), depth_similarity(far, far, "distance"))


def _street_points(sky_depth: float = 200.0) -> torch.Tensor:
    """A 16 x 16 street-like depth map (sky in the top quarter, ground 5..40 m below), unprojected."""
    rows = torch.arange(16, dtype=torch.float64).view(16, 1).expand(16, 16)
    depth = torch.where(rows < 4, torch.full_like(rows, sky_depth), 40.0 - (rows - 4) * (35.0 / 11))
    pts = depth_to_points(depth.view(1, 1, 16, 16).float(), fov_deg=90.0)
    return pts.transpose(1, 2).reshape(1, 3, 16, 16).double()


def test_distance_only_pulls_while_centred_and_quantile_pull_and_push():
    p = _street_points()
    shift = 0.03
    dist = pull_push_fractions(depth_similarity(p, p, "distance"), shift)
    assert dist["pushed"] < 0.05  # the sky sets the scale: almost every pair looks close
    for kind in ("centred", "quantile"):
        frac = pull_push_fractions(depth_similarity(p, p, kind), shift)
        assert frac["pulled"] > 0.25 and frac["pushed"] > 0.25, (kind, frac)


def test_pull_push_fractions_hand_example():
    sim = torch.tensor([0.5, 0.03, -0.2, 0.04, 0.0, 1.0]).view(1, 1, 6, 1, 1)
    frac = pull_push_fractions(sim, 0.03)
    assert frac == {"pulled": 3 / 6, "pushed": 2 / 6}  # 0.03 itself is neither
    with pytest.raises(LossError):
        pull_push_fractions(torch.zeros(0), 0.0)


def test_point_similarities_need_points():
    d = torch.ones(1, 1, 4, 4)
    for kind in ("centred", "quantile"):
        with pytest.raises(LossError, match="3D points"):
            depth_similarity(d, d, kind)


@pytest.mark.parametrize("kind", ["centred", "quantile"])
def test_depth_term_uses_the_option_at_the_code_locations(kind):
    g = torch.Generator().manual_seed(3)
    code = torch.randn(2, 5, 8, 8, generator=g)
    depth = 2 + torch.rand(2, 1, 32, 32, generator=g) * 120
    grid = random_grid(2, 4, generator=g)
    loss_fn = DepthGLoss(depth_similarity=kind)
    got = loss_fn.depth_term(sample(code, grid), depth, grid, (8, 8), 0.03)
    pooled = torch.nn.functional.adaptive_avg_pool2d(depth, (8, 8))
    pts = sample(depth_to_points(pooled).transpose(1, 2).reshape(2, 3, 8, 8), grid)
    expected = depth_feature_loss(sample(code, grid), depth_similarity(pts, pts, kind), 0.03)
    torch.testing.assert_close(got, expected)


def test_paper_default_is_the_chosen_similarity_everywhere():
    assert Config(mode="paper").depth_similarity == PAPER_DEPTH_SIMILARITY
    assert Config.preset("synthetic", "paper").depth_similarity == PAPER_DEPTH_SIMILARITY
    assert Config.preset("synthetic", "released").depth_similarity == "released"
    assert DepthGLoss().depth_similarity == PAPER_DEPTH_SIMILARITY
    for kind in ("centred", "quantile"):
        assert Config(depth_similarity=kind).depth_similarity == kind
    with pytest.raises(ConfigError, match="depth_similarity"):
        Config(depth_similarity="gaussian")
    with pytest.raises(LossError, match="depth_similarity"):
        DepthGLoss(depth_similarity="gaussian")
