"""The datasets by name: :func:`build_dataset` and the class-name and palette tables per setting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .cityscapes import (
    CITYSCAPES_19_CLASSES,
    CITYSCAPES_19_PALETTE,
    CITYSCAPES_27_CLASSES,
    CITYSCAPES_27_PALETTE,
    Cityscapes,
)
from .cocostuff import COCOSTUFF_27_CLASSES, COCOSTUFF_27_PALETTE, CocoStuff
from .common import SegmentationDataset, UnknownDatasetError
from .directory import ImageDirectory
from .potsdam import POTSDAM_3_CLASSES, POTSDAM_3_PALETTE, POTSDAM_6_CLASSES, POTSDAM_6_PALETTE, Potsdam

__all__ = ["DATASET_CLASSES", "PALETTES", "DATASETS", "build_dataset"]

#: build_dataset name -> (class, fixed keyword arguments, class names, palette); "directory" has its own.
_SETTINGS: dict[str, tuple[type, dict[str, Any], list[str] | None, np.ndarray | None]] = {
    "cityscapes": (Cityscapes, {}, CITYSCAPES_27_CLASSES, CITYSCAPES_27_PALETTE),
    "cityscapes27": (Cityscapes, {"classes": 27}, CITYSCAPES_27_CLASSES, CITYSCAPES_27_PALETTE),
    "cityscapes19": (Cityscapes, {"classes": 19}, CITYSCAPES_19_CLASSES, CITYSCAPES_19_PALETTE),
    "cocostuff": (CocoStuff, {}, COCOSTUFF_27_CLASSES, COCOSTUFF_27_PALETTE),
    "cocostuff27": (CocoStuff, {}, COCOSTUFF_27_CLASSES, COCOSTUFF_27_PALETTE),
    "potsdam": (Potsdam, {}, POTSDAM_3_CLASSES, POTSDAM_3_PALETTE),
    "potsdam3": (Potsdam, {"n_classes": 3}, POTSDAM_3_CLASSES, POTSDAM_3_PALETTE),
    "potsdam6": (Potsdam, {"n_classes": 6}, POTSDAM_6_CLASSES, POTSDAM_6_PALETTE),
    "directory": (ImageDirectory, {}, None, None),
}
#: build_dataset name -> (class, fixed keyword arguments)
DATASETS: dict[str, tuple[type, dict[str, Any]]] = {k: (cls, kw) for k, (cls, kw, _, _) in _SETTINGS.items()}
#: class-name lists per dataset setting
DATASET_CLASSES: dict[str, list[str]] = {k: v[2] for k, v in _SETTINGS.items() if v[2] is not None}
#: uint8 (n_classes, 3) colours, same keys as DATASET_CLASSES
PALETTES: dict[str, np.ndarray] = {k: v[3] for k, v in _SETTINGS.items() if v[3] is not None}


def build_dataset(name: str, root: str | os.PathLike, split: str, **kwargs: Any) -> SegmentationDataset:
    """Construct a dataset by name (``Config.dataset``); extra keyword arguments go to its constructor."""
    if name not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    cls, fixed = DATASETS[name]
    return cls(Path(root), split, **{**fixed, **kwargs})
