"""Tests for depthg.method.losses: correlations, STEGO loss, depth similarity, DepthGLoss, decay schedule."""

from __future__ import annotations

import math

import pytest
import torch

from depthg.config import Config
from depthg.method.losses import (
    CorrelationTerms,
    DepthGLoss,
    LossError,
    LossInputs,
    correlation_loss,
    depth_feature_loss,
    depth_similarity,
    derangement,
    tensor_correlation,
)
from depthg.method.released import global_steps_to_iterations, super_perm, super_perm_negatives
from depthg.method.sampling import random_grid, sample
from depthg.method.schedules import DepthDecaySchedule

#: what released mode hands the loss (depthg.build.Fidelity.released and the released config keys)
RELEASED_LOSS = dict(depth_similarity="released", negatives=super_perm_negatives, transposed_depth_pairs=True)
RELEASED = "released"


def _maps(batch=2, c=6, d=4, h=5, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, c, h, w, generator=g), torch.randn(batch, c, h, w, generator=g),
            torch.randn(batch, d, h, w, generator=g), torch.randn(batch, d, h, w, generator=g))


# ---------------------------------------------------------------------------------------------------
# tensor_correlation / correlation_loss: hand-computed examples
# ---------------------------------------------------------------------------------------------------


def test_tensor_correlation_hand_example():
    # 2 channels, 2x1 grids. a: (1,0) and (3,4) -> normalised (1,0), (0.6,0.8); b: (0,2), (1,1)/sqrt2.
    a = torch.tensor([[1.0, 3.0], [0.0, 4.0]]).view(1, 2, 2, 1)
    b = torch.tensor([[0.0, 1.0], [2.0, 1.0]]).view(1, 2, 2, 1)
    got = tensor_correlation(a, b)
    assert got.shape == (1, 2, 1, 2, 1)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[0.0, s], [0.8, (0.6 + 0.8) * s]])
    torch.testing.assert_close(got.view(2, 2), expected)
    # a zero vector stays zero (eps clamp, no NaN)
    z = torch.zeros(1, 2, 1, 1)
    assert tensor_correlation(z, b).abs().max() == 0


def test_correlation_loss_hand_example_all_centerings():
    a = torch.tensor([[1.0, 3.0], [0.0, 4.0]]).view(1, 2, 2, 1)  # features
    b = torch.tensor([[0.0, 1.0], [2.0, 1.0]]).view(1, 2, 2, 1)
    c1 = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 2, 1)  # codes: (1,0), (1,1)/sqrt2
    c2 = torch.tensor([[1.0, -1.0], [0.0, 0.0]]).view(1, 2, 2, 1)  # codes: (1,0), (-1,0)
    s = 1 / math.sqrt(2)
    fd = torch.tensor([[0.0, s], [0.8, 1.4 * s]])
    cd = torch.tensor([[1.0, -1.0], [s, -s]])
    shift = 0.1
    clamped = cd.clamp(min=0)
    centred = fd - fd.mean(dim=1, keepdim=True)
    expected = {
        "none": -((fd - shift) * clamped).mean(),
        "paper": -((centred - shift) * clamped).mean(),
        "released": -((centred - centred.mean() + fd.mean() - shift) * clamped).mean(),
    }
    for centering, value in expected.items():
        loss, code_corr = correlation_loss((a, b), (c1, c2), shift, centering=centering)
        assert loss.dim() == 0
        torch.testing.assert_close(loss, value.float(), msg=centering)
        torch.testing.assert_close(code_corr.view(2, 2), cd)
    # without the zero clamp negative code correlations count too
    loss, _ = correlation_loss((a, b), (c1, c2), shift, centering="none", zero_clamp=False)
    torch.testing.assert_close(loss, -((fd - shift) * cd).mean())


def test_released_centering_keeps_global_mean_paper_removes_it():
    f1, f2, _, _ = _maps()
    fd = tensor_correlation(f1, f2)
    # with code correlation 1 everywhere the loss is -mean(F^SC - shift)
    ones = torch.ones(2, 1, 5, 5)
    paper, _ = correlation_loss((f1, f2), (ones, ones), 0.0, centering="paper")
    released, _ = correlation_loss((f1, f2), (ones, ones), 0.0, centering="released")
    assert abs(paper.item()) < 1e-6
    torch.testing.assert_close(released, -fd.mean(), atol=1e-6, rtol=1e-5)


def test_gradients_reach_only_the_code():
    f1, f2, c1, c2 = _maps()
    f1.requires_grad_(True)
    f2.requires_grad_(True)
    c1.requires_grad_(True)
    c2.requires_grad_(True)
    loss, _ = correlation_loss((f1, f2), (c1, c2), 0.2)
    loss.backward()
    assert f1.grad is None and f2.grad is None
    assert c1.grad is not None and c1.grad.abs().sum() > 0 and c2.grad.abs().sum() > 0


def test_correlation_loss_bad_centering():
    f1, f2, c1, c2 = _maps()
    with pytest.raises(LossError, match="centering"):
        correlation_loss((f1, f2), (c1, c2), 0.1, centering="mean")


# ---------------------------------------------------------------------------------------------------
# depth similarity
# ---------------------------------------------------------------------------------------------------


def test_released_depth_similarity_is_constant_one_for_positive_depth():
    g = torch.Generator().manual_seed(0)
    depth = torch.randint(1, 256, (3, 1, 32, 32), generator=g).float()
    sim = depth_similarity(depth, depth, "released", size=(11, 11))
    assert sim.shape == (3, 11, 11, 11, 11)
    assert torch.unique(sim).tolist() == [1.0]


def test_released_depth_similarity_zero_region_gives_zero_and_one():
    depth = torch.full((1, 1, 32, 32), 100.0)
    depth[..., :16, :] = 0.0  # the top half is exactly zero -> resized values there stay 0
    sim = depth_similarity(depth, depth, "released", size=(11, 11))
    assert set(torch.unique(sim).tolist()) == {0.0, 1.0}


def test_distance_similarity_hand_example_and_not_constant():
    # three points on a line at x = 0, 1, 3: distances 1, 2, 3 (max 3)
    p = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).view(1, 3, 3, 1)
    sim = depth_similarity(p, p, "distance").view(3, 3)
    expected = 1 - torch.tensor([[0, 1, 3], [1, 0, 2], [3, 2, 0]]) / 3.0
    torch.testing.assert_close(sim, expected)
    assert sim.min() == 0 and sim.max() == 1
    # higher for points close in 3D
    assert sim[0, 1] > sim[0, 2]


def test_product_similarity_hand_example():
    d = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    z = torch.tensor([-1.0, 0.0, 1.0])  # (d - 2) / std (std = 1, unbiased)
    sim = depth_similarity(d, d, "product").view(3, 3)
    torch.testing.assert_close(sim, z[:, None] * z[None, :])


def test_depth_similarity_errors():
    d = torch.ones(1, 1, 4, 4)
    with pytest.raises(LossError, match="size"):
        depth_similarity(d, d, "released")
    with pytest.raises(LossError, match="3D points"):
        depth_similarity(d, d, "distance")
    with pytest.raises(LossError, match="kind"):
        depth_similarity(d, d, "gaussian")


def test_depth_feature_loss_hand_example():
    code = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 2, 1)  # (1,0), (1,1)/sqrt2
    s = 1 / math.sqrt(2)
    cd = torch.tensor([[1.0, s], [s, 1.0]])
    dsim = torch.tensor([[1.0, 0.2], [0.2, 1.0]]).view(1, 2, 1, 2, 1)
    loss = depth_feature_loss(code, dsim, 0.5)
    torch.testing.assert_close(loss, -(cd * (dsim.view(2, 2) - 0.5)).mean())


# ---------------------------------------------------------------------------------------------------
# DepthGLoss
# ---------------------------------------------------------------------------------------------------


def _step_inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats, feats_pos = torch.randn(batch, 8, 7, 7, generator=g), torch.randn(batch, 8, 7, 7, generator=g)
    code = torch.randn(batch, 5, 7, 7, generator=g, requires_grad=True)
    code_pos = torch.randn(batch, 5, 7, 7, generator=g, requires_grad=True)
    depth = torch.rand(batch, 1, 28, 28, generator=g) * 255 + 1
    depth_pos = torch.rand(batch, 1, 28, 28, generator=g) * 255 + 1
    grid1, grid2 = random_grid(batch, 4, generator=g), random_grid(batch, 4, generator=g)
    return feats, feats_pos, code, code_pos, depth, depth_pos, grid1, grid2


def test_depthg_loss_terms_match_manual_computation_paper():
    feats, feats_pos, code, code_pos, depth, depth_pos, grid1, grid2 = _step_inputs()
    loss_fn = DepthGLoss(CorrelationTerms(0.5, 0.1, 0.3, 0.2, 0.7, 0.8, neg_samples=3, centering="paper"))
    out = loss_fn(LossInputs(feats, feats_pos, code, code_pos, depth, depth_pos), (grid1, grid2),
                  depth_weight=0.2, depth_shift=0.05, generator=torch.Generator().manual_seed(5))
    assert set(out) == {"pos_intra", "pos_inter", "neg_inter", "depth", "total"}
    f1, c1, f2, c2 = sample(feats, grid1), sample(code, grid1), sample(feats_pos, grid2), sample(code_pos, grid2)
    intra = correlation_loss((f1, f1), (c1, c1), 0.1, centering="paper")[0]
    inter = correlation_loss((f1, f2), (c1, c2), 0.2, centering="paper")[0]
    g = torch.Generator().manual_seed(5)
    negs = []
    for _ in range(3):
        perm = derangement(4, g)
        assert not (perm == torch.arange(4)).any()
        # each negative read at its own coordinates = sample(feats[perm], grid1[perm])
        fn, cn = sample(feats[perm], grid1[perm]), sample(code[perm], grid1[perm])
        negs.append(correlation_loss((f1, fn), (c1, cn), 0.8, centering="paper")[0])
    neg = torch.stack(negs).mean()
    torch.testing.assert_close(out["pos_intra"], intra)
    torch.testing.assert_close(out["pos_inter"], inter)
    torch.testing.assert_close(out["neg_inter"], neg)
    total = 0.5 * intra + 0.3 * inter + 0.7 * neg + 0.2 * out["depth"]
    torch.testing.assert_close(out["total"], total)
    out["total"].backward()
    assert code.grad.abs().sum() > 0 and code_pos.grad.abs().sum() > 0


def test_depthg_loss_released_negatives_use_super_perm_and_coords2():
    feats, feats_pos, code, code_pos, depth, depth_pos, grid1, grid2 = _step_inputs()
    loss_fn = DepthGLoss(CorrelationTerms(0.5, 0.1, 0.3, 0.2, 0.7, 0.8, neg_samples=2, centering=RELEASED),
                         **RELEASED_LOSS)
    assert loss_fn.terms.centering == "released" and loss_fn.depth_similarity == "released"
    out = loss_fn(LossInputs(feats, feats_pos, code, code_pos, depth, depth_pos), (grid1, grid2),
                  depth_weight=0.1, depth_shift=0.03, generator=torch.Generator().manual_seed(7))
    f1, c1 = sample(feats, grid1), sample(code, grid1)
    g = torch.Generator().manual_seed(7)
    negs = []
    for _ in range(2):
        perm = super_perm(4, g)
        negs.append(correlation_loss((f1, sample(feats[perm], grid2)), (c1, sample(code[perm], grid2)), 0.8,
                                     centering="released")[0])
    torch.testing.assert_close(out["neg_inter"], torch.stack(negs).mean())
    # released depth term: D = 1 -> -(1 - b) mean clamp(S_intra)
    cd = tensor_correlation(c1, c1)
    torch.testing.assert_close(out["depth"], -(1 - 0.03) * cd.clamp(min=0).mean())


def test_released_depth_term_equals_shifted_self_term():
    """docs/method.md §4.4: l_self L_self(b) + w_d L_depth = l_self L_self(b - w_d (1 - b_d) / l_self)."""
    feats, feats_pos, code, code_pos, depth, depth_pos, grid1, grid2 = _step_inputs(seed=3)
    lam, b_self, w_d, b_d = 0.58, 0.07, 0.19, 0.03
    loss_fn = DepthGLoss(CorrelationTerms(lam, b_self, 0.0, 0.0, 0.0, 0.0, neg_samples=0, centering=RELEASED), **RELEASED_LOSS)
    x = LossInputs(feats, feats_pos, code, code_pos, depth, depth_pos)
    out = loss_fn(x, (grid1, grid2), depth_weight=w_d, depth_shift=b_d)
    shifted = DepthGLoss(CorrelationTerms(lam, b_self - w_d * (1 - b_d) / lam, 0.0, 0.0, 0.0, 0.0, neg_samples=0,
                                          centering=RELEASED), **RELEASED_LOSS)
    out2 = shifted(x, (grid1, grid2), depth_weight=0.0)
    assert abs(out["total"].item() - out2["total"].item()) < 1e-6
    assert math.isclose(b_self - w_d * (1 - b_d) / lam, -0.248, abs_tol=1e-3)


def test_paper_depth_term_uses_3d_distance_at_the_code_locations():
    feats, feats_pos, code, code_pos, depth, depth_pos, grid1, grid2 = _step_inputs(seed=4)
    loss_fn = DepthGLoss(depth_similarity="distance")
    assert loss_fn.depth_similarity == "distance"
    out = loss_fn(LossInputs(feats, feats_pos, code, code_pos, depth, depth_pos), (grid1, grid2),
                  depth_weight=1.0, depth_shift=0.3)
    # the same term built by hand from its parts
    from depthg.method.sampling import depth_to_points
    pooled = torch.nn.functional.adaptive_avg_pool2d(depth, (7, 7))
    pts = depth_to_points(pooled).transpose(1, 2).reshape(4, 3, 7, 7)
    p = sample(pts, grid1)
    sim = depth_similarity(p, p, "distance")
    assert sim.unique().numel() > 10  # depends on depth
    expected = depth_feature_loss(sample(code, grid1), sim, 0.3)
    torch.testing.assert_close(out["depth"], expected)
    # changing the depth changes the paper term but not the released one
    out_b = loss_fn(LossInputs(feats, feats_pos, code, code_pos, depth.flip(-1), depth_pos), (grid1, grid2),
                    depth_weight=1.0, depth_shift=0.3)
    assert not torch.allclose(out["depth"], out_b["depth"])
    rel = DepthGLoss(CorrelationTerms(centering=RELEASED), **RELEASED_LOSS)
    flipped = LossInputs(feats, feats_pos, code, code_pos, depth.flip(-1), depth_pos)
    r1 = rel(LossInputs(feats, feats_pos, code, code_pos, depth, depth_pos), (grid1, grid2), depth_weight=1.0)
    r2 = rel(flipped, (grid1, grid2), depth_weight=1.0)
    torch.testing.assert_close(r1["depth"], r2["depth"])


def test_default_terms_are_the_default_configs():
    # one source of STEGO's defaults: a loss built without a config is the one a default config builds
    assert CorrelationTerms() == CorrelationTerms.from_config(Config())
    assert CorrelationTerms(neg_samples=2) == CorrelationTerms.from_config(Config(neg_samples=2))


def test_depthg_loss_no_depth_and_errors():
    feats, feats_pos, code, code_pos, depth, depth_pos, grid1, grid2 = _step_inputs()
    out = DepthGLoss()(LossInputs(feats, feats_pos, code, code_pos), (grid1, grid2))
    assert out["depth"].item() == 0.0
    with pytest.raises(LossError, match="depth"):
        DepthGLoss()(LossInputs(feats, feats_pos, code, code_pos), (grid1, grid2), depth_weight=0.1)
    with pytest.raises(LossError, match="at least 2"):
        derangement(1)


def test_permutations():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = derangement(5, g)
        assert sorted(p.tolist()) == list(range(5)) and not (p == torch.arange(5)).any()
        q = super_perm(5, g)
        assert not (q == torch.arange(5)).any()
    # super_perm can repeat indices (not a strict permutation), derangement never does
    g = torch.Generator().manual_seed(1)
    assert any(len(set(super_perm(3, g).tolist())) < 3 for _ in range(50))


# ---------------------------------------------------------------------------------------------------
# DepthDecaySchedule
# ---------------------------------------------------------------------------------------------------


def test_depth_decay_released_coco_vits_table():
    """docs/fidelity.md §3.9: COCO ViT-S decays at iterations 250, ..., 2250 -> final 0.19 * 0.6**9 = 0.0019."""
    s = DepthDecaySchedule(0.19, 0.03, factor=0.6, every=global_steps_to_iterations(250), after_step=True)
    assert s.at(0) == (0.19, 0.03)
    assert s.at(250) == (0.19, 0.03)  # fires after iteration 250, acts from 251
    assert s.at(251)[0] == pytest.approx(0.19 * 0.6)
    w, b = s.at(2333)  # last of 2334 iterations
    assert w == pytest.approx(0.19 * 0.6**9) and round(w, 4) == 0.0019
    assert b == pytest.approx(0.03 * 0.6**9)
    assert s.events(2333) == 9


def test_depth_decay_released_brute_force_and_every_300():
    for every in (250, 300, 400, 200):
        s = DepthDecaySchedule(1.0, 0.5, factor=0.5, every=global_steps_to_iterations(every), after_step=True)
        w = 1.0
        for it in range(0, 1300):
            assert s.at(it)[0] == pytest.approx(w), (every, it)
            if (3 * it) % every == 0 and 3 * it > 0:
                w *= 0.5
    s = DepthDecaySchedule(0.16, 0.036, factor=0.64, every=global_steps_to_iterations(300), after_step=True)
    assert [s.events(i) for i in (100, 101, 200, 201, 2333)] == [0, 1, 1, 2, 23]  # every 100 iterations


def test_depth_decay_paper():
    s = DepthDecaySchedule(0.19, 0.03, factor=0.6, every=250)
    assert s.at(249) == (0.19, 0.03)
    assert s.at(250) == pytest.approx((0.19 * 0.6, 0.03 * 0.6))
    assert DepthDecaySchedule(0.1, 0.1).at(10**6) == (0.1, 0.1)
