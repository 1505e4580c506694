"""Tests of the synthetic world (depthg/world/synthetic.py): determinism, file formats, geometry.

Every check compares against an independent reference: the Cityscapes disparity formula applied to
the written files, the analytic depth of a flat ground plane seen by a pitched pinhole camera, and
the renderer's own in-memory output for the same seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from depthg.world.synthetic import (
    DEPTH_SCALE,
    MAX_DEPTH,
    SKY,
    WORLD_LABEL_IDS,
    SyntheticWorldError,
    make_world,
    render_scene,
)

SIZE = (48, 96)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"), n_train=3, n_val=2, size=SIZE, seed=0, progress=False)


def test_layout_and_metadata(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text())
    assert meta["label_ids"] == sorted(WORLD_LABEL_IDS)
    assert meta["names"][meta["label_ids"].index(7)] == "road"
    assert meta["names"][meta["label_ids"].index(26)] == "car"
    assert meta["size"] == list(SIZE) and meta["seed"] == 0 and meta["generator_version"] == 1
    assert (meta["n_train"], meta["n_val"]) == (3, 2)
    depth_meta = json.loads((world / "depth_gt" / "depth_meta.json").read_text())
    assert depth_meta == {"source": "synthetic_gt", "encoding": "uint16", "scale": DEPTH_SCALE, "offset": 0.0,
                          "units": "m", "normalisation": "none"}
    for split, n in (("train", 3), ("val", 2)):
        imgs = sorted((world / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(imgs) == n
        for img in imgs:
            city = img.parent.name
            stem = img.name[: -len("_leftImg8bit.png")]
            assert stem.startswith(city + "_") and len(stem.split("_")) == 3
            for folder, suffix in (("gtFine", "_gtFine_labelIds.png"), ("gtFine", "_gtFine_color.png"),
                                   ("disparity", "_disparity.png"), ("camera", "_camera.json")):
                assert (world / folder / split / city / f"{stem}{suffix}").is_file()
            assert (world / "depth_gt" / split / city / f"{stem}.png").is_file()
            assert _read(img).shape == (*SIZE, 3) and _read(img).dtype == np.uint8
    # train and val cities differ, as in Cityscapes
    train_cities = {p.name for p in (world / "leftImg8bit" / "train").iterdir()}
    val_cities = {p.name for p in (world / "leftImg8bit" / "val").iterdir()}
    assert train_cities and val_cities and not train_cities & val_cities


def test_same_seed_same_bytes_other_seed_other_bytes(world: Path, tmp_path: Path) -> None:
    again = make_world(tmp_path / "again", n_train=3, n_val=2, size=SIZE, seed=0, progress=False)
    assert _files(again) == _files(world)
    other = make_world(tmp_path / "other", n_train=3, n_val=2, size=SIZE, seed=1, progress=False)
    a, b = _files(world), _files(other)
    images = [k for k in a if k.endswith("_leftImg8bit.png")]
    assert images and all(a[k] != b[k] for k in images)


def test_written_files_equal_render_scene(world: Path) -> None:
    """Image i of a split is render_scene(default_rng(SeedSequence([seed, split_code, i])))."""
    out = render_scene(np.random.default_rng(np.random.SeedSequence([0, 1, 1])), SIZE)  # val image 1
    city = "synth3"  # val cities are synth{n_cities + k}; image 1 lands in the second city
    stem = f"{city}_000000_000019"
    assert np.array_equal(_read(world / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"), out["img"])
    assert np.array_equal(_read(world / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"), out["label_ids"])
    depth = _read(world / "depth_gt" / "val" / city / f"{stem}.png").astype(np.float64) * DEPTH_SCALE
    assert np.allclose(depth, out["depth"], atol=DEPTH_SCALE / 2 + 1e-6)
    assert json.loads((world / "camera" / "val" / city / f"{stem}_camera.json").read_text()) == out["camera"]


def test_depth_agrees_with_disparity_and_camera(world: Path) -> None:
    for disp_path in sorted((world / "disparity").rglob("*_disparity.png")):
        split, city = disp_path.parent.parent.name, disp_path.parent.name
        stem = disp_path.name[: -len("_disparity.png")]
        cam = json.loads((world / "camera" / split / city / f"{stem}_camera.json").read_text())
        assert set(cam) == {"extrinsic", "intrinsic"}
        assert set(cam["extrinsic"]) == {"baseline", "pitch", "roll", "x", "y", "yaw", "z"}
        assert set(cam["intrinsic"]) == {"fx", "fy", "u0", "v0"}
        p = _read(disp_path)
        assert p.dtype == np.uint16
        depth = _read(world / "depth_gt" / split / city / f"{stem}.png").astype(np.float64) * DEPTH_SCALE
        labels = _read(world / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
        assert np.all(p[labels == SKY] == 0), "sky must have invalid (0) disparity"
        valid = p > 0
        assert valid.mean() > 0.4
        bf = cam["extrinsic"]["baseline"] * cam["intrinsic"]["fx"]
        d = (p[valid].astype(np.float64) - 1) / 256.0
        # disparity is rounded to the nearest 1/256 px and depth_gt to DEPTH_SCALE, so the true depth
        # bf / d_true lies in [bf / (d + 1/512), bf / (d - 1/512)] and depth_gt within DEPTH_SCALE/2 of it
        slack = DEPTH_SCALE / 2 + 1e-4
        assert np.all(depth[valid] >= bf / (d + 1 / 512) - slack)
        assert np.all(depth[valid] <= bf / (d - 1 / 512) + slack)
        assert np.allclose(bf / d, depth[valid], rtol=0.05)
        assert np.all(depth <= MAX_DEPTH) and np.all(depth > 0)


def test_every_class_appears_and_only_world_classes() -> None:
    seen: set[int] = set()
    for seed in range(8):
        labels = render_scene(seed, (96, 192))["label_ids"]
        assert labels.dtype == np.uint8 and labels.shape == (96, 192)
        ids = set(np.unique(labels).tolist())
        assert ids <= set(WORLD_LABEL_IDS)
        seen |= ids
    assert seen == set(WORLD_LABEL_IDS)


def _analytic_ground_depth(camera: dict, rows: np.ndarray) -> np.ndarray:
    """z-depth of the ground z = 0 seen at pixel row v: h cos(a) / sin(pitch + a), a = atan((v - v0)/fy)."""
    h, pitch = camera["extrinsic"]["z"], camera["extrinsic"]["pitch"]
    a = np.arctan((rows - camera["intrinsic"]["v0"]) / camera["intrinsic"]["fy"])
    return h * np.cos(a) / np.sin(pitch + a)


@pytest.mark.parametrize("seed", [0, 3])
def test_flat_ground_depth_matches_pinhole_geometry(seed: int) -> None:
    out = render_scene(seed, (64, 128), objects=False)
    labels, depth, cam = out["label_ids"], out["depth"], out["camera"]
    assert cam == render_scene(seed, (64, 128))["camera"]  # same camera as the full street
    assert set(np.unique(labels).tolist()) <= {7, 9, 22, 23}
    rows = np.broadcast_to(np.arange(64, dtype=np.float64)[:, None], depth.shape)
    ground = labels != SKY
    expected = _analytic_ground_depth(cam, rows[ground])
    assert ground.mean() > 0.3
    near = expected < MAX_DEPTH
    assert np.allclose(depth[ground][near], expected[near], rtol=1e-4)
    # rows above the horizon see sky (the horizon is where pitch + a = 0)
    a = np.arctan((np.arange(64) - cam["intrinsic"]["v0"]) / cam["intrinsic"]["fy"])
    assert np.all(labels[(cam["extrinsic"]["pitch"] + a) < 0] == SKY)


def test_road_pixels_of_a_full_scene_lie_on_the_ground() -> None:
    out = render_scene(5, (96, 192))
    road = (out["label_ids"] == 7) & (out["depth"] < MAX_DEPTH)
    assert road.mean() > 0.1
    rows = np.nonzero(road)[0].astype(np.float64)
    assert np.allclose(out["depth"][road], _analytic_ground_depth(out["camera"], rows), rtol=1e-4)


def test_render_scene_outputs_and_rng_forms() -> None:
    out = render_scene(7, (40, 80))
    assert out["img"].shape == (40, 80, 3) and out["img"].dtype == np.uint8
    assert out["depth"].dtype == np.float32 and np.all(np.isfinite(out["depth"]))
    assert np.all(out["depth"][out["label_ids"] == SKY] == MAX_DEPTH)
    cam = out["camera"]["intrinsic"]
    assert math.isclose(cam["u0"], 39.5) and math.isclose(cam["v0"], 19.5) and cam["fx"] == cam["fy"]
    same = render_scene(np.random.default_rng(7), (40, 80))
    assert all(np.array_equal(out[k], same[k]) for k in ("img", "label_ids", "depth"))
    assert not np.array_equal(render_scene(8, (40, 80))["img"], out["img"])
    # the street does not depend on the resolution, only its sampling does
    big = render_scene(7, (80, 160))
    assert big["camera"]["extrinsic"] == out["camera"]["extrinsic"]


def test_resume_rewrites_only_missing_files(tmp_path: Path) -> None:
    root = make_world(tmp_path / "w", n_train=2, n_val=0, size=(32, 64), seed=3, progress=False)
    before = _files(root)
    victim = next(root.rglob("*_disparity.png"))
    victim.unlink()
    untouched = next(root.rglob("*_leftImg8bit.png"))
    mtime = untouched.stat().st_mtime_ns
    make_world(root, n_train=2, n_val=0, size=(32, 64), seed=3, progress=False)
    assert _files(root) == before
    assert untouched.stat().st_mtime_ns == mtime
    assert not list(root.rglob("*.tmp"))
    with pytest.raises(SyntheticWorldError, match="world.json"):
        make_world(root, n_train=2, n_val=0, size=(32, 64), seed=4, progress=False)


@pytest.mark.parametrize("kwargs", [dict(size=(4, 64)), dict(size="big"), dict(n_train=-1), dict(seed=1.5), dict(n_cities=0)])
def test_bad_arguments_raise_clear_errors(tmp_path: Path, kwargs: dict) -> None:
    args = dict(root=tmp_path / "w", n_train=1, n_val=0, size=(32, 64), progress=False) | kwargs
    with pytest.raises(SyntheticWorldError):
        make_world(**args)
    with pytest.raises(SyntheticWorldError):
        render_scene("zero", (32, 64))  # type: ignore[arg-type]
