"""One-off preparation of training data: five-crops, kNN positives, and the whole chain.

STEGO/DepthG train on five-crops of the source images and draw each image's positive partner from its
k nearest neighbours in backbone feature space (docs/method.md §10). Both are computed once into
``cache_dir``: lossless crops with an ``index.json``, kNN files keyed by what made them, each rebuilt
(with one line on stderr) when that changes, under an inter-process lock and published atomically.
docs/method.md §10 describes the caches; docs/fidelity.md §4 the released bugs they avoid.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..backbone import load_backbone
from ..config import Config
from ..dataset_protocol import (SegmentationSource, image_loader, is_full_resolution, item_camera, item_identities,
                                item_keys)
from ..depth import (
    DEPTH_MODEL_ALIASES,
    META_NAME as DEPTH_META,
    DepthCache,
    DepthSettings,
    disparity_to_depth,
    estimate_depth_for_dataset,
    load_depth_model,
    stale_depth_keys,
)
from ..features import backbone_fingerprint
from ..precision import amp_context
from ..utils import (
    DIGEST_MEMO,
    DepthGError,
    atomic_write,
    build_lock,
    digest,
    file_digest,
    file_identity,
    get_device,
    inside,
    load_digests,
    note,
    owned_output,
    partial_dir,
    pool_map,
    publish_dir,
    remember_digest,
    save_digests,
    timed,
)
from ..world.synthetic import GENERATOR_VERSION, make_world, world_complete
from .common import CorruptFileError, image_to_tensor, read_image, read_label
from .cityscapes import Cityscapes
from .registry import build_dataset
from .transforms import PAPER_RESIZE, RESIZES, Camera, Resize, resize_center_crop

__all__ = [
    "five_crop",
    "five_crop_boxes",
    "CroppedDataset",
    "compute_knn",
    "KnnSettings",
    "knn_search",
    "prepare_training_data",
    "load_knn",
    "dataset_digest",
    "dataset_kwargs",
    "dataset_root",
    "world_folder",
    "check_outside_dataset",
    "is_knn_file",
    "stereo_depth_for_dataset",
    "PreparationError",
]

INDEX_NAME = "index.json"
INDEX_FORMAT = 3  # 3: each crop records its camera (None where the source has no calibration)
KNN_FORMAT = 3  # 3: exact float64 search, equal similarities ordered by index
CROP_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


class PreparationError(DepthGError, ValueError):
    """A preparation folder belongs to other data/settings, or is incomplete."""


# ------------------------------------------------------------------------------------------------
# Five-crop
# ------------------------------------------------------------------------------------------------
def five_crop_boxes(h: int, w: int, ratio: float, where: str | None = None) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of torchvision's ``five_crop`` with size int(h·ratio) × int(w·ratio).

    Order as torchvision: top-left, top-right, bottom-left, bottom-right, centre. ``where`` names the image in
    the error for one too small to crop.
    """
    ch, cw = int(h * ratio), int(w * ratio)
    if ch < 1 or cw < 1:
        image = f"the {w}x{h} image {where}" if where is not None else f"a {w}x{h} image"
        raise PreparationError(f"crop ratio {ratio} gives an empty crop for {image}")
    ct, cl = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return [(0, 0, ch, cw), (0, w - cw, ch, cw), (h - ch, 0, ch, cw), (h - ch, w - cw, ch, cw), (ct, cl, ch, cw)]


def _crop_path(root: Path, part: str, split: str, i: int) -> Path:
    """Crop ``i``'s file of ``part`` ("img", "label" or "depth") in a five-crop folder."""
    return root / part / split / f"{i:06d}.png"


def _file_record(data: bytes) -> list[Any]:
    """``[size, sha256]`` of a crop file's bytes, as the index records them."""
    return [len(data), hashlib.sha256(data).hexdigest()]


def _save_png(path: Path, arr: np.ndarray) -> list[Any]:
    """Write ``arr`` as a PNG atomically; return its :func:`_file_record`."""
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    data = buffer.getvalue()
    with atomic_write(path, "wb") as f:
        f.write(data)
    record = _file_record(data)
    remember_digest(path, record[1])  # written under the folder's lock: its digest is known
    return record


def _read_index(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreparationError(f"cannot read {path}: {err}; delete the folder {out_dir} to redo the crops") from None
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise PreparationError(f"{path} is not a five-crop index (no 'splits'); delete the folder {out_dir} to redo the crops")
    return index


def _write_index(out_dir: Path, index: dict[str, Any]) -> None:
    with atomic_write(out_dir / INDEX_NAME, "w") as f:
        json.dump(index, f, indent=1)


def _dataset_info(dataset: SegmentationSource) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "root": str(dataset.root),
        "n_classes": int(dataset.n_classes),
        "class_names": list(dataset.class_names),
        "palette": np.asarray(dataset.palette).tolist(),
    }


def check_outside_dataset(target: str | os.PathLike, dataset: Any, what: str) -> None:
    """Refuse to write ``target`` inside the dataset's folder (its root or its image/label trees)."""
    folders = [*map(Path, dataset.source_dirs), Path(dataset.root)] if isinstance(dataset, SegmentationSource) else []
    for folder in folders:
        if inside(target, folder):
            raise PreparationError(
                f"refusing to write the {what} {target}: it is inside the dataset folder {folder}. Nothing is "
                "written into a dataset; choose a folder outside it"
            )


def dataset_digest(dataset: Any, parts: tuple[str, ...] = ("img", "label", "depth")) -> str | None:
    """A key of what ``dataset``'s items hold: crop-file hashes for :class:`CroppedDataset`, the source files'
    identity (size, modification time) and the label mapping for the loaders; None when it cannot tell.

    ``parts`` picks which of ("img", "label", "depth") count (kNN needs the images only).
    """
    return dataset.content_digest(parts) if isinstance(dataset, SegmentationSource) else None


def five_crop(dataset: Any, out_dir: str | os.PathLike, ratio: float = 0.5, progress: bool = True,
              workers: int = 0) -> Path:
    """Write the five crops of every item of ``dataset`` (image, label and depth cropped together).

    Output (contract): ``out_dir/img/{split}/{i:06d}.png``, ``out_dir/label/{split}/{i:06d}.png``
    (uint8 ``class + 1``, 0 = ignore), ``out_dir/depth/{split}/{i:06d}.png`` (16-bit, a
    :class:`DepthCache` with the source's scale) and ``out_dir/index.json``; crop ``i = item * 5 + k``
    with ``k`` in :data:`CROP_NAMES` order (as released). Items must be full resolution (no transform).

    Incremental and safe: an item is (re)cropped when its crops are missing or differ from the index, or
    when one of its source files (image, label, depth) changed since it was cropped (one line on stderr
    says how many and why); finished items are kept. The work happens under a lock on ``out_dir`` in
    ``out_dir.partial`` (the index is rewritten every few items, so a killed run resumes there) and the
    folder is renamed back when every item is done. ``out_dir`` must not lie inside the dataset.

    ``workers`` > 1 crops on that many processes, one source item per task (the dataset must pickle); the
    files and the index are byte for byte those of the serial run (``workers`` <= 1, in this process).
    """
    if not is_full_resolution(dataset):
        raise PreparationError("five_crop needs full-resolution items: pass a dataset with transform=None")
    if not 0 < ratio <= 1:
        raise PreparationError(f"crop ratio must be in (0, 1], got {ratio}")
    if dataset.n_classes >= 255:
        raise PreparationError(f"five_crop stores labels as uint8 class+1; {dataset.n_classes} classes do not fit")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PreparationError(f"five-crop output {out_dir} exists and is not a folder")
    check_outside_dataset(out_dir, dataset, "five-crop folder")
    owned_output(out_dir, "five-crop folder", INDEX_NAME)  # never into (or renaming) a folder of someone else
    items = _SourceItems(item_keys(dataset), item_identities(dataset))
    with timed("five-crop") as stage:  # the check counts as the stage's time, 'cached' when nothing is to do
        index = _read_index(out_dir)
        stage.cached = index is not None and _crops_fresh(out_dir, index, dataset, items, ratio)
    if stage.cached:
        return out_dir  # complete and up to date: only read (no lock, nothing written: a read-only cache works)
    with build_lock(out_dir, "five-crop folder"), timed("five-crop") as stage:
        work = owned_output(partial_dir(out_dir), "five-crop folder", INDEX_NAME)  # a killed build's, or someone's
        index = _read_index(out_dir)
        if index is not None and _crops_fresh(out_dir, index, dataset, items, ratio):
            stage.cached = True
            return out_dir
        if out_dir.exists():  # continue from the published folder: unchanged items are kept as they are
            if work.exists():
                shutil.rmtree(work)
            os.replace(out_dir, work)
        if _read_index(work) is None:  # the work folder is marked as five-crop's before its first crop
            _write_index(work, {"format": INDEX_FORMAT, "ratio": ratio, **_dataset_info(dataset), "splits": {}})
        _five_crop_into(dataset, work, items, ratio, progress, out_dir, workers)
        publish_dir(work, out_dir)
    return out_dir


def _check_compatible(index: dict[str, Any], info: dict[str, Any], ratio: float, where: Path) -> None:
    same = (index.get("ratio") == ratio and index.get("dataset") == info["dataset"]
            and index.get("n_classes") == info["n_classes"]
            and index.get("class_names", info["class_names"]) == info["class_names"])
    if not same:
        raise PreparationError(
            f"{where} holds crops of {index.get('dataset')!r} ({index.get('n_classes')} classes) at ratio "
            f"{index.get('ratio')}, not {info['dataset']!r} ({info['n_classes']}) at {ratio}; use another folder"
        )


def _item_done(out_dir: Path, split: str, entry: dict[str, Any], n: int, ident: Any, with_depth: bool) -> bool:
    """Item n's five crops are all recorded, present with their recorded sizes and SHA-256 (a file replaced by
    another of the same size is caught; :func:`depthg.utils.file_digest` hashes a file again only when it
    changed), and made from ``ident``."""
    sources = entry.get("sources")
    if ident is not None and (not isinstance(sources, list) or n >= len(sources) or sources[n] != ident):
        return False
    for k in range(5):
        crop = entry["crops"].get(str(n * 5 + k))
        if crop is None or "files" not in crop or ("depth" in crop["files"]) != with_depth:
            return False
        if "camera" not in crop:  # cropped before cameras were recorded (index format 2)
            return False
        for part, (size, sha) in crop["files"].items():
            path = _crop_path(out_dir, part, split, n * 5 + k)
            try:
                if path.stat().st_size != size or file_digest(path) != sha:
                    return False
            except FileNotFoundError:
                return False
    return True


def _has_depth(dataset: Any) -> bool:
    return getattr(dataset, "depth_cache", None) is not None or getattr(dataset, "npy_depth_dir", None) is not None


def _crops_fresh(out_dir: Path, index: dict[str, Any], dataset: Any, items: _SourceItems, ratio: float) -> bool:
    _check_compatible(index, _dataset_info(dataset), ratio, out_dir)
    entry = index["splits"].get(dataset.split)
    if index.get("format") != INDEX_FORMAT or entry is None or not entry.get("complete"):
        return False
    if entry.get("source_keys") != items.keys or entry.get("has_depth") != _has_depth(dataset):
        return False
    return all(_item_done(out_dir, dataset.split, entry, n, items.ident(n), entry["has_depth"])
               for n in range(len(items.keys)))


@dataclass(frozen=True)
class _SourceItems:
    """The items :func:`five_crop` crops: their keys and, per item, the identity of its source files
    (``idents`` None for datasets that cannot say, :func:`depthg.dataset_protocol.item_identities`)."""

    keys: list[str]
    idents: list[Any] | None

    def ident(self, n: int) -> Any:
        """Item ``n``'s source identity (None when unknown)."""
        return None if self.idents is None else self.idents[n]


def _five_crop_into(dataset: Any, out_dir: Path, items: _SourceItems, ratio: float, progress: bool,
                    shown: Path, workers: int) -> None:
    """Crop the stale items of ``items`` into the work folder ``out_dir`` (``shown``: the folder named in
    messages) on ``workers`` processes (:func:`depthg.utils.pool_map`: one item per task), updating its index
    as it goes, in item order."""
    keys, idents = items.keys, items.idents
    split = dataset.split
    info = _dataset_info(dataset)
    index = _read_index(out_dir) or {"format": INDEX_FORMAT, "ratio": ratio, **info, "splits": {}}
    _check_compatible(index, info, ratio, shown)
    index["format"] = INDEX_FORMAT
    entry = index["splits"].get(split)
    if entry is not None and entry.get("source_keys") != keys:
        note(f"five-crop {shown}: split {split!r} now has other images (keys differ); recropping all of it")
        entry = None
    entry = entry or {"source_keys": keys, "crops": {}, "complete": False}
    entry.setdefault("sources", [None] * len(keys))
    entry["complete"] = False
    index["splits"][split] = entry

    src_cache: DepthCache | None = getattr(dataset, "depth_cache", None)
    depth_cache: DepthCache | None = None
    has_depth = _has_depth(dataset)
    if has_depth:
        if src_cache is not None:
            m = src_cache.meta
            standard = {"source", "encoding", "scale", "offset", "units", "normalisation"}
            settings = DepthSettings(str(m.get("source")), m["units"], scale=src_cache.scale,
                                     offset=src_cache.offset, normalisation=str(m.get("normalisation", "none")),
                                     extra={k: v for k, v in m.items() if k not in standard})
        else:
            settings = DepthSettings("directory npy", "unknown")
        try:
            depth_cache = DepthCache(out_dir / "depth", settings)
        except DepthGError:  # the depth came from another source than before: redo all depth crops
            note(f"five-crop {shown}: the depth source changed; recropping every item")
            shutil.rmtree(out_dir / "depth")
            entry["crops"] = {}
            depth_cache = DepthCache(out_dir / "depth", settings)
    if entry.get("has_depth") != has_depth:
        entry["crops"] = {}
    entry["has_depth"] = has_depth

    todo = [n for n in range(len(keys)) if not _item_done(out_dir, split, entry, n, items.ident(n), has_depth)]
    changed = [keys[n] for n in todo if entry["sources"][n] is not None and idents is not None
               and entry["sources"][n] != idents[n]]
    if changed:
        note(f"five-crop {shown}: {len(changed)} source item(s) changed since they were cropped "
             f"(e.g. {changed[0]}); recropping them")
    damaged = [keys[n] for n in todo if keys[n] not in changed and str(n * 5) in entry["crops"]]
    if damaged:
        note(f"five-crop {shown}: {len(damaged)} item(s) have missing or modified crop files (e.g. {damaged[0]}); "
             "recropping them")
    job = _CropJob(dataset, out_dir, split, ratio, keys, has_depth, depth_cache)
    results = pool_map(_crop_item, todo, workers, shared=job, what=f"five-crop {shown}")
    bar = tqdm(results, total=len(todo), desc=f"five-crop {split} -> {shown}", disable=not progress or not todo)
    for count, (n, crops) in enumerate(bar):  # in item order, whatever the number of workers
        entry["crops"].update(crops)
        entry["sources"][n] = items.ident(n)
        if count % 25 == 24:
            _write_index(out_dir, index)
    entry["complete"] = True
    _write_index(out_dir, index)


@dataclass(frozen=True)
class _CropJob:
    """What :func:`_crop_item` needs to crop one item (sent once to each worker process)."""

    dataset: Any
    out_dir: Path  # the work folder
    split: str
    ratio: float
    keys: list[str]
    has_depth: bool
    depth_cache: DepthCache | None  # the crops' depth cache (None without depth)


def _crop_item(job: _CropJob, n: int) -> tuple[int, dict[str, Any]]:
    """Write the five crops of item ``n`` (image, label, depth) -> (n, their index entries by crop number)."""
    item = job.dataset[n]
    img = (item["img"] * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    label = (item["label"] + 1).to(torch.uint8).numpy()
    depth = item.get("depth")
    if job.has_depth and depth is None:
        raise PreparationError(f"five-crop: item {job.keys[n]!r} has no depth although the dataset has a depth source")
    h, w = img.shape[:2]
    camera = item_camera(job.dataset, n)
    dmin = float(depth.min()) if depth is not None else None
    dmax = float(depth.max()) if depth is not None else None
    crops: dict[str, Any] = {}
    for k, (top, left, ch, cw) in enumerate(five_crop_boxes(h, w, job.ratio, where=item.get("path", job.keys[n]))):
        i = n * 5 + k
        files = {part: _save_png(_crop_path(job.out_dir, part, job.split, i),
                                 np.ascontiguousarray(arr[top : top + ch, left : left + cw]))
                 for part, arr in (("img", img), ("label", label))}
        if job.depth_cache is not None and depth is not None:
            written = job.depth_cache.write(f"{job.split}/{i:06d}", depth[:, top : top + ch, left : left + cw])
            files["depth"] = _file_record(written.read_bytes())
        crops[str(i)] = {"key": job.keys[n], "crop": CROP_NAMES[k], "box": [top, left, ch, cw],
                         "depth_min": dmin, "depth_max": dmax, "files": files,
                         "camera": camera.crop(top, left, ch, cw).intrinsics() if camera else None}
    return n, crops


class CroppedDataset(Dataset):
    """The crops written by :func:`five_crop`, as dict items like every other dataset (it provides the dataset
    protocol, :class:`depthg.dataset_protocol.SegmentationSource`).

    ``depth_normalization``:

    * ``"none"``: the cached depth (metres for metric sources);
    * ``"minmax"``: ``(d - min) / (max - min)`` with min/max of the **full parent image** — what the
      released depth PNGs held before quantisation;
    * ``"minmax255"``: ``round(255 * minmax)``, the 0..255 integer-valued floats the released training
      actually fed to the model for cropped sets (docs/fidelity.md §3.11).

    Item key: ``"{split}/{i:06d}"``; ``source_key`` is the parent image's key.
    """

    name = "cropped"

    def __init__(
        self,
        out_dir: str | os.PathLike,
        split: str = "train",
        depth_normalization: Literal["none", "minmax", "minmax255"] = "none",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        with_depth: bool = True,
    ) -> None:
        if depth_normalization not in ("none", "minmax", "minmax255"):
            raise PreparationError(f"depth_normalization must be 'none', 'minmax' or 'minmax255', got {depth_normalization!r}")
        self.root = Path(out_dir)
        index = _read_index(self.root)
        if index is None:
            raise FileNotFoundError(f"no five-crop index at {self.root / INDEX_NAME}; run depthg.data.prepare.five_crop first")
        if split not in index["splits"]:
            raise PreparationError(f"{self.root}: split {split!r} was not cropped (have {sorted(index['splits'])})")
        entry = index["splits"][split]
        if not entry.get("complete"):
            raise PreparationError(f"{self.root}: the five-crop of split {split!r} is incomplete; rerun five_crop to finish it")
        if index.get("format") != INDEX_FORMAT:
            raise PreparationError(f"{self.root} was cropped by an older version of the workbench (index format "
                                   f"{index.get('format')}, expected {INDEX_FORMAT}); rerun five_crop / prepare to update it")
        self.split = split
        self.transform = transform
        self.depth_normalization = depth_normalization
        self.ratio = index["ratio"]
        self.source_dataset = index["dataset"]
        self.n_classes = int(index["n_classes"])
        self.class_names = list(index["class_names"])
        self.palette = np.asarray(index.get("palette", []), dtype=np.uint8).reshape(-1, 3)
        try:
            self.crops = [entry["crops"][str(i)] for i in range(5 * len(entry["source_keys"]))]
        except KeyError as err:
            raise PreparationError(f"{self.root / INDEX_NAME}: crop {err} of split {split!r} is missing from the index; "
                                   "rerun five_crop / prepare") from None
        self.depth_cache = DepthCache(self.root / "depth") if with_depth and entry.get("has_depth") else None
        self._verify_sizes()

    def _verify_sizes(self) -> None:
        """Every crop file is present with the size and SHA-256 the index recorded (against files replaced,
        truncated or deleted after the crops were built; a file is hashed again only when it changed,
        :func:`depthg.utils.file_digest`)."""
        for i, crop in enumerate(self.crops):
            for part, (size, sha) in crop["files"].items():
                if part == "depth" and self.depth_cache is None:
                    continue
                path = _crop_path(self.root, part, self.split, i)
                try:
                    actual = path.stat().st_size
                except FileNotFoundError:
                    raise PreparationError(f"crop file {path} is missing (listed in {self.root / INDEX_NAME}); "
                                           "rerun `python -m depthg prepare` (or five_crop) to rebuild it") from None
                if actual != size or file_digest(path) != sha:
                    what = f"has {actual} bytes but" if actual != size else "does not have the SHA-256"
                    raise PreparationError(f"crop file {path} {what} {self.root / INDEX_NAME} recorded "
                                           f"({size} bytes): it was changed after the crops were built; rerun "
                                           "`python -m depthg prepare` (or five_crop) to rebuild it")

    def content_digest(self, parts: tuple[str, ...] = ("img", "label", "depth")) -> str:
        """A key over the crops' content: the SHA-256 of every crop file of ``parts`` (as recorded when they
        were written), the crop ratio and the class list."""
        parts = tuple(p for p in parts if p != "depth" or self.depth_cache is not None)
        hashes = [[crop["files"][p][1] for p in parts if p in crop["files"]] for crop in self.crops]
        return digest({"ratio": self.ratio, "dataset": self.source_dataset, "classes": self.class_names if "label" in parts else None,
                       "parts": list(parts), "files": hashes})

    def item_identity(self, index: int, parts: tuple[str, ...] = ("img", "label", "depth")) -> None:
        """None: the crops are keyed by their files' hashes (:meth:`content_digest`), not by size and time."""
        return None

    @property
    def keys(self) -> list[str]:
        return [f"{self.split}/{i:06d}" for i in range(len(self.crops))]

    @property
    def source_dirs(self) -> list[Path]:
        return [self.root / "img" / self.split, self.root / "label" / self.split]

    def __len__(self) -> int:
        return len(self.crops)

    def load_image_tensor(self, index: int) -> torch.Tensor:
        return image_to_tensor(read_image(_crop_path(self.root, "img", self.split, index)))

    def camera(self, index: int) -> Camera | None:
        """The crop's camera: its parent's, shifted by the crop box (None where the parent had none)."""
        crop = self.crops[index]
        _, _, height, width = crop["box"]
        return Camera(*crop["camera"], height, width) if crop.get("camera") else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = f"{self.split}/{index:06d}"
        img_path = _crop_path(self.root, "img", self.split, index)
        img = image_to_tensor(read_image(img_path))
        label = torch.from_numpy(read_label(_crop_path(self.root, "label", self.split, index)) - 1)
        item: dict[str, Any] = {"img": img, "label": label, "path": str(img_path), "key": key,
                                "source_key": self.crops[index]["key"]}
        if self.depth_cache is not None:
            depth = self.depth_cache.read(key)
            if depth.shape[1:] != img.shape[1:]:
                raise CorruptFileError(f"{self.depth_cache.path(key)}: depth {tuple(depth.shape[1:])} vs image {tuple(img.shape[1:])}")
            if self.depth_normalization != "none":
                lo, hi = self.crops[index]["depth_min"], self.crops[index]["depth_max"]
                depth = (depth - lo) / (hi - lo) if hi > lo else torch.zeros_like(depth)
                if self.depth_normalization == "minmax255":
                    depth = torch.round(depth * 255.0)
            item["depth"] = depth
        if self.transform is not None:
            item = self.transform(item)
        return item


# ------------------------------------------------------------------------------------------------
# kNN
# ------------------------------------------------------------------------------------------------
#: Similarities are ranked on a grid of 2**-32 (about 2e-10, far below what float32 descriptors resolve):
#: values equal on it are ties, broken by the lower index, so the order of equal neighbours is defined and does
#: not depend on the device's summation order.
SIM_GRID = 2.0**32


def _self_first(ranked: np.ndarray, k: int) -> np.ndarray:
    """Put each row's own index at rank 0 and keep the next k others, in their order."""
    n = ranked.shape[0]
    out = np.empty((n, k + 1), dtype=np.int64)
    for i in range(n):
        row = ranked[i]
        out[i, 0] = i
        out[i, 1:] = row[row != i][:k]
    return out


def _top_m(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Column indices (R, m) of each row's m largest ``scores`` (R, N), by decreasing score, equal scores by
    increasing index (whichever of them the cut-off keeps: the lowest indices)."""
    cut = scores.topk(m, dim=1).values[:, -1:]  # (R, 1) the m-th largest score
    above = scores > cut
    at = scores == cut
    room = m - above.sum(dim=1, keepdim=True)  # how many of the scores equal to the cut-off fit
    keep = above | (at & (at.cumsum(dim=1) <= room))  # exactly m per row
    cols = keep.nonzero()[:, 1].view(-1, m)  # row-major: increasing index within each row
    order = torch.sort(scores.gather(1, cols), dim=1, descending=True, stable=True).indices
    return cols.gather(1, order)


def knn_search(desc: torch.Tensor | np.ndarray, k: int, chunk_size: int = 1024,
               device: str | torch.device = "cpu", progress: bool = False) -> np.ndarray:
    """Indices (N, k+1) of the k+1 most cosine-similar rows of L2-normalised ``desc`` (N, C), self first.

    Exact and defined to the last place: the similarities are computed in float64 on ``device`` (``chunk_size``
    rows against all rows at a time, memory chunk × N), ranked on the grid :data:`SIM_GRID` by decreasing value,
    equal values by increasing index (:func:`_top_m`); the query itself is moved to rank 0 (the released code
    only "usually" had it there). The same neighbours on every device, in every chunking.
    """
    dev = get_device(device)
    if dev.type == "mps":  # no float64 there
        dev = torch.device("cpu")
    x = torch.as_tensor(desc).to(device=dev, dtype=torch.float64)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} descriptors, got {k}")
    m = k + 1
    ranked = np.empty((n, m), dtype=np.int64)
    bar = tqdm(range(0, n, chunk_size), desc=f"kNN search ({n} x {n}, {dev.type})", disable=not progress or n <= chunk_size)
    for s in bar:
        scores = torch.round((x[s : s + chunk_size] @ x.T) * SIM_GRID)
        ranked[s : s + chunk_size] = _top_m(scores, m).cpu().numpy()
    return _self_first(ranked, k)


class _ImagesOnly(Dataset):
    def __init__(self, dataset: Any, res: int, resize: Resize) -> None:
        self.dataset, self.res, self.resize = dataset, res, resize
        self.load = image_loader(dataset)  # the image file alone where the dataset can read it so

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.load(i)
        return resize_center_crop({"img": img}, self.res, self.resize)["img"]  # type: ignore[arg-type]


@dataclass(frozen=True)
class KnnSettings:
    """How :func:`compute_knn` finds each image's neighbours."""

    k: int = 30  # neighbours per image (besides itself)
    res: int = 224  # images resized (short side, by ``resize``) and centre-cropped to res x res
    resize: Resize = PAPER_RESIZE
    batch_size: int = 32  # images per backbone forward
    device: str | torch.device = "auto"
    num_workers: int = 0
    chunk_size: int = 1024  # rows compared at a time (:func:`knn_search`, on ``device``)

    @classmethod
    def of(cls, cfg: Config, n_images: int) -> "KnnSettings":
        """The settings of a run for ``n_images`` images: k = knn_k (at most every other image; Config keeps
        num_neighbors <= knn_k), the training resolution and resize, the run's batch size and device."""
        return cls(k=min(cfg.knn_k, n_images - 1), res=cfg.res, resize=RESIZES[cfg.mode], batch_size=cfg.batch_size,
                   device=cfg.device, num_workers=cfg.num_workers)


def compute_knn(dataset: Any, backbone: torch.nn.Module, out_path: str | os.PathLike,
                settings: KnnSettings = KnnSettings(), progress: bool = True) -> Path:
    """Nearest neighbours of every image in backbone-feature space → ``out_path`` (npz).

    The npz holds ``nns`` (N, k+1) int64 with self at rank 0, ``keys`` (N,) str, ``k``, ``res`` and
    ``backbone``, ``mode`` (the name of ``resize``). Images are resized (short side ``res``, by ``resize``:
    :mod:`depthg.data.transforms`) and centre-cropped to ``res``;
    descriptor = spatial mean of ``backbone(img)`` (B, C, h, w), L2-normalised, as released, computed in full
    precision on ``settings.device`` in batches read by ``settings.num_workers`` loader processes; the
    neighbour search runs there too, exact, equal similarities ordered by index (:func:`knn_search`).
    Keyed: the file records a key over the images' content (:func:`dataset_digest`), k, ``res``, the resize
    and the backbone's weights hash; an existing file with the same key is kept, anything else (another
    key, an older format, an unreadable file) is recomputed with one line on stderr saying why. Runs
    under a lock on ``out_path``. If the dataset has fewer than k+1 images, k is reduced to N-1 with a
    warning.
    """
    out_path = Path(out_path)
    if out_path.exists() and not out_path.is_file():
        raise PreparationError(f"kNN output {out_path} exists and is not a file")
    check_outside_dataset(out_path, dataset, "kNN file")
    owned_output(out_path, "kNN file", is_knn_file)
    keys = item_keys(dataset)
    n, k, res, resize = len(keys), settings.k, settings.res, settings.resize
    if n < 2:
        raise PreparationError(f"compute_knn needs at least 2 images, the dataset has {n}")
    if k >= n:
        warnings.warn(f"kNN: k={k} but only {n} images; using k={n - 1}")
        k = n - 1
    name = str(getattr(backbone, "name", type(backbone).__name__))
    with timed("kNN") as stage:  # the key and the check count as the stage's time, 'cached' when up to date
        key = {"format": KNN_FORMAT, "keys": digest(keys), "images": dataset_digest(dataset, ("img",)), "k": k,
               "res": res, "mode": resize.name, "backbone_sha256": backbone_fingerprint(backbone)}
        stage.cached = _knn_stale(out_path, key) is None
    if stage.cached:
        return out_path  # up to date: only read (no lock, nothing written: a read-only cache works)
    with build_lock(out_path, "kNN file"), timed("kNN") as stage:
        reason = _knn_stale(out_path, key)
        if reason is None:
            stage.cached = True
            return out_path
        if reason != "missing":
            note(f"kNN {out_path}: recomputing ({reason})")
        dev = get_device(settings.device)
        descs = _knn_descriptors(dataset, backbone, settings, dev, progress)
        nns = knn_search(descs, k, chunk_size=settings.chunk_size, device=dev, progress=progress)
        with atomic_write(out_path, "wb") as f:
            np.savez(f, nns=nns, keys=np.array(keys), k=np.int64(k), res=np.int64(res), backbone=np.array(name),
                     mode=np.array(resize.name), key=np.array(json.dumps(key, sort_keys=True)))
    return out_path


def _knn_descriptors(dataset: Any, backbone: torch.nn.Module, settings: KnnSettings, dev: torch.device,
                     progress: bool) -> torch.Tensor:
    """(N, C) L2-normalised spatial means of the backbone's features, in full precision, left on ``dev``:
    batches of ``settings.batch_size`` images read by ``settings.num_workers`` loader processes."""
    name = str(getattr(backbone, "name", type(backbone).__name__))
    was_training = backbone.training
    backbone.eval()  # no dropout while extracting (the released extraction kept Dropout2d on)
    backbone.to(dev)
    loader = DataLoader(_ImagesOnly(dataset, settings.res, settings.resize), batch_size=settings.batch_size,
                        shuffle=False, num_workers=settings.num_workers, pin_memory=dev.type == "cuda")
    descs = []
    with torch.inference_mode():
        bar = tqdm(loader, desc=f"kNN features ({name}, {settings.res}px)", disable=not progress)
        for img in bar:
            feats = backbone(img.to(dev, non_blocking=True))
            descs.append(F.normalize(feats.float().mean(dim=(2, 3)), dim=1))
    backbone.train(was_training)
    return torch.cat(descs)


_KNN_FIELDS = {"keys": "the image list", "images": "the images' content", "k": "k", "res": "the resolution",
               "mode": "the resize mode", "backbone_sha256": "the backbone weights", "format": "the file format"}


def _knn_stale(path: Path, key: dict[str, Any]) -> str | None:
    """None when ``path`` holds neighbours made with ``key``; else why not ("missing", what changed, ...)."""
    if not path.is_file():
        return "missing"
    try:
        with np.load(path, allow_pickle=False) as old:
            stored = json.loads(str(old["key"])) if "key" in old.files else None
            nns = old["nns"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        return f"the existing file is unreadable: {type(err).__name__}: {err}"
    if stored is None:
        return "it was written by an older version without a content key"
    changed = [_KNN_FIELDS.get(f, f) for f in sorted(set(key) | set(stored)) if key.get(f) != stored.get(f)]
    if changed:
        return "changed since it was computed: " + ", ".join(changed)
    if nns.shape != (len(nns), key["k"] + 1):
        return f"its neighbour table has shape {nns.shape}"
    return None


def is_knn_file(path: Path) -> bool:
    """Whether ``path`` is a kNN file :func:`compute_knn` wrote, even a damaged one (its zip archive starts with
    the neighbour table ``nns.npy``); any other file is not compute_knn's to replace."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    return head.startswith(b"PK\x03\x04") and b"nns.npy" in head


def load_knn(path: str | os.PathLike) -> tuple[np.ndarray, list[str] | None]:
    """(nns (N, k+1) int64, keys or None) from a kNN file, with a clear error for a missing or damaged one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kNN file {path} not found; run `python -m depthg prepare` (or compute_knn) first")
    try:
        with np.load(path, allow_pickle=False) as data:
            nns = data["nns"].astype(np.int64)
            keys = [str(k) for k in data["keys"]] if "keys" in data.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise PreparationError(f"cannot read kNN file {path} ({type(err).__name__}: {err}): truncated or not a "
                               "kNN .npz; delete it and rerun `python -m depthg prepare`") from None
    if nns.ndim != 2 or nns.shape[1] < 2 or (nns.size and (nns.min() < 0 or nns.max() >= len(nns))):
        raise PreparationError(f"kNN file {path}: neighbour table of shape {nns.shape} with indices outside "
                               f"[0, {len(nns)}); delete it and rerun `python -m depthg prepare`")
    return nns, keys


# ------------------------------------------------------------------------------------------------
# Stereo depth for a whole dataset
# ------------------------------------------------------------------------------------------------
def stereo_depth_for_dataset(dataset: Any, cache_root: str | os.PathLike, progress: bool = True) -> Path:
    """Cache metric depth from Cityscapes disparity + camera files for every item (incremental).

    Uses :func:`depthg.depth.disparity_to_depth`; depths beyond what the cache holds (256 m at 1/256 m
    steps) are marked invalid (0) like pixels without disparity. A key is converted again when its
    disparity or camera file changed since (their size and modification time are recorded).
    """
    if not isinstance(dataset, Cityscapes):  # the reader that knows the disparity/ and camera/ files
        raise PreparationError(f"depth_source='disparity' needs a Cityscapes dataset with disparity/ and camera/ folders, got {dataset!r}")
    cache_root = Path(cache_root)
    check_outside_dataset(cache_root, dataset, "depth cache")
    owned_output(cache_root, "depth cache", DEPTH_META)
    idents = {}
    for key in dataset.keys:
        files = (dataset.disparity_path(key), dataset.camera_path(key))
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"stereo depth for {key!r}: {f} not found")
        idents[key] = [[f.name, *file_identity(f)] for f in files]
    if (cache_root / DEPTH_META).is_file():  # up to date: only read (no lock, nothing written)
        cache = DepthCache(cache_root)
        recorded = cache.recorded_sources()
        if all(cache.exists(k) and recorded.get(k) == idents[k] for k in dataset.keys):
            return cache_root
    with build_lock(cache_root, "depth cache"):
        cache = DepthCache(cache_root, DepthSettings("cityscapes-disparity", "m", extra={"invalid_value": 0}))
        recorded = cache.recorded_sources()
        todo = [k for k in dataset.keys if not cache.exists(k) or recorded.get(k) != idents[k]]
        changed = [k for k in todo if k in recorded and cache.exists(k)]
        if changed:
            note(f"stereo depth {cache_root}: {len(changed)} disparity/camera file(s) changed (e.g. {changed[0]}); converting them again")
        for count, key in enumerate(tqdm(todo, desc=f"stereo depth -> {cache_root}", disable=not progress or not todo)):
            cache.write(key, disparity_to_depth(dataset.disparity_path(key), dataset.camera_path(key), max_depth=cache.max_value))
            recorded[key] = idents[key]
            if count % 50 == 49:
                cache.record_sources(recorded)
        if todo:
            cache.record_sources(recorded)
    return cache_root


# ------------------------------------------------------------------------------------------------
# The whole chain
# ------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def _short_hash(*parts: Any) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:8]


def dataset_kwargs(cfg: Config) -> dict[str, Any]:
    """The dataset constructor's class arguments of a config -- one class mapping for every split
    (training, validation, preparation): ``classes`` for Cityscapes, ``n_classes`` for Potsdam and the
    directory dataset (an integer there: ``Config`` checks it); COCO-Stuff has its fixed 27 classes."""
    if cfg.dataset == "cityscapes":
        return {"classes": cfg.classes}
    if cfg.dataset in ("potsdam", "directory"):
        return {"n_classes": int(cfg.classes)}
    return {}


def world_folder(cfg: Config) -> Path:
    """Where the synthetic world of a config lives: ``cache_dir/synthetic_world_<arguments>``, so a world
    with other arguments (or from another generator version) is another folder, never a stale one."""
    h, w = cfg.world_size
    tag = f"{cfg.world_n_train}+{cfg.world_n_val}_{h}x{w}_seed{cfg.world_seed}_v{GENERATOR_VERSION}"
    return Path(cfg.cache_dir) / f"synthetic_world_{tag}"


def dataset_root(cfg: Config, progress: bool = True) -> Path:
    """The dataset root of a config: ``cfg.data_dir``, or -- when it is None -- the embedded synthetic world
    in :func:`world_folder`, rendered first if missing (under a lock, in ``<folder>.partial``, renamed into
    place when complete; a killed render resumes).
    """
    if cfg.data_dir is not None:
        return Path(cfg.data_dir)
    if cfg.dataset != "cityscapes":
        raise PreparationError(f"data_dir is required for dataset {cfg.dataset!r} (only 'cityscapes' falls back to "
                               "the synthetic world)")
    root = world_folder(cfg)
    note(f"data_dir is not set: using the embedded synthetic world at {root}")
    args = (cfg.world_n_train, cfg.world_n_val)
    kwargs = dict(size=tuple(cfg.world_size), seed=cfg.world_seed)
    with timed("synthetic world") as stage:  # the check counts as the stage's time, 'cached' when complete
        stage.cached = world_complete(root, *args, **kwargs)
    if stage.cached:
        return root  # only read (no lock, nothing written: a read-only cache works)
    with build_lock(root, "synthetic world"), timed("synthetic world"):
        if root.is_dir():
            make_world(root, *args, progress=False, **kwargs)  # complete: only checks (and repairs) its files
        else:
            work = partial_dir(root)
            make_world(work, *args, progress=progress, **kwargs)  # resumes a killed render
            publish_dir(work, root)
    return root


def _depth_model_identity(name: str) -> str:
    """What identifies a depth model's weights without loading it: a local folder's files (name, size,
    modification time); a hub id stands for itself."""
    target = DEPTH_MODEL_ALIASES.get(name, name)
    local = Path(target).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        return "folder:" + digest([[p.relative_to(local).as_posix(), *file_identity(p)] for p in files])
    return "hub:" + target


@dataclass(frozen=True)
class _TrainSplit:
    """The training split :func:`prepare_training_data` prepares, and where its caches go."""

    name: str  # the dataset's name (``cfg.dataset``)
    root: Path  # its root folder (``data_dir`` or the synthetic world)
    split: str  # ``cfg.train_split``
    kwargs: dict[str, Any]  # the class arguments of :func:`dataset_kwargs`
    cache_dir: Path  # ``cfg.cache_dir``
    tag: str  # "<dataset>-<hash of the root>": every cache name of this data starts with it

    def build(self, **extra: Any) -> Any:
        """The split's dataset at full resolution; ``extra`` goes to its constructor (e.g. ``depth_dir``)."""
        return build_dataset(self.name, self.root, self.split, **self.kwargs, **extra)


def _prepare_depth(cfg: Config, data: _TrainSplit, raw: Any, progress: bool) -> Path | None:
    """Step 1: the training split's depth folder (a :class:`DepthCache`), or None without depth.

    ``depth_source`` "gt" reads the synthetic world's ``root/depth_gt``; "disparity" converts Cityscapes
    stereo into ``cache_dir/depth/<tag>/disparity``; any other source but "none" is a depth model whose
    estimates go to ``cache_dir/depth/<tag>/<model>`` (only the keys that are missing or stale are redone), in
    batches of ``eval_batch_size`` on ``device`` under the run's autocast (:func:`depthg.precision.amp_context`,
    part of the cache's identity), the images read by ``num_workers`` loader processes.
    """
    source = cfg.depth_source if cfg.use_depth else "none"
    if source == "none":
        return None
    with timed("depth") as stage:
        if source == "gt":
            depth_dir = data.root / "depth_gt"
            DepthCache(depth_dir)  # fails clearly when there is no ground truth
            stage.cached = True  # exact depth, nothing to compute
            return depth_dir
        if source == "disparity":
            depth_dir = data.cache_dir / "depth" / data.tag / "disparity"
            stereo_depth_for_dataset(raw, depth_dir, progress=progress)
            return depth_dir
        model_name = cfg.depth_model or source
        depth_dir = data.cache_dir / "depth" / data.tag / _slug(model_name)
        precision, _ = amp_context(cfg, get_device(cfg.device))
        identity = _depth_model_identity(model_name)
        if precision.dtype is not None:  # autocast changes the maps: full-precision caches keep their identity
            identity += f" autocast:{precision.name}"
        # load the model only when some key has no estimate from these weights yet
        if stale_depth_keys(raw, depth_dir, identity):
            model = load_depth_model(model_name, cfg.device)
            estimate_depth_for_dataset(raw, model, depth_dir, batch_size=cfg.eval_batch_size, progress=progress,
                                       model_identity=identity, num_workers=cfg.num_workers, precision=precision)
        else:
            stage.cached = True
        return depth_dir


def _prepare_crops(cfg: Config, data: _TrainSplit, raw: Any, depth_dir: Path | None, progress: bool) -> Path | None:
    """Step 2: the five-crop folder of the split with its depth, or None when ``cfg.five_crop`` is off.

    Incremental: items whose image, label or depth changed are recropped (:func:`five_crop`). The folder's
    name holds the data, the class list, the depth folder and the crop ratio.
    """
    if not cfg.five_crop:
        return None
    depth_tag = "nodepth" if depth_dir is None else f"depth-{_short_hash(depth_dir.resolve())}"
    ratio = cfg.crop_ratio
    classes_tag = f"{_slug(str(cfg.classes))}-{_short_hash(*raw.class_names)}"  # e.g. a world's own class list
    crop_dir = data.cache_dir / "crops" / f"{data.tag}_{classes_tag}_{depth_tag}_five_crop_{ratio}"
    five_crop(data.build(depth_dir=depth_dir), crop_dir, ratio, progress=progress, workers=cfg.num_workers)
    return crop_dir


def _prepare_knn(cfg: Config, data: _TrainSplit, knn_data: Any, crop_dir: Path | None,
                 backbone: torch.nn.Module | None, progress: bool) -> Path:
    """Step 3: the kNN file of ``knn_data`` (the crops, or the full images without five-crop).

    Keyed by the images' content, k, res, mode and the backbone's weights (:func:`compute_knn`); its name
    holds the image set, the backbone, the resolution and the split. The backbone is loaded from
    ``cfg.backbone`` when none is passed in.
    """
    res, bb_name, weights = cfg.res, cfg.backbone, cfg.weights
    bb_tag = _slug(bb_name) + "-" + _short_hash(bb_name, weights, sorted(cfg.backbone_kwargs.items()))
    set_tag = crop_dir.name if crop_dir is not None else f"{data.tag}_{_slug(str(cfg.classes))}_full"
    settings = KnnSettings.of(cfg, len(knn_data))
    suffix = "" if settings.resize is PAPER_RESIZE else f"_{settings.resize.name}"
    knn_path = data.cache_dir / "knn" / f"nns_{set_tag}_{bb_tag}_{res}{suffix}_{data.split}.npz"
    if backbone is None:
        backbone = load_backbone(bb_name, weights, **cfg.backbone_kwargs)
    compute_knn(knn_data, backbone, knn_path, settings, progress=progress)
    return knn_path


def prepare_training_data(cfg: Config, backbone: torch.nn.Module | None = None, progress: bool = True) -> dict[str, Any]:
    """Depth cache → five-crop → kNN for the training split; each step reuses what is up to date.

    * ``data_dir=None`` with ``dataset="cityscapes"``: the synthetic world is built (resumably) with
      :func:`depthg.world.make_world` in :func:`world_folder` and used.
    * ``depth_source``: "gt" = the synthetic world's exact depth (``root/depth_gt``); "disparity" =
      Cityscapes stereo; "none" (or ``use_depth=False``) = no depth; anything else is a
      ``transformers`` model (alias, hub id or folder; ``depth_model`` overrides it when set).
    * ``classes`` is used for Cityscapes (27, 19 or "world"), Potsdam (3 or 6) and the directory
      dataset (its number of classes); COCO-Stuff is always 27.
    * ``backbone`` may be passed in (tests, notebooks) instead of loading ``cfg.backbone``; it is
      loaded here otherwise, since the kNN file is keyed by its weights.
    * Nothing is written inside the dataset folder: a ``cache_dir`` inside ``data_dir`` is refused.

    Returns ``{"data_dir", "dataset", "dataset_kwargs", "train_split", "depth_dir", "crop_dir",
    "knn_path", "synthetic"}``; :func:`depthg.build.training_dataset` turns it into the training dataset.
    """
    name, cache_dir, split = cfg.dataset, Path(cfg.cache_dir), cfg.train_split
    synthetic = cfg.data_dir is None
    if not synthetic and inside(cache_dir, cfg.data_dir):
        raise PreparationError(f"cache_dir {cache_dir} is inside the dataset folder data_dir={cfg.data_dir}; "
                               "nothing is written into a dataset: choose a cache_dir outside it")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise PreparationError(f"cache_dir {cache_dir} exists and is not a folder")
    root = dataset_root(cfg, progress=progress)
    kwargs = dataset_kwargs(cfg)
    data = _TrainSplit(name, root, split, kwargs, cache_dir, tag=f"{name}-{_short_hash(root.resolve())}")
    raw = data.build()

    load_digests(cache_dir / DIGEST_MEMO)  # the sources' and crops' digests: unchanged files are not read again
    try:
        depth_dir = _prepare_depth(cfg, data, raw, progress)
        crop_dir = _prepare_crops(cfg, data, raw, depth_dir, progress)
        # the kNN are computed over the crops when there are crops, else over the full images
        knn_data = raw if crop_dir is None else CroppedDataset(crop_dir, split, with_depth=False)
        knn_path = _prepare_knn(cfg, data, knn_data, crop_dir, backbone, progress)
    finally:
        save_digests(cache_dir / DIGEST_MEMO)  # skipped when the cache is read-only
    return {"data_dir": root, "dataset": name, "dataset_kwargs": kwargs, "train_split": split,
            "depth_dir": depth_dir, "crop_dir": crop_dir, "knn_path": knn_path, "synthetic": synthetic}
