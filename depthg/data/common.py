"""Shared machinery of the dataset loaders: the item format, file reading, split lists and the errors.

Items are ``{"img" (3, H, W) in [0, 1], "label" (H, W) int64 (-1 = ignore), "depth"? (1, H, W),
"path", "key"}``; ``key`` names the item in every cache. What a reader provides besides its items is the
dataset protocol, :class:`depthg.dataset_protocol.SegmentationSource`, which :class:`SegmentationDataset`
implements. Bad input raises a :class:`DepthGError` subclass naming the file (docs/datasets.md).
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ..depth import DepthCache
from .transforms import Camera
from ..utils import DepthGError, digest, file_identity

__all__ = [
    "DatasetNotFoundError",
    "EmptySplitError",
    "UnpairedFilesError",
    "CorruptFileError",
    "DepthSizeMismatchError",
    "UnknownDatasetError",
    "InvalidDatasetError",
    "IMAGE_EXTENSIONS",
    "Sample",
    "SegmentationDataset",
    "read_image",
    "upright",
    "image_size",
    "image_array",
    "read_label",
    "image_to_tensor",
    "check_pairs",
    "describe_dir",
    "present",
    "lut_map",
    "default_palette",
    "listed_samples",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DatasetNotFoundError(DepthGError, FileNotFoundError):
    """A dataset root (or a folder of its layout) does not exist."""


class EmptySplitError(DepthGError, FileNotFoundError):
    """A split folder exists but holds no images."""


class UnpairedFilesError(DepthGError, ValueError):
    """Images without labels, or labels without images."""


class CorruptFileError(DepthGError, OSError):
    """An image or label file cannot be decoded (unreadable, truncated, wrong format)."""


class DepthSizeMismatchError(DepthGError, ValueError):
    """A depth map (or label) does not have its image's size."""


class UnknownDatasetError(DepthGError, ValueError):
    """``build_dataset`` got a name it does not know."""


class InvalidDatasetError(DepthGError, ValueError):
    """A dataset argument or metadata file does not fit (number of classes, split name, world.json, ...)."""


def present(path: Path) -> bool:
    """Whether the file ``path`` is there; a symbolic link to nothing is an error naming it (a file that is
    listed but cannot be read must not be skipped silently)."""
    if path.is_symlink() and not path.exists():
        raise CorruptFileError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; fix or "
                               "remove the link")
    return path.is_file()


def describe_dir(path: Path, limit: int = 10) -> str:
    """A short listing of ``path`` for error messages ("found instead: ...")."""
    if not path.is_dir():
        return f"{path} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{path} contains: {', '.join(names[:limit]) or '(nothing)'}{more}"


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` upright (:func:`upright`); wrap PIL's errors with the path (truncation
    included)."""
    if path.is_symlink() and not path.exists():
        raise CorruptFileError(f"cannot read {what} {path}: it is a symbolic link to {os.readlink(path)}, which does "
                               "not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        im = Image.open(path)
        im.load()  # decodes everything: truncated files raise here, not later in a worker
        return upright(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptFileError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from None


#: the EXIF tag that says how a camera held the picture (1: as stored; 2..8: mirrored and/or rotated)
EXIF_ORIENTATION = 0x0112


def upright(im: Image.Image) -> Image.Image:
    """The image as viewers show it: its EXIF orientation applied (a phone photo taken upright is stored
    sideways with orientation 6). Images and labels are both read so: a label drawn on the image as displayed
    (every viewer and annotation tool displays it upright) lines up with it, and a label file that carries
    an orientation of its own is shown, and so drawn, turned by it too (docs/datasets.md)."""
    if im.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
        return im
    turned = ImageOps.exif_transpose(im)
    turned.format = im.format  # the decoder's format (16-bit PNGs are told apart by it)
    im.close()
    return turned


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB image as uint8 (H, W, 3), whatever the file's mode (:func:`image_array`)."""
    path = Path(path)
    with _open(path, "image") as im:
        return image_array(im, str(path))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file as :func:`read_image` returns it (EXIF orientation applied), from its
    header (no decoding)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            width, height = im.size
            turned = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn swaps the sides
            return (height, width) if turned else (width, height)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptFileError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


# PIL modes holding 16 bits per sample; PIL's convert("RGB") clips them at 255 (all white).
_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def image_array(im: Image.Image, where: str = "image") -> np.ndarray:
    """A decoded PIL image as RGB uint8 (H, W, 3): 8-bit modes by PIL, 16-bit grey scaled by 255/65535,
    alpha composited over black; float and 32-bit integer modes are refused (docs/datasets.md)."""
    mode = im.mode
    if mode in _MODES_16BIT or (mode == "I" and im.format == "PNG"):
        arr = np.asarray(im).astype(np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise CorruptFileError(f"{where}: 16-bit image holds values outside 0..65535 ({arr.min():g}..{arr.max():g})")
        grey = np.rint(arr * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("F", "I", "LAB", "HSV"):
        raise CorruptFileError(
            f"{where}: image mode {mode!r} ({'32-bit float' if mode == 'F' else '32-bit integer' if mode == 'I' else mode} "
            "samples) has no known display range; expected an 8-bit or 16-bit RGB or grey image"
        )
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    try:
        if has_alpha:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
            alpha = rgba[:, :, 3:] / 255.0
            return np.rint(rgba[:, :, :3] * alpha).astype(np.uint8)
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except ValueError as err:
        raise CorruptFileError(f"{where}: cannot convert image mode {mode!r} to RGB ({err})") from None


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Single-channel label PNG as its raw integer values (H, W), int64."""
    path = Path(path)
    with _open(path, "label") as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise CorruptFileError(f"label {path} must be a single-channel image of class ids, got shape {arr.shape}")
    return arr.astype(np.int64)


def image_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def check_pairs(images: dict[str, Path], labels: dict[str, Path], what: str, image_dir: Path, label_dir: Path) -> None:
    """Raise :class:`UnpairedFilesError` when the two stem sets differ, listing the unmatched stems."""
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if not no_label and not no_image:
        return

    def show(xs: list[str]) -> str:
        return ", ".join(xs[:10]) + (f", ... ({len(xs) - 10} more)" if len(xs) > 10 else "")

    parts = []
    if no_label:
        parts.append(f"{len(no_label)} image(s) in {image_dir} have no label in {label_dir}: {show(no_label)}")
    if no_image:
        parts.append(f"{len(no_image)} label(s) in {label_dir} have no image in {image_dir}: {show(no_image)}")
    raise UnpairedFilesError(f"{what}: images and labels are paired by file stem; " + "; ".join(parts))


@dataclass(frozen=True)
class Sample:
    """One item on disk: its cache key, image file and (optional) label file."""

    key: str
    image: Path
    label: Path | None


class SegmentationDataset(Dataset):
    """Base class of the readers; it provides the whole dataset protocol (:class:`depthg.dataset_protocol.
    SegmentationSource`). Subclasses implement :meth:`_find_samples`, set ``name``, ``n_classes``,
    ``class_names``, ``palette`` and the label table ``lut`` (raw value → class id, -1 = ignore) or override
    :meth:`map_label`, and may override the readers; ``transform`` is a callable on the item dict."""

    name: ClassVar[str] = "dataset"
    n_classes: int
    class_names: list[str]
    palette: np.ndarray
    lut: np.ndarray
    #: each class's category (Cityscapes: flat, construction, object, nature, sky, human, vehicle), or None
    class_categories: list[str] | None = None

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        depth_dir: str | os.PathLike | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if depth_dir is not None and not isinstance(depth_dir, (str, os.PathLike)):
            raise TypeError(f"depth_dir must be a path, got {depth_dir!r} (pass classes / n_classes by keyword)")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be a callable on item dicts, got {transform!r}")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.samples: list[Sample] = self._find_samples()
        if not self.samples:
            raise EmptySplitError(f"{self.name}: no images for split {split!r} under {self.root}")
        self.depth_cache = DepthCache(Path(depth_dir)) if depth_dir is not None else None

    def _find_samples(self) -> list[Sample]:
        raise NotImplementedError

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        return lut_map(raw, self.lut)

    def load_image_array(self, sample: Sample) -> np.ndarray:
        return read_image(sample.image)

    def load_raw_label(self, sample: Sample) -> np.ndarray | None:
        return read_label(sample.label) if sample.label is not None else None

    def load_depth(self, sample: Sample) -> torch.Tensor | None:
        return self.depth_cache.read(sample.key) if self.depth_cache is not None else None

    def depth_path(self, sample: Sample) -> Path | None:
        """The file :meth:`load_depth` reads (for error messages)."""
        return self.depth_cache.path(sample.key) if self.depth_cache is not None else None

    def item_identity(self, index: int, parts: tuple[str, ...] = ("img", "label", "depth")) -> list[Any]:
        """``[[name, size, mtime_ns], ...]`` of the files of ``parts`` item ``index`` is read from."""
        sample = self.samples[index]
        files = [sample.image] if "img" in parts else []
        if "label" in parts and sample.label is not None:
            files.append(sample.label)
        depth = self.depth_path(sample) if "depth" in parts else None
        out = []
        for path in files + ([depth] if depth is not None else []):
            try:
                out.append([path.name, *file_identity(path)])
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.name}: file of item {self.samples[index].key!r} not found: {path}") from None
        return out

    def label_mapping(self) -> dict[str, Any]:
        """What turns raw label values into class ids (part of every label-holding artefact's key)."""
        return {"dataset": self.name, "n_classes": int(self.n_classes), "class_names": list(self.class_names)}

    def content_digest(self, parts: tuple[str, ...] = ("img", "label", "depth")) -> str:
        """A key over what the items' ``parts`` hold: the keys, the identity (size, modification time) of every
        source file of ``parts`` and, when labels count, the label mapping."""
        items = [self.item_identity(n, parts) for n in range(len(self))]
        mapping = self.label_mapping() if "label" in parts else None
        return digest({"keys": list(self.keys), "items": items, "labels": mapping, "parts": list(parts)})

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]

    @property
    def source_dirs(self) -> list[Path]:
        """Folders holding the source images and labels (caches must stay out of them)."""
        dirs = {s.image.parent for s in self.samples} | {s.label.parent for s in self.samples if s.label}
        return sorted(dirs)

    def camera(self, index: int) -> Camera | None:
        """The pinhole camera of item ``index``'s full-resolution image; None: this dataset does not know it
        (readers with calibration files override this)."""
        return None

    def load_image_tensor(self, index: int) -> torch.Tensor:
        """Just the full-resolution image (3, H, W); used by depth estimation."""
        return image_to_tensor(self.load_image_array(self.samples[index]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        img = image_to_tensor(self.load_image_array(sample))
        h, w = img.shape[1:]
        raw = self.load_raw_label(sample)
        if raw is None:
            label = torch.full((h, w), -1, dtype=torch.int64)
        else:
            if raw.shape != (h, w):
                raise DepthSizeMismatchError(f"label {sample.label} is {raw.shape[1]}x{raw.shape[0]} but image {sample.image} is {w}x{h}")
            label = torch.from_numpy(self.map_label(raw).astype(np.int64))
        item: dict[str, Any] = {"img": img, "label": label, "path": str(sample.image), "key": sample.key}
        depth = self.load_depth(sample)
        if depth is not None:
            if tuple(depth.shape) != (1, h, w):
                where = self.depth_path(sample) or sample.key
                raise DepthSizeMismatchError(
                    f"depth map {where} has shape {tuple(depth.shape)[1:]} (HxW) but image {sample.image} is {h}x{w}"
                )
            item["depth"] = depth
        if self.transform is not None:
            item = self.transform(item)
        return item

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, n_classes={self.n_classes})"


def listed_samples(what: str, list_path: Path, split: str, where: str,
                   locate: Callable[[str], tuple[Path | None, Path | None | bool]]) -> list[Sample]:
    """The samples of the ids in a split list file, one per non-empty line.

    ``locate(id)`` returns (image, label): a path, None when the file is missing, or ``False`` for a label
    an unlabelled split does not have. ``where`` says which files were expected (for the error message).
    """
    ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
    if not ids:
        raise EmptySplitError(f"{what} {list_path} is empty")
    found = [(i, *locate(i)) for i in ids]
    no_image = [i for i, image, _ in found if image is None]
    no_label = [i for i, _, label in found if label is None]
    if no_image or no_label:
        raise UnpairedFilesError(
            f"{what} {list_path} lists {len(ids)} ids but {len(no_image)} images are missing (e.g. {no_image[:5]}) "
            f"and {len(no_label)} labels are missing (e.g. {no_label[:5]}); expected {where}"
        )
    return [Sample(f"{split}/{i}", image, label or None) for i, image, label in found]


def default_palette(n: int) -> np.ndarray:
    """``n`` distinct colours (golden-ratio hue steps), uint8 (n, 3)."""
    return np.array(
        [[round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)] for i in range(n)],
        dtype=np.uint8,
    ).reshape(n, 3)


def lut_map(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map raw integer labels through a lookup table; values outside the table become -1."""
    out = np.full(raw.shape, -1, dtype=np.int64)
    inside = (raw >= 0) & (raw < len(lut))
    out[inside] = lut[raw[inside]]
    return out
