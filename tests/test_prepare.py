"""Five-crop, kNN, pair sampling and the whole preparation chain (issue 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from depthg.config import Config
from depthg.data import Cityscapes, ImageDirectory
from depthg.data.prepare import (
    CroppedDataset,
    KnnSettings,
    PreparationError,
    compute_knn,
    five_crop,
    knn_search,
    prepare_training_data,
    world_folder,
)
from depthg.depth import DepthCache
from depthg.utils import DIGEST_MEMO


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_directory(root: Path, n: int = 3, h: int = 11, w: int = 15) -> None:
    """Images whose pixels are unique, labels with ignore pixels, depth in 1/256 m steps (exact)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        save_png(root / "imgs" / "train" / f"im{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        lab = rng.integers(0, 4, (h, w)).astype(np.uint8)
        lab[0, :3] = 255
        save_png(root / "labels" / "train" / f"im{i}.png", lab)
        (root / "depth" / "train").mkdir(parents=True, exist_ok=True)
        np.save(root / "depth" / "train" / f"im{i}.npy", rng.integers(256, 256 * 40, (h, w)).astype(np.float32) / 256)


# ------------------------------------------------------------------------------------------------
# five-crop
# ------------------------------------------------------------------------------------------------
def test_five_crop_matches_torchvision_and_reads_back(tmp_path):
    write_directory(tmp_path / "d")
    ds = ImageDirectory(tmp_path / "d", "train", n_classes=4)
    out = five_crop(ds, tmp_path / "crops", ratio=0.5, progress=False)
    crops = CroppedDataset(out, "train")
    assert len(crops) == 5 * len(ds) and crops.n_classes == 4 and crops.keys[7] == "train/000007"
    for n in range(len(ds)):
        item = ds[n]
        size = (int(11 * 0.5), int(15 * 0.5))
        # independent reference: torchvision's five_crop (tl, tr, bl, br, centre), as the released script
        refs = {k: TF.five_crop(item[k] if k != "label" else item[k][None], list(size)) for k in ("img", "label", "depth")}
        for c in range(5):
            got = crops[5 * n + c]
            assert got["source_key"] == item["key"]
            assert torch.equal(got["img"], refs["img"][c])  # lossless PNG
            assert torch.equal(got["label"], refs["label"][c][0])  # -1 survives the +1 storage
            assert torch.equal(got["depth"], refs["depth"][c])  # same 16-bit scale as the source

    # released per-full-image min-max normalisation from the parent's min/max in index.json
    mm = CroppedDataset(out, "train", depth_normalization="minmax")
    mm255 = CroppedDataset(out, "train", depth_normalization="minmax255")
    parent = ds[1]["depth"]
    lo, hi = float(parent.min()), float(parent.max())
    expected = (crops[7]["depth"] - lo) / (hi - lo)
    assert torch.allclose(mm[7]["depth"], expected) and torch.equal(mm255[7]["depth"], torch.round(expected * 255))
    index = json.loads((out / "index.json").read_text())
    boxes = [index["splits"]["train"]["crops"][str(i)]["box"] for i in range(5, 10)]  # item 1, 11x15 at 5x7
    assert boxes == [[0, 0, 5, 7], [0, 8, 5, 7], [6, 0, 5, 7], [6, 8, 5, 7], [3, 4, 5, 7]]


def test_five_crop_resumes_without_redoing(tmp_path):
    write_directory(tmp_path / "d")
    ds = ImageDirectory(tmp_path / "d", "train", n_classes=4)
    out = five_crop(ds, tmp_path / "crops", progress=False)
    files = sorted(p for p in out.rglob("*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    removed = out / "img" / "train" / "000006.png"  # crop of item 1
    removed.unlink()
    five_crop(ds, out, progress=False)
    assert removed.is_file()
    changed = {p for p in files if p.stat().st_mtime_ns != mtimes[p]}
    assert changed and all(5 <= int(p.stem) <= 9 for p in changed)  # only item 1's crops were redone
    assert not list(out.rglob("*.tmp"))

    other = ImageDirectory(tmp_path / "d", "train", n_classes=5)
    with pytest.raises(PreparationError, match="use another folder"):
        five_crop(other, out, progress=False)


def test_five_crop_on_a_process_pool_is_byte_identical_to_serial(tmp_path):
    """One source item per task on 2 worker processes: the same crop files (image, label, depth) and the same
    index.json, byte for byte, as the serial run; a resumed pool run redoes only what is missing."""
    from depthg.world import make_world

    world = make_world(tmp_path / "world", 4, 1, size=(32, 64), seed=0, progress=False)
    ds = Cityscapes(world, "train", classes="world", depth_dir=world / "depth_gt")
    serial = five_crop(ds, tmp_path / "serial", progress=False, workers=0)
    pooled = five_crop(ds, tmp_path / "pooled", progress=False, workers=2)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(pooled) for p in pooled.rglob("*") if p.is_file())
    assert len([f for f in files if f.parts[0] == "depth"]) == 5 * len(ds) + 1  # + depth_meta.json
    assert all((serial / f).read_bytes() == (pooled / f).read_bytes() for f in files)

    removed = pooled / "label" / "train" / "000012.png"
    removed.unlink()
    five_crop(ds, pooled, progress=False, workers=2)
    assert removed.read_bytes() == (serial / "label" / "train" / "000012.png").read_bytes()
    assert (pooled / "index.json").read_bytes() == (serial / "index.json").read_bytes()


def test_cropped_dataset_refuses_incomplete(tmp_path):
    write_directory(tmp_path / "d", n=1)
    out = five_crop(ImageDirectory(tmp_path / "d", "train"), tmp_path / "c", progress=False)
    index = json.loads((out / "index.json").read_text())
    index["splits"]["train"]["complete"] = False
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(PreparationError, match="incomplete"):
        CroppedDataset(out, "train")
    with pytest.raises(FileNotFoundError, match="index.json"):
        CroppedDataset(tmp_path / "nothing", "train")


# ------------------------------------------------------------------------------------------------
# kNN
# ------------------------------------------------------------------------------------------------
class ColourBackbone(nn.Module):
    """Stub backbone: patch features = mean colour of each 4x4 patch, then a dropout layer.

    Images of constant colour c_i get descriptor c_i / |c_i|, so the true neighbours are known.
    If the dropout were active (train mode, the released bug), the descriptors would be perturbed.
    """

    name = "colour-stub"

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout2d(0.5)
        self.modes: list[bool] = []

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.drop(nn.functional.avg_pool2d(img, 4))


class ColourDataset:
    def __init__(self, colours: torch.Tensor, size: int = 12) -> None:
        self.colours, self.size = colours, size
        self.keys = [f"train/{i}" for i in range(len(colours))]

    def __len__(self) -> int:
        return len(self.colours)

    def __getitem__(self, i: int) -> dict:
        img = self.colours[i][:, None, None].expand(3, self.size, self.size + 4).clone()
        return {"img": img, "label": torch.zeros(self.size, self.size + 4, dtype=torch.long), "key": self.keys[i]}


def brute_force_nns(colours: torch.Tensor, k: int) -> np.ndarray:
    x = colours.double() / colours.double().norm(dim=1, keepdim=True)
    sims = (x @ x.T).numpy()
    out = []
    for i in range(len(x)):
        others = [j for j in np.argsort(-sims[i], kind="stable") if j != i]
        out.append([i] + others[:k])
    return np.array(out)


def test_knn_returns_known_neighbours(tmp_path):
    colours = torch.rand(20, 3, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1
    ds = ColourDataset(colours)
    expected = brute_force_nns(colours, 5)
    backbone = ColourBackbone().train()
    settings = KnnSettings(k=5, res=8, batch_size=6, device="cpu")
    path = compute_knn(ds, backbone, tmp_path / "nns.npz", settings, progress=False)
    assert backbone.modes and not any(backbone.modes) and backbone.training  # eval inside, restored after
    with np.load(path) as data:
        assert data["nns"].shape == (20, 6) and list(data["keys"]) == ds.keys and int(data["res"]) == 8
        np.testing.assert_array_equal(data["nns"], expected)

    x = torch.nn.functional.normalize(colours, dim=1)
    np.testing.assert_array_equal(knn_search(x, 5, chunk_size=3), expected)  # chunked

    mtime = path.stat().st_mtime_ns
    compute_knn(ds, backbone, path, KnnSettings(k=5, res=8, device="cpu"), progress=False)  # idempotent
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="k must be in"):
        knn_search(x[:3], 3)


def test_knn_self_first_with_duplicates():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    nns = knn_search(x, 2)
    assert nns[:, 0].tolist() == [0, 1, 2, 3] and nns[0, 1] == 1 and nns[1, 1] == 0


def reference_knn(x: np.ndarray, k: int) -> np.ndarray:
    """Brute force, written independently: float64 similarities on the 2**-32 grid, every row sorted by
    (decreasing similarity, increasing index) with NumPy's lexsort, self moved to rank 0."""
    scores = np.round((x.astype(np.float64) @ x.astype(np.float64).T) * 2.0**32)
    out = []
    for i, row in enumerate(scores):
        order = np.lexsort((np.arange(len(row)), -row))
        out.append([i] + [j for j in order if j != i][:k])
    return np.array(out)


def test_knn_ties_are_ordered_by_index_in_any_chunking():
    """Many exactly equal similarities (repeated rows, and rows whose similarities to a query coincide): the
    neighbours follow (similarity, index) whatever the chunk size, including at the cut-off of the k."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(0, 3, (6, 4), generator=gen).float() + torch.eye(6, 4)
    rows = base[torch.randint(0, 6, (40,), generator=gen)]  # 40 rows, 6 distinct: ties everywhere
    x = torch.nn.functional.normalize(rows, dim=1)
    for k in (1, 5, 12, 39):
        expected = reference_knn(x.numpy(), k)
        for chunk in (1, 7, 40, 1024):
            np.testing.assert_array_equal(knn_search(x, k, chunk_size=chunk), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_knn_search_on_cuda_equals_the_cpu():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 96, generator=gen)
    x[1000:1100] = x[:100]  # exact ties too
    x = torch.nn.functional.normalize(x, dim=1)
    np.testing.assert_array_equal(knn_search(x.cuda(), 30, chunk_size=512, device="cuda"), knn_search(x, 30))


def test_knn_equals_the_previous_search_on_the_synthetic_world(tmp_path):
    """On real descriptors (the embedded backbone on a small synthetic world's five-crops) the exact search gives
    the neighbours of the faiss inner-product search the kNN files were made with before (no ties there)."""
    faiss = pytest.importorskip("faiss")
    from depthg.backbone import load_backbone
    from depthg.data.prepare import _knn_descriptors

    cfg = Config.preset("synthetic").replace(cache_dir=str(tmp_path), five_crop=True, world_n_train=8, world_n_val=1,
                                             world_size=[64, 128], device="cpu")
    backbone = load_backbone(cfg.backbone)
    paths = prepare_training_data(cfg, backbone=backbone, progress=False)
    crops = CroppedDataset(paths["crop_dir"], "train", with_depth=False)
    desc = _knn_descriptors(crops, backbone, KnnSettings.of(cfg, len(crops)), torch.device("cpu"), False)
    index = faiss.IndexFlatIP(desc.shape[1])
    index.add(desc.numpy())
    _, previous = index.search(desc.numpy(), 31)
    assert (previous[:, 0] == np.arange(len(desc))).all()  # no duplicates: self is first there too
    np.testing.assert_array_equal(knn_search(desc, 30), previous)
    np.testing.assert_array_equal(knn_search(desc, 30), reference_knn(desc.numpy(), 30))


# ------------------------------------------------------------------------------------------------
# the chain
# ------------------------------------------------------------------------------------------------
def write_stereo_cityscapes(root: Path, n: int = 2, h: int = 16, w: int = 24) -> None:
    for i in range(n):
        stem = f"ulm_{i:06d}_000019"
        rng = np.random.default_rng(i)
        save_png(root / "leftImg8bit" / "train" / "ulm" / f"{stem}_leftImg8bit.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        save_png(root / "gtFine" / "train" / "ulm" / f"{stem}_gtFine_labelIds.png", rng.integers(0, 34, (h, w)).astype(np.uint8))
        save_png(root / "disparity" / "train" / "ulm" / f"{stem}_disparity.png", rng.integers(0, 3000, (h, w)).astype(np.uint16))
        cam = root / "camera" / "train" / "ulm" / f"{stem}_camera.json"
        cam.parent.mkdir(parents=True, exist_ok=True)
        cam.write_text(json.dumps({"extrinsic": {"baseline": 0.2}, "intrinsic": {"fx": 100.0, "fy": 100.0, "u0": 12, "v0": 8}}))


def test_prepare_training_data_disparity_chain(tmp_path):
    write_stereo_cityscapes(tmp_path / "cs")
    cfg = Config(dataset="cityscapes", data_dir=str(tmp_path / "cs"), cache_dir=str(tmp_path / "cache"),
                 classes=27, depth_source="disparity", five_crop=True, crop_ratio=0.5, knn_k=30,
                 num_neighbors=3, res=8, batch_size=4, device="cpu", backbone="colour-stub")
    paths = prepare_training_data(cfg, backbone=ColourBackbone(), progress=False)
    assert paths["depth_dir"].is_relative_to(tmp_path / "cache") and paths["crop_dir"].is_dir()
    with np.load(paths["knn_path"]) as data:
        assert data["nns"].shape == (10, 10)  # k reduced to N - 1 = 9
    # the cached stereo depth equals the direct conversion
    raw = Cityscapes(tmp_path / "cs", "train", depth_dir=paths["depth_dir"])
    from depthg.depth import disparity_to_depth

    key = raw.keys[1]
    max_depth = DepthCache(paths["depth_dir"]).max_value  # farther than the cache holds -> invalid (0)
    direct = disparity_to_depth(raw.disparity_path(key), raw.camera_path(key), max_depth=max_depth)
    assert (direct == 0).any() and (direct > 0).any()
    assert float((raw[1]["depth"] - direct).abs().max()) <= 0.5 / 256 + 1e-6

    item = CroppedDataset(paths["crop_dir"], "train")[0]
    assert item["img"].shape == (3, 8, 12) and item["depth"].shape == (1, 8, 12)

    def stamps() -> dict:  # every cache file but the memo of file digests (a cache of hashes, not of data)
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != DIGEST_MEMO}

    before = stamps()
    again = prepare_training_data(cfg, backbone=ColourBackbone(), progress=False)  # idempotent
    assert again == paths
    assert before == stamps()


def test_prepare_training_data_synthetic_world(tmp_path, capsys):
    pytest.importorskip("depthg.world.synthetic")
    cfg = Config(dataset="cityscapes", data_dir=None, cache_dir=str(tmp_path), classes="world",
                 depth_source="gt", five_crop=True, crop_ratio=0.5, knn_k=4, num_neighbors=2, res=16, batch_size=4,
                 device="cpu", world_n_train=2, world_n_val=1, world_size=[32, 64], world_seed=0, backbone="colour-stub")
    paths = prepare_training_data(cfg, backbone=ColourBackbone(), progress=False)
    assert "synthetic world" in capsys.readouterr().err  # notes go to stderr (stdout is the CLI's JSON)
    world = world_folder(cfg)  # the folder is named by the world's arguments
    assert world.parent == tmp_path and world.name.startswith("synthetic_world_2+1_32x64_seed0_v")
    assert paths["synthetic"] and paths["data_dir"] == world
    assert paths["depth_dir"] == world / "depth_gt"
    crops = CroppedDataset(paths["crop_dir"], "train")
    assert len(crops) == 10 and crops[3]["depth"].shape == (1, 16, 32) and float(crops[3]["depth"].min()) > 0
    assert DepthCache(paths["depth_dir"]).units == "m"
    with pytest.raises(ValueError, match="data_dir is required"):
        prepare_training_data(Config(dataset="cocostuff", data_dir=None, cache_dir=str(tmp_path)), progress=False)
