"""Cityscapes in its official (torchvision) layout, in the paper's 27 classes, the 19 trainIds or the world's.

``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and ``gtFine/{split}/{city}/*_gtFine_labelIds.png``, with
optional ``disparity/`` and ``camera/`` for stereo depth; the synthetic world writes the same layout
(docs/datasets.md). Keys are ``"{split}/{city}/{city}_{seq}_{frame}"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from cityscapesscripts.helpers.labels import id2label, labels as CS_LABELS

from ..depth import read_camera
from .common import (
    InvalidDatasetError,
    present,
    DatasetNotFoundError,
    EmptySplitError,
    Sample,
    SegmentationDataset,
    check_pairs,
    describe_dir,
    image_size,
)
from .transforms import Camera

__all__ = ["Cityscapes", "CITYSCAPES_27_CLASSES", "CITYSCAPES_19_CLASSES", "CITYSCAPES_27_PALETTE", "CITYSCAPES_19_PALETTE"]

_IMG_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"

# 27 classes: every label of a non-void category, in id order (ids 7..33); 19: the trainIds.
_LABELS_27 = sorted((lab for lab in CS_LABELS if lab.category != "void" and lab.id >= 0), key=lambda lab: lab.id)
_LABELS_19 = sorted((lab for lab in CS_LABELS if 0 <= lab.trainId < 255), key=lambda lab: lab.trainId)
assert [lab.id for lab in _LABELS_27] == list(range(7, 34)), "cityscapesscripts label table changed"
assert [lab.trainId for lab in _LABELS_19] == list(range(19))

CITYSCAPES_27_CLASSES: list[str] = [lab.name for lab in _LABELS_27]
CITYSCAPES_19_CLASSES: list[str] = [lab.name for lab in _LABELS_19]
CITYSCAPES_27_PALETTE = np.array([lab.color for lab in _LABELS_27], dtype=np.uint8)
CITYSCAPES_19_PALETTE = np.array([lab.color for lab in _LABELS_19], dtype=np.uint8)

_N_IDS = 256  # labelIds PNGs are uint8


def _lut(pairs: list[tuple[int, int]]) -> np.ndarray:
    lut = np.full(_N_IDS, -1, dtype=np.int64)
    for label_id, cls in pairs:
        lut[label_id] = cls
    return lut


_LUT_27 = _lut([(lab.id, i) for i, lab in enumerate(_LABELS_27)])
_LUT_19 = _lut([(lab.id, lab.trainId) for lab in CS_LABELS if 0 <= lab.trainId < 255 and lab.id >= 0])

_HOW_TO_GET = (
    "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com "
    "(or `csDownload` from cityscapesscripts) and pass the folder that contains leftImg8bit/ and gtFine/; "
    "or build the embedded synthetic world with `python -m depthg synthesize` (depthg.world.make_world)."
)


def _world_label_ids(root: str | os.PathLike) -> list[int]:
    """Label ids listed in ``root/world.json`` (the synthetic world's class list)."""
    path = Path(root) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"classes='world' needs {path} (written by depthg.world.make_world); it does not exist")
    try:
        ids = [int(i) for i in json.loads(path.read_text())["label_ids"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InvalidDatasetError(f"{path}: expected {{\"label_ids\": [int, ...]}}: {err}") from None
    bad = [i for i in ids if i not in id2label or i < 0]
    if bad or len(set(ids)) != len(ids) or not ids:
        raise InvalidDatasetError(f"{path}: label_ids must be distinct Cityscapes label ids (0..33), got {ids}")
    return ids


class Cityscapes(SegmentationDataset):
    """Cityscapes ``gtFine``; ``classes`` = 27 (ids 7..33), 19 (trainIds) or "world" (``root/world.json``)."""

    name = "cityscapes"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        depth_dir: str | os.PathLike | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        classes: Literal[27, 19, "world"] | int | str = 27,
    ) -> None:
        root = Path(root)
        self.classes = classes
        if classes in (27, "27"):
            self.lut, self.class_names, self.palette = _LUT_27, list(CITYSCAPES_27_CLASSES), CITYSCAPES_27_PALETTE
            self.class_categories = [lab.category for lab in _LABELS_27]
        elif classes in (19, "19"):
            self.lut, self.class_names, self.palette = _LUT_19, list(CITYSCAPES_19_CLASSES), CITYSCAPES_19_PALETTE
            self.class_categories = [lab.category for lab in _LABELS_19]
        elif classes == "world":
            ids = _world_label_ids(root)
            self.lut = _lut([(i, k) for k, i in enumerate(ids)])
            self.class_names = [id2label[i].name for i in ids]
            self.palette = np.array([id2label[i].color for i in ids], dtype=np.uint8)
            self.class_categories = [id2label[i].category for i in ids]
        else:
            raise InvalidDatasetError(f"Cityscapes classes must be 27, 19 or 'world', got {classes!r}")
        self.n_classes = len(self.class_names)
        super().__init__(root, split, depth_dir=depth_dir, transform=transform)

    def _find_samples(self) -> list[Sample]:
        img_root, lbl_root = self.root / "leftImg8bit", self.root / "gtFine"
        if not img_root.is_dir() or not lbl_root.is_dir():
            hint = ""
            if (self.root / "cityscapes" / "leftImg8bit").is_dir():
                hint = f" Did you mean {self.root / 'cityscapes'}? data_dir is the dataset root itself."
            raise DatasetNotFoundError(
                f"Cityscapes root {self.root} is not in the expected layout: need {img_root}/{{split}}/{{city}}/"
                f"*{_IMG_SUFFIX} and {lbl_root}/{{split}}/{{city}}/*{_LABEL_SUFFIX} ({describe_dir(self.root)}).{hint} "
                + _HOW_TO_GET
            )
        img_dir, lbl_dir = img_root / self.split, lbl_root / self.split
        if not img_dir.is_dir():
            splits = sorted(p.name for p in img_root.iterdir() if p.is_dir())
            raise EmptySplitError(f"Cityscapes split {self.split!r} not found: {img_dir} does not exist (splits found: {splits})")
        images = {p.relative_to(img_dir).as_posix()[: -len(_IMG_SUFFIX)]: p for p in img_dir.glob(f"*/*{_IMG_SUFFIX}")
                  if present(p)}
        if not images:
            raise EmptySplitError(f"Cityscapes split {self.split!r}: no */*{_IMG_SUFFIX} files in {img_dir} ({describe_dir(img_dir)})")
        labels = {p.relative_to(lbl_dir).as_posix()[: -len(_LABEL_SUFFIX)]: p for p in lbl_dir.glob(f"*/*{_LABEL_SUFFIX}")
                  if present(p)}
        check_pairs(images, labels, f"Cityscapes {self.split!r}", img_dir, lbl_dir)
        return [Sample(f"{self.split}/{stem}", images[stem], labels[stem]) for stem in sorted(images)]

    @property
    def source_dirs(self) -> list[Path]:
        return [self.root / "leftImg8bit", self.root / "gtFine"]

    def _stem(self, key: str) -> tuple[str, str]:
        split, city, stem = key.split("/")
        return f"{split}/{city}", stem

    def disparity_path(self, key: str) -> Path:
        """``disparity/{split}/{city}/{stem}_disparity.png`` for an item key."""
        folder, stem = self._stem(key)
        return self.root / "disparity" / folder / f"{stem}_disparity.png"

    def camera_path(self, key: str) -> Path:
        """``camera/{split}/{city}/{stem}_camera.json`` for an item key."""
        folder, stem = self._stem(key)
        return self.root / "camera" / folder / f"{stem}_camera.json"

    def camera(self, index: int) -> Camera | None:
        """The camera of ``camera/.../*_camera.json`` (the synthetic world writes them too) at the size of the
        image file; None without the file."""
        sample = self.samples[index]
        path = self.camera_path(sample.key)
        if not path.is_file():
            return None
        cam = read_camera(path)
        width, height = image_size(sample.image)
        return Camera(cam["fx"], cam["fy"], cam["u0"], cam["v0"], height, width)
