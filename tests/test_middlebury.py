"""Real data out of the box: the Middlebury pair, its calibration, unprojection with real intrinsics, the
SGBM stereo matcher, depth metrics and the covering radius, each against hand-computed values or brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from depthg.data.middlebury import MOTORCYCLE_CALIBRATION, load_motorcycle
from depthg.metrics import MetricsInputError, align_depth, depth_abs_rel, depth_delta, depth_scores
from depthg.method.sampling import (
    SamplingError,
    covering_radius,
    depth_to_points,
    depth_to_points_intrinsics,
    farthest_point_sample,
    nearest_sample_distance,
)
from depthg.stereo import StereoCalibration, StereoError, sgbm_disparity


@pytest.fixture(scope="module")
def scene():
    return load_motorcycle()


# -- calibration and disparity -> depth ------------------------------------------------------------------
def test_motorcycle_calibration_is_the_741x500_one():
    c = MOTORCYCLE_CALIBRATION
    assert (c.fx, c.fy, c.cx, c.cy, c.doffs) == (994.978, 994.978, 311.193, 254.877, 31.086)
    assert c.baseline == 0.193001  # 193.001 mm, in metres


def test_disparity_to_depth_hand_computed():
    # d + doffs = 100 px: Z = 0.193001 m * 994.978 px / 100 px = 1.92031749 m (by hand: 192.031749 / 100)
    # d + doffs = 50 px: 3.84063498 m; NaN, -31.086 (d + doffs = 0) and -40 (behind infinity) are invalid
    disp = np.array([[68.914, 18.914], [np.nan, -31.086], [-40.0, 0.0]])
    depth, valid = MOTORCYCLE_CALIBRATION.disparity_to_depth(disp)
    assert depth.dtype == np.float32 and valid.dtype == bool
    np.testing.assert_allclose(depth[0], [1.92031749, 3.84063498], rtol=1e-6)
    assert valid.tolist() == [[True, True], [False, False], [False, True]]
    assert depth[1, 0] == 0 and depth[1, 1] == 0 and depth[2, 0] == 0
    np.testing.assert_allclose(depth[2, 1], 192.031749 / 31.086, rtol=1e-6)  # disparity 0 is fine with doffs
    # an extra mask removes pixels; the calibration refuses nonsense
    _, v2 = MOTORCYCLE_CALIBRATION.disparity_to_depth(disp, valid=np.array([[False, True]] * 3))
    assert v2.tolist() == [[False, True], [False, False], [False, True]]
    with pytest.raises(StereoError, match="baseline"):
        StereoCalibration(fx=1.0, fy=1.0, cx=0.0, cy=0.0, baseline=0.0)


def test_load_motorcycle(scene):
    assert scene.shape == (500, 741)
    assert scene.left.shape == scene.right.shape == (500, 741, 3) and scene.left.dtype == np.uint8
    gt_known = np.isfinite(scene.disparity)
    assert np.array_equal(scene.valid, gt_known)  # every shipped disparity gives a positive depth
    assert 0.85 < scene.valid.mean() < 0.95       # the benchmark leaves occlusions etc. without ground truth
    d = scene.disparity[gt_known].astype(np.float64)
    depth = scene.depth
    assert (depth[~scene.valid] == 0).all()
    # nearest and farthest pixel, computed by hand from the formula
    np.testing.assert_allclose(depth[gt_known].min(), 0.193001 * 994.978 / (d.max() + 31.086), rtol=1e-6)
    np.testing.assert_allclose(depth[gt_known].max(), 0.193001 * 994.978 / (d.min() + 31.086), rtol=1e-6)
    assert 1.5 < depth[gt_known].min() < depth[gt_known].max() < 6.0  # a motorcycle a few metres away
    img = scene.image_tensor()
    assert img.shape == (3, 500, 741) and float(img.max()) <= 1.0
    assert torch.equal((img * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(scene.left))


# -- unprojection with real intrinsics ---------------------------------------------------------------------
def test_depth_to_points_intrinsics_hand_computed():
    depth = torch.tensor([[2.0, 4.0, 6.0], [8.0, 10.0, 0.0]])[None, None]  # (1, 1, 2, 3)
    pts = depth_to_points_intrinsics(depth, fx=2.0, fy=4.0, cx=1.0, cy=0.5)
    # pixel (r=0, c=0), Z = 2: X = (0 - 1) * 2 / 2 = -1, Y = (0 - 0.5) * 2 / 4 = -0.25
    # pixel (r=1, c=2), Z = 0: the camera centre; pixel (r=1, c=1), Z = 10: X = 0, Y = 0.5 * 10 / 4 = 1.25
    assert pts.shape == (1, 6, 3)
    torch.testing.assert_close(pts[0, 0], torch.tensor([-1.0, -0.25, 2.0]))
    torch.testing.assert_close(pts[0, 2], torch.tensor([3.0, -0.75, 6.0]))  # (2 - 1) * 6 / 2, (0 - 0.5) * 6 / 4
    torch.testing.assert_close(pts[0, 4], torch.tensor([0.0, 1.25, 10.0]))
    torch.testing.assert_close(pts[0, 5], torch.zeros(3))
    with pytest.raises(SamplingError, match="focal"):
        depth_to_points_intrinsics(depth, fx=0.0, fy=1.0, cx=0.0, cy=0.0)


def test_paper_unprojection_is_the_intrinsics_one_with_fov_intrinsics():
    depth = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) * 50 + 1
    f = (7 / 2) / math.tan(math.radians(70.0) / 2)
    torch.testing.assert_close(depth_to_points(depth, fov_deg=70.0),
                               depth_to_points_intrinsics(depth, f, f, 3.0, 2.0))


def test_point_cloud_uses_the_real_intrinsics(scene):
    full = scene.point_cloud(stride=1)
    assert len(full["points"]) == int(scene.valid.sum())
    r, c = full["pixels"][12345]
    z = scene.depth[r, c]
    # X = (c - cx) Z / f, Y = (r - cy) Z / f, by hand
    expected = [(c - 311.193) * z / 994.978, (r - 254.877) * z / 994.978, z]
    np.testing.assert_allclose(full["points"][12345], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(full["colors"][12345], scene.left[r, c])
    # a strided cloud holds exactly the same points for the pixels it keeps
    sub = scene.point_cloud(stride=8)
    assert (sub["pixels"] % 8 == 4).all()
    lookup = {tuple(p): i for i, p in enumerate(full["pixels"].tolist())}
    rows = [lookup[tuple(p)] for p in sub["pixels"].tolist()]
    np.testing.assert_allclose(sub["points"], full["points"][rows], rtol=1e-5, atol=1e-6)
    assert len(sub["points"]) == int(scene.valid[4::8, 4::8].sum())
    with pytest.raises(StereoError):
        scene.point_cloud(stride=0)


# -- SGBM --------------------------------------------------------------------------------------------------
def test_sgbm_recovers_a_known_shift():
    rng = np.random.default_rng(0)
    texture = (rng.random((80, 200)) * 255).astype(np.uint8)
    shift = 12
    left = texture[:, :-shift]         # left column x shows texture x ...
    right = texture[:, shift:]         # ... which the right image shows at column x - shift: disparity 12
    disp, valid = sgbm_disparity(left, right, num_disparities=32, block_size=5)
    assert disp.shape == left.shape and valid.dtype == bool
    assert np.isnan(disp[~valid]).all() and not valid[:, :32].any()  # the unmatched left border
    interior = valid[5:-5, 40:-5]
    assert interior.mean() > 0.95
    np.testing.assert_allclose(disp[5:-5, 40:-5][interior], shift, atol=0.5)
    with pytest.raises(StereoError, match="multiple of 16"):
        sgbm_disparity(left, right, num_disparities=20)
    with pytest.raises(StereoError, match="uint8"):
        sgbm_disparity(left.astype(np.float32), right.astype(np.float32))


def test_sgbm_on_middlebury_is_close_to_the_ground_truth(scene):
    disp, ok = sgbm_disparity(scene.left, scene.right, num_disparities=64, block_size=5)
    depth, valid = scene.calibration.disparity_to_depth(disp, ok)
    both = valid & scene.valid
    assert both.sum() / scene.valid.sum() > 0.8  # SGBM leaves holes (left border, occlusions, no texture)
    s = depth_scores(depth, scene.depth, both)
    # measured: AbsRel 0.015, delta1 0.976; a broken calibration or sign convention lands far off
    assert s["abs_rel"] < 0.03 and s["delta1"] > 0.95


# -- metrics -----------------------------------------------------------------------------------------------
def test_depth_metrics_hand_computed():
    pred, gt = np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 5.0])
    # |p-g|/g = 0, 1, 0.2 -> 0.4; ratios 1, 2, 1.25: only the first is < 1.25 (1.25 itself is not)
    assert depth_abs_rel(pred, gt) == pytest.approx(0.4)
    assert depth_delta(pred, gt) == pytest.approx(1 / 3)
    assert depth_delta(pred, gt, threshold=1.25**2) == pytest.approx(2 / 3)
    # masked, invalid reference (0, NaN) and zero prediction
    mask = np.array([True, False, True])
    assert depth_abs_rel(pred, gt, mask) == pytest.approx(0.1)
    assert depth_abs_rel(np.array([1.0, 3.0, 3.0]), np.array([0.0, np.nan, 2.0])) == pytest.approx(0.5)
    assert depth_delta(np.array([0.0, 2.0]), np.array([2.0, 2.0])) == pytest.approx(0.5)
    s = depth_scores(2.0 * gt, gt, align="median")
    assert s["scale"] == pytest.approx(0.5) and s["abs_rel"] == pytest.approx(0.0) and s["delta1"] == 1.0
    # a relative map affine in inverse depth (here 1 - minmax(1/gt), as the workbench stores relative depth)
    inv = 1.0 / gt
    rel = 1.0 - (inv - inv.min()) / (inv.max() - inv.min())
    s = depth_scores(rel, gt, align="inverse_affine")
    assert s["abs_rel"] == pytest.approx(0.0, abs=1e-9) and s["delta1"] == 1.0 and s["scale"] < 0
    aligned, fit = align_depth(rel, gt, align="inverse_affine")
    np.testing.assert_allclose(aligned, gt, rtol=1e-9)
    # a fit that gives no positive depth somewhere: 0 there (a miss), NaN input stays NaN
    # (fitted on the first two pixels: 1/gt = 2 - pred, negative at pred 5, where there is no reference)
    aligned, fit = align_depth(np.array([0.0, 1.0, 5.0, np.nan]), np.array([0.5, 1.0, 0.0, 1.0]), align="inverse_affine")
    assert fit["scale"] == pytest.approx(-1.0) and fit["shift"] == pytest.approx(2.0)
    assert aligned[:2] == pytest.approx([0.5, 1.0]) and aligned[2] == 0.0 and np.isnan(aligned[3])
    with pytest.raises(MetricsInputError, match="no pixel"):
        depth_abs_rel(pred, gt, np.zeros(3, bool))
    with pytest.raises(MetricsInputError, match="shape"):
        depth_delta(pred, gt[:2])


def test_depth_metrics_match_brute_force():
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.5, 20, size=(13, 17))
    pred = gt * rng.uniform(0.6, 1.6, size=gt.shape)
    mask = rng.random(gt.shape) > 0.3
    gt[0, :4] = 0.0  # no reference there
    errs, hits, n = 0.0, 0, 0
    for i in range(gt.shape[0]):
        for j in range(gt.shape[1]):
            if mask[i, j] and gt[i, j] > 0:
                errs += abs(pred[i, j] - gt[i, j]) / gt[i, j]
                hits += max(pred[i, j] / gt[i, j], gt[i, j] / pred[i, j]) < 1.25
                n += 1
    assert depth_abs_rel(pred, gt, mask) == pytest.approx(errs / n, rel=1e-12)
    assert depth_delta(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(mask)) == pytest.approx(hits / n)
    assert depth_scores(pred, gt, mask)["n"] == n


# -- covering radius ---------------------------------------------------------------------------------------
def test_nearest_sample_distance_and_covering_radius_match_brute_force():
    gen = torch.Generator().manual_seed(2)
    pts = torch.rand(2, 300, 3, generator=gen) * torch.tensor([10.0, 3.0, 50.0])
    idx = torch.stack([torch.randperm(300, generator=gen)[:9] for _ in range(2)])
    near = nearest_sample_distance(pts, idx, chunk=64)
    for b in range(2):
        for n in range(300):
            best = min(math.dist(pts[b, n].tolist(), pts[b, k].tolist()) for k in idx[b].tolist())
            assert near[b, n].item() == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert covering_radius(pts[b], idx[b]).item() == pytest.approx(near[b].max().item())
    torch.testing.assert_close(covering_radius(pts, idx), near.amax(dim=1))
    assert (near[0, idx[0]] == 0).all()
    with pytest.raises(SamplingError, match="indices"):
        nearest_sample_distance(pts[0], torch.tensor([300]))


def test_fps_covers_the_middlebury_cloud_better_than_random(scene):
    pts = torch.from_numpy(scene.point_cloud(stride=8)["points"])
    fps = farthest_point_sample(pts[None], 121, start=0)[0]
    rand = torch.randperm(len(pts), generator=torch.Generator().manual_seed(0))[:121]
    # greedy FPS is within a factor 2 of the optimal covering radius; random picks are not
    assert covering_radius(pts, fps) < covering_radius(pts, rand)
