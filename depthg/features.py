"""Feature cache: frozen-backbone features of the fixed training crops, computed once, read by memmap.

Why: the backbone is frozen and the training crops are fixed (five-crop done offline, no random
augmentation of the training view; released_code.md §1.2), so the backbone's output for a crop never
changes during training. Recomputing it twice per step (anchor and kNN positive) is most of the cost of
a STEGO/DepthG step on a CPU. The cache stores, for every training crop at the training resolution:

* ``feats.f16``  (N, C, h, w) float16  last-layer patch features (eval mode: no dropout),
* ``depth.f32``  (N, 1, H, W) float32  the crop's depth (what FPS and the depth term read; kept in full
  precision because FPS is a discrete choice that fp16 rounding could flip),
* ``label.i16``  (N, H, W)    int16    the crop's labels (linear probe), -1 = ignore,

as raw NumPy memmaps plus ``manifest.json``. Channel dropout (Dropout2d, p=0.1) is *not* baked in: the
trainer applies it on the fly each step, independently for the correlation target and the head inputs
(released_code.md §1.3), so training from the cache computes the same losses as recomputing the features,
up to the float16 rounding of the features (tests/test_train.py checks this).

Precision. The cache and the trainer's recomputation compute features through one function,
:func:`backbone_features`, under one :class:`Precision` (autocast to bf16/fp16 when the run uses AMP on
CUDA, full precision otherwise), so the promise above holds with AMP on too: only the float16 storage
separates them (tests/test_gpu_path.py checks it with CPU autocast). A non-fp32 precision is part of the
cache key, so an AMP cache is never reused by a full-precision run or the other way round.

The cache folder is keyed by everything that changes the features: the backbone's name and a hash of its
weights and architecture, the resolution, the crop folder and split, and the number of crops; a stale or
half-written cache (no ``"complete": true`` in the manifest) is rebuilt, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from depthg.utils import DepthGError, atomic_write

__all__ = ["FeatureCache", "FeatureCacheError", "Precision", "backbone_features", "backbone_fingerprint",
           "build_feature_cache", "cache_key"]

CACHE_VERSION = 2


class FeatureCacheError(DepthGError, RuntimeError):
    """The feature cache is missing, incomplete or does not match the requested data."""


@dataclass(frozen=True)
class Precision:
    """Numeric policy of a run's forward passes: autocast to ``dtype`` on ``device_type``, or full precision.

    ``dtype=None`` is full precision (float32). Calling the object returns a fresh context manager, so it
    drops in wherever a ``nullcontext`` factory was used: ``with precision(): y = model(x)``.
    """

    device_type: str = "cpu"
    dtype: torch.dtype | None = None

    def __call__(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        """"fp32", "bf16" or "fp16" (what the cache manifest records)."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))


FULL_PRECISION = Precision()


@torch.no_grad()
def backbone_features(backbone: torch.nn.Module, img: torch.Tensor, precision: Precision | None = None) -> torch.Tensor:
    """Frozen-backbone features, (B, 3, H, W) images -> (B, C, H/p, W/p) float32, under ``precision``.

    The one function through which both the feature cache and the trainer's per-step recomputation
    (``depthg.train.CropSource``) run the backbone, so both follow the same precision policy.
    """
    with (precision or FULL_PRECISION)():
        feats = backbone(img)
    return feats.float()


def backbone_fingerprint(backbone: torch.nn.Module) -> str:
    """SHA-256 over the backbone's parameter names, shapes and bytes (format-independent weights hash)."""
    digest = hashlib.sha256()
    for key, value in sorted(backbone.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_key(info: dict[str, Any]) -> str:
    """Stable short hash of the identifying manifest fields."""
    text = json.dumps(info, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


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
    def open(cls, root: str | Path) -> "FeatureCache":
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise FeatureCacheError(f"no feature cache at {root} (missing manifest.json); build it first")
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete"):
            raise FeatureCacheError(f"feature cache {root} is incomplete (interrupted build); rebuild it")
        n = manifest["n"]
        feats = np.memmap(root / "feats.f16", dtype=np.float16, mode="r", shape=(n, *manifest["feat_shape"]))
        depth = None
        if manifest.get("depth_shape"):
            depth = np.memmap(root / "depth.f32", dtype=np.float32, mode="r", shape=(n, *manifest["depth_shape"]))
        label = None
        if manifest.get("label_shape"):
            label = np.memmap(root / "label.i16", dtype=np.int16, mode="r", shape=(n, *manifest["label_shape"]))
        return cls(root, feats, depth, label, manifest)

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather rows (any order, repeats allowed) -> {"feats", "depth"?, "label"?} float32/int64 tensors."""
        idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise FeatureCacheError(f"feature cache {self.root}: index out of range [0, {len(self)})")
        # Read sorted unique rows (sequential memmap access), then scatter back to the requested order.
        uniq, inverse = np.unique(idx, return_inverse=True)
        out = {"feats": torch.from_numpy(np.asarray(self.feats[uniq], dtype=np.float32)[inverse])}
        if self.depth is not None:
            out["depth"] = torch.from_numpy(np.asarray(self.depth[uniq], dtype=np.float32)[inverse])
        if self.label is not None:
            out["label"] = torch.from_numpy(np.asarray(self.label[uniq], dtype=np.int64)[inverse])
        return out


def build_feature_cache(
    backbone: torch.nn.Module,
    dataset: Any,
    root_dir: str | Path,
    info: dict[str, Any],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    progress: bool = True,
    precision: Precision | None = None,
) -> FeatureCache:
    """Compute (or reuse) the cache for ``dataset`` under ``root_dir/<key>/``.

    Args:
        backbone: the frozen backbone (evaluated in eval mode, no dropout).
        dataset: training crops; items are dicts with "img" (3,H,W) in [0,1], optional "depth" (1,H,W)
            and "label" (H,W), all at the training resolution (after ``transform``).
        root_dir: parent folder (``cfg.cache_dir/features``).
        info: identifying facts (backbone name, res, crop folder, split, ...); the backbone's weights
            fingerprint and the dataset length are added here.
        transform: optional per-item transform (e.g. resize + centre crop to the training resolution).
        precision: the run's precision policy (``depthg.train``'s AMP setting); features are computed
            with :func:`backbone_features` under it, exactly as the trainer recomputes them.
    """
    precision = precision or FULL_PRECISION
    info = dict(info, version=CACHE_VERSION, n=len(dataset), backbone_sha256=backbone_fingerprint(backbone))
    if precision.dtype is not None:  # full-precision caches keep the keys they had before AMP was keyed
        info["precision"] = precision.name
    key = cache_key(info)
    root = Path(root_dir) / key
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("complete") and manifest.get("key") == key:
            return FeatureCache.open(root)
    if root.exists():  # stale or half-written: rebuild from scratch
        shutil.rmtree(root)
    root.mkdir(parents=True)
    n = len(dataset)
    if n == 0:
        raise FeatureCacheError(f"cannot build a feature cache of an empty dataset ({info})")
    device = torch.device(device)
    backbone = backbone.to(device).eval()

    feats_mm = depth_mm = label_mm = None
    shapes: dict[str, list[int] | None] = {"feat_shape": None, "depth_shape": None, "label_shape": None}
    bar = tqdm(range(0, n, batch_size), desc="feature cache", disable=not progress, leave=False)
    for start in bar:
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        if transform is not None:
            items = [transform(item) for item in items]
        img = torch.stack([it["img"] for it in items]).to(device)
        feats = backbone_features(backbone, img, precision).cpu().numpy()
        if feats_mm is None:
            shapes["feat_shape"] = list(feats.shape[1:])
            feats_mm = np.memmap(root / "feats.f16", dtype=np.float16, mode="w+", shape=(n, *feats.shape[1:]))
            if "depth" in items[0] and items[0]["depth"] is not None:
                shapes["depth_shape"] = list(items[0]["depth"].shape)
                depth_mm = np.memmap(root / "depth.f32", dtype=np.float32, mode="w+", shape=(n, *items[0]["depth"].shape))
            if "label" in items[0] and items[0]["label"] is not None:
                shapes["label_shape"] = list(items[0]["label"].shape)
                label_mm = np.memmap(root / "label.i16", dtype=np.int16, mode="w+", shape=(n, *items[0]["label"].shape))
        stop = start + len(items)
        feats_mm[start:stop] = feats.astype(np.float16)
        if depth_mm is not None:
            depth_mm[start:stop] = torch.stack([it["depth"] for it in items]).float().numpy()
        if label_mm is not None:
            label_mm[start:stop] = torch.stack([it["label"] for it in items]).numpy().astype(np.int16)
    for mm in (feats_mm, depth_mm, label_mm):
        if mm is not None:
            mm.flush()
    manifest = dict(info, key=key, complete=True, **shapes)
    with atomic_write(manifest_path, "w") as handle:
        json.dump(manifest, handle, indent=2, default=str)
    return FeatureCache.open(root)
