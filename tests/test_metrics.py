"""Metrics: permuted perfect predictions, hand-computed confusions, ignore labels, extra clusters as
errors, and the Hungarian matching against a brute force over all permutations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from depthg.metrics import MetricsInputError, UnsupervisedMetrics


def pixels_from_counts(counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """preds/targets (1, N) whose confusion stats[pred, gt] is exactly ``counts``."""
    preds, targets = [], []
    for p, g in itertools.product(range(counts.shape[0]), range(counts.shape[1])):
        preds += [p] * int(counts[p, g])
        targets += [g] * int(counts[p, g])
    return torch.tensor([preds]), torch.tensor([targets])


def test_permuted_perfect_prediction_scores_100():
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (2, 16, 16), generator=gen)
    perm = torch.tensor([3, 0, 4, 1, 2])  # class c is predicted as cluster perm[c]
    metrics = UnsupervisedMetrics(5)
    metrics.update(perm[targets], targets)
    out = metrics.compute()
    assert out["accuracy"] == 100.0 and out["miou"] == 100.0
    assert out["iou"] == [100.0] * 5
    assert [out["assignment"][int(perm[c])] for c in range(5)] == list(range(5))


def test_hand_computed_three_class_example_with_ignored_pixels():
    counts = np.array([[5, 1, 0], [0, 0, 4], [1, 3, 0]])  # stats[cluster, class]
    preds, targets = pixels_from_counts(counts)
    # Ignored targets (-1 and out of range) with arbitrary valid predictions change nothing.
    preds = torch.cat([preds, torch.tensor([[0, 1, 2, 2]])], dim=1)
    targets = torch.cat([targets, torch.tensor([[-1, -1, 3, 255]])], dim=1)
    metrics = UnsupervisedMetrics(3)
    metrics.update(preds, targets)
    out = metrics.compute()
    # Best matching: cluster0->class0 (5), cluster1->class2 (4), cluster2->class1 (3): 12 of 14 pixels.
    assert out["assignment"] == [0, 2, 1]
    assert out["accuracy"] == pytest.approx(12 / 14 * 100)
    # IoU = tp / (predicted + actual - tp): class0 5/(6+6-5), class1 3/(4+4-3), class2 4/(4+4-4).
    expected_iou = [5 / 7 * 100, 3 / 5 * 100, 100.0]
    assert out["iou"] == pytest.approx(expected_iou)
    assert out["miou"] == pytest.approx(sum(expected_iou) / 3)
    assert out["confusion"].tolist() == [[5, 1, 0], [1, 3, 0], [0, 0, 4]]
    assert out["cluster_confusion"].tolist() == counts.tolist()


def test_split_updates_accumulate_like_one():
    gen = torch.Generator().manual_seed(1)
    preds = torch.randint(0, 4, (6, 8, 8), generator=gen)
    targets = torch.randint(-1, 4, (6, 8, 8), generator=gen)
    whole, parts = UnsupervisedMetrics(4), UnsupervisedMetrics(4)
    whole.update(preds, targets)
    for i in range(0, 6, 2):
        parts.update(preds[i : i + 2], targets[i : i + 2].numpy())
    assert torch.equal(whole.stats, parts.stats)
    assert whole.compute()["miou"] == parts.compute()["miou"]


def test_extra_clusters_count_as_errors():
    counts = np.array([[4, 0], [0, 3], [2, 1]])  # cluster 2 is an extra cluster
    metrics = UnsupervisedMetrics(2, extra_clusters=1)
    metrics.update(*pixels_from_counts(counts))
    out = metrics.compute()
    assert out["assignment"] == [0, 1, -1]
    # 7 of 10 pixels correct; the released code would drop cluster 2's 3 pixels and report 100.
    assert out["accuracy"] == pytest.approx(70.0)
    assert out["iou"] == pytest.approx([4 / 6 * 100, 3 / 4 * 100])


def test_absent_class_is_nan_and_left_out_of_miou():
    metrics = UnsupervisedMetrics(3, hungarian=False)
    metrics.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0]))
    out = metrics.compute()
    assert math.isnan(out["iou"][2])
    assert out["iou"][:2] == pytest.approx([2 / 3 * 100, 1 / 2 * 100])
    assert out["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2 * 100)
    assert out["accuracy"] == pytest.approx(75.0)


def test_identity_mapping_for_linear_probe():
    metrics = UnsupervisedMetrics(2, hungarian=False)
    metrics.update(torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, 1]))
    out = metrics.compute()
    assert out["assignment"] == [0, 1] and out["accuracy"] == 0.0 and out["miou"] == 0.0


@pytest.mark.parametrize("extra", [0, 1])
def test_hungarian_matches_brute_force(extra):
    rng = np.random.default_rng(extra)
    for _ in range(5):
        counts = rng.integers(0, 20, size=(4 + extra, 4))
        metrics = UnsupervisedMetrics(4, extra_clusters=extra)
        metrics.update(*pixels_from_counts(counts))
        out = metrics.compute()
        # Brute force: every injective map class -> cluster.
        best = max(
            sum(counts[clusters[c], c] for c in range(4))
            for clusters in itertools.permutations(range(4 + extra), 4)
        )
        assert out["accuracy"] == pytest.approx(best / counts.sum() * 100)
        matched = sum(counts[k, c] for k, c in enumerate(out["assignment"]) if c >= 0)
        assert matched == best


def test_bad_inputs_raise():
    metrics = UnsupervisedMetrics(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metrics.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metrics.update(torch.tensor([-1, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dtype"):
        metrics.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(torch.tensor([0, 1]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="no valid pixels"):
        metrics.compute()


def test_category_scores_by_hand():
    from depthg.metrics import category_scores

    # classes 0, 1 form category "a", class 2 category "b"; identity clusters
    m = UnsupervisedMetrics(3, hungarian=False)
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    true = torch.tensor([0, 0, 1, 2, 1, 2])
    m.update(pred, true)
    res = m.compute()
    scores = category_scores(res, ["a", "a", "b"])
    # category a: true pixels {0,1,2,4} (4), predicted a at {0,1,2,5} (4), both a at {0,1,2} (3): IoU 3/5
    # category b: true {3,5} (2), predicted b {3,4} (2), both {3} (1): IoU 1/3
    assert scores["iou_per_category"]["a"] == pytest.approx(60.0)
    assert scores["iou_per_category"]["b"] == pytest.approx(100 / 3)
    assert scores["miou"] == pytest.approx((60.0 + 100 / 3) / 2)
    with pytest.raises(MetricsInputError, match="one per class"):
        category_scores(res, ["a", "b"])
