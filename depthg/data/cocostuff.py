"""COCO-Stuff-27: COCO-Stuff 164k with the 182 fine ids merged into STEGO's 27 coarse classes.

Layout ``images/``, ``annotations/``, ``curated/`` with ``{split}2017`` (or ``{split}``) sub-folders; "train"
reads the full curated list, "val" the IIC "subset 7" list (docs/datasets.md). Keys are ``"{split}/{id}"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import (InvalidDatasetError, DatasetNotFoundError, Sample, SegmentationDataset, describe_dir, listed_samples,
                     present)

__all__ = ["CocoStuff", "COCOSTUFF_27_CLASSES", "COCOSTUFF_27_PALETTE", "COCO_FINE_TO_COARSE"]

COCOSTUFF_27_CLASSES: list[str] = [
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
    "person", "sports", "vehicle", "ceiling", "floor", "food", "furniture", "rawmaterial", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
]  # the released names: "food" and "furniture" occur as thing and as stuff


def _ranges(*spec: int | tuple[int, int]) -> list[int]:
    out: list[int] = []
    for s in spec:
        out.extend(range(s[0], s[1] + 1) if isinstance(s, tuple) else [s])
    return out


# coarse id -> fine ids (0-based), STEGO's table
_COARSE_TO_FINE: dict[int, list[int]] = {
    0: _ranges((71, 76)), 1: _ranges((77, 82)), 2: _ranges((51, 60)), 3: _ranges((61, 70)),
    4: _ranges((83, 90)), 5: _ranges((43, 50)), 6: _ranges((25, 32)), 7: _ranges((15, 24)),
    8: _ranges((9, 14)), 9: [0], 10: _ranges((33, 42)), 11: _ranges((1, 8)),
    12: _ranges((101, 102)), 13: _ranges(100, (113, 117)), 14: _ranges((120, 121), 152, 169),
    15: _ranges(97, (106, 107), 109, 111, 122, 129, 132, 155, 160, 164),
    16: _ranges(99, 131, 138, 142), 17: _ranges((91, 92), (103, 104), 108, 130, 136, 140, 151, (166, 167)),
    18: _ranges((170, 176)), 19: _ranges((179, 180)), 20: _ranges((94, 95), 127, 150, 157, 165),
    21: _ranges(110, (124, 125), 135, 139, (143, 144), 146, 148, 153, 158),
    22: _ranges(93, 96, 118, 123, 128, 133, 141, 162, 168), 23: _ranges(105, 156),
    24: _ranges(126, 134, 149, 159, 161, 181), 25: _ranges(98, 112, 137, 145, 163),
    26: _ranges(119, 147, 154, (177, 178)),
}
COCO_FINE_TO_COARSE = np.full(256, -1, dtype=np.int64)
for _coarse, _fines in _COARSE_TO_FINE.items():
    COCO_FINE_TO_COARSE[_fines] = _coarse
assert (COCO_FINE_TO_COARSE[:182] >= 0).all() and sum(map(len, _COARSE_TO_FINE.values())) == 182

# A fixed, well-separated palette (the released code draws colours at random per run).
COCOSTUFF_27_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128), (70, 70, 70), (152, 251, 152), (107, 142, 35), (70, 130, 180),
    (190, 153, 153), (102, 102, 156), (0, 80, 160),
], dtype=np.uint8)

_LISTS = {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"}
_HOW_TO_GET = (
    "Get COCO 2017 images (http://images.cocodataset.org/zips/{train,val}2017.zip), the stuff+thing maps "
    "(stuffthingmaps_trainval2017.zip) into annotations/, and the IIC curated lists into curated/ "
    "(STEGO's cocostuff.zip has exactly this layout)."
)


class CocoStuff(SegmentationDataset):
    """COCO-Stuff-27 (curated lists); see the module docstring."""

    name = "cocostuff"
    class_names = list(COCOSTUFF_27_CLASSES)
    n_classes = 27
    palette = COCOSTUFF_27_PALETTE
    lut = COCO_FINE_TO_COARSE

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        depth_dir: str | os.PathLike | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if split not in _LISTS:
            raise InvalidDatasetError(f"CocoStuff split must be one of {sorted(_LISTS)}, got {split!r}")
        self.image_list = _LISTS[split]
        super().__init__(root, split, depth_dir=depth_dir, transform=transform)

    def _folder(self, kind: str) -> Path:
        base = self.root / kind
        for name in (f"{self.split}2017", self.split):
            if (base / name).is_dir():
                return base / name
        raise DatasetNotFoundError(
            f"COCO-Stuff root {self.root}: missing {base}/{self.split}2017 ({describe_dir(base)}). Expected "
            "images/{train2017,val2017}/{id}.jpg, annotations/{train2017,val2017}/{id}.png and "
            f"curated/{{train2017,val2017}}/{self.image_list}. " + _HOW_TO_GET
        )

    def _find_samples(self) -> list[Sample]:
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"COCO-Stuff root {self.root} does not exist. " + _HOW_TO_GET)
        list_path = self._folder("curated") / self.image_list
        if not list_path.is_file():
            raise DatasetNotFoundError(f"COCO-Stuff image list {list_path} not found ({describe_dir(list_path.parent)}). " + _HOW_TO_GET)
        img_dir, lbl_dir = self._folder("images"), self._folder("annotations")

        def locate(i: str) -> tuple[Path | None, Path | None]:
            image, label = img_dir / f"{i}.jpg", lbl_dir / f"{i}.png"
            return (image if present(image) else None), (label if present(label) else None)

        return listed_samples("COCO-Stuff image list", list_path, self.split,
                              f"{img_dir}/{{id}}.jpg and {lbl_dir}/{{id}}.png", locate)
