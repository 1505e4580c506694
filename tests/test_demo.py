"""The small demonstrations of the teaching notebooks: the loss on one pair of crops is seeded (notebook 03),
perfect patches lose what is thinner than a patch and the two probes are seeded (notebook 04)."""

from __future__ import annotations

import math

import torch

from depthg.config import Config
from depthg.lab.demo import fit_probes, optimise_pair, patch_majority
from depthg.method.head import SegmentationHead
from depthg.method.losses import CorrelationTerms, DepthGLoss
from depthg.method.sampling import random_grid
from depthg.metrics import UnsupervisedMetrics


def test_optimise_pair_depends_on_its_seed_alone():
    cfg = Config.preset("synthetic")
    gen = torch.Generator().manual_seed(0)
    feats, depth = torch.randn(2, 8, 4, 4, generator=gen), 1 + 10 * torch.rand(2, 1, 32, 32, generator=gen)
    grids = random_grid(2, 3, generator=gen)

    def run(seed):
        head = SegmentationHead(8, 6, dropout=0.5, generator=1)
        loss = DepthGLoss(CorrelationTerms.from_config(cfg), depth_similarity="centred")
        torch.manual_seed(seed + 100)  # the caller's random state must not matter
        return optimise_pair(loss, head, feats, depth, grids, steps=3, lr=0.01, depth_weight=0.1, depth_shift=0.0,
                             seed=seed)

    a, b = run(0), run(0)
    assert a["records"] == b["records"] and torch.equal(a["S_after"], b["S_after"])
    assert run(1)["records"] != a["records"]


def test_patch_majority_loses_what_is_thinner_than_a_patch():
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, :, 8:] = 1
    labels[0, :, 3] = 2                            # a one-pixel pole inside the first 8-pixel column of patches
    pred, shares = patch_majority(labels, 8, 3)
    assert shares.shape == (1, 3, 2, 2) and torch.allclose(shares.sum(1), torch.ones(1, 2, 2))
    assert not (pred == 2).any() and (pred[0, :, :4] == 0).all() and (pred[0, :, 12:] == 1).all()
    m = UnsupervisedMetrics(3, hungarian=False)
    m.update(pred, labels)
    assert m.compute()["iou"][2] == 0.0


def test_fit_probes_is_seeded_and_the_linear_probe_uses_the_labels():
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 8:] = 1
    feats = torch.randn(2, 4, 4, 4, generator=gen) * 0.1
    feats[:, 0, 2:] += 1.0                         # class 1 rows have a strong first channel
    a = fit_probes(feats, labels, 2, steps=30, seed=3)
    b = fit_probes(feats, labels, 2, steps=30, seed=3)
    assert torch.equal(a["cluster"], b["cluster"]) and torch.equal(a["linear"], b["linear"])
    assert (a["linear"] == labels).float().mean() > 0.9 and a["cluster"].shape == labels.shape
    assert not math.isnan(float(a["cluster"].float().mean()))
