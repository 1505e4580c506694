"""Datasets and their preparation (depth cache, five-crop, kNN); the synthetic world is :mod:`depthg.world`.

Every dataset returns dict items ``{"img", "label", "depth"?, "path", "key"}`` (see
:mod:`depthg.data.common`). :func:`build_dataset` picks one by the names ``Config.dataset`` uses.
"""

from __future__ import annotations

from .cityscapes import Cityscapes
from .cocostuff import CocoStuff
from .common import (
    CorruptFileError,
    DatasetNotFoundError,
    DepthSizeMismatchError,
    EmptySplitError,
    SegmentationDataset,
    UnknownDatasetError,
    UnpairedFilesError,
)
from .directory import ImageDirectory
from .potsdam import Potsdam
from .prepare import CroppedDataset, compute_knn, five_crop, prepare_training_data
from .registry import DATASET_CLASSES, DATASETS, PALETTES, build_dataset
from .transforms import resize_center_crop

__all__ = [
    "Cityscapes", "CocoStuff", "Potsdam", "ImageDirectory", "CroppedDataset", "SegmentationDataset",
    "build_dataset", "DATASET_CLASSES", "PALETTES", "DATASETS",
    "five_crop", "compute_knn", "prepare_training_data", "resize_center_crop",
    "DatasetNotFoundError", "EmptySplitError", "UnpairedFilesError", "CorruptFileError",
    "DepthSizeMismatchError", "UnknownDatasetError",
]
