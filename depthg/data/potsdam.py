"""ISPRS Potsdam tiles as packaged by STEGO/IIC (``.mat`` or ``.png``), in 3 or 6 classes.

Split lists ``labelled_train.txt`` ("train"), ``labelled_test.txt`` ("val"), ``unlabelled_train.txt``,
``all.txt``; ``imgs/{id}`` and ``gt/{id}``. Values outside the class map are ignored, not class 0 as
released (docs/datasets.md). Keys are ``"{split}/{id}"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.io

from .common import (
    InvalidDatasetError,
    present,
    CorruptFileError,
    DatasetNotFoundError,
    Sample,
    SegmentationDataset,
    describe_dir,
    listed_samples,
    read_image,
    read_label,
)

__all__ = ["Potsdam", "POTSDAM_3_CLASSES", "POTSDAM_6_CLASSES", "POTSDAM_3_PALETTE", "POTSDAM_6_PALETTE"]

POTSDAM_6_CLASSES = ["impervious surfaces", "building", "low vegetation", "tree", "car", "clutter"]
POTSDAM_3_CLASSES = ["roads and cars", "buildings and clutter", "trees and vegetation"]
# ISPRS benchmark colours
POTSDAM_6_PALETTE = np.array(
    [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)], dtype=np.uint8
)
POTSDAM_3_PALETTE = np.array([(128, 128, 128), (0, 0, 255), (0, 160, 0)], dtype=np.uint8)

_LUT_6 = np.array([0, 1, 2, 3, 4, 5], dtype=np.int64)
_LUT_3 = np.array([0, 1, 2, 2, 0, 1], dtype=np.int64)

_SPLIT_FILES = {
    "train": "labelled_train.txt",
    "val": "labelled_test.txt",
    "labelled_train": "labelled_train.txt",
    "labelled_test": "labelled_test.txt",
    "unlabelled_train": "unlabelled_train.txt",
    "all": "all.txt",
}
_HOW_TO_GET = (
    "Get the Potsdam tiles as STEGO packages them (potsdam.zip from STEGO's dataset download: "
    "imgs/*.mat, gt/*.mat and the split lists) or convert ISPRS Potsdam to that layout."
)


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if present(p)), None)


class Potsdam(SegmentationDataset):
    """Potsdam-3 / Potsdam-6; see the module docstring."""

    name = "potsdam"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        depth_dir: str | os.PathLike | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        n_classes: int = 3,
    ) -> None:
        if n_classes == 3:
            self.lut, self.class_names, self.palette = _LUT_3, list(POTSDAM_3_CLASSES), POTSDAM_3_PALETTE
        elif n_classes == 6:
            self.lut, self.class_names, self.palette = _LUT_6, list(POTSDAM_6_CLASSES), POTSDAM_6_PALETTE
        else:
            raise InvalidDatasetError(f"Potsdam n_classes must be 3 or 6, got {n_classes!r}")
        if split not in _SPLIT_FILES:
            raise InvalidDatasetError(f"Potsdam split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
        self.n_classes = n_classes
        super().__init__(root, split, depth_dir=depth_dir, transform=transform)

    def _find_samples(self) -> list[Sample]:
        list_path = self.root / _SPLIT_FILES[self.split]
        if not (self.root / "imgs").is_dir() or not list_path.is_file():
            raise DatasetNotFoundError(
                f"Potsdam root {self.root} is not in the expected layout: need {list_path} and "
                f"{self.root / 'imgs'}/{{id}}.mat (+ gt/{{id}}.mat) ({describe_dir(self.root)}). " + _HOW_TO_GET
            )
        unlabelled = self.split == "unlabelled_train"

        def locate(i: str) -> tuple[Path | None, Path | None | bool]:
            image = _first_existing(self.root / "imgs" / f"{i}.mat", self.root / "imgs" / f"{i}.png")
            label = False if unlabelled else _first_existing(self.root / "gt" / f"{i}.mat", self.root / "gt" / f"{i}.png")
            return image, label

        return listed_samples("Potsdam split list", list_path, self.split,
                              f"{self.root / 'imgs'}/{{id}}.mat|png and {self.root / 'gt'}/{{id}}.mat|png", locate)

    @staticmethod
    def _loadmat(path: Path, key: str) -> np.ndarray:
        try:
            mat = scipy.io.loadmat(path)
        except Exception as err:  # scipy raises ValueError/OSError/MatReadError for bad files
            raise CorruptFileError(f"cannot read {path}: {type(err).__name__}: {err}") from None
        if key not in mat:
            keys = sorted(k for k in mat if not k.startswith("__"))
            raise CorruptFileError(f"{path} has no variable {key!r} (found {keys})")
        return np.asarray(mat[key])

    def load_image_array(self, sample: Sample) -> np.ndarray:
        if sample.image.suffix != ".mat":
            return read_image(sample.image)
        arr = self._loadmat(sample.image, "img")
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise CorruptFileError(f"{sample.image}: 'img' must be (H, W, C>=3) RGB(-IR), got shape {arr.shape}")
        arr = arr[:, :, :3]
        if arr.dtype == np.uint8:
            return arr.copy()
        if arr.dtype == np.uint16:  # 16-bit tiles: the full range maps to 0..255
            return np.rint(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
        if np.issubdtype(arr.dtype, np.floating):
            lo, hi = float(arr.min()), float(arr.max())
            if lo < 0 or hi > 1 or not np.isfinite(arr).all():
                raise CorruptFileError(f"{sample.image}: float 'img' must lie in [0, 1], found [{lo:g}, {hi:g}]")
            return np.rint(arr * 255.0).astype(np.uint8)
        raise CorruptFileError(f"{sample.image}: 'img' dtype {arr.dtype} unsupported (expected uint8, uint16 or float in [0, 1])")

    def load_raw_label(self, sample: Sample) -> np.ndarray | None:
        if sample.label is None:
            return None
        if sample.label.suffix != ".mat":
            return read_label(sample.label)
        arr = self._loadmat(sample.label, "gt")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim != 2:
            raise CorruptFileError(f"{sample.label}: 'gt' must be (H, W), got shape {arr.shape}")
        return arr.astype(np.int64)
