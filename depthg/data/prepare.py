"""One-off preparation of training data: five-crops, kNN positives, and the whole chain.

STEGO/DepthG train on five-crops of the source images (released_code.md §4.4) and draw each image's
positive partner from its k nearest neighbours in DINO feature space (§4.5). Both are computed once
and cached. Fixes relative to the released scripts:

* **Lossless crops.** The released script re-encodes the image crops as JPEG and stores depth as 8-bit
  ``round(d * 255)``; here images are PNG, labels PNG (``class + 1``, 0 = ignore, as released) and
  depth a 16-bit :class:`~depthg.depth.DepthCache` with the source cache's scale. ``index.json``
  records every crop's source key, box, and the parent image's depth min/max, so
  :class:`CroppedDataset` can reproduce the released per-full-image min-max normalisation
  (``depth_normalization="minmax255"``, released_code.md §4.3) or give metric depth (``"none"``).
* **Resumable, atomic.** Finished crops are skipped; every file goes through ``atomic_write``.
* **kNN in eval mode.** The released extraction left ``Dropout2d(0.1)`` active (§4.5); here the
  backbone is put in eval mode. Descriptor = spatial mean of the patch features, L2-normalised (as
  released); cosine top-(k+1) computed in row chunks (bounded memory) or with faiss when installed;
  both give the same neighbours. Self is always rank 0. The file's resolution is the one used (the
  released 392-vs-224 file-name mismatch cannot happen).
* :class:`PairDataset` draws the neighbour rank uniformly from 1..num_neighbors (released: 7) with a
  generator seeded from (seed, epoch, index), so the draw does not depend on worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..depth import DepthCache, disparity_to_depth, estimate_depth_for_dataset, load_depth_model
from ..utils import DepthGError, atomic_write, get_device
from .common import CorruptFileError, image_to_tensor, read_image, read_label
from .transforms import resize_center_crop

__all__ = [
    "five_crop",
    "five_crop_boxes",
    "CroppedDataset",
    "compute_knn",
    "knn_search",
    "PairDataset",
    "prepare_training_data",
    "load_prepared",
    "stereo_depth_for_dataset",
    "PreparationError",
]

INDEX_NAME = "index.json"
CROP_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


class PreparationError(DepthGError, ValueError):
    """A preparation folder belongs to other data/settings, or is incomplete."""


# ------------------------------------------------------------------------------------------------
# Five-crop
# ------------------------------------------------------------------------------------------------
def five_crop_boxes(h: int, w: int, ratio: float) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of torchvision's ``five_crop`` with size int(h·ratio) × int(w·ratio).

    Order as torchvision: top-left, top-right, bottom-left, bottom-right, centre (released_code.md §4.4).
    """
    ch, cw = int(h * ratio), int(w * ratio)
    if ch < 1 or cw < 1:
        raise ValueError(f"crop ratio {ratio} gives an empty crop for a {h}x{w} image")
    ct, cl = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return [(0, 0, ch, cw), (0, w - cw, ch, cw), (h - ch, 0, ch, cw), (h - ch, w - cw, ch, cw), (ct, cl, ch, cw)]


def _save_png(path: Path, arr: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")


def _read_index(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / INDEX_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PreparationError(f"cannot read {path}: {err}; delete it to redo the crops") from None


def _write_index(out_dir: Path, index: dict[str, Any]) -> None:
    with atomic_write(out_dir / INDEX_NAME, "w") as f:
        json.dump(index, f, indent=1)


def _dataset_info(dataset: Any) -> dict[str, Any]:
    return {
        "dataset": getattr(dataset, "name", type(dataset).__name__),
        "root": str(getattr(dataset, "root", "")),
        "n_classes": int(dataset.n_classes),
        "class_names": list(dataset.class_names),
        "palette": np.asarray(getattr(dataset, "palette", np.zeros((0, 3)))).tolist(),
    }


def five_crop(dataset: Any, out_dir: str | os.PathLike, ratio: float = 0.5, progress: bool = True) -> Path:
    """Write the five crops of every item of ``dataset`` (image, label and depth cropped together).

    Output (contract): ``out_dir/img/{split}/{i:06d}.png``, ``out_dir/label/{split}/{i:06d}.png``
    (uint8 ``class + 1``, 0 = ignore), ``out_dir/depth/{split}/{i:06d}.png`` (16-bit, a
    :class:`DepthCache` with the source's scale) and ``out_dir/index.json``; crop ``i = item * 5 + k``
    with ``k`` in :data:`CROP_NAMES` order (as released). Items must be full resolution (no transform).
    Re-running skips finished items; the index is rewritten atomically every few items so an
    interrupted run resumes where it stopped.
    """
    if getattr(dataset, "transform", None) is not None:
        raise ValueError("five_crop needs full-resolution items: pass a dataset with transform=None")
    if not 0 < ratio <= 1:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio}")
    if dataset.n_classes >= 255:
        raise ValueError(f"five_crop stores labels as uint8 class+1; {dataset.n_classes} classes do not fit")
    out_dir = Path(out_dir)
    split = dataset.split
    info = _dataset_info(dataset)
    index = _read_index(out_dir) or {"format": 1, "ratio": ratio, **info, "splits": {}}
    if index.get("ratio") != ratio or index.get("dataset") != info["dataset"] or index.get("n_classes") != info["n_classes"]:
        raise PreparationError(
            f"{out_dir} holds crops of {index.get('dataset')!r} ({index.get('n_classes')} classes) at ratio "
            f"{index.get('ratio')}, not {info['dataset']!r} ({info['n_classes']}) at {ratio}; use another folder"
        )
    keys: list[str] = list(getattr(dataset, "keys", None) or [dataset[i]["key"] for i in range(len(dataset))])
    entry = index["splits"].get(split)
    if entry is not None and entry.get("source_keys") != keys:
        raise PreparationError(f"{out_dir}: split {split!r} was cropped from other images (source keys differ); use another folder")
    entry = entry or {"source_keys": keys, "crops": {}, "complete": False}
    index["splits"][split] = entry

    src_cache: DepthCache | None = getattr(dataset, "depth_cache", None)
    depth_cache: DepthCache | None = None
    has_depth = src_cache is not None or getattr(dataset, "npy_depth_dir", None) is not None
    if has_depth:
        if src_cache is not None:
            m = src_cache.meta
            standard = {"source", "encoding", "scale", "offset", "units", "normalisation"}
            depth_cache = DepthCache(out_dir / "depth", source=str(m.get("source")), units=m["units"],
                                     scale=src_cache.scale, offset=src_cache.offset,
                                     normalisation=str(m.get("normalisation", "none")),
                                     extra={k: v for k, v in m.items() if k not in standard})
        else:
            depth_cache = DepthCache(out_dir / "depth", source="directory npy", units="unknown")
    entry["has_depth"] = has_depth

    def done(n: int) -> bool:
        for k in range(5):
            i = n * 5 + k
            if str(i) not in entry["crops"]:
                return False
            if not (out_dir / "img" / split / f"{i:06d}.png").is_file() or not (out_dir / "label" / split / f"{i:06d}.png").is_file():
                return False
            if depth_cache is not None and not depth_cache.exists(f"{split}/{i:06d}"):
                return False
        return True

    todo = [n for n in range(len(keys)) if not done(n)]
    bar = tqdm(todo, desc=f"five-crop {split} -> {out_dir}", disable=not progress or not todo)
    for count, n in enumerate(bar):
        item = dataset[n]
        img = (item["img"] * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        label = (item["label"] + 1).to(torch.uint8).numpy()
        depth = item.get("depth")
        h, w = img.shape[:2]
        dmin = float(depth.min()) if depth is not None else None
        dmax = float(depth.max()) if depth is not None else None
        for k, (top, left, ch, cw) in enumerate(five_crop_boxes(h, w, ratio)):
            i = n * 5 + k
            _save_png(out_dir / "img" / split / f"{i:06d}.png", np.ascontiguousarray(img[top : top + ch, left : left + cw]))
            _save_png(out_dir / "label" / split / f"{i:06d}.png", np.ascontiguousarray(label[top : top + ch, left : left + cw]))
            if depth_cache is not None and depth is not None:
                depth_cache.write(f"{split}/{i:06d}", depth[:, top : top + ch, left : left + cw])
            entry["crops"][str(i)] = {"key": keys[n], "crop": CROP_NAMES[k], "box": [top, left, ch, cw],
                                      "depth_min": dmin, "depth_max": dmax}
        if count % 25 == 24:
            _write_index(out_dir, index)
    entry["complete"] = True
    _write_index(out_dir, index)
    return out_dir


class CroppedDataset(Dataset):
    """The crops written by :func:`five_crop`, as dict items like every other dataset.

    ``depth_normalization``:

    * ``"none"``: the cached depth (metres for metric sources);
    * ``"minmax"``: ``(d - min) / (max - min)`` with min/max of the **full parent image** — what the
      released depth PNGs held before quantisation (released_code.md §4.6);
    * ``"minmax255"``: ``round(255 * minmax)``, the 0..255 integer-valued floats the released training
      actually fed to the model for cropped sets (released_code.md §4.3).

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
            raise ValueError(f"depth_normalization must be 'none', 'minmax' or 'minmax255', got {depth_normalization!r}")
        self.root = Path(out_dir)
        index = _read_index(self.root)
        if index is None:
            raise FileNotFoundError(f"no five-crop index at {self.root / INDEX_NAME}; run depthg.data.prepare.five_crop first")
        if split not in index["splits"]:
            raise PreparationError(f"{self.root}: split {split!r} was not cropped (have {sorted(index['splits'])})")
        entry = index["splits"][split]
        if not entry.get("complete"):
            raise PreparationError(f"{self.root}: the five-crop of split {split!r} is incomplete; rerun five_crop to finish it")
        self.split = split
        self.transform = transform
        self.depth_normalization = depth_normalization
        self.ratio = index["ratio"]
        self.source_dataset = index["dataset"]
        self.n_classes = int(index["n_classes"])
        self.class_names = list(index["class_names"])
        self.palette = np.asarray(index.get("palette", []), dtype=np.uint8).reshape(-1, 3)
        self.crops = [entry["crops"][str(i)] for i in range(5 * len(entry["source_keys"]))]
        self.depth_cache = DepthCache(self.root / "depth") if with_depth and entry.get("has_depth") else None

    @property
    def keys(self) -> list[str]:
        return [f"{self.split}/{i:06d}" for i in range(len(self.crops))]

    @property
    def source_dirs(self) -> list[Path]:
        return [self.root / "img" / self.split, self.root / "label" / self.split]

    def __len__(self) -> int:
        return len(self.crops)

    def load_image_tensor(self, index: int) -> torch.Tensor:
        return image_to_tensor(read_image(self.root / "img" / self.split / f"{index:06d}.png"))

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = f"{self.split}/{index:06d}"
        img_path = self.root / "img" / self.split / f"{index:06d}.png"
        img = image_to_tensor(read_image(img_path))
        label = torch.from_numpy(read_label(self.root / "label" / self.split / f"{index:06d}.png") - 1)
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
def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _self_first(ranked: np.ndarray, k: int) -> np.ndarray:
    """Put each row's own index at rank 0 and keep the next k others, in their order."""
    n = ranked.shape[0]
    out = np.empty((n, k + 1), dtype=np.int64)
    for i in range(n):
        row = ranked[i]
        out[i, 0] = i
        out[i, 1:] = row[row != i][:k]
    return out


def knn_search(
    desc: torch.Tensor | np.ndarray, k: int, chunk_size: int = 1024, use_faiss: bool | None = None
) -> np.ndarray:
    """Indices (N, k+1) of the k+1 most cosine-similar rows of L2-normalised ``desc`` (N, C), self first.

    The torch path compares ``chunk_size`` rows at a time against all rows (memory chunk × N); the
    faiss path uses an exact inner-product index. Both rank by decreasing similarity and move the
    query itself to rank 0 (the released code only "usually" had it there, released_code.md §4.5).
    """
    x = torch.as_tensor(desc, dtype=torch.float32).cpu().contiguous()
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} descriptors, got {k}")
    m = min(k + 1, n)
    if use_faiss is None:
        use_faiss = _faiss_available()
    if use_faiss:
        import faiss

        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x.numpy())
        _, ranked = index.search(x.numpy(), m)
        return _self_first(ranked.astype(np.int64), k)
    ranked = np.empty((n, m), dtype=np.int64)
    for s in range(0, n, chunk_size):
        sims = x[s : s + chunk_size] @ x.T
        ranked[s : s + chunk_size] = sims.topk(m, dim=1).indices.numpy()
    return _self_first(ranked, k)


class _ImagesOnly(Dataset):
    def __init__(self, dataset: Any, res: int, mode: str) -> None:
        self.dataset, self.res, self.mode = dataset, res, mode

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        load = getattr(self.dataset, "load_image_tensor", None)
        img = load(i) if load is not None else self.dataset[i]["img"]
        return resize_center_crop({"img": img}, self.res, mode=self.mode)["img"]  # type: ignore[arg-type]


def compute_knn(
    dataset: Any,
    backbone: torch.nn.Module,
    out_path: str | os.PathLike,
    k: int = 30,
    res: int = 224,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    chunk_size: int = 1024,
    use_faiss: bool | None = None,
    progress: bool = True,
    mode: Literal["paper", "released"] = "paper",
) -> Path:
    """Nearest neighbours of every image in backbone-feature space → ``out_path`` (npz).

    The npz holds ``nns`` (N, k+1) int64 with self at rank 0, ``keys`` (N,) str, ``k``, ``res`` and
    ``backbone``, ``mode``. Images are resized (short side ``res``; bilinear in paper mode, nearest in
    released mode, see :mod:`depthg.data.transforms`) and centre-cropped to ``res``;
    descriptor = spatial mean of ``backbone(img)`` (B, C, h, w), L2-normalised (released_code.md §4.5).
    Idempotent: an existing file with the same keys, k and res is kept. If the dataset has fewer
    than k+1 images, k is reduced to N-1 with a warning.
    """
    out_path = Path(out_path)
    keys = list(getattr(dataset, "keys", None) or [dataset[i]["key"] for i in range(len(dataset))])
    n = len(keys)
    if n < 2:
        raise ValueError(f"compute_knn needs at least 2 images, the dataset has {n}")
    if k >= n:
        warnings.warn(f"kNN: k={k} but only {n} images; using k={n - 1}")
        k = n - 1
    name = str(getattr(backbone, "name", type(backbone).__name__))
    if out_path.is_file():
        with np.load(out_path, allow_pickle=False) as old:
            same = list(old["keys"]) == keys and int(old["k"]) == k and int(old["res"]) == res
            if same and str(old["backbone"]) == name and str(old.get("mode", "paper")) == mode:
                return out_path
    dev = get_device(device)
    was_training = backbone.training
    backbone.eval()  # no dropout while extracting (the released extraction kept Dropout2d on)
    backbone.to(dev)
    loader = DataLoader(_ImagesOnly(dataset, res, mode), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    descs = []
    with torch.inference_mode():
        for img in tqdm(loader, desc=f"kNN features ({name}, {res}px)", disable=not progress):
            feats = backbone(img.to(dev))
            descs.append(F.normalize(feats.float().mean(dim=(2, 3)), dim=1).cpu())
    backbone.train(was_training)
    nns = knn_search(torch.cat(descs), k, chunk_size=chunk_size, use_faiss=use_faiss)
    with atomic_write(out_path, "wb") as f:
        np.savez(f, nns=nns, keys=np.array(keys), k=np.int64(k), res=np.int64(res), backbone=np.array(name),
                 mode=np.array(mode))
    return out_path


class PairDataset(Dataset):
    """Items of ``dataset`` with a kNN positive partner: adds ``img_pos``, ``label_pos``, ``depth_pos``.

    The partner of item i is ``nns[i, r]`` with r uniform in 1..num_neighbors (released: 7; rank 0
    is the image itself). r comes from a ``torch.Generator`` seeded from (seed, epoch, i), so a run is
    reproducible whatever the number of DataLoader workers; call :meth:`set_epoch` each epoch (with
    non-persistent workers) to draw new partners. ``transform`` is applied to both items separately.
    """

    def __init__(
        self,
        dataset: Any,
        nns_path: str | os.PathLike,
        num_neighbors: int = 7,
        seed: int = 0,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.dataset, self.num_neighbors, self.seed, self.transform = dataset, num_neighbors, seed, transform
        self.epoch = 0
        path = Path(nns_path)
        if not path.is_file():
            raise FileNotFoundError(f"kNN file {path} not found; run depthg.data.prepare.compute_knn first")
        with np.load(path, allow_pickle=False) as data:
            self.nns = data["nns"].astype(np.int64)
            stored = list(data["keys"]) if "keys" in data else None
        if self.nns.shape[0] != len(dataset):
            raise PreparationError(f"{path} has neighbours for {self.nns.shape[0]} images, the dataset has {len(dataset)}")
        keys = getattr(dataset, "keys", None)
        if stored is not None and keys is not None and list(keys) != stored:
            raise PreparationError(f"{path} was computed for other images than {dataset!r} (keys differ)")
        if not 1 <= num_neighbors < self.nns.shape[1]:
            raise ValueError(f"num_neighbors must be in [1, {self.nns.shape[1] - 1}] for {path}, got {num_neighbors}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def partner(self, index: int) -> int:
        """The neighbour drawn for ``index`` in the current epoch (deterministic)."""
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        rank = int(torch.randint(1, self.num_neighbors + 1, (1,), generator=g))
        return int(self.nns[index, rank])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        j = self.partner(index)
        item, pos = self.dataset[index], self.dataset[j]
        if self.transform is not None:
            item, pos = self.transform(item), self.transform(pos)
        out = dict(item)
        for name in ("img", "label", "depth", "key"):
            if name in pos:
                out[f"{name}_pos"] = pos[name]
        out["index"], out["index_pos"] = index, j
        return out


# ------------------------------------------------------------------------------------------------
# Stereo depth for a whole dataset
# ------------------------------------------------------------------------------------------------
def stereo_depth_for_dataset(dataset: Any, cache_root: str | os.PathLike, progress: bool = True) -> Path:
    """Cache metric depth from Cityscapes disparity + camera files for every item (idempotent).

    Uses :func:`depthg.depth.disparity_to_depth`; depths beyond what the cache holds (256 m at 1/256 m
    steps) are marked invalid (0) like pixels without disparity.
    """
    if not hasattr(dataset, "disparity_path"):
        raise ValueError(f"depth_source='disparity' needs a Cityscapes dataset with disparity/ and camera/ folders, got {dataset!r}")
    cache = DepthCache(cache_root, source="cityscapes-disparity", units="m", extra={"invalid_value": 0})
    todo = [k for k in dataset.keys if not cache.exists(k)]
    for key in tqdm(todo, desc=f"stereo depth -> {cache_root}", disable=not progress or not todo):
        cache.write(key, disparity_to_depth(dataset.disparity_path(key), dataset.camera_path(key), max_depth=cache.max_value))
    return Path(cache_root)


# ------------------------------------------------------------------------------------------------
# The whole chain
# ------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def _short_hash(*parts: Any) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:8]


def dataset_root(cfg: Any, progress: bool = True) -> Path:
    """The dataset root of a config: ``cfg.data_dir``, or -- when it is None -- the embedded synthetic world
    in ``cfg.cache_dir/synthetic_world``, rendered there first if missing (:func:`depthg.data.make_world`
    resumes, so an existing world costs nothing). Reads ``dataset, data_dir, cache_dir, world_n_train,
    world_n_val, world_size, world_seed``.
    """
    from . import make_world  # late: __init__ imports this module

    get = lambda name, default: getattr(cfg, name, default)  # noqa: E731
    data_dir = get("data_dir", None)
    if data_dir is not None:
        return Path(data_dir)
    name = get("dataset", "cityscapes")
    if name != "cityscapes":
        raise ValueError(f"data_dir is required for dataset {name!r} (only 'cityscapes' falls back to the synthetic world)")
    root = Path(get("cache_dir", "cache")) / "synthetic_world"
    print(f"data_dir is not set: using the embedded synthetic world at {root}")
    make_world(root, int(get("world_n_train", 48)), int(get("world_n_val", 16)),
               size=tuple(get("world_size", (256, 512))), seed=int(get("world_seed", 0)), progress=progress)
    return root


def prepare_training_data(
    cfg: Any,
    backbone: torch.nn.Module | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Depth cache → five-crop → kNN for the training split, each step skipped when already done.

    Reads only these attributes of ``cfg`` (``depthg.config.Config``; defaults in brackets):

    ``dataset`` ["cityscapes"], ``data_dir`` [None], ``cache_dir`` ["cache"], ``classes`` [27],
    ``train_split`` ["train"], ``use_depth`` [True], ``depth_source`` ["gt"], ``depth_model`` [None],
    ``five_crop`` [True], ``crop_ratio`` [0.5], ``knn_k`` [30], ``num_neighbors`` [7], ``res`` [224],
    ``batch_size`` [32] (kNN batches), ``num_workers`` [0], ``device`` ["auto"], ``mode`` ["paper"]
    (kNN image resize), ``backbone`` ["vit_small_patch8_224"], ``weights`` [None],
    ``backbone_kwargs`` [{}], ``world_n_train`` [48], ``world_n_val`` [16], ``world_size``
    [(256, 512)], ``world_seed`` [0].

    * ``data_dir=None`` with ``dataset="cityscapes"``: the synthetic world is built (resumably) with
      :func:`depthg.data.make_world` in ``cache_dir/synthetic_world`` and used.
    * ``depth_source``: "gt" = the synthetic world's exact depth (``root/depth_gt``); "disparity" =
      Cityscapes stereo; "none" (or ``use_depth=False``) = no depth; anything else is a
      ``transformers`` model (alias, hub id or folder; ``depth_model`` overrides it when set).
    * ``classes`` is used for Cityscapes (27, 19 or "world"), Potsdam (3 or 6) and the directory
      dataset (its number of classes); COCO-Stuff is always 27.
    * ``backbone`` may be passed in (tests, notebooks) instead of loading ``cfg.backbone``.

    Returns ``{"data_dir", "dataset", "dataset_kwargs", "train_split", "depth_dir", "crop_dir",
    "knn_path", "synthetic"}``; :func:`load_prepared` turns it into the training dataset.
    """
    from . import build_dataset  # late: __init__ imports this module

    get = lambda name, default: getattr(cfg, name, default)  # noqa: E731
    name: str = get("dataset", "cityscapes")
    cache_dir = Path(get("cache_dir", "cache"))
    split: str = get("train_split", "train")
    synthetic = get("data_dir", None) is None
    root = dataset_root(cfg, progress=progress)

    classes = get("classes", 27)
    kwargs: dict[str, Any] = {}
    if name == "cityscapes":
        kwargs["classes"] = classes
    elif name in ("potsdam", "directory"):
        kwargs["n_classes"] = int(classes)
    data_tag = f"{name}-{_short_hash(root.resolve())}"

    # 1. depth ------------------------------------------------------------------------------------
    source = str(get("depth_source", "gt") or "none")
    if not get("use_depth", True):
        source = "none"
    depth_dir: Path | None = None
    raw = build_dataset(name, root, split, **kwargs)
    if source == "gt":
        depth_dir = root / "depth_gt"
        DepthCache(depth_dir)  # fails clearly when there is no ground truth
    elif source == "disparity":
        depth_dir = cache_dir / "depth" / data_tag / "disparity"
        stereo_depth_for_dataset(raw, depth_dir, progress=progress)
    elif source != "none":
        model_name = str(get("depth_model", None) or source)
        depth_dir = cache_dir / "depth" / data_tag / _slug(model_name)
        keys = raw.keys
        if not all((depth_dir / f"{k}.png").is_file() for k in keys):
            model = load_depth_model(model_name, get("device", "auto"))
            estimate_depth_for_dataset(raw, model, depth_dir, progress=progress)
    depth_tag = "nodepth" if depth_dir is None else f"depth-{_short_hash(depth_dir.resolve())}"

    # 2. five-crop --------------------------------------------------------------------------------
    crop_dir: Path | None = None
    ratio = float(get("crop_ratio", 0.5))
    if get("five_crop", True):
        crop_dir = cache_dir / "crops" / f"{data_tag}_{_slug(str(classes))}_{depth_tag}_five_crop_{ratio}"
        index = _read_index(crop_dir)
        if not (index and index["splits"].get(split, {}).get("complete")):
            five_crop(build_dataset(name, root, split, depth_dir=depth_dir, **kwargs), crop_dir, ratio, progress=progress)
        knn_data: Any = CroppedDataset(crop_dir, split, with_depth=False)
    else:
        knn_data = raw

    # 3. kNN --------------------------------------------------------------------------------------
    res = int(get("res", 224))
    k = max(int(get("knn_k", 30)), int(get("num_neighbors", 7)))
    bb_name, weights = str(get("backbone", "vit_small_patch8_224")), get("weights", None)
    bb_tag = _slug(bb_name) + "-" + _short_hash(bb_name, weights, sorted(dict(get("backbone_kwargs", {}) or {}).items()))
    set_tag = crop_dir.name if crop_dir is not None else f"{data_tag}_{_slug(str(classes))}_full"
    mode = str(get("mode", "paper"))
    knn_path = cache_dir / "knn" / f"nns_{set_tag}_{bb_tag}_{res}{'_released' if mode == 'released' else ''}_{split}.npz"
    k = min(k, len(knn_data) - 1)
    if backbone is None and not _knn_done(knn_path, knn_data, res, k):
        from ..backbone import load_backbone

        backbone = load_backbone(bb_name, weights, **dict(get("backbone_kwargs", {}) or {}))
    if backbone is not None:
        compute_knn(knn_data, backbone, knn_path, k=k, res=res,
                    batch_size=int(get("batch_size", 32)), device=get("device", "auto"),
                    num_workers=int(get("num_workers", 0)), progress=progress, mode=mode)  # type: ignore[arg-type]
    return {"data_dir": root, "dataset": name, "dataset_kwargs": kwargs, "train_split": split,
            "depth_dir": depth_dir, "crop_dir": crop_dir, "knn_path": knn_path, "synthetic": synthetic}


def _knn_done(path: Path, dataset: Any, res: int, k: int) -> bool:
    if not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as old:
        return list(old["keys"]) == list(dataset.keys) and int(old["res"]) == res and int(old["k"]) == k


def load_prepared(
    paths: dict[str, Any],
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    depth_normalization: Literal["none", "minmax", "minmax255"] = "none",
    num_neighbors: int = 7,
    seed: int = 0,
) -> PairDataset:
    """The training :class:`PairDataset` for what :func:`prepare_training_data` returned."""
    from . import build_dataset

    if paths["crop_dir"] is not None:
        base: Any = CroppedDataset(paths["crop_dir"], paths["train_split"], depth_normalization=depth_normalization)
    else:
        if depth_normalization != "none":
            raise ValueError("depth_normalization needs five-cropped data (the parent min/max is stored in its index)")
        base = build_dataset(paths["dataset"], paths["data_dir"], paths["train_split"], depth_dir=paths["depth_dir"],
                             **paths["dataset_kwargs"])
    return PairDataset(base, paths["knn_path"], num_neighbors=num_neighbors, seed=seed, transform=transform)
