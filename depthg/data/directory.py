"""A folder of the user's own images: ``imgs/{split}``, optional ``labels/{split}``, ``depth/{split}/*.npy``
and ``classes.txt`` (docs/datasets.md). Images and labels are paired by file stem; keys are ``"{split}/{stem}"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..depth import validate_depth
from .common import (
    InvalidDatasetError,
    present,
    IMAGE_EXTENSIONS,
    DatasetNotFoundError,
    EmptySplitError,
    Sample,
    SegmentationDataset,
    UnpairedFilesError,
    check_pairs,
    default_palette,
    describe_dir,
    read_label,
)

__all__ = ["ImageDirectory"]


def _by_stem(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in exts or p.name.startswith(".") or not present(p):
            continue
        if p.stem in files:
            raise UnpairedFilesError(f"{folder}: two files share the stem {p.stem!r} ({files[p.stem].name}, {p.name}); stems must be unique")
        files[p.stem] = p
    return files


class ImageDirectory(SegmentationDataset):
    """The user's images; ``n_classes`` comes from the argument, the class names, or all splits' labels."""

    name = "directory"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        depth_dir: str | os.PathLike | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        n_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self._n_classes_arg, self._names_arg = n_classes, class_names
        super().__init__(root, split, depth_dir=depth_dir, transform=transform)
        self.npy_depth_dir = self.root / "depth" / split
        if depth_dir is None and self.npy_depth_dir.is_dir():
            missing = [s.key for s in self.samples if not (self.npy_depth_dir / f"{Path(s.key).name}.npy").is_file()]
            if missing:
                raise UnpairedFilesError(f"{self.npy_depth_dir}: {len(missing)} image(s) have no depth .npy, e.g. {missing[:5]}")
        else:
            self.npy_depth_dir = None  # type: ignore[assignment]
        self._set_classes()

    def _find_samples(self) -> list[Sample]:
        img_dir = self.root / "imgs" / self.split
        if not img_dir.is_dir():
            raise DatasetNotFoundError(
                f"image directory dataset: {img_dir} does not exist. Expected {self.root}/imgs/{{split}}/*.png|jpg "
                f"with optional labels/{{split}}/*.png and depth/{{split}}/*.npy ({describe_dir(self.root)})"
            )
        images = _by_stem(img_dir, IMAGE_EXTENSIONS)
        if not images:
            raise EmptySplitError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {img_dir} ({describe_dir(img_dir)})")
        lbl_dir = self.root / "labels" / self.split
        if not lbl_dir.is_dir():
            return [Sample(f"{self.split}/{stem}", images[stem], None) for stem in sorted(images)]
        labels = _by_stem(lbl_dir, IMAGE_EXTENSIONS)
        check_pairs(images, labels, f"image directory {self.split!r}", img_dir, lbl_dir)
        return [Sample(f"{self.split}/{stem}", images[stem], labels[stem]) for stem in sorted(images)]

    def _set_classes(self) -> None:
        names = list(self._names_arg) if self._names_arg is not None else None
        if names is None and (self.root / "classes.txt").is_file():
            names = [n.strip() for n in (self.root / "classes.txt").read_text().splitlines() if n.strip()]
        n = self._n_classes_arg if self._n_classes_arg is not None else (len(names) if names is not None else None)
        if n is None:  # from the labels of *every* split, so that all splits share one class mapping
            files = sorted(p for p in (self.root / "labels").glob("*/*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            values = [read_label(p) for p in files]
            n = 1 + max((int(v[v < 255].max()) for v in values if (v < 255).any()), default=-1)
        if names is not None and len(names) != n:
            raise InvalidDatasetError(f"{self.root}: {len(names)} class names but n_classes={n}")
        self.n_classes = n
        self.class_names = names if names is not None else [f"class {i}" for i in range(n)]
        self.palette = default_palette(n)

    @property
    def source_dirs(self) -> list[Path]:
        return [self.root / "imgs", self.root / "labels"]

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        return np.where((raw >= 0) & (raw < self.n_classes), raw, -1).astype(np.int64)

    def depth_path(self, sample: Sample) -> Path | None:
        if self.depth_cache is not None or self.npy_depth_dir is None:
            return super().depth_path(sample)
        return self.npy_depth_dir / f"{Path(sample.key).name}.npy"

    def load_depth(self, sample: Sample) -> torch.Tensor | None:
        if self.depth_cache is not None or self.npy_depth_dir is None:
            return super().load_depth(sample)
        path = self.npy_depth_dir / f"{Path(sample.key).name}.npy"
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DatasetNotFoundError(f"cannot read depth {path}: {err}") from None
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise InvalidDatasetError(f"depth {path} must be (H, W) or (1, H, W), got shape {arr.shape}")
        validate_depth(arr, str(path))
        return torch.from_numpy(arr)[None]
