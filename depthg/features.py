"""Feature cache: frozen-backbone features of the fixed training crops, computed once, read by memmap.

Files, keys and integrity checks are described in docs/backbones.md ("The feature cache").
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from depthg.precision import FULL_PRECISION, Precision
from depthg.utils import (DepthGError, allocate_file, atomic_write, build_lock, digest, file_digest, map_threads, note,
                          partial_dir, publish_dir, sha256_file, timed, transient_bar_leave)

__all__ = ["FeatureCache", "FeatureCacheError", "backbone_features", "backbone_fingerprint",
           "CacheOptions", "build_feature_cache", "cache_key", "cache_problem"]

CACHE_VERSION = 3  # 3: content-keyed, per-file sizes and SHA-256 in the manifest, lock + atomic folder

#: Files are hashed on every open up to this total size (a second or two); above it only sizes are checked.
VERIFY_MAX_BYTES = 2 << 30
MANIFEST = "manifest.json"
_FILES = {"feats.f16": ("feat_shape", np.float16), "depth.f32": ("depth_shape", np.float32),
          "label.i16": ("label_shape", np.int16)}


class FeatureCacheError(DepthGError, RuntimeError):
    """The feature cache is missing, incomplete or does not match the requested data."""


@torch.no_grad()
def backbone_features(backbone: torch.nn.Module, img: torch.Tensor, precision: Precision | None = None) -> torch.Tensor:
    """Frozen-backbone features (B, 3, H, W) -> (B, C, H/p, W/p) float32 under ``precision``.

    The cache and the trainer's recomputation both run the backbone through here, so they agree.
    """
    with (precision or FULL_PRECISION)():
        feats = backbone(img)
    return feats.float()


def backbone_fingerprint(backbone: torch.nn.Module) -> str:
    """SHA-256 over the backbone's parameter names, shapes and bytes (format-independent weights hash)."""
    h = hashlib.sha256()
    for key, value in sorted(backbone.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(info: dict[str, Any]) -> str:
    """Stable short hash of the identifying manifest fields."""
    return digest(info)[:20]


@dataclass
class FeatureCache:
    """Read-only view of a built cache. ``batch(indices)`` returns float32 tensors for those crops."""

    root: Path
    feats: np.ndarray  # memmap (N, C, h, w) float16
    depth: np.ndarray | None  # memmap (N, 1, H, W) float32
    label: np.ndarray | None  # memmap (N, H, W) int16
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return int(self.feats.shape[0])

    @classmethod
    def open(cls, root: str | Path, verify: bool | None = None) -> "FeatureCache":
        """Open a built cache after checking it (:func:`cache_problem`); ``verify`` forces (True) or skips
        (False) the SHA-256 check, None = when the files total at most :data:`VERIFY_MAX_BYTES`."""
        root = Path(root)
        problem = cache_problem(root, verify=verify)
        if problem is not None:
            raise FeatureCacheError(f"feature cache {root}: {problem}; delete the folder (training rebuilds it)")
        manifest = json.loads((root / MANIFEST).read_text())
        n = manifest["n"]
        maps: dict[str, np.ndarray | None] = {}
        for name, (shape_key, dtype) in _FILES.items():
            shape = manifest.get(shape_key)
            maps[name] = np.memmap(root / name, dtype=dtype, mode="r", shape=(n, *shape)) if shape else None
        return cls(root, maps["feats.f16"], maps["depth.f32"], maps["label.i16"], manifest)  # type: ignore[arg-type]

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor, *, as_stored: bool = False) -> dict[str, torch.Tensor]:
        """Gather rows (any order, repeats allowed) -> {"feats", "depth"?, "label"?} float32/int64 tensors,
        or float16/float32/int16 as stored with ``as_stored`` (widening them later gives the same values)."""
        idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise FeatureCacheError(f"feature cache {self.root}: index out of range [0, {len(self)})")
        # Read sorted unique rows (sequential memmap access), then scatter back to the requested order.
        uniq, inverse = np.unique(idx, return_inverse=True)
        rows = np.asarray(self.feats[uniq])
        # a backbone's features are never exactly zero everywhere: a row of zero bytes is a hole (zero-filled
        # file); tested on the float16 bits, which is several times faster than comparing float16 values
        empty = ~rows.reshape(len(rows), -1).view(np.uint16).any(axis=1)
        if empty.any():
            raise FeatureCacheError(f"feature cache {self.root}: the features of crop {int(uniq[empty][0])} are all "
                                    "zero (a damaged or partly written cache); delete the folder to rebuild it")
        feats_dtype, label_dtype = (None, None) if as_stored else (np.float32, np.int64)
        out = {"feats": torch.from_numpy(np.asarray(rows[inverse], dtype=feats_dtype))}
        if self.depth is not None:
            out["depth"] = torch.from_numpy(np.asarray(self.depth[uniq], dtype=np.float32)[inverse])
        if self.label is not None:
            out["label"] = torch.from_numpy(np.asarray(self.label[uniq][inverse], dtype=label_dtype))
        return out


@dataclass(frozen=True)
class CacheOptions:
    """How :func:`build_feature_cache` computes the features.

    ``transform`` maps each dataset item to the training resolution (None = as is); ``precision`` is the
    run's AMP policy, the same the trainer recomputes features under (the only one of these in the key);
    ``workers`` threads read and transform the items (0 = the calling thread; the bytes do not change).
    """

    batch_size: int = 16
    device: torch.device | str = "cpu"
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    progress: bool = True
    precision: Precision | None = None  # None = full precision
    workers: int = 0


def build_feature_cache(
    backbone: torch.nn.Module,
    dataset: Any,
    root_dir: str | Path,
    info: dict[str, Any],
    options: CacheOptions = CacheOptions(),
) -> FeatureCache:
    """Compute (or reuse) the cache for ``dataset`` under ``root_dir/<key>/``.

    Args:
        dataset: items {"img" (3, H, W) in [0, 1], "depth"? (1, H, W), "label"? (H, W)} at the training
            resolution after ``options.transform``.
        info: identifying facts (backbone, res, mode, split, data digest); the weights fingerprint and
            the dataset length are added here.
        options: batch size, device, transform, progress bar and precision (:class:`CacheOptions`).
    """
    precision = options.precision or FULL_PRECISION
    info = dict(info, version=CACHE_VERSION, n=len(dataset), backbone_sha256=backbone_fingerprint(backbone))
    if precision.dtype is not None:  # full-precision caches keep the keys they had before AMP was keyed
        info["precision"] = precision.name
    key = cache_key(info)
    root = Path(root_dir) / key
    with timed("feature cache") as stage:  # the check counts as the stage's time, 'cached' when complete
        stage.cached = cache_problem(root, key) is None
    if stage.cached:  # complete: only read (no lock, nothing written: a read-only cache works)
        return FeatureCache.open(root, verify=False)  # just verified
    with build_lock(root, "feature cache"), timed("feature cache") as stage:
        problem = cache_problem(root, key)
        if problem is None:
            stage.cached = True
            return FeatureCache.open(root, verify=False)  # just verified
        if problem != "missing":
            note(f"feature cache {root}: rebuilding ({problem})")
        work = partial_dir(root)
        if work.exists():  # a killed build: start again (features are cheap to redo, and must be whole)
            shutil.rmtree(work)
        work.mkdir(parents=True)
        try:
            _write_cache(backbone, dataset, work, dict(info, key=key), options)
        except BaseException:  # a full disk, Ctrl-C: nothing half-written stays behind
            shutil.rmtree(work, ignore_errors=True)
            raise
        publish_dir(work, root)
    return FeatureCache.open(root, verify=False)


def cache_problem(root: Path, key: str | None = None, verify: bool | None = None) -> str | None:
    """None when ``root`` holds a complete cache (with ``key``, when given) whose files match the manifest;
    else what is wrong ("missing", "incomplete", "feats.f16 has N bytes, expected M", ...)."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return "missing" if not root.exists() else "no manifest.json (an interrupted or foreign folder)"
    try:
        manifest = json.loads(manifest_path.read_text())
        n = int(manifest["n"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        return f"manifest.json is unreadable ({type(err).__name__}: {err})"
    if not manifest.get("complete"):
        return "incomplete (interrupted build)"
    if key is not None and manifest.get("key") != key:
        return "its manifest belongs to other data"
    files = manifest.get("files")
    if manifest.get("version") != CACHE_VERSION or not isinstance(files, dict) or not manifest.get("feat_shape"):
        return f"written by another cache version ({manifest.get('version')}, expected {CACHE_VERSION})"
    total = 0
    for name, (shape_key, dtype) in _FILES.items():
        shape = manifest.get(shape_key)
        if not shape:
            continue
        expected = n * int(np.prod(shape)) * np.dtype(dtype).itemsize
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected or files.get(name, [None])[0] != expected:
            return f"{name} has {size} bytes, expected {expected} (truncated or replaced)"
        total += size
    if verify or (verify is None and total <= VERIFY_MAX_BYTES):
        for name, (size, sha) in files.items():
            if file_digest(root / name) != sha:
                return f"{name} does not match its SHA-256 in manifest.json (corrupted or modified)"
    return None


def _allocate(root: Path, n: int, shapes: dict[str, list[int] | None]) -> list[np.ndarray | None]:
    """Memory maps of the cache files for ``n`` crops of these shapes, their disk space reserved first
    (:func:`depthg.utils.allocate_file`): a full disk is a clear error before anything is written, never a
    crash (SIGBUS) halfway through."""
    sizes = {name: n * int(np.prod(shapes[key])) * np.dtype(dtype).itemsize
             for name, (key, dtype) in _FILES.items() if shapes[key]}
    for name, nbytes in sizes.items():
        allocate_file(root / name, nbytes, "feature cache file")
    return [np.memmap(root / name, dtype=dtype, mode="r+", shape=(n, *shapes[key])) if name in sizes else None
            for name, (key, dtype) in _FILES.items()]


def _write_cache(backbone: torch.nn.Module, dataset: Any, root: Path, info: dict[str, Any],
                 options: CacheOptions) -> None:
    """Compute every crop's features (+ depth, labels) into memmaps in ``root`` and write the manifest last."""
    n = len(dataset)
    if n == 0:
        raise FeatureCacheError(f"cannot build a feature cache of an empty dataset ({info})")
    batch_size, transform, precision = options.batch_size, options.transform, options.precision or FULL_PRECISION
    device = torch.device(options.device)
    backbone = backbone.to(device).eval()

    feats_mm = depth_mm = label_mm = None
    shapes: dict[str, list[int] | None] = {"feat_shape": None, "depth_shape": None, "label_shape": None}
    load = (lambda i: transform(dataset[i])) if transform is not None else dataset.__getitem__
    bar = tqdm(range(0, n, batch_size), desc="feature cache", disable=not options.progress, leave=transient_bar_leave())
    for start in bar:
        items = map_threads(load, range(start, min(start + batch_size, n)), options.workers)
        img = torch.stack([it["img"] for it in items]).to(device)
        feats = backbone_features(backbone, img, precision).cpu().numpy()
        if feats_mm is None:  # the first batch gives the shapes: every file's disk space is reserved now
            shapes["feat_shape"] = list(feats.shape[1:])
            for part, shape_key in (("depth", "depth_shape"), ("label", "label_shape")):
                if items[0].get(part) is not None:
                    shapes[shape_key] = list(items[0][part].shape)
            feats_mm, depth_mm, label_mm = _allocate(root, n, shapes)
        stop = start + len(items)
        feats_mm[start:stop] = feats.astype(np.float16)
        if depth_mm is not None:
            depth_mm[start:stop] = torch.stack([it["depth"] for it in items]).float().numpy()
        if label_mm is not None:
            label_mm[start:stop] = torch.stack([it["label"] for it in items]).numpy().astype(np.int16)
    files = {}
    for name, mm in (("feats.f16", feats_mm), ("depth.f32", depth_mm), ("label.i16", label_mm)):
        if mm is not None:
            mm.flush()
            files[name] = [(root / name).stat().st_size, sha256_file(root / name)]
    feats_mm = depth_mm = label_mm = None
    manifest = dict(info, complete=True, files=files, **shapes)
    with atomic_write(root / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=2, default=str)
