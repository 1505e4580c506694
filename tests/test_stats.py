"""depthg.lab.stats against hand computations: paired t, pooling over worlds, Holm."""

from __future__ import annotations

import math

import pytest

from depthg.lab.stats import holm, paired_differences, pooled_differences


def test_paired_p_value_by_hand():
    # differences 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.4641, df 2: two-sided p = 0.07418 (statistical tables)
    d = paired_differences([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert math.isclose(d["p"], 0.0741799, rel_tol=1e-4) and d["df"] == 2
    assert paired_differences([2.0, 2.0], [1.0, 1.0])["p"] == 0.0  # no spread, non-zero mean
    assert paired_differences([1.0, 1.0], [1.0, 1.0])["p"] == 1.0


def test_pooling_over_worlds_by_hand():
    # world a: differences 1, 2, 3 (mean 2); world b: 3, 4, 5 (mean 4). Within-world sum of squares 2 + 2 = 4,
    # df = 6 - 2 = 4, pooled variance 1, SE = sqrt(1 / 6); mean 3, t_{0.975,4} = 2.776445105
    per_world = {"a": ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]), "b": ([3.0, 4.0, 5.0], [0.0, 0.0, 0.0])}
    d = pooled_differences(per_world)
    assert d["mean"] == 3.0 and d["df"] == 4 and d["n"] == 6 and d["worlds"] == 2
    assert math.isclose(d["half_width"], 2.776445105 * math.sqrt(1 / 6), rel_tol=1e-8)
    # random worlds: the world means 2 and 4, sd sqrt 2, SE 1, t_{0.975,1} = 12.70620474
    r = d["random_worlds"]
    assert r["world_means"] == [2.0, 4.0] and r["df"] == 1
    assert math.isclose(r["half_width"], 12.70620474, rel_tol=1e-8)
    # one world: the same as the paired t-test
    one = pooled_differences({"a": per_world["a"]})
    assert math.isclose(one["half_width"], paired_differences(*per_world["a"])["half_width"])
    assert math.isnan(one["random_worlds"]["half_width"])
    with pytest.raises(ValueError):
        pooled_differences({"a": ([1.0], [1.0, 2.0])})


def test_holm_by_hand():
    # p = 0.01, 0.04, 0.03 (m = 3): sorted 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04) = 0.06
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    assert math.isclose(adj["a"], 0.03) and math.isclose(adj["c"], 0.06) and math.isclose(adj["b"], 0.06)
    assert math.isnan(adj["d"])
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}
