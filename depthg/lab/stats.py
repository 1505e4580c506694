"""Paired comparisons of training runs: per world, pooled over worlds, and Holm's correction.

A comparison of two variants pairs their runs by (world, seed): the same seed means the same head
initialisation and data order, so the per-seed difference removes that noise. Within one world the mean
difference gets a paired t-interval over seeds. Over several worlds, two poolings are reported
(docs/method.md §9.4):

* **fixed worlds** (the primary inference of the miniature's plan): the mean over all (world, seed) pairs,
  its standard error from the pooled within-world variance (df = pairs - worlds), i.e. what the effect is on
  these worlds with the world-to-world differences taken out;
* **random worlds**: a t-interval over the per-world mean differences (df = worlds - 1), i.e. how far the
  effect would carry to another world drawn the same way. With three worlds it is wide, and it says so.

:func:`holm` adjusts a family of p-values for multiplicity (Holm's step-down method, which controls the
family-wise error rate without assumptions about dependence).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from scipy import stats

__all__ = ["paired_differences", "pooled_differences", "holm"]


def _t_summary(mean: float, se: float, df: int, confidence: float) -> dict[str, Any]:
    """Interval and two-sided p-value (H0: mean 0) of a t statistic; NaN where there is no spread."""
    if df < 1 or not math.isfinite(se):
        return {"mean": mean, "half_width": math.nan, "ci": [math.nan, math.nan], "p": math.nan, "df": df}
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * se
    if se > 0:
        p = float(2 * stats.t.sf(abs(mean) / se, df))
    else:  # every difference equal: certain, unless they are all zero
        p = 1.0 if mean == 0 else 0.0
    return {"mean": mean, "half_width": half, "ci": [mean - half, mean + half], "p": p, "df": df}


def paired_differences(values: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of the per-seed differences ``values - base``, its t-interval and two-sided p (NaN for one seed)."""
    if len(values) != len(base):
        raise ValueError(f"paired differences need the same seeds: {len(values)} vs {len(base)} values")
    diffs = [a - b for a, b in zip(values, base)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    return {**_t_summary(mean, se, n - 1, confidence), "n": n, "confidence": confidence, "values": diffs}


def pooled_differences(per_world: Mapping[Any, tuple[Sequence[float], Sequence[float]]],
                       confidence: float = 0.95) -> dict[str, Any]:
    """Pool paired differences over worlds: ``per_world[w] = (values, base)``, paired by seed.

    Returns the fixed-worlds summary (mean over all pairs, SE from the pooled within-world variance,
    df = pairs - worlds) with ``random_worlds`` (t over the world means, df = worlds - 1) inside.
    """
    diffs = {w: [a - b for a, b in zip(*pair)] for w, pair in per_world.items()}
    if any(len(v) != len(b) for v, b in per_world.values()) or not diffs or not all(diffs.values()):
        raise ValueError("pooled differences need the same, non-empty seeds for both variants in every world")
    flat = [d for ds in diffs.values() for d in ds]
    n, worlds = len(flat), len(diffs)
    mean = statistics.fmean(flat)
    within = sum(sum((d - statistics.fmean(ds)) ** 2 for d in ds) for ds in diffs.values())
    df = n - worlds
    se = math.sqrt(within / df / n) if df > 0 else math.nan
    world_means = [statistics.fmean(ds) for ds in diffs.values()]
    se_random = statistics.stdev(world_means) / math.sqrt(worlds) if worlds > 1 else math.nan
    random_worlds = {**_t_summary(statistics.fmean(world_means), se_random, worlds - 1, confidence),
                     "world_means": world_means}
    return {**_t_summary(mean, se, df, confidence), "n": n, "worlds": worlds, "confidence": confidence,
            "values": flat, "random_worlds": random_worlds}


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values of a family: sorted ascending, p_(i) * (m - i + 1), made monotone, capped at 1.
    NaN p-values are left out of the family and stay NaN."""
    family = sorted((p, name) for name, p in pvalues.items() if not math.isnan(p))
    m, running, out = len(family), 0.0, {name: math.nan for name in pvalues}
    for i, (p, name) in enumerate(family):
        running = max(running, min(1.0, (m - i) * p))
        out[name] = running
    return out
