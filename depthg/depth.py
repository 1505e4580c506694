"""Depth for DepthG: a 16-bit PNG depth cache, monocular estimators from ``transformers``, stereo depth.

docs/method.md §10. All depth tensors are (1, H, W) or (B, 1, H, W) float32, larger = farther.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import socket
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Literal, Sequence
from urllib.parse import urlsplit

import numpy as np
import torch
from huggingface_hub import constants, try_to_load_from_cache
from PIL import Image
from tqdm.auto import tqdm

from .dataset_protocol import SegmentationSource, is_full_resolution, item_identities, item_keys
from .precision import FULL_PRECISION, Precision
from .utils import DepthGError, atomic_write, build_lock, get_device, inside, note, owned_output, repo_root

__all__ = [
    "DepthCache",
    "DepthCacheError",
    "DepthSettings",
    "InvalidDepthError",
    "DepthModelNotFoundError",
    "DepthModel",
    "DEPTH_MODEL_ALIASES",
    "load_depth_model",
    "build_tiny_random_depth_model",
    "hub_reachable",
    "estimate_depth",
    "estimate_depth_for_dataset",
    "disparity_to_depth",
    "read_camera",
    "validate_depth",
    "stale_depth_keys",
    "META_NAME",
]

META_NAME = "depth_meta.json"
SOURCES_NAME = "depth_sources.json"
UINT16_MAX = 65535

# default quantisation per unit: 1/256 m (4 mm steps up to 256 m); relative depth uses the full 16 bits
DEFAULT_SCALE = {"m": 1.0 / 256.0, "relative": 1.0 / UINT16_MAX, "unknown": 1.0 / 256.0}


class DepthCacheError(DepthGError, ValueError):
    """A depth cache is missing its metadata, was made by another source, or a value does not fit it."""


class InvalidDepthError(DepthGError, ValueError):
    """A depth map holds NaN, inf or negative values, or has the wrong shape."""


class DepthModelNotFoundError(DepthGError, FileNotFoundError):
    """A depth model could be found neither as a local folder nor in the Hugging Face cache."""


def validate_depth(depth: np.ndarray | torch.Tensor, where: str) -> None:
    """Raise :class:`InvalidDepthError` naming ``where`` when ``depth`` holds NaN, inf or negatives (zero is
    allowed: the nearest point of a relative map, or "no depth" in stereo caches)."""
    arr = depth.detach().cpu().numpy() if isinstance(depth, torch.Tensor) else np.asarray(depth)
    if arr.size == 0:
        raise InvalidDepthError(f"{where}: empty depth map (shape {arr.shape})")
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(np.isinf(arr).sum())
    if n_nan or n_inf:
        raise InvalidDepthError(
            f"{where}: depth has {n_nan} NaN and {n_inf} inf values out of {arr.size}; expected finite "
            "depths >= 0"
        )
    lo = float(arr.min())
    if lo < 0:
        raise InvalidDepthError(
            f"{where}: depth has {int((arr < 0).sum())} negative values (min {lo:g}); expected depths "
            ">= 0 with larger = farther"
        )


def _check_key(key: str) -> PurePosixPath:
    """Keys are relative POSIX ids such as ``train/aachen/aachen_000000_000019``; refuse escapes."""
    p = PurePosixPath(key)
    if not key or p.is_absolute() or ".." in p.parts or "\\" in key:
        raise DepthCacheError(f"invalid depth-cache key {key!r}: expected a relative id like 'train/city/stem'")
    return p


@dataclass(frozen=True)
class DepthSettings:
    """What a new :class:`DepthCache` records in ``depth_meta.json``: the depth ``source`` and its ``units``,
    the quantisation ``scale`` (None: :data:`DEFAULT_SCALE` of the units) and ``offset``, the
    ``normalisation`` and any ``extra`` keys. Reopening a cache checks source, units and scale."""

    source: str
    units: Literal["m", "relative", "unknown"]
    scale: float | None = None
    offset: float = 0.0
    normalisation: str = "none"
    extra: dict[str, Any] | None = None


class DepthCache:
    """A folder of uint16 PNGs ``root/{key}.png`` holding ``offset + scale * pixel``, with
    ``root/depth_meta.json`` = ``{"source", "encoding": "uint16", "scale", "offset", "units", "normalisation",
    ...extras}`` (e.g. ``"invalid_value": 0`` in stereo caches).

    ``DepthCache(root)`` opens a cache; passing ``settings`` (:class:`DepthSettings`) creates one, or reopens
    it only if its metadata agrees, so two estimators never mix in one folder.
    """

    def __init__(self, root: str | os.PathLike, settings: DepthSettings | None = None) -> None:
        self.root = Path(root)
        self.meta_path = self.root / META_NAME
        source = units = scale = None
        if settings is not None:
            source, units, scale = settings.source, settings.units, settings.scale
        if self.meta_path.is_file():
            self.meta = self._read_meta()
            wanted: dict[str, Any] = {"source": source, "units": units, "scale": scale}
            clashes = {}
            for k, v in wanted.items():
                have = self.meta.get(k)
                if v is None:
                    continue
                same = math.isclose(float(have), float(v), rel_tol=1e-9) if k == "scale" else have == v
                if not same:
                    clashes[k] = (have, v)
            if clashes:
                detail = ", ".join(f"{k}: cache has {a!r}, asked for {b!r}" for k, (a, b) in clashes.items())
                raise DepthCacheError(
                    f"depth cache {self.root} was made with different settings ({detail}). Use another "
                    "cache folder for another depth source, or delete this one to rebuild it."
                )
        elif settings is not None:
            if source is None or units is None:
                raise DepthCacheError(f"creating depth cache {self.root}: the settings need a source and units")
            if units not in DEFAULT_SCALE:
                raise DepthCacheError(f"units must be one of {sorted(DEFAULT_SCALE)}, got {units!r}")
            self.meta = {
                "source": source,
                "encoding": "uint16",
                "scale": float(scale if scale is not None else DEFAULT_SCALE[units]),
                "offset": float(settings.offset),
                "units": units,
                "normalisation": settings.normalisation,
                **(settings.extra or {}),
            }
            with atomic_write(self.meta_path, "w") as f:
                json.dump(self.meta, f, indent=2)
        else:
            raise FileNotFoundError(
                f"no depth cache at {self.root}: {self.meta_path} does not exist. Create the cache first, "
                "e.g. `python -m depthg depth` (depthg.depth.estimate_depth_for_dataset), or use "
                "depth_source='disparity' for Cityscapes stereo / 'gt' for the synthetic world."
            )

    def _read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DepthCacheError(f"cannot read {self.meta_path}: {err}") from None
        missing = {"encoding", "scale", "units"} - set(meta)
        if missing:
            raise DepthCacheError(f"{self.meta_path} lacks the keys {sorted(missing)}")
        if meta["encoding"] != "uint16":
            raise DepthCacheError(f"{self.meta_path}: encoding {meta['encoding']!r} unsupported (expected 'uint16')")
        meta.setdefault("offset", 0.0)
        meta.setdefault("normalisation", "none")
        meta.setdefault("source", "unknown")
        return meta

    # -- properties -------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return float(self.meta["scale"])

    @property
    def offset(self) -> float:
        return float(self.meta["offset"])

    @property
    def units(self) -> str:
        return str(self.meta["units"])

    @property
    def max_value(self) -> float:
        """The largest depth one PNG of this cache can hold."""
        return self.offset + self.scale * UINT16_MAX

    def path(self, key: str) -> Path:
        return self.root / f"{_check_key(key)}.png"

    # -- what each map was made from ----------------------------------------------------------------
    def recorded_sources(self) -> dict[str, Any]:
        """``{key: identity of the source files}`` recorded by :meth:`record_sources` ({} when none)."""
        path = self.root / SOURCES_NAME
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}  # unreadable: every map counts as unverified and is made again
        return data if isinstance(data, dict) else {}

    def record_sources(self, sources: dict[str, Any]) -> None:
        """Write ``{key: identity}`` (atomically): a map is up to date while its source's identity is."""
        with atomic_write(self.root / SOURCES_NAME, "w") as f:
            json.dump(sources, f)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    # -- io ---------------------------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        """Depth for ``key`` as a (1, H, W) float32 tensor (units as in the metadata)."""
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(
                f"depth map for {key!r} not found: {path} (cache source {self.meta.get('source')!r}). "
                "Run the depth preparation (`python -m depthg depth`) for this dataset and split."
            )
        try:
            with Image.open(path) as im:
                im.load()
                arr = np.array(im)
        except (OSError, SyntaxError, ValueError) as err:
            raise DepthCacheError(f"cannot read depth map {path}: {err}") from None
        if arr.ndim != 2 or arr.dtype not in (np.uint16, np.int32, np.uint8):
            raise DepthCacheError(f"{path}: expected a single-channel 16-bit PNG, got shape {arr.shape} dtype {arr.dtype}")
        depth = self.offset + self.scale * arr.astype(np.float64)
        depth = torch.from_numpy(depth.astype(np.float32))[None]
        validate_depth(depth, str(path))
        return depth

    def write(self, key: str, depth: np.ndarray | torch.Tensor) -> Path:
        """Quantise ``depth`` ((H, W) or (1, H, W)) to 16 bits and write it atomically.

        Values are validated first (NaN/inf/negative → :class:`InvalidDepthError`); values beyond
        :attr:`max_value` raise instead of being clipped (nothing is silently clamped).
        """
        path = self.path(key)
        arr = depth.detach().cpu().numpy() if isinstance(depth, torch.Tensor) else np.asarray(depth)
        arr = arr.astype(np.float64)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise InvalidDepthError(f"depth for {path} must be (H, W) or (1, H, W), got shape {arr.shape}")
        validate_depth(arr, f"depth for {path}")
        q = np.rint((arr - self.offset) / self.scale)
        if q.min() < 0 or q.max() > UINT16_MAX:
            raise DepthCacheError(
                f"depth for {path} spans [{arr.min():g}, {arr.max():g}] {self.units}, outside what this "
                f"cache stores ([{self.offset:g}, {self.max_value:g}] with scale {self.scale:g}); create the "
                "cache with a larger scale="
            )
        with atomic_write(path, "wb") as f:
            Image.fromarray(q.astype(np.uint16)).save(f, format="PNG")
        return path


# ------------------------------------------------------------------------------------------------
# Stereo depth (Cityscapes)
# ------------------------------------------------------------------------------------------------
def read_camera(camera_json: str | os.PathLike) -> dict[str, float]:
    """Read a Cityscapes ``*_camera.json``: returns baseline (m), fx, fy, u0, v0 (pixels)."""
    path = Path(camera_json)
    try:
        cam = json.loads(path.read_text())
        out = {"baseline": float(cam["extrinsic"]["baseline"])}
        out.update({k: float(cam["intrinsic"][k]) for k in ("fx", "fy", "u0", "v0")})
    except FileNotFoundError:
        raise FileNotFoundError(f"camera file not found: {path}") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DepthCacheError(
            f"{path}: not a Cityscapes camera file ({type(err).__name__}: {err}); expected "
            '{"extrinsic": {"baseline": ...}, "intrinsic": {"fx", "fy", "u0", "v0"}}'
        ) from None
    if out["baseline"] <= 0 or out["fx"] <= 0:
        raise DepthCacheError(f"{path}: baseline and fx must be positive, got {out}")
    return out


def disparity_to_depth(
    disparity_png: str | os.PathLike,
    camera_json: str | os.PathLike,
    max_depth: float | None = None,
) -> torch.Tensor:
    """Metric depth (1, H, W) = baseline * fx / d from a Cityscapes disparity PNG (``p = 256 d + 1``, 0 = none).

    Pixels without disparity (p <= 1) or beyond ``max_depth`` become 0, the caches' invalid value.
    """
    path = Path(disparity_png)
    if not path.is_file():
        raise FileNotFoundError(f"disparity file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            p = np.array(im).astype(np.float64)
    except (OSError, SyntaxError, ValueError) as err:
        raise DepthCacheError(f"cannot read disparity PNG {path}: {err}") from None
    if p.ndim != 2:
        raise DepthCacheError(f"{path}: expected a single-channel 16-bit disparity PNG, got shape {p.shape}")
    cam = read_camera(camera_json)
    d = np.where(p > 0, (p - 1.0) / 256.0, 0.0)
    valid = d > 0
    depth = np.zeros_like(d)
    depth[valid] = cam["baseline"] * cam["fx"] / d[valid]
    if max_depth is not None:
        depth[depth > max_depth] = 0.0
    return torch.from_numpy(depth.astype(np.float32))[None]


# ------------------------------------------------------------------------------------------------
# Monocular estimators from transformers
# ------------------------------------------------------------------------------------------------
DEPTH_MODEL_ALIASES: dict[str, str] = {
    "depth-anything-v2-small": "depth-anything/Depth-Anything-V2-Small-hf",
    "depth-anything-v2-base": "depth-anything/Depth-Anything-V2-Base-hf",
    "depth-anything-v2-large": "depth-anything/Depth-Anything-V2-Large-hf",
    "depth-anything-small": "LiheYoung/depth-anything-small-hf",
    "depth-anything-base": "LiheYoung/depth-anything-base-hf",
    "depth-anything-large": "LiheYoung/depth-anything-large-hf",
    "zoedepth": "Intel/zoedepth-nyu",  # the released ZoeD_N (NYU) model
    "zoedepth-nyu": "Intel/zoedepth-nyu",
    "zoedepth-kitti": "Intel/zoedepth-kitti",
    "zoedepth-nyu-kitti": "Intel/zoedepth-nyu-kitti",
    "dpt-large": "Intel/dpt-large",
    "dpt-hybrid": "Intel/dpt-hybrid-midas",
}

# model_type -> what predicted_depth holds. Depth Anything reads ``config.depth_estimation_type``.
_METRIC_TYPES = {"zoedepth", "glpn", "depth_pro", "prompt_depth_anything"}
_RELATIVE_TYPES = {"dpt"}


@dataclass
class DepthModel:
    """A loaded ``transformers`` depth estimator and its processor; ``kind`` "metric" (metres) or
    "relative" (disparity-like); ``name`` (alias or path) becomes the cache's ``source``."""

    model: torch.nn.Module
    processor: Any
    name: str
    kind: Literal["metric", "relative"]
    device: torch.device

    @property
    def units(self) -> str:
        return "m" if self.kind == "metric" else "relative"

    @property
    def normalisation(self) -> str:
        return "none" if self.kind == "metric" else "1-minmax(disparity) per image"


def _offline() -> bool:
    """True when Hugging Face offline mode is on: the environment *now* (``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``), or ``huggingface_hub``'s own flag, which it reads once at import."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _depth_kind(config: Any) -> Literal["metric", "relative"]:
    mtype = getattr(config, "model_type", "")
    if mtype == "depth_anything":
        return "metric" if getattr(config, "depth_estimation_type", "relative") == "metric" else "relative"
    if mtype in _METRIC_TYPES:
        return "metric"
    if mtype not in _RELATIVE_TYPES:
        warnings.warn(f"unknown depth model type {mtype!r}; treating its output as relative (disparity-like)")
    return "relative"


def _hub_endpoint() -> str:
    return str(getattr(constants, "ENDPOINT", "https://huggingface.co"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint (or the HTTPS proxy) opens within ``timeout``
    seconds: one quick probe instead of the hub client's retries."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy if proxy else _hub_endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_cache_dir() -> str:
    return str(constants.HF_HUB_CACHE)


def _in_hf_cache(repo_id: str) -> bool:
    """Whether ``repo_id``'s config.json is in the local Hugging Face cache (no network)."""
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub client rejects (e.g. a path with three parts) is not cached
        return False
    return isinstance(found, str)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Switch transformers' own progress bars off for a moment (noise in notebooks and on the command line)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_depth_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "auto",
    kind: Literal["metric", "relative"] | None = None,
) -> DepthModel:
    """Load a ``transformers`` depth estimator and its processor (eval mode, on ``device``).

    ``name_or_path``: an alias of :data:`DEPTH_MODEL_ALIASES`, a hub id, or a ``save_pretrained`` folder
    (relative to :func:`repo_root`). A hub id comes from the local Hugging Face cache, else is downloaded
    unless offline mode is on or the hub does not answer a 3 s probe. ``kind`` overrides
    metric/relative. Raises :class:`DepthModelNotFoundError` saying where it looked and how to get weights.
    """
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    name = str(name_or_path)
    target = DEPTH_MODEL_ALIASES.get(name, name)
    local = Path(target).expanduser()
    if not local.is_absolute():
        local = repo_root() / local
    how = (f"on a machine with network run `hf download {target} --local-dir DIR` (huggingface_hub's CLI) and "
           f"pass DIR (absolute, or relative to {repo_root()}), or copy the Hugging Face cache into HF_HOME")
    aliases = f"Aliases: {', '.join(sorted(DEPTH_MODEL_ALIASES))}."
    if local.exists():
        if not (local / "config.json").is_file():
            raise DepthModelNotFoundError(
                f"depth model folder {local} has no config.json; expected a folder written by save_pretrained "
                "(config.json, model.safetensors, preprocessor_config.json)"
            )
        source, local_only = str(local), True
    elif Path(target).expanduser().is_absolute() or target.startswith(".") or target.count("/") > 1:
        raise DepthModelNotFoundError(  # clearly a path, not a hub id ("org/name")
            f"depth model folder {local} does not exist. To get weights, {how}. {aliases}"
        )
    else:
        source = target
        looked = f"looked for a local folder {local} (does not exist) and in the Hugging Face cache {_hf_cache_dir()}"
        local_only = _in_hf_cache(target)
        if not local_only and _offline():
            raise DepthModelNotFoundError(
                f"no weights for depth model {name!r}: {looked} (not there), and Hugging Face offline mode is on "
                f"(HF_HUB_OFFLINE), so nothing is downloaded. To get them, {how}. {aliases}"
            )
        if not local_only and not hub_reachable(3.0):
            raise DepthModelNotFoundError(
                f"no weights for depth model {name!r}: {looked} (not there), and {_hub_endpoint()} cannot be "
                f"reached from this machine (no network), so nothing can be downloaded. To get them, {how}. {aliases}"
            )
    try:
        with _quiet_transformers():
            model = AutoModelForDepthEstimation.from_pretrained(source, local_files_only=local_only)
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        where = f"the local folder {local}" if source == str(local) else (
            f"the Hugging Face cache {_hf_cache_dir()}" if local_only else f"the hub {_hub_endpoint()}")
        first = str(err).splitlines()[0] if str(err) else ""
        raise DepthModelNotFoundError(
            f"could not load depth model {name!r} from {where} ({type(err).__name__}: {first}). "
            f"To get complete weights, {how}. {aliases}"
        ) from None
    dev = get_device(device)
    model = model.eval().to(dev)
    return DepthModel(model, processor, name, kind or _depth_kind(model.config), dev)


def build_tiny_random_depth_model(folder: str | os.PathLike, kind: str = "relative") -> Path:
    """Write a tiny randomly initialised Depth Anything (~140k parameters, ``kind`` "relative" or "metric")
    and its processor into ``folder``: smoke tests of the loading path only, its depth is noise."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]), _quiet_transformers():  # seeded, leaves the caller's RNG alone
        torch.manual_seed(0)
        backbone = Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=64, out_features=["stage1", "stage2", "stage3", "stage4"],
                                reshape_hidden_states=False)
        config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                                     neck_hidden_sizes=[8, 16, 32, 32], reassemble_factors=[4, 2, 1, 0.5],
                                     fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type=kind,
                                     max_depth=1 if kind == "relative" else 80)
        DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      do_pad=False).save_pretrained(folder)
    return folder


def _post_process(depth_model: DepthModel, outputs: Any, size: tuple[int, int], batch: int) -> torch.Tensor:
    """Predicted depth back at the input size, via the processor when it knows how (ZoeDepth removes
    its padding there), else bicubic interpolation like the processors do."""
    proc = depth_model.processor
    fn = getattr(proc, "post_process_depth_estimation", None)
    if fn is not None:
        params = inspect.signature(fn).parameters
        kwargs: dict[str, Any] = {"target_sizes": [size] * batch}
        if "source_sizes" in params:
            kwargs["source_sizes"] = [size] * batch
        res = fn(outputs, **kwargs)
        return torch.stack([r["predicted_depth"] for r in res])[:, None].float()
    pred = outputs.predicted_depth
    pred = pred[:, None] if pred.ndim == 3 else pred
    return torch.nn.functional.interpolate(pred.float(), size=size, mode="bicubic", align_corners=False)


def _process(processor: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The processor's model inputs (``pixel_values`` (B, 3, h, w), ...) for images (B, 3, H, W) in [0, 1]:
    resized, normalised (and padded, for ZoeDepth) one image at a time, on the CPU."""
    return dict(processor(images=list(images.detach().float().cpu()), return_tensors="pt", do_rescale=False))


def _forward(depth_model: DepthModel, inputs: dict[str, torch.Tensor], size: tuple[int, int],
             precision: Precision | None) -> torch.Tensor:
    """Raw post-processed prediction (B, 1, H, W) float32 at ``size`` (metres or disparity-like) of processed
    ``inputs``; the network runs under ``precision`` (autocast), the post-processing in float32."""
    inputs = {k: v.to(depth_model.device, non_blocking=True) for k, v in inputs.items()}
    with (precision or FULL_PRECISION)():
        outputs = depth_model.model(**inputs)
    outputs.predicted_depth = outputs.predicted_depth.float()
    return _post_process(depth_model, outputs, size, len(outputs.predicted_depth)).float()


def _to_depth(depth_model: DepthModel, raw: torch.Tensor) -> torch.Tensor:
    """Depth, larger = farther: metres for metric models, ``1 - minmax(disparity)`` per image for relative ones."""
    depth = raw
    if depth_model.kind == "relative":
        flat = depth.flatten(1)
        lo = flat.min(1).values[:, None, None, None]
        hi = flat.max(1).values[:, None, None, None]
        depth = 1.0 - (depth - lo) / (hi - lo).clamp_min(1e-12)
        depth = depth.clamp(0.0, 1.0)  # only float round-off; the range is [0, 1] by construction
    validate_depth(depth, f"output of depth model {depth_model.name!r}")
    return depth


@torch.inference_mode()
def estimate_depth(depth_model: DepthModel, images: torch.Tensor, flip_tta: bool = False,
                   precision: Precision | None = None) -> torch.Tensor:
    """Depth (B, 1, H, W), larger = farther, of images (B, 3, H, W) in [0, 1], on the images' device.

    Metric models give metres; relative ones ``1 - minmax(disparity)`` per image. ``flip_tta`` averages
    with the flipped image's prediction, as the released ZoeDepth inference did. ``precision``: autocast of
    the network (the run's policy: ``depthg.precision.amp_context``; None = full precision).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    size = (images.shape[2], images.shape[3])
    raw = _forward(depth_model, _process(depth_model.processor, images), size, precision)
    if flip_tta:
        flipped = _forward(depth_model, _process(depth_model.processor, images.flip(-1)), size, precision)
        raw = 0.5 * (raw + flipped.flip(-1))
    return _to_depth(depth_model, raw).to(images.device)


def _check_not_in_sources(cache_root: Path, dataset: Any) -> None:
    """Caches never go inside the dataset's folders (docs/fidelity.md §4)."""
    if not isinstance(dataset, SegmentationSource):  # a plain dataset names no folders
        return
    for src in dataset.source_dirs:
        if inside(cache_root, src):
            raise DepthCacheError(
                f"refusing to write depth into {cache_root}: it is inside the dataset's source folder {Path(src).resolve()}. "
                "Pick a cache folder outside the image and label trees."
            )
    root = dataset.root  # the five-crops keep their depth crops in their own folder: that is allowed
    if dataset.name != "cropped" and inside(cache_root, root):
        raise DepthCacheError(
            f"refusing to write depth into {cache_root}: it is inside the dataset folder {Path(root).resolve()}. "
            "Nothing is written into a dataset; pick a cache folder outside it."
        )


def _image_identities(dataset: Any, keys: Sequence[str]) -> dict[str, Any]:
    """``{key: identity of the item's image file}`` (size, modification time); {} for datasets that cannot say."""
    identities = item_identities(dataset, ("img",))
    return {} if identities is None else dict(zip(keys, identities))


def _stale(cache: DepthCache, keys: Sequence[str], recorded: dict[str, Any], current: dict[str, Any]) -> list[int]:
    """Indices of the keys whose map is missing or whose image changed since (``recorded`` vs ``current``)."""
    return [i for i, k in enumerate(keys) if not cache.exists(k) or (k in current and recorded.get(k) != current[k])]


def stale_depth_keys(dataset: Any, cache_root: str | os.PathLike, model_identity: str | None = None) -> list[str]:
    """Keys of ``dataset`` whose depth map in ``cache_root`` is missing, was made from another version of its
    image, or by another model (``model_identity`` differs from the cache's): what
    :func:`estimate_depth_for_dataset` would compute."""
    cache_root = Path(cache_root)
    keys = item_keys(dataset)
    if not (cache_root / META_NAME).is_file():
        return list(keys)
    cache = DepthCache(cache_root)
    if model_identity is not None and cache.meta.get("model_identity") != model_identity:
        return list(keys)
    return [keys[i] for i in _stale(cache, keys, cache.recorded_sources(), _image_identities(dataset, keys))]


class _DepthInputs(torch.utils.data.Dataset):
    """Item ``j``: the processed model inputs of ``dataset``'s item ``indices[j]`` (and of its mirror image with
    ``flip``): what :func:`estimate_depth_for_dataset`'s loader workers read and prepare."""

    def __init__(self, dataset: Any, indices: Sequence[int], processor: Any, flip: bool) -> None:
        self.dataset, self.indices, self.processor, self.flip = dataset, list(indices), processor, flip
        self.source = isinstance(dataset, SegmentationSource)  # asked once (image_loader's choice, picklable)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i = self.indices[j]
        img = (self.dataset.load_image_tensor(i) if self.source else self.dataset[i]["img"])[None]
        item: dict[str, Any] = {"j": j, "size": tuple(img.shape[2:]), "inputs": _process(self.processor, img)}
        if self.flip:
            item["flipped"] = _process(self.processor, img.flip(-1))
        return item


def _batches(items: Iterable[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Group consecutive items of the same image size (COCO sizes vary; Cityscapes' do not)."""
    batch: list[dict[str, Any]] = []
    for item in items:
        if batch and (len(batch) == batch_size or batch[0]["size"] != item["size"]):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _stack_inputs(batch: list[dict[str, Any]], name: str) -> dict[str, torch.Tensor]:
    return {k: torch.cat([item[name][k] for item in batch]) for k in batch[0][name]}


def _depth_of_batch(depth_model: DepthModel, batch: list[dict[str, Any]], flip_tta: bool,
                    precision: Precision | None) -> torch.Tensor:
    """Depth (B, 1, H, W) of a batch of :class:`_DepthInputs` items: :func:`estimate_depth`'s computation."""
    size = batch[0]["size"]
    raw = _forward(depth_model, _stack_inputs(batch, "inputs"), size, precision)
    if flip_tta:
        raw = 0.5 * (raw + _forward(depth_model, _stack_inputs(batch, "flipped"), size, precision).flip(-1))
    return _to_depth(depth_model, raw).cpu()


@torch.inference_mode()
def estimate_depth_for_dataset(
    dataset: Any,
    depth_model: DepthModel,
    cache_root: str | os.PathLike,
    batch_size: int = 4,
    progress: bool = True,
    flip_tta: bool = False,
    model_identity: str | None = None,
    num_workers: int = 0,
    precision: Precision | None = None,
) -> Path:
    """Estimate and cache depth ``cache_root/{key}.png`` for every full-resolution item of ``dataset`` whose
    map is missing or stale (its image changed, per ``depth_sources.json``), under a lock, each file written
    atomically, so an interrupted run resumes. A cache made by another ``model_identity`` is emptied and
    made again; each rebuild says why on stderr. Returns ``cache_root``.

    Throughput: ``num_workers`` loader processes read the images and run the processor (resize, normalise),
    the network sees batches of ``batch_size`` images on the model's device under ``precision`` (autocast;
    its identity belongs in ``model_identity``), and the 16-bit PNGs are written on ``num_workers`` threads
    while the next batch runs. The maps are those of :func:`estimate_depth` image by image (tested).
    """
    if not is_full_resolution(dataset):
        raise ValueError("estimate_depth_for_dataset needs full-resolution items: pass a dataset with transform=None")
    cache_root = Path(cache_root)
    _check_not_in_sources(cache_root, dataset)
    owned_output(cache_root, "depth cache", META_NAME)  # never among files of someone else
    with build_lock(cache_root, "depth cache"):
        cache = _open_cache(cache_root, depth_model, flip_tta, model_identity, precision)
        keys = item_keys(dataset)
        recorded = cache.recorded_sources()
        current = _image_identities(dataset, keys)
        todo = _stale(cache, keys, recorded, current)
        changed = [keys[i] for i in todo if cache.exists(keys[i])]
        if changed:
            note(f"depth cache {cache_root}: {len(changed)} image(s) changed since their depth was estimated "
                 f"(e.g. {changed[0]}); estimating them again")
        inputs = _DepthInputs(dataset, todo, depth_model.processor, flip_tta)
        loader = torch.utils.data.DataLoader(inputs, batch_size=None, num_workers=num_workers,
                                             pin_memory=depth_model.device.type == "cuda")
        bar = tqdm(total=len(todo), desc=f"depth ({depth_model.name})", disable=not progress or not todo)
        with ThreadPoolExecutor(max_workers=max(num_workers, 1)) as writer:
            files = _PendingMaps(cache, recorded, current, bar)
            for batch in _batches(loader, batch_size):
                depth = _depth_of_batch(depth_model, batch, flip_tta, precision)
                for item, d in zip(batch, depth):
                    key = keys[todo[item["j"]]]
                    files.add(key, writer.submit(cache.write, key, d))
                files.finish(keep=2 * batch_size)  # earlier batches' files were written while this one ran
            files.finish(keep=0)
        bar.close()
        cache.record_sources(recorded)
        return cache_root


@dataclass
class _PendingMaps:
    """Depth maps being written by :func:`estimate_depth_for_dataset`'s writer threads; a finished map's source
    goes into ``recorded`` (written to the cache every 50 maps, so a killed run resumes there)."""

    cache: DepthCache
    recorded: dict[str, Any]
    current: dict[str, Any]
    bar: Any
    count: int = 0
    writes: deque[tuple[str, Future[Path]]] = field(default_factory=deque)

    def add(self, key: str, write: Future[Path]) -> None:
        self.writes.append((key, write))

    def finish(self, keep: int) -> None:
        """Wait for all but the last ``keep`` writes (in order; a write's error is raised here)."""
        while len(self.writes) > keep:
            key, write = self.writes.popleft()
            write.result()
            if key in self.current:
                self.recorded[key] = self.current[key]
            self.count += 1
            self.bar.update(1)
            if self.count % 50 == 0:
                self.cache.record_sources(self.recorded)


def _open_cache(cache_root: Path, depth_model: DepthModel, flip_tta: bool, model_identity: str | None,
                precision: Precision | None = None) -> DepthCache:
    """The depth cache for ``depth_model``'s maps, emptied first when another model version, or the same model
    under another autocast precision, made it."""
    name = (precision or FULL_PRECISION).name
    extra: dict[str, Any] = {"flip_tta": flip_tta}
    if name != "fp32":  # full-precision caches keep the metadata they had before autocast was recorded
        extra["precision"] = name
    if model_identity is not None:
        extra["model_identity"] = model_identity
    meta_path = cache_root / META_NAME
    if meta_path.is_file():
        meta = DepthCache(cache_root).meta
        why = None
        if model_identity is not None and meta.get("model_identity") != model_identity:
            why = f"made by another version of depth model {depth_model.name!r}"
        elif meta.get("precision", "fp32") != name:
            why = f"estimated in {meta.get('precision', 'fp32')}, now in {name}"
        if why is not None:
            note(f"depth cache {cache_root}: {why}; estimating again")
            for png in cache_root.rglob("*.png"):
                png.unlink()
            meta_path.unlink()
            (cache_root / SOURCES_NAME).unlink(missing_ok=True)
    settings = DepthSettings(depth_model.name, depth_model.units,  # type: ignore[arg-type]
                             normalisation=depth_model.normalisation, extra=extra)
    return DepthCache(cache_root, settings)
