"""Depth cache, stereo depth, and the real transformers loading path with tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthg.data import Cityscapes
from depthg.features import FULL_PRECISION, Precision
from depthg.depth import (
    DepthCache,
    DepthCacheError,
    DepthSettings,
    DepthModelNotFoundError,
    InvalidDepthError,
    build_tiny_random_depth_model,
    disparity_to_depth,
    estimate_depth,
    estimate_depth_for_dataset,
    hub_reachable,
    load_depth_model,
)
from depthg.utils import repo_root

H, W = 30, 40


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------
def test_cache_roundtrip_and_meta(tmp_path):
    cache = DepthCache(tmp_path / "c", DepthSettings("unit", "m"))
    depth = torch.rand(1, H, W) * 100
    path = cache.write("train/city/img0", depth)
    assert path == tmp_path / "c" / "train" / "city" / "img0.png"
    with Image.open(path) as im:
        assert im.mode == "I;16"
    meta = json.loads((tmp_path / "c" / "depth_meta.json").read_text())
    assert meta == {"source": "unit", "encoding": "uint16", "scale": 1 / 256, "offset": 0.0, "units": "m", "normalisation": "none"}
    back = DepthCache(tmp_path / "c").read("train/city/img0")
    assert back.shape == (1, H, W) and back.dtype == torch.float32
    assert float((back - depth).abs().max()) <= 0.5 / 256 + 1e-6  # half a quantisation step

    with pytest.raises(DepthCacheError, match="source: cache has 'unit', asked for 'other'"):
        DepthCache(tmp_path / "c", DepthSettings("other", "m"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "depth_meta.json")):
        DepthCache(tmp_path / "empty")
    with pytest.raises(DepthCacheError, match="invalid depth-cache key"):
        cache.path("../escape")


def test_cache_rejects_bad_values(tmp_path):
    cache = DepthCache(tmp_path, DepthSettings("unit", "relative"))
    for bad, what in ((float("nan"), "NaN"), (float("inf"), "inf"), (-0.5, "negative")):
        d = torch.ones(H, W)
        d[3, 4] = bad
        with pytest.raises(InvalidDepthError, match=what) as err:
            cache.write("k", d)
        assert str(tmp_path / "k.png") in str(err.value)
    with pytest.raises(DepthCacheError, match="outside what this cache stores"):
        cache.write("k", torch.full((H, W), 2.0))  # relative depth lives in [0, 1]
    assert not (tmp_path / "k.png").exists()


# ------------------------------------------------------------------------------------------------
# stereo
# ------------------------------------------------------------------------------------------------
def write_camera(path: Path, baseline: float = 0.2, fx: float = 1000.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"extrinsic": {"baseline": baseline, "pitch": 0.0}, "intrinsic": {"fx": fx, "fy": fx, "u0": 20.0, "v0": 15.0}}))
    return path


def test_disparity_to_depth(tmp_path):
    p = np.array([[0, 1, 257, 513, 2561]], dtype=np.uint16)  # d = (p-1)/256 = -, 0, 1, 2, 10 px
    Image.fromarray(p).save(tmp_path / "d.png")
    cam = write_camera(tmp_path / "cam.json")
    depth = disparity_to_depth(tmp_path / "d.png", cam)
    # depth = baseline * fx / d = 200 / d; p = 0 (no disparity) and p = 1 (zero disparity) are invalid -> 0
    assert depth.shape == (1, 1, 5)
    np.testing.assert_allclose(depth[0, 0].numpy(), [0, 0, 200, 100, 20], rtol=1e-6)
    np.testing.assert_allclose(disparity_to_depth(tmp_path / "d.png", cam, max_depth=150)[0, 0].numpy(), [0, 0, 0, 100, 20])
    (tmp_path / "bad.json").write_text(json.dumps({"intrinsic": {"fx": 1.0}}))
    with pytest.raises(DepthCacheError, match="bad.json"):
        disparity_to_depth(tmp_path / "d.png", tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        disparity_to_depth(tmp_path / "nope.png", cam)


# ------------------------------------------------------------------------------------------------
# transformers models
# ------------------------------------------------------------------------------------------------
def tiny_depth_anything(folder: Path, kind: str = "relative") -> Path:
    """Tiny random Depth Anything + processor, saved with save_pretrained (the library's smoke-test model)."""
    return build_tiny_random_depth_model(folder, kind)


@pytest.fixture(scope="module")
def relative_model(tmp_path_factory):
    return tiny_depth_anything(tmp_path_factory.mktemp("da_rel"))


def test_estimate_depth_relative_and_metric(relative_model, tmp_path):
    model = load_depth_model(relative_model, device="cpu")
    assert model.kind == "relative" and not model.model.training and model.units == "relative"
    images = torch.rand(2, 3, H, W)
    depth = estimate_depth(model, images)
    assert depth.shape == (2, 1, H, W)
    for d in depth:  # relative: 1 - minmax(disparity) per image -> exactly spans [0, 1]
        assert float(d.min()) == pytest.approx(0.0, abs=1e-6) and float(d.max()) == pytest.approx(1.0, abs=1e-6)
    # larger = farther: the converted map is a decreasing function of the raw disparity
    inputs = model.processor(images=list(images), return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        raw = model.processor.post_process_depth_estimation(model.model(**inputs), target_sizes=[(H, W)] * 2)
    disp = raw[0]["predicted_depth"].flatten()
    order = disp.argsort()
    assert (depth[0].flatten()[order].diff() <= 1e-6).all()

    metric = load_depth_model(tiny_depth_anything(tmp_path / "da_metric", "metric"), device="cpu")
    assert metric.kind == "metric" and metric.units == "m"
    md = estimate_depth(metric, images)
    assert md.shape == (2, 1, H, W) and float(md.min()) >= 0 and float(md.max()) <= 80
    tta = estimate_depth(metric, images, flip_tta=True)  # released ZoeDepth inference's flip averaging
    assert torch.allclose(tta, 0.5 * (md + estimate_depth(metric, images.flip(-1)).flip(-1)), atol=1e-5)


def write_tiny_cityscapes(root: Path, n: int = 3) -> None:
    for i in range(n):
        stem = f"ulm_{i:06d}_000019"
        for sub, suffix, arr in (("leftImg8bit", "_leftImg8bit.png", np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)),
                                 ("gtFine", "_gtFine_labelIds.png", np.full((H, W), 7 + i, np.uint8))):
            path = root / sub / "train" / "ulm" / f"{stem}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)


def test_estimate_depth_for_dataset_writes_a_cache_the_dataset_reads(relative_model, tmp_path):
    root, cache_root = tmp_path / "cs", tmp_path / "cache" / "da"
    write_tiny_cityscapes(root)
    model = load_depth_model(str(relative_model), device="cpu")
    ds = Cityscapes(root, "train")
    assert estimate_depth_for_dataset(ds, model, cache_root, batch_size=2, progress=False) == cache_root
    meta = json.loads((cache_root / "depth_meta.json").read_text())
    assert meta["units"] == "relative" and meta["source"] == str(relative_model) and "minmax" in meta["normalisation"]

    with_depth = Cityscapes(root, "train", depth_dir=cache_root)
    direct = estimate_depth(model, torch.stack([ds[i]["img"] for i in range(len(ds))]))
    for i in range(len(ds)):
        item = with_depth[i]
        assert item["depth"].shape == (1, H, W) and item["img"].shape == (3, H, W)
        assert float((item["depth"] - direct[i]).abs().max()) <= 1 / 65535  # quantisation only

    mtimes = {p: p.stat().st_mtime_ns for p in cache_root.rglob("*.png")}
    (cache_root / "train" / "ulm" / "ulm_000001_000019.png").unlink()
    estimate_depth_for_dataset(ds, model, cache_root, progress=False)  # resumes: only the missing file
    after = {p: p.stat().st_mtime_ns for p in cache_root.rglob("*.png")}
    assert set(after) == set(mtimes)
    assert all(after[p] == t for p, t in mtimes.items() if "000001" not in p.name)

    with pytest.raises(DepthCacheError, match="inside the dataset's source folder"):
        estimate_depth_for_dataset(ds, model, root / "leftImg8bit" / "train" / "ulm" / "depth", progress=False)


def test_dataset_depth_on_loader_workers_in_batches_equals_image_by_image(relative_model, tmp_path):
    """The batched path (images read and processed by 2 loader workers, batches of 3, PNGs written on threads)
    gives every image's map of estimate_depth on that image alone (up to float round-off: quantisation)."""
    root = tmp_path / "cs"
    write_tiny_cityscapes(root, n=5)
    model = load_depth_model(str(relative_model), device="cpu")
    ds = Cityscapes(root, "train")
    estimate_depth_for_dataset(ds, model, tmp_path / "batched", batch_size=3, progress=False, num_workers=2)
    cached = Cityscapes(root, "train", depth_dir=tmp_path / "batched")
    for i in range(len(ds)):
        alone = estimate_depth(model, ds[i]["img"][None])[0]
        assert float((cached[i]["depth"] - alone).abs().max()) <= 1.5 / 65535  # half a step + round-off
    assert json.loads((tmp_path / "batched" / "depth_sources.json").read_text()).keys() == set(ds.keys)


def test_depth_under_autocast_stays_within_the_stated_tolerance(relative_model, tmp_path):
    """bf16 autocast (what a CUDA run uses; on the CPU only when asked) moves the relative maps by at most 0.05
    of their [0, 1] range, 0.005 on average (a random tiny model; the trained models are not measured here);
    the cache records the precision and is estimated again when it changes."""
    model = load_depth_model(str(relative_model), device="cpu")
    images = torch.rand(4, 3, H, W, generator=torch.Generator().manual_seed(0))
    bf16 = Precision("cpu", torch.bfloat16)
    diff = (estimate_depth(model, images, precision=bf16) - estimate_depth(model, images)).abs()
    assert float(diff.max()) <= 0.05 and float(diff.mean()) <= 0.005

    root, cache_root = tmp_path / "cs", tmp_path / "cache"
    write_tiny_cityscapes(root, n=2)
    ds = Cityscapes(root, "train")
    estimate_depth_for_dataset(ds, model, cache_root, progress=False)
    assert "precision" not in json.loads((cache_root / "depth_meta.json").read_text())  # fp32 caches unchanged
    estimate_depth_for_dataset(ds, model, cache_root, progress=False, precision=bf16)
    assert json.loads((cache_root / "depth_meta.json").read_text())["precision"] == "bf16"
    with_depth = Cityscapes(root, "train", depth_dir=cache_root)
    expected = estimate_depth(model, torch.stack([ds[i]["img"] for i in range(2)]), precision=bf16)
    assert all(float((with_depth[i]["depth"] - expected[i]).abs().max()) <= 1.5 / 65535 for i in range(2))


def _never_download(monkeypatch):
    """Make any attempt to load through transformers fail the test (no network call may start)."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError(f"from_pretrained was called with {args} {kwargs}")

    monkeypatch.setattr(transformers.AutoModelForDepthEstimation, "from_pretrained", boom)


def test_missing_model_error_says_where_and_how(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: still respected
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.chdir(tmp_path)
    _never_download(monkeypatch)
    with pytest.raises(DepthModelNotFoundError) as err:
        load_depth_model("depth-anything-v2-small", device="cpu")
    msg = str(err.value)
    assert "hf download depth-anything/Depth-Anything-V2-Small-hf --local-dir DIR" in msg
    assert "offline mode is on" in msg and str(tmp_path / "hf" / "hub") in msg
    # the local folder looked at is under the repository root, not the current directory
    assert str(repo_root() / "depth-anything" / "Depth-Anything-V2-Small-hf") in msg
    assert str(tmp_path / "depth-anything") not in msg
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(DepthModelNotFoundError, match="has no config.json"):
        load_depth_model(tmp_path / "empty_model", device="cpu")
    with pytest.raises(DepthModelNotFoundError, match="does not exist"):
        load_depth_model(tmp_path / "no_such_model", device="cpu")


def test_no_network_is_said_at_once(tmp_path, monkeypatch):
    """Offline mode off, nothing cached, the hub unreachable: one quick probe, no download attempt."""
    import socket
    import time

    import huggingface_hub.constants as hf_constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with socket.socket() as s:  # a port on this machine that nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    _never_download(monkeypatch)
    t0 = time.monotonic()
    with pytest.raises(DepthModelNotFoundError, match="cannot be reached") as err:
        load_depth_model("zoedepth", device="cpu")
    assert time.monotonic() - t0 < 5.0
    assert "hf download Intel/zoedepth-nyu" in str(err.value)


def test_hub_reachable_probe(monkeypatch):
    import socket

    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable(timeout=2.0)
    assert not hub_reachable(timeout=2.0)  # the same port, closed now


def test_relative_model_path_is_resolved_under_the_repository_root(relative_model, tmp_path, monkeypatch):
    import shutil

    import depthg.depth as depth_module

    root = tmp_path / "repo"
    shutil.copytree(relative_model, root / "models" / "tiny")
    monkeypatch.setattr(depth_module, "repo_root", lambda: root)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # like Jupyter, which runs a notebook in its own folder
    model = load_depth_model("models/tiny", device="cpu")
    assert model.name == "models/tiny" and model.kind == "relative"


def test_hub_id_in_the_local_cache_loads_without_network(relative_model, tmp_path, monkeypatch):
    """A hub id found in the Hugging Face cache is read from there (local files only), even offline."""
    import shutil

    import huggingface_hub.constants as hf_constants

    hub = tmp_path / "hub"
    repo = hub / "models--someone--tiny-depth"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(relative_model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_depth_model("someone/tiny-depth", device="cpu")
    assert model.kind == "relative"
    assert estimate_depth(model, torch.rand(1, 3, H, W)).shape == (1, 1, H, W)


def test_tiny_random_depth_model_is_reproducible_and_leaves_the_rng_alone(tmp_path):
    """The smoke-test model: loads through the real path, same weights every time, caller's RNG untouched."""
    from depthg.depth import build_tiny_random_depth_model

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_depth_model(build_tiny_random_depth_model(tmp_path / "a"), device="cpu")
    assert torch.equal(torch.rand(3), expected_next)  # building it did not consume the global RNG stream
    b = load_depth_model(build_tiny_random_depth_model(tmp_path / "b"), device="cpu")
    assert a.kind == "relative" and sum(p.numel() for p in a.model.parameters()) < 300_000
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), name
    images = torch.rand(1, 3, H, W)
    torch.testing.assert_close(estimate_depth(a, images), estimate_depth(b, images))
