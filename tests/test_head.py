"""Head and probes: exact formulas against hand computations, independent dropout masks, ignore labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from depthg.method.head import ClusterProbe, LinearProbe, SegmentationHead
from depthg.utils import DepthGError


def conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    w = conv.weight[:, :, 0, 0]
    return torch.einsum("oc,bchw->bohw", w, x) + conv.bias.view(1, -1, 1, 1)


def test_head_formula_in_eval(tmp_path):
    head = SegmentationHead(12, 5, generator=0).eval()
    f = torch.randn(2, 12, 4, 3, generator=torch.Generator().manual_seed(1))
    hidden = torch.relu(conv1x1(f, head.nonlinear[0]))
    expected = conv1x1(f, head.linear) + conv1x1(hidden, head.nonlinear[2])
    out = head(f)
    assert out.shape == (2, 5, 4, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(head(f), out), "no dropout in eval mode"


def test_head_seeded_init_is_reproducible():
    a, b = SegmentationHead(8, 3, generator=4), SegmentationHead(8, 3, generator=4)
    c = SegmentationHead(8, 3, generator=5)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    bound = 1 / 8**0.5  # default Conv2d init range for fan_in = 8
    assert a.linear.weight.abs().max() <= bound and a.linear.bias.abs().max() <= bound


def test_head_dropout_masks_are_independent_per_path():
    c = 64
    head = SegmentationHead(c, c, dropout=0.5)
    eye = torch.eye(c).view(c, c, 1, 1)
    with torch.no_grad():
        for conv in (head.linear, head.nonlinear[0], head.nonlinear[2]):
            conv.weight.copy_(eye)
            conv.bias.zero_()
    f = torch.ones(4, c, 2, 2)
    torch.testing.assert_close(head.eval()(f), 2 * f)
    torch.manual_seed(0)
    out = head.train()(f)
    # Each path is f * mask / (1 - p) = f * {0, 2}; the sum is 0 or 4 if the masks were shared,
    # and 2 exactly where one path kept the channel and the other dropped it.
    values = set(out.unique().tolist())
    assert values <= {0.0, 2.0, 4.0} and 2.0 in values and 4.0 in values and 0.0 in values
    per_channel = out.amax(dim=(2, 3)) == out.amin(dim=(2, 3))
    assert per_channel.all(), "Dropout2d drops whole channels"


def test_head_rejects_wrong_width():
    with pytest.raises(DepthGError, match=r"\(B, 8, h, w\)"):
        SegmentationHead(8, 3)(torch.zeros(1, 7, 2, 2))


def brute_force_cosines(code: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    b, d, h, w = code.shape
    out = torch.empty(b, centroids.shape[0], h, w)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                v = code[i, :, r, s]
                for k in range(centroids.shape[0]):
                    m = centroids[k]
                    out[i, k, r, s] = (v @ m) / (v.norm() * m.norm())
    return out


def test_cluster_probe_init_and_hard_loss():
    probe = ClusterProbe(6, n_classes=3, extra_clusters=2, generator=7)
    assert probe.n_clusters == 5 and probe.clusters.shape == (5, 6)
    assert torch.equal(probe.clusters.data, torch.randn(5, 6, generator=torch.Generator().manual_seed(7)))
    code = torch.randn(2, 6, 3, 4, generator=torch.Generator().manual_seed(3))
    cos = brute_force_cosines(code, probe.clusters.detach())
    loss, probs = probe(code)
    torch.testing.assert_close(loss, -cos.max(dim=1).values.mean(), rtol=1e-5, atol=1e-6)
    assert probs.shape == (2, 5, 3, 4)
    assert torch.equal(probs.sum(1), torch.ones(2, 3, 4)) and torch.equal(probs.argmax(1), cos.argmax(1))
    loss.backward()
    used = set(cos.argmax(1).unique().tolist())
    for k in range(5):
        has_grad = probe.clusters.grad[k].abs().sum() > 0
        assert bool(has_grad) == (k in used), "hard assignment: only chosen centroids get gradient"


def test_cluster_probe_eval_log_softmax():
    probe = ClusterProbe(4, n_classes=3, generator=0)
    code = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cos = brute_force_cosines(code, probe.clusters.detach())
    loss, log_probs = probe(code, alpha=2.0)
    expected = 2 * cos - torch.logsumexp(2 * cos, dim=1, keepdim=True)
    torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, -(expected.exp() * cos).sum(1).mean(), rtol=1e-5, atol=1e-6)


def test_linear_probe_loss_ignores_labels_outside_range():
    probe = LinearProbe(3, n_classes=4, generator=0)
    code = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    label = torch.randint(0, 4, (2, 6, 6), generator=torch.Generator().manual_seed(1))
    label[0, 0, :] = -1
    label[1, :, 0] = 255
    logits = F.interpolate(conv1x1(code, probe.conv), size=(6, 6), mode="bilinear", align_corners=False)
    terms = []
    for b in range(2):
        for r in range(6):
            for c in range(6):
                y = int(label[b, r, c])
                if 0 <= y < 4:
                    terms.append(-torch.log_softmax(logits[b, :, r, c], 0)[y])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(probe.loss(code, label), expected, rtol=1e-5, atol=1e-6)
    assert probe(code).shape == (2, 4, 2, 2)


def test_linear_probe_all_ignored_is_zero_and_differentiable():
    probe = LinearProbe(3, n_classes=4)
    loss = probe.loss(torch.randn(1, 3, 2, 2), torch.full((1, 4, 4), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert probe.conv.weight.grad is not None
    with pytest.raises(DepthGError, match="label"):
        probe.loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 1, 4, 4, dtype=torch.long))


def _brute_force_objective(x: torch.Tensor, k: int) -> float:
    """The best spherical k-means objective over every assignment of a handful of points (exhaustive)."""
    import itertools

    unit = F.normalize(x.double(), dim=1)
    best = -float("inf")
    for labels in itertools.product(range(k), repeat=len(x)):
        lab = torch.tensor(labels)
        if len(set(labels)) < k:
            continue
        cent = F.normalize(torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, lab, unit), dim=1)
        best = max(best, float((unit * cent[lab]).sum(1).sum()))
    return best


def test_spherical_kmeans_reaches_the_exhaustive_optimum_on_small_sets():
    from depthg.method.head import spherical_kmeans

    gen = torch.Generator().manual_seed(3)
    for trial in range(3):
        x = torch.randn(7, 3, generator=gen)
        cent = spherical_kmeans(x, 3, torch.Generator().manual_seed(trial), restarts=10)
        assert torch.allclose(cent.norm(dim=1), torch.ones(3), atol=1e-6)
        unit = F.normalize(x.double(), dim=1)
        objective = float((unit @ cent.double().T).amax(dim=1).sum())
        assert objective == pytest.approx(_brute_force_objective(x, 3), abs=1e-6)  # float32 centroids


def test_spherical_kmeans_finds_separated_directions_and_is_reproducible():
    from depthg.method.head import spherical_kmeans

    gen = torch.Generator().manual_seed(0)
    axes = torch.eye(4)
    x = torch.cat([axes[i] * 5 + 0.05 * torch.randn(50, 4, generator=gen) for i in range(4)])  # 4 tight cones
    cent = spherical_kmeans(x, 4, torch.Generator().manual_seed(1))
    assert sorted(cent.abs().argmax(dim=1).tolist()) == [0, 1, 2, 3]  # one centroid per cone
    assert torch.equal(cent, spherical_kmeans(x, 4, torch.Generator().manual_seed(1)))
    with pytest.raises(DepthGError, match="spherical_kmeans"):
        spherical_kmeans(x[:2], 3, torch.Generator())


def test_cluster_probe_from_centroids_assigns_by_cosine():
    cent = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    probe = ClusterProbe.from_centroids(cent, n_classes=2)
    assert probe.n_classes == 2 and probe.n_clusters == 3 and torch.equal(probe.clusters.data, cent)
    code = torch.tensor([[0.9, 0.1], [0.1, 0.9], [-0.8, 0.2]]).T.reshape(1, 2, 3, 1)
    _, logp = probe(code, alpha=2.0)
    assert logp.argmax(dim=1).flatten().tolist() == [0, 1, 2]
