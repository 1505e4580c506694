"""Calibrated unprojection: cameras followed through crops and resizes, and the grid's 3D points."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from depthg.build import TrainError, fidelity, training_cameras, training_dataset
from depthg.config import Config, ConfigError, apply_overrides
from depthg.data.prepare import prepare_training_data
from depthg.data.transforms import Camera, resize_center_crop
from depthg.method.sampling import cell_intrinsics, depth_to_points, fps_grid, grid_points
from tests.test_cli import tiny_overrides


def _blob(h: int, w: int, u: float, v: float, sigma: float = 2.0) -> torch.Tensor:
    """A (3, h, w) image of one Gaussian blob centred on pixel coordinates (u, v) (pixel centres at integers)."""
    rows = torch.arange(h, dtype=torch.float64)[:, None]
    cols = torch.arange(w, dtype=torch.float64)[None, :]
    g = torch.exp(-((cols - u) ** 2 + (rows - v) ** 2) / (2 * sigma ** 2))
    return g.float().expand(3, h, w).clone()


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    g = img[0].double()
    rows = torch.arange(g.shape[0], dtype=torch.float64)[:, None]
    cols = torch.arange(g.shape[1], dtype=torch.float64)[None, :]
    return float((g * cols).sum() / g.sum()), float((g * rows).sum() / g.sum())


@pytest.mark.parametrize("size,box,res", [((240, 480), (0, 100, 120, 240), 96), ((300, 200), (40, 10, 150, 120), 64)])
def test_camera_follows_a_point_through_crop_and_resize(size, box, res):
    # a 3D point seen by the camera; its image is a blob, which crop + resize_center_crop move with the pixels
    cam = Camera(fx=350.0, fy=330.0, cx=size[1] / 2 - 3.3, cy=size[0] / 2 + 2.1, height=size[0], width=size[1])
    top, left, ch, cw = box
    crop_cam = cam.crop(top, left, ch, cw).resized_center_crop(res)
    # a point the final camera should see at (0.4 res, 0.6 res), at depth 5
    u, v, z = 0.4 * res, 0.6 * res, 5.0
    point = ((u - crop_cam.cx) * z / crop_cam.fx, (v - crop_cam.cy) * z / crop_cam.fy, z)
    # where the original camera sees it: the blob is drawn there, then cropped and resized as pixels
    u0, v0 = cam.fx * point[0] / point[2] + cam.cx, cam.fy * point[1] / point[2] + cam.cy
    img = _blob(*size, u0, v0, sigma=4.0)[:, top:top + ch, left:left + cw]
    item = {"img": img, "label": torch.zeros(ch, cw, dtype=torch.long)}
    out = resize_center_crop(item, res)["img"]
    cu, cv = _centroid(out)
    assert cu == pytest.approx(u, abs=0.05) and cv == pytest.approx(v, abs=0.05)


def test_grid_points_of_a_plane_by_hand():
    # a fronto-parallel plane at Z = 10 seen by a 64 x 64 image, pooled to 8 x 8 cells of 8 px
    depth = torch.full((1, 1, 64, 64), 10.0)
    k = torch.tensor([[80.0, 80.0, 31.5, 20.0]])
    pts = grid_points(depth, (8, 8), intrinsics=k).reshape(8, 8, 3)
    # cell (r, c) centre is pixel (8c + 3.5, 8r + 3.5): X = (u - cx) Z / fx
    for r, c in ((0, 0), (3, 5), (7, 7)):
        u, v = 8 * c + 3.5, 8 * r + 3.5
        assert pts[r, c, 0].item() == pytest.approx((u - 31.5) * 10 / 80)
        assert pts[r, c, 1].item() == pytest.approx((v - 20.0) * 10 / 80)
        assert pts[r, c, 2].item() == pytest.approx(10.0)
    assert torch.allclose(cell_intrinsics(k, (64, 64), (8, 8)), torch.tensor([[10.0, 10.0, 3.5, 2.0625]]))
    # without a camera: the fov pinhole over the grid
    assert torch.equal(grid_points(depth, (8, 8), fov_deg=60.0), depth_to_points(torch.full((1, 1, 8, 8), 10.0), 60.0))


def test_fps_with_a_narrow_real_camera_differs_from_the_90_degree_guess():
    # a street-like depth: near at the bottom, far at the top
    rows = torch.linspace(60.0, 3.0, 64)[:, None].expand(64, 64)
    depth = (rows + torch.linspace(0, 1, 64)[None, :]).reshape(1, 1, 64, 64)
    k = torch.tensor([[560.0, 560.0, 31.5, 31.5]])  # a 6-degree field of view
    a = fps_grid(depth, (16, 16), 4, fov_deg=90.0)
    b = fps_grid(depth, (16, 16), 4, intrinsics=k)
    assert not torch.equal(a, b)
    # with a narrow view the lateral spread is small: FPS spends its picks along the depth (rows), so it
    # reaches more distinct rows than columns
    rows_b = {round(y, 4) for y in b[0, ..., 1].flatten().tolist()}
    cols_b = {round(x, 4) for x in b[0, ..., 0].flatten().tolist()}
    assert len(rows_b) > len(cols_b)


def test_training_cameras_follow_the_five_crops_of_the_synthetic_world(tmp_path):
    cfg = apply_overrides(Config.preset("synthetic", "paper"),
                          [*tiny_overrides(tmp_path), "world_n_train=2", "unprojection=camera"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = prepare_training_data(cfg, progress=False)
    crops = training_dataset(cfg, fidelity(cfg), data)
    cams = training_cameras(cfg, crops)
    assert cams.shape == (10, 4)
    # the world's camera: fx = 2262.52 * W / 2048 at W = 128, principal point at the centre (63.5, 31.5)
    fx = 2262.52 * 128 / 2048
    top_left = crops.camera(0)  # box (0, 0, 32, 64)
    assert (top_left.fx, top_left.cx, top_left.cy, top_left.height, top_left.width) == pytest.approx((fx, 63.5, 31.5, 32, 64), abs=1e-3)
    # res 32: the 32 x 64 crop keeps its scale and loses 16 columns on the left
    assert cams[0].tolist() == pytest.approx([fx, fx, 47.5, 31.5], abs=1e-3)
    assert training_cameras(apply_overrides(cfg, ["unprojection=fov"]), crops) is None
    with pytest.raises(ConfigError, match="released mode"):
        apply_overrides(cfg, ["mode=released", "unprojection=camera"])


def test_camera_unprojection_needs_calibration(tmp_path):
    from depthg.data import ImageDirectory
    from PIL import Image
    import numpy as np

    for split in ("train",):
        (tmp_path / "imgs" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imgs" / split / "a.png")
    ds = ImageDirectory(tmp_path, "train", n_classes=2)
    cfg = Config(unprojection="camera", dataset="directory", classes=2, res=16, eval_res=16, backbone="vit_small_patch8_224",
                 depth_sampling="random", feature_samples=2)
    with pytest.raises(TrainError, match="calibrated camera"):
        training_cameras(cfg, ds)
