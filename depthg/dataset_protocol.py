"""The dataset protocol: what a dataset hands to the depth cache, the five-crop, the kNN, the feature cache,
the trainer and the evaluation, written down once (:class:`SegmentationSource`).

Every reader in ``depthg.data`` (:class:`depthg.data.common.SegmentationDataset` and its subclasses:
Cityscapes and the synthetic world, COCO-Stuff, Potsdam, a directory of your own) and the five-crops
(:class:`depthg.data.prepare.CroppedDataset`) provide all of it; ``tests/test_datasets.py`` checks each. A
plain map-style dataset (``len`` and dict items ``{"img", "label", "key", ...}``, e.g. in tests and
benchmarks) is accepted too: the functions below read its items instead, and what is built from it is keyed
by its item keys only (no file identity, no content digest).

The module sits at the top of the package, below ``depthg.data``, because ``depthg.depth`` (whose depth
cache the readers in ``depthg.data`` use) walks datasets through it as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["SegmentationSource", "item_keys", "item_identities", "image_loader", "is_full_resolution", "item_camera"]

#: the item parts a key or an identity can cover
Parts = tuple[str, ...]


@runtime_checkable
class SegmentationSource(Protocol):
    """A dataset of segmentation items read from files.

    Items (``dataset[i]``) are ``{"img" (3, H, W) float in [0, 1], "label" (H, W) int64 (-1 = ignore),
    "depth"? (1, H, W) float (larger = farther), "path", "key"}``, after ``transform`` when one is set.
    Optional: ``class_categories`` (each class's coarser category, e.g. Cityscapes' seven), which the
    evaluation scores beside the classes, and ``camera(index)`` (:func:`item_camera`), the pinhole camera of
    an item's full-resolution image where the dataset has calibration.
    """

    #: the reader's name, recorded in every cache built from it ("cityscapes", ..., "cropped")
    name: str
    #: the dataset folder; nothing is ever written inside it
    root: Path
    #: the split the items come from ("train", "val", ...)
    split: str
    #: number of classes, their names and colours (``palette``: (n_classes, 3) uint8)
    n_classes: int
    class_names: list[str]
    palette: np.ndarray
    #: applied to every item; None for full-resolution items, which depth estimation and five-crop need
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None

    @property
    def keys(self) -> list[str]:
        """The item keys in index order: the names of the items in every cache (``"train/aachen/..."``)."""
        ...

    @property
    def source_dirs(self) -> list[Path]:
        """The folders the images and labels are read from; caches refuse to be written inside them."""
        ...

    def item_identity(self, index: int, parts: Parts = ("img", "label", "depth")) -> list[Any] | None:
        """``[[file name, size, mtime_ns], ...]`` of the files of ``parts`` item ``index`` is read from: what a
        derived artefact records to notice a changed source. None when the files are keyed by their content
        instead (:meth:`content_digest`), as the five-crops are."""
        ...

    def load_image_tensor(self, index: int) -> torch.Tensor:
        """The full-resolution image (3, H, W) of item ``index`` alone (no label or depth read)."""
        ...

    def content_digest(self, parts: Parts = ("img", "label", "depth")) -> str | None:
        """A key over what the items' ``parts`` hold (file identities or hashes, and the class mapping when
        labels count): equal keys mean equal data. None when the dataset cannot tell."""
        ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------------
# reading any dataset: the protocol's members, or the items of a plain map-style dataset
# ----------------------------------------------------------------------------------------------------
# ``isinstance(x, SegmentationSource)`` reads every member (``keys`` builds its list), so it is asked once
# per dataset and operation, never per item.


def item_keys(dataset: Any) -> list[str]:
    """The item keys of ``dataset``: its ``keys``, else each item's ``"key"`` (reads every item)."""
    if isinstance(dataset, SegmentationSource):
        return list(dataset.keys)
    return [dataset[i]["key"] for i in range(len(dataset))]


def item_identities(dataset: Any, parts: Parts = ("img", "label", "depth")) -> list[Any] | None:
    """Per item, the identity of the files of ``parts`` it is read from; None when the dataset cannot say
    (a plain dataset, or one keyed by content)."""
    if not isinstance(dataset, SegmentationSource):
        return None
    identities = [dataset.item_identity(n, parts) for n in range(len(dataset))]
    return None if any(i is None for i in identities) else identities


def image_loader(dataset: Any) -> Callable[[int], torch.Tensor]:
    """``index -> (3, H, W)`` image: ``load_image_tensor`` (the image file alone), else the item's ``"img"``."""
    if isinstance(dataset, SegmentationSource):
        return dataset.load_image_tensor
    return lambda index: dataset[index]["img"]


def is_full_resolution(dataset: Any) -> bool:
    """Whether the items come as stored (no ``transform``); a plain dataset's items are taken as stored."""
    return not (isinstance(dataset, SegmentationSource) and dataset.transform is not None)


def item_camera(dataset: Any, index: int) -> Any:
    """Item ``index``'s :class:`depthg.data.transforms.Camera` (its full-resolution image's pinhole camera), or
    None where the dataset has no ``camera`` method or no calibration for that item."""
    camera = getattr(dataset, "camera", None)  # optional member of the protocol
    return camera(index) if callable(camera) else None
