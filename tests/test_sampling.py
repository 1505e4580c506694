"""Tests for depthg.method.sampling: unprojection, batched FPS, grid coordinates, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthg.method.released import global_steps_to_iterations, radians_unprojection, transposed_readout
from depthg.method.sampling import (
    FpsChoices,
    SamplingError,
    depth_to_points,
    farthest_point_sample,
    fps_grid,
    indices_to_grid,
    numba_available,
    random_grid,
    sample,
)
from depthg.method.schedules import SampleCountSchedule

BACKENDS = ["torch"] + (["numba"] if numba_available() else [])


def brute_force_fps(points: np.ndarray, n: int, start: int = 0) -> list[int]:
    """Textbook greedy FPS in float64 over the set of not-yet-chosen points (first index on ties)."""
    chosen = [start]
    for _ in range(n - 1):
        best, best_d = -1, -1.0
        for j in range(len(points)):
            if j in chosen:
                continue
            d = min(float(((points[j] - points[c]) ** 2).sum()) for c in chosen)
            if d > best_d:
                best, best_d = j, d
        chosen.append(best)
    return chosen


# ---------------------------------------------------------------------------------------------------
# depth_to_points
# ---------------------------------------------------------------------------------------------------


def test_depth_to_points_paper_pinhole_hand_values():
    depth = torch.full((1, 1, 3, 4), 2.0)
    depth[0, 0, 2, 3] = 4.0
    pts = depth_to_points(depth, fov_deg=90.0)
    assert pts.shape == (1, 12, 3)
    f = 2.0 / math.tan(math.radians(45.0))  # (w/2)/tan(fov/2) = 2 pixels
    # cell (r=2, c=3) has index 2*4+3 = 11; centre (1.5, 1.0)
    np.testing.assert_allclose(pts[0, 11].numpy(), [(3 - 1.5) * 4.0 / f, (2 - 1.0) * 4.0 / f, 4.0], rtol=1e-6)
    # cell (0, 0)
    np.testing.assert_allclose(pts[0, 0].numpy(), [(0 - 1.5) * 2.0 / f, (0 - 1.0) * 2.0 / f, 2.0], rtol=1e-6)
    # the centre column of an odd grid has X = 0 and the image-plane angle of the edge is fov/2
    d = torch.ones(1, 1, 5, 5)
    p = depth_to_points(d, fov_deg=60.0).view(5, 5, 3)
    assert torch.allclose(p[:, 2, 0], torch.zeros(5))
    # a point at the left border of the image plane (c = -0.5) would be at angle fov/2
    focal = 2.5 / math.tan(math.radians(30.0))
    assert math.isclose(math.degrees(math.atan((0 - 0.5 - 2.0) / focal)), -30.0, rel_tol=1e-6)


def test_depth_to_points_released_radians_and_z_stretch():
    depth = torch.full((1, 1, 28, 28), 10.0)
    pts = radians_unprojection(depth, 90.0).view(28, 28, 3)
    kappa = 2 * math.tan(45.0)  # radians: 3.2396
    assert math.isclose(kappa, 3.2396, abs_tol=1e-4)
    r, c = 5, 20
    np.testing.assert_allclose(
        pts[r, c].numpy(), [kappa * 10 * (c - 14) / 28, kappa * 10 * (r - 14) / 28, -50.0], rtol=1e-5)
    # principal point at w/2 = 14, not 13.5
    assert torch.all(pts[:, 14, 0] == 0)


def test_depth_to_points_rejects_bad_input():
    with pytest.raises(SamplingError, match="depth"):
        depth_to_points(torch.ones(1, 2, 4, 4))
    with pytest.raises(SamplingError, match="fov_deg"):
        depth_to_points(torch.ones(1, 1, 4, 4), fov_deg=180.0)


# ---------------------------------------------------------------------------------------------------
# farthest_point_sample
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_matches_brute_force(backend):
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(3, 40, 3, generator=g, dtype=torch.float64)
    start = torch.tensor([0, 7, 39])
    got = farthest_point_sample(pts, 12, start=start, backend=backend)
    assert got.dtype == torch.long and got.shape == (3, 12)
    for b in range(3):
        assert got[b].tolist() == brute_force_fps(pts[b].numpy(), 12, int(start[b]))


def test_fps_backends_identical_float32_with_ties():
    """Integer-valued depth (ties everywhere) exercises the first-index tie-break of both kernels."""
    if not numba_available():
        pytest.skip("numba not installed")
    g = torch.Generator().manual_seed(1)
    depth = torch.randint(0, 4, (4, 1, 28, 28), generator=g).float()
    pts = radians_unprojection(depth)
    a = farthest_point_sample(pts, 121, backend="torch")
    b = farthest_point_sample(pts, 121, backend="numba")
    assert torch.equal(a, b)
    assert all(len(set(row.tolist())) == 121 for row in a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_degenerate_all_zero_depth_gives_raster_prefix(backend):
    """Released FPS: equal depths -> the first 121 raster cells (rows 0-3 + 9 of row 4)."""
    pts = radians_unprojection(torch.zeros(2, 1, 28, 28))
    got = farthest_point_sample(pts, 121, backend=backend)
    assert got.tolist() == [list(range(121))] * 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fps_cuda_equals_cpu():
    g = torch.Generator().manual_seed(5)
    depth = torch.randint(0, 6, (8, 1, 28, 28), generator=g).float() * 40
    pts = radians_unprojection(depth)
    start = torch.randint(0, 784, (8,), generator=g)
    cpu = farthest_point_sample(pts, 121, start=start)
    gpu = farthest_point_sample(pts.cuda(), 121, start=start.cuda())
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    grid = fps_grid(depth.cuda(), (28, 28), 11)
    assert grid.device.type == "cuda"


def test_fps_spreads_points_more_than_random():
    g = torch.Generator().manual_seed(2)
    pts = torch.rand(1, 500, 3, generator=g)
    fps = pts[0, farthest_point_sample(pts, 30)[0]]
    rnd = pts[0, torch.randperm(500, generator=g)[:30]]

    def min_pairwise(p):
        d = torch.cdist(p, p) + torch.eye(len(p)) * 1e9
        return d.min().item()

    assert min_pairwise(fps) > min_pairwise(rnd)


def test_fps_vertical_ramp_prefers_far_rows_released():
    """Released FPS: with far at the top, the released cloud is sampled densely up there."""
    depth = torch.linspace(255.0, 0.0, 28).view(1, 1, 28, 1).expand(1, 1, 28, 28).contiguous()
    idx = farthest_point_sample(radians_unprojection(depth), 121)[0]
    rows = idx // 28
    assert (rows < 14).sum() > (rows >= 14).sum()


def test_fps_errors():
    pts = torch.rand(2, 10, 3)
    with pytest.raises(SamplingError, match="n_samples"):
        farthest_point_sample(pts, 11)
    with pytest.raises(SamplingError, match="start"):
        farthest_point_sample(pts, 3, start=10)
    with pytest.raises(SamplingError, match="start"):
        farthest_point_sample(pts, 3, start=torch.tensor([0]))
    bad = pts.clone()
    bad[0, 0, 0] = float("nan")
    for backend in BACKENDS:
        with pytest.raises(SamplingError, match="NaN"):
            farthest_point_sample(bad, 3, backend=backend)


# ---------------------------------------------------------------------------------------------------
# indices_to_grid, sample
# ---------------------------------------------------------------------------------------------------


def test_paper_grid_reads_exactly_the_chosen_cells():
    g = torch.Generator().manual_seed(3)
    h, w = 7, 5
    feat = torch.randn(2, 4, h, w, generator=g)
    idx = torch.stack([torch.randperm(h * w, generator=g)[:9] for _ in range(2)])
    grid = indices_to_grid(idx, h, w, 3)
    got = sample(feat, grid)  # (B, C, 3, 3)
    expected = feat.flatten(2).gather(2, idx.unsqueeze(1).expand(-1, 4, -1)).view(2, 4, 3, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert grid.min() >= -1 and grid.max() <= 1


def _read_location(grid_xy: torch.Tensor, h: int, w: int) -> tuple[float, float]:
    """(row, col) that grid_sample(align_corners=True) reads for one (x, y)."""
    x, y = grid_xy.tolist()
    return (y + 1) / 2 * (h - 1), (x + 1) / 2 * (w - 1)


def test_released_grid_is_transposed_and_shrunk_checked_examples():
    # docs/fidelity.md §3.3: (5, 20) -> (19.29, 4.82); (0, 27) -> (26.04, 0); (27, 0) -> (0, 26.04)
    picks = [(5, 20), (0, 27), (27, 0), (1, 1)]
    idx = torch.tensor([[r * 28 + c for r, c in picks]])
    grid = transposed_readout(idx, 28, 28, 2)
    locs = {tuple(round(v, 2) for v in _read_location(grid.view(-1, 2)[k], 28, 28)) for k in range(4)}
    assert (19.29, 4.82) in locs and (26.04, 0.0) in locs and (0.0, 26.04) in locs
    # the values really are read there (bilinear blend of the transposed cells)
    ramp = torch.arange(28.0).view(1, 1, 28, 1).expand(1, 1, 28, 28)  # value = row
    rows_read = sample(ramp, grid).flatten()
    sorted_picks = sorted(picks)  # released = raster order
    for k, (r, c) in enumerate(sorted_picks):
        assert math.isclose(rows_read[k].item(), c * 27 / 28, abs_tol=1e-4)


def test_released_grid_is_raster_sorted_paper_keeps_selection_order():
    idx = torch.tensor([[30, 2, 17, 5]])
    rel = transposed_readout(idx, 6, 6, 2).view(-1, 2)
    pap = indices_to_grid(idx, 6, 6, 2).view(-1, 2)
    # released stores (row/h*2-1, col/w*2-1) of the sorted indices 2, 5, 17, 30
    expected = torch.tensor([[r / 6 * 2 - 1, c / 6 * 2 - 1] for r, c in [(0, 2), (0, 5), (2, 5), (5, 0)]])
    torch.testing.assert_close(rel, expected)
    expected_paper = torch.tensor([[2 * c / 5 - 1, 2 * r / 5 - 1] for r, c in [(5, 0), (0, 2), (2, 5), (0, 5)]])
    torch.testing.assert_close(pap, expected_paper)


def test_indices_to_grid_shape_error():
    with pytest.raises(SamplingError, match="n_side"):
        indices_to_grid(torch.zeros(1, 5, dtype=torch.long), 4, 4, 2)


def test_random_grid_seeded_and_in_range():
    a = random_grid(3, 11, generator=torch.Generator().manual_seed(0))
    b = random_grid(3, 11, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 11, 11, 2) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


# ---------------------------------------------------------------------------------------------------
# fps_grid
# ---------------------------------------------------------------------------------------------------


def test_fps_grid_pipeline_matches_manual_steps():
    g = torch.Generator().manual_seed(4)
    depth = torch.rand(2, 1, 32, 32, generator=g) * 255
    for unproject, to_grid in ((depth_to_points, indices_to_grid), (radians_unprojection, transposed_readout)):
        grid = fps_grid(depth, (8, 8), 4, choices=FpsChoices(unproject, to_grid))
        pooled = F.adaptive_avg_pool2d(depth, (8, 8))
        idx = farthest_point_sample(unproject(pooled, 90.0), 16)
        torch.testing.assert_close(grid, to_grid(idx, 8, 8, 4))
    start = torch.tensor([3, 60])
    grid = fps_grid(depth, (8, 8), 4, start=start)
    # paper grid, first entry = the start cell
    assert _read_location(grid[0, 0, 0], 8, 8) == pytest.approx((0, 3))
    assert _read_location(grid[1, 0, 0], 8, 8) == pytest.approx((7, 4))
    with pytest.raises(SamplingError, match="cannot sample"):
        fps_grid(depth, (3, 3), 4)


# ---------------------------------------------------------------------------------------------------
# SampleCountSchedule
# ---------------------------------------------------------------------------------------------------


def test_sample_count_schedule_released_coco_vits():
    """docs/fidelity.md §3.10: 11 at iteration 0, 9 from 1, 8 from 1001, 7 from 2001 (global_step = 3*it)."""
    s = SampleCountSchedule(11, factor=0.9, every=global_steps_to_iterations(1000), min_side=0, after_step=True,
                            at_start=True)
    expected = {0: 11, 1: 9, 2: 9, 1000: 9, 1001: 8, 2000: 8, 2001: 7, 2333: 7}
    assert {it: s.at(it) for it in expected} == expected


def test_sample_count_schedule_brute_force_released_rule():
    """Simulate the released loop step by step (decay after the loss, global_step += 3)."""
    for n0, factor, every in [(11, 0.9, 1000), (12, 0.8, 300), (11, 0.5, 250)]:
        sched = SampleCountSchedule(n0, factor=factor, every=global_steps_to_iterations(every), min_side=0,
                                    after_step=True, at_start=True)
        n = n0
        for it in range(0, 2400):
            assert sched.at(it) == n, (n0, factor, every, it)
            if (3 * it) % every == 0:
                n = max(int(n * factor), 0)


def test_sample_count_schedule_paper_counts_optimizer_steps():
    s = SampleCountSchedule(11, factor=0.9, every=1000)
    assert [s.at(i) for i in (0, 999, 1000, 1999, 2000)] == [11, 11, 9, 9, 8]
    assert SampleCountSchedule(11).at(10**6) == 11  # every = 0: off
    assert SampleCountSchedule(3, factor=0.1, every=1).at(5) == 1  # floored at min_side
