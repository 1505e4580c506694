"""Tests for depthg.method.lhp: propagation weights and the batched propagation against a brute-force loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthg.build import Fidelity
from depthg.method.lhp import LHPError, LocalHiddenPositives, row_quantile
from depthg.method.sampling import depth_to_points

REL = Fidelity.released()


def make_lhp(dim: int, mode: str = "paper", **kwargs) -> LocalHiddenPositives:
    """The LHP module with the paper's or the released functions (as depthg.train builds it)."""
    fid = Fidelity.paper() if mode == "paper" else REL
    return LocalHiddenPositives(dim, choices=fid.lhp, **kwargs)


def brute_force(code, depth=None, attention=None, quantile=0.1, mode="paper", strategy="depth"):
    """Per-image, per-row NumPy reference of weights and propagated code (before the projection)."""
    b, d, h, w = code.shape
    n = h * w
    out = np.zeros((b, d, n))
    weights = np.zeros((b, n, n))
    for k in range(b):
        if strategy == "depth":
            pooled = F.adaptive_avg_pool2d(depth[k : k + 1], (h, w))
            unproject = depth_to_points if mode == "paper" else REL.unproject
            pts = unproject(pooled, 90.0)[0].numpy().astype(np.float64)
        flat = code[k].reshape(d, n).numpy().astype(np.float64)
        for p in range(n):
            if strategy == "depth":
                row = np.sqrt(((pts - pts[p]) ** 2).sum(-1))
            else:
                row = attention[k, p].numpy().astype(np.float64)
            row = (row - row.min()) / max(row.max() - row.min(), 1e-10)
            if strategy == "depth":
                keep = row <= np.quantile(row, quantile)
                wr = (1 - row) * keep
            else:
                thr = np.quantile(row, 1 - quantile)
                keep = row >= thr if mode == "paper" else row <= thr
                wr = row * keep
            weights[k, p] = wr
            mixed = (flat * wr[None]).sum(1)
            out[k, :, p] = mixed / (wr.sum() if mode == "paper" else n)
    return weights, out.reshape(b, d, h, w)


@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("strategy", ["depth", "attention"])
def test_matches_brute_force(mode, strategy):
    g = torch.Generator().manual_seed(0)
    code = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    depth = torch.rand(2, 1, 8, 10, generator=g, dtype=torch.float64) * 255 + 1
    attention = torch.rand(2, 20, 20, generator=g, dtype=torch.float64).softmax(-1)
    lhp = make_lhp(3, mode, strategy=strategy, quantile=0.1).double()
    w_ref, out_ref = brute_force(code, depth, attention, 0.1, mode, strategy)
    weights = lhp.propagation_weights((4, 5), depth=depth, attention=attention)
    np.testing.assert_allclose(weights.numpy(), w_ref, atol=1e-12)
    mixed = lhp.propagate(code, weights)
    np.testing.assert_allclose(mixed.numpy(), out_ref, atol=1e-12)
    out = lhp(code, depth=depth, attention=attention)
    torch.testing.assert_close(out, lhp.project(torch.from_numpy(out_ref)))


def test_depth_weights_keep_nearest_and_self():
    g = torch.Generator().manual_seed(1)
    depth = torch.rand(1, 1, 28, 28, generator=g) * 255 + 1
    lhp = LocalHiddenPositives(4, quantile=0.01)
    wts = lhp.propagation_weights((28, 28), depth=depth)
    kept = (wts > 0).sum(-1).float()
    assert kept.min() >= 7 and kept.median() <= 10  # about the 8 nearest of 784
    assert torch.allclose(wts[0].diagonal(), torch.ones(784))  # self: distance 0 -> weight 1


def test_paper_attention_keeps_most_attended_released_the_weakest():
    g = torch.Generator().manual_seed(2)
    att = torch.rand(1, 100, 100, generator=g)
    paper = make_lhp(2, strategy="attention").propagation_weights((10, 10), attention=att)
    released = make_lhp(2, "released", strategy="attention").propagation_weights((10, 10), attention=att)
    top = att.argmax(-1)
    assert bool((paper[0].gather(1, top[0][:, None]) > 0).all())  # the most attended is kept
    assert bool((released[0].gather(1, top[0][:, None]) == 0).all())  # ... and dropped by the released bug
    assert (released > 0).sum() > 50 * (paper > 0).sum()


def test_paper_is_weighted_mean_released_shrinks():
    code = torch.ones(1, 2, 4, 4)
    depth = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(3)) + 1
    paper, released = LocalHiddenPositives(2, quantile=0.2), make_lhp(2, "released", quantile=0.2)
    mixed_paper = paper.propagate(code, paper.propagation_weights((4, 4), depth=depth))
    mixed_rel = released.propagate(code, released.propagation_weights((4, 4), depth=depth))
    torch.testing.assert_close(mixed_paper, code)  # mean of a constant code is the constant
    assert mixed_rel.max() < 0.5


def test_row_quantile_matches_torch_quantile():
    x = torch.rand(3, 7, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for q in (0.0, 0.01, 0.5, 0.99, 1.0):
        torch.testing.assert_close(row_quantile(x, q), torch.quantile(x, q, dim=-1, keepdim=True))


def test_gradients_flow_to_code_and_projection():
    lhp = LocalHiddenPositives(3)
    code = torch.randn(2, 3, 4, 4, requires_grad=True)
    lhp(code, depth=torch.rand(2, 1, 8, 8) + 1).sum().backward()
    assert code.grad.abs().sum() > 0 and lhp.projection[0].weight.grad is not None


def test_errors():
    with pytest.raises(LHPError, match="strategy"):
        LocalHiddenPositives(3, strategy="knn")
    lhp = LocalHiddenPositives(3)
    with pytest.raises(LHPError, match="depth"):
        lhp(torch.randn(1, 3, 4, 4))
    with pytest.raises(LHPError, match="attention"):
        LocalHiddenPositives(3, strategy="attention")(torch.randn(1, 3, 4, 4), attention=torch.rand(1, 4, 4))
    with pytest.raises(LHPError, match="code"):
        lhp(torch.randn(1, 5, 4, 4), depth=torch.rand(1, 1, 4, 4))
