"""Dataset loaders on tiny datasets written here in the exact official layouts (issue 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from depthg.data import (
    DATASET_CLASSES,
    PALETTES,
    Cityscapes,
    CocoStuff,
    CorruptFileError,
    DatasetNotFoundError,
    DepthSizeMismatchError,
    EmptySplitError,
    ImageDirectory,
    Potsdam,
    UnknownDatasetError,
    UnpairedFilesError,
    build_dataset,
)
from depthg.data.transforms import PAPER_RESIZE, RELEASED_RESIZE, resize_center_crop
from depthg.depth import DepthCache, DepthSettings, InvalidDepthError
from depthg.utils import DepthGError

H, W = 6, 8


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# Cityscapes
# ------------------------------------------------------------------------------------------------
def write_cityscapes(root: Path, split: str = "train", n_per_city: int = 1, cities=("aachen", "bochum")) -> dict:
    """Cityscapes layout; the labels hold every id 0..33 (in some order) plus id 255-free filler."""
    ids = {}
    for c, city in enumerate(cities):
        for j in range(n_per_city):
            stem = f"{city}_{j:06d}_000019"
            save_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(10 * c + j))
            lab = np.random.default_rng(100 + 10 * c + j).integers(0, 34, (H, W)).astype(np.uint8)
            lab.flat[:34] = np.arange(34)  # every id appears
            save_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
            ids[f"{split}/{city}/{stem}"] = lab
    return ids


def test_cityscapes_27_classes_per_pixel(tmp_path):
    ids = write_cityscapes(tmp_path, n_per_city=2)
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 4 and ds.n_classes == 27 and len(ds.class_names) == 27
    assert ds.class_names[:4] == ["road", "sidewalk", "parking", "rail track"] and ds.class_names[-1] == "bicycle"
    for i in range(len(ds)):
        item = ds[i]
        raw = ids[item["key"]]
        expected = np.where((raw >= 7) & (raw <= 33), raw.astype(np.int64) - 7, -1)  # ids 7..33 -> 0..26
        assert item["label"].dtype == torch.int64 and item["label"].shape == (H, W)
        np.testing.assert_array_equal(item["label"].numpy(), expected)
        assert item["img"].shape == (3, H, W) and item["img"].dtype == torch.float32
        assert 0.0 <= float(item["img"].min()) and float(item["img"].max()) <= 1.0
        np.testing.assert_allclose(item["img"].permute(1, 2, 0).numpy() * 255, np.asarray(Image.open(item["path"])), atol=1e-4)
        assert "depth" not in item


def test_cityscapes_19_and_world_classes(tmp_path):
    ids = write_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "train", classes=19)
    item = ds[0]
    raw = ids[item["key"]]
    # hand-checked trainIds (cityscapesScripts labels.py): road 7->0, sidewalk 8->1, sky 23->10, car 26->13,
    # bicycle 33->18; parking 9, guard rail 14, polegroup 5/18 and voids -> ignore
    hand = {7: 0, 8: 1, 23: 10, 26: 13, 33: 18, 9: -1, 14: -1, 18: -1, 0: -1, 3: -1}
    for label_id, cls in hand.items():
        assert set(item["label"].numpy()[raw == label_id].tolist()) == {cls}
    assert ds.n_classes == 19 and ds.class_names[13] == "car"

    (tmp_path / "world.json").write_text(json.dumps({"label_ids": [26, 7, 23], "names": ["car", "road", "sky"]}))
    ds = Cityscapes(tmp_path, "train", classes="world")
    item = ds[0]
    raw = ids[item["key"]]
    expected = np.select([raw == 26, raw == 7, raw == 23], [0, 1, 2], -1)
    np.testing.assert_array_equal(item["label"].numpy(), expected)
    assert ds.class_names == ["car", "road", "sky"] and ds.n_classes == 3
    assert ds.palette.tolist() == [[0, 0, 142], [128, 64, 128], [70, 130, 180]]


def test_cityscapes_keys_paths_and_depth(tmp_path):
    write_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    key = "train/aachen/aachen_000000_000019"
    assert ds.keys[0] == key
    assert ds.disparity_path(key) == tmp_path / "disparity/train/aachen/aachen_000000_000019_disparity.png"
    assert ds.camera_path(key) == tmp_path / "camera/train/aachen/aachen_000000_000019_camera.json"

    cache = DepthCache(tmp_path.parent / "cache", DepthSettings("test", "m"))
    for k in ds.keys:
        cache.write(k, np.full((H, W), 12.5))
    ds = Cityscapes(tmp_path, "train", depth_dir=cache.root)
    item = ds[1]
    assert item["depth"].shape == (1, H, W)
    assert torch.allclose(item["depth"], torch.tensor(12.5))

    cache.write(ds.keys[1], np.ones((H + 1, W)))
    with pytest.raises(DepthSizeMismatchError, match=str(cache.path(ds.keys[1]))):
        ds[1]
    cache.path(ds.keys[0]).unlink()
    with pytest.raises(FileNotFoundError, match=str(cache.path(ds.keys[0]))):
        ds[0]


def test_cityscapes_bad_roots(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nope")) as err:
        Cityscapes(tmp_path / "nope", "train")
    assert "leftImg8bit" in str(err.value) and "cityscapes-dataset.com" in str(err.value)

    write_cityscapes(tmp_path / "cityscapes")
    with pytest.raises(DatasetNotFoundError, match="Did you mean"):  # parent folder given
        Cityscapes(tmp_path, "train")

    root = tmp_path / "cityscapes"
    with pytest.raises(EmptySplitError, match="splits found: \\['train'\\]"):
        Cityscapes(root, "val")
    (root / "leftImg8bit" / "val").mkdir()
    (root / "gtFine" / "val").mkdir()
    with pytest.raises(EmptySplitError, match=str(root / "leftImg8bit" / "val")):
        Cityscapes(root, "val")

    # image without label, and the reverse
    extra = save_png(root / "leftImg8bit/train/aachen/aachen_000009_000019_leftImg8bit.png", rgb(5))
    with pytest.raises(UnpairedFilesError, match="aachen/aachen_000009_000019"):
        Cityscapes(root, "train")
    extra.unlink()
    save_png(root / "gtFine/train/bochum/bochum_000007_000019_gtFine_labelIds.png", np.zeros((H, W), np.uint8))
    with pytest.raises(UnpairedFilesError, match="have no image"):
        Cityscapes(root, "train")


def test_truncated_and_unreadable_images(tmp_path):
    write_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    path = Path(ds.samples[0].image)
    big = rgb(0, 64, 64)
    Image.fromarray(big).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CorruptFileError, match=str(path)):
        ds[0]
    path.write_bytes(b"not an image at all")
    with pytest.raises(CorruptFileError, match=str(path)):
        ds[0]
    assert issubclass(CorruptFileError, DepthGError) and issubclass(CorruptFileError, OSError)


# ------------------------------------------------------------------------------------------------
# COCO-Stuff
# ------------------------------------------------------------------------------------------------
def write_coco(root: Path, split: str, ids: list[str], labels: list[np.ndarray]) -> None:
    d = f"{split}2017"
    name = "Coco164kFull_Stuff_Coarse.txt" if split == "train" else "Coco164kFull_Stuff_Coarse_7.txt"
    (root / "curated" / d).mkdir(parents=True, exist_ok=True)
    (root / "curated" / d / name).write_text("".join(f"{i}\n" for i in ids))
    for k, (i, lab) in enumerate(zip(ids, labels)):
        (root / "images" / d).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(k, *lab.shape)).save(root / "images" / d / f"{i}.jpg", quality=95)
        save_png(root / "annotations" / d / f"{i}.png", lab)


def test_cocostuff_fine_to_coarse(tmp_path):
    fine = np.concatenate([np.arange(182), [255, 255]]).astype(np.uint8).reshape(8, 23)
    write_coco(tmp_path, "train", ["000000000009"], [fine])
    write_coco(tmp_path, "val", ["000000000139", "000000000285"], [fine, fine[::-1].copy()])
    ds = CocoStuff(tmp_path, "train")
    assert len(ds) == 1 and ds.n_classes == 27 and ds.keys == ["train/000000000009"]
    label = ds[0]["label"].numpy()
    # spot checks of STEGO's fine -> coarse table, written out by hand
    table = {0: 9, 1: 11, 8: 11, 9: 8, 24: 7, 25: 6, 42: 10, 43: 5, 50: 5, 51: 2, 61: 3, 71: 0, 77: 1, 83: 4,
             90: 4, 91: 17, 93: 22, 94: 20, 97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 105: 23, 110: 21, 113: 13,
             119: 26, 120: 14, 126: 24, 156: 23, 170: 18, 176: 18, 179: 19, 180: 19, 181: 24, 255: -1}
    for f, c in table.items():
        assert set(label[fine == f].tolist()) == {c}, f
    assert sorted(set(label.ravel().tolist())) == list(range(-1, 27))  # every coarse class reached
    val = CocoStuff(tmp_path, "val")
    assert len(val) == 2 and val[1]["img"].shape == (3, 8, 23)


def test_cocostuff_bad_input(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "coco")):
        CocoStuff(tmp_path / "coco", "train")
    write_coco(tmp_path, "train", ["1", "2"], [np.zeros((4, 4), np.uint8)] * 2)
    (tmp_path / "annotations" / "train2017" / "2.png").unlink()
    with pytest.raises(UnpairedFilesError, match="1 labels are missing"):
        CocoStuff(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        CocoStuff(tmp_path, "test")


# ------------------------------------------------------------------------------------------------
# Potsdam
# ------------------------------------------------------------------------------------------------
def write_potsdam(root: Path, float_img: bool = False) -> np.ndarray:
    gt = np.array([[0, 1, 2, 3, 4, 5, 255, 7]] * 3, dtype=np.uint8)  # 7: not an ISPRS class
    img = rgb(1, 3, 8)
    ir = np.full((3, 8, 1), 77, np.uint8)
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    arr = np.concatenate([img, ir], axis=2)
    scipy.io.savemat(root / "imgs" / "t1.mat", {"img": arr.astype(np.float64) / 255.0 if float_img else arr})
    scipy.io.savemat(root / "gt" / "t1.mat", {"gt": gt})
    save_png(root / "imgs" / "t2.png", img)  # png tile (released potsdam_ops.py output)
    save_png(root / "gt" / "t2.png", gt)
    (root / "labelled_train.txt").write_text("t1\nt2\n")
    (root / "labelled_test.txt").write_text("t2\n")
    return img


@pytest.mark.parametrize("float_img", [False, True])
def test_potsdam_3_and_6(tmp_path, float_img):
    img = write_potsdam(tmp_path, float_img)
    ds3 = Potsdam(tmp_path, "train")
    assert ds3.n_classes == 3 and len(ds3) == 2
    for i in range(2):
        item = ds3[i]
        # {0,4}->0, {1,5}->1, {2,3}->2 (STEGO's Potsdam-3 map); 255 and the unknown 7 -> -1 (not 0)
        assert item["label"][0].tolist() == [0, 1, 2, 2, 0, 1, -1, -1]
        np.testing.assert_allclose(item["img"].permute(1, 2, 0).numpy() * 255, img, atol=1e-3)
    ds6 = Potsdam(tmp_path, "val", n_classes=6)
    assert ds6[0]["label"][0].tolist() == [0, 1, 2, 3, 4, 5, -1, -1] and ds6.keys == ["val/t2"]


def test_potsdam_bad_input(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="labelled_train.txt"):
        Potsdam(tmp_path, "train")
    write_potsdam(tmp_path)
    (tmp_path / "labelled_train.txt").write_text("t1\nt3\n")
    with pytest.raises(UnpairedFilesError, match="t3"):
        Potsdam(tmp_path, "train")
    scipy.io.savemat(tmp_path / "imgs" / "t1.mat", {"image": np.zeros((3, 8, 4), np.uint8)})
    (tmp_path / "labelled_train.txt").write_text("t1\n")
    with pytest.raises(CorruptFileError, match="no variable 'img'"):
        Potsdam(tmp_path, "train")[0]
    with pytest.raises(ValueError, match="n_classes"):
        Potsdam(tmp_path, "train", n_classes=4)


# ------------------------------------------------------------------------------------------------
# Image directory
# ------------------------------------------------------------------------------------------------
def test_image_directory_pairs_by_stem(tmp_path):
    # each label holds its stem's index, so a mismatched pair would show; the released code pairs by sort
    # order and only compares counts, so the renamed label below would silently shift the pairs
    stems = ["b", "a_x", "a"]
    for v, s in enumerate(stems):
        save_png(tmp_path / "imgs" / "train" / f"{s}.png", rgb(v))
        save_png(tmp_path / "labels" / "train" / f"{s}.png", np.full((H, W), v, np.uint8))
    ds = ImageDirectory(tmp_path, "train", n_classes=2)
    assert ds.keys == ["train/a", "train/a_x", "train/b"]
    for item in (ds[i] for i in range(3)):
        v = stems.index(item["key"].split("/")[1])
        assert set(item["label"].unique().tolist()) == ({v} if v < 2 else {-1})  # v >= n_classes -> ignore
    assert ImageDirectory(tmp_path, "train").n_classes == 3  # inferred from the largest label value

    (tmp_path / "labels" / "train" / "b.png").rename(tmp_path / "labels" / "train" / "c.png")
    with pytest.raises(UnpairedFilesError) as err:
        ImageDirectory(tmp_path, "train")
    assert "b" in str(err.value) and "c" in str(err.value) and "paired by file stem" in str(err.value)


def test_image_directory_unlabelled_and_npy_depth(tmp_path):
    save_png(tmp_path / "imgs" / "val" / "x.png", rgb(0))
    depth_dir = tmp_path / "depth" / "val"
    depth_dir.mkdir(parents=True)
    np.save(depth_dir / "x.npy", np.linspace(1, 5, H * W, dtype=np.float32).reshape(H, W))
    ds = ImageDirectory(tmp_path, "val")
    item = ds[0]
    assert (item["label"] == -1).all() and item["depth"].shape == (1, H, W)

    for bad, what in ((np.nan, "NaN"), (np.inf, "inf"), (-1.0, "negative")):
        d = np.ones((H, W), np.float32)
        d[0, 0] = bad
        np.save(depth_dir / "x.npy", d)
        with pytest.raises(InvalidDepthError, match=what) as err:
            ds[0]
        assert str(depth_dir / "x.npy") in str(err.value)
    np.save(depth_dir / "x.npy", np.ones((H, W + 2), np.float32))
    with pytest.raises(DepthSizeMismatchError, match="x.npy"):
        ds[0]


def test_image_directory_bad_roots(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "imgs" / "train")):
        ImageDirectory(tmp_path, "train")
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "imgs" / "train" / "notes.txt").write_text("hi")
    with pytest.raises(EmptySplitError, match=str(tmp_path / "imgs" / "train")):
        ImageDirectory(tmp_path, "train")


# ------------------------------------------------------------------------------------------------
# Registry and transforms
# ------------------------------------------------------------------------------------------------
def test_build_dataset_and_registry(tmp_path):
    write_cityscapes(tmp_path)
    ds = build_dataset("cityscapes19", tmp_path, "train")
    assert isinstance(ds, Cityscapes) and ds.n_classes == 19
    with pytest.raises(UnknownDatasetError) as err:
        build_dataset("citiscapes", tmp_path, "train")
    assert "cityscapes" in str(err.value) and "cocostuff" in str(err.value) and "directory" in str(err.value)
    for name, names in DATASET_CLASSES.items():
        assert PALETTES[name].shape == (len(names), 3) and PALETTES[name].dtype == np.uint8


def test_resize_center_crop_modes():
    h, w, res = 8, 12, 4
    img = torch.rand(3, h, w)
    label = torch.arange(h * w).reshape(h, w)
    depth = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    item = {"img": img, "label": label, "depth": depth, "key": "k"}
    for resize in (PAPER_RESIZE, RELEASED_RESIZE):
        out = resize_center_crop(item, res, resize)
        assert out["img"].shape == (3, res, res) and out["label"].shape == (res, res) and out["depth"].shape == (1, res, res)
        assert out["label"].dtype == torch.int64 and out["key"] == "k"
        # short side 8 -> 4 (scale 1/2), long side 12 -> 6, centre crop columns 1..4: nearest picks
        # source pixel centres 2*i + 0.5 -> rows 1,3,5,7 and columns 3,5,7,9
        expected = label[1::2][:, 3:11:2]
        assert torch.equal(out["label"], expected) and torch.equal(out["depth"][0], expected.float())
    released = resize_center_crop(item, res, RELEASED_RESIZE)["img"]
    assert torch.equal(released, img[:, 1::2][:, :, 3:11:2])
    paper = resize_center_crop(item, res)["img"]
    assert not torch.equal(paper, released) and 0 <= float(paper.min()) and float(paper.max()) <= 1
    assert torch.allclose(resize_center_crop({"img": torch.full((3, h, w), 0.3)}, res)["img"], torch.tensor(0.3))


# ------------------------------------------------------------------------------------------------
# the dataset protocol
# ------------------------------------------------------------------------------------------------
def test_every_reader_and_the_five_crops_provide_the_dataset_protocol(tmp_path):
    """depthg.dataset_protocol.SegmentationSource is what the caches read; every reader provides all of it,
    and a plain map-style dataset falls back to its items."""
    from depthg.data.prepare import CroppedDataset, five_crop
    from depthg.dataset_protocol import SegmentationSource, image_loader, item_identities, item_keys

    write_cityscapes(tmp_path / "cs")
    fine = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 182
    write_coco(tmp_path / "coco", "train", ["000000000009"], [fine])
    write_potsdam(tmp_path / "potsdam")
    save_png(tmp_path / "dir" / "imgs" / "train" / "a.png", rgb(0))
    save_png(tmp_path / "dir" / "labels" / "train" / "a.png", np.zeros((H, W), np.uint8))
    readers = [Cityscapes(tmp_path / "cs", "train"), CocoStuff(tmp_path / "coco", "train"),
               Potsdam(tmp_path / "potsdam", "train"), ImageDirectory(tmp_path / "dir", "train", n_classes=2)]
    crops = CroppedDataset(five_crop(readers[0], tmp_path / "crops", progress=False), "train")
    for ds in readers + [crops]:
        assert isinstance(ds, SegmentationSource), type(ds).__name__
        assert item_keys(ds) == [ds[i]["key"] for i in range(len(ds))]
        assert torch.equal(image_loader(ds)(0), ds[0]["img"])
        assert isinstance(ds.content_digest(("img",)), str) and ds.content_digest(("img",)) != ds.content_digest()
    assert item_identities(readers[0]) is not None and item_identities(crops) is None  # crops: keyed by hashes

    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict:
            return {"img": torch.full((3, 2, 2), float(i)), "label": torch.zeros(2, 2, dtype=torch.long), "key": f"k{i}"}

    plain = Plain()
    assert not isinstance(plain, SegmentationSource)
    assert item_keys(plain) == ["k0", "k1"] and item_identities(plain) is None
    assert torch.equal(image_loader(plain)(1), torch.ones(3, 2, 2))
