"""Resize-and-centre-crop of dataset items (image, label and depth together).

STEGO/DepthG train on crops resized so the short side is ``res`` and centre-cropped to ``res × res``;
evaluation does the same at 320. The new size follows torchvision's ``Resize(int)``: short side = ``res``,
long side = ``int(res * long / short)``; the crop offset is ``int(round((size - res) / 2))`` as in
torchvision's ``center_crop``.

A :class:`Resize` names how the image and how the label/depth are resized. :data:`PAPER_RESIZE`: the
image bilinear with antialiasing, label and depth with torch's ``nearest-exact`` (a label cannot be
interpolated; interpolating depth would invent depths across object borders). :data:`RELEASED_RESIZE`:
all three with PIL's NEAREST rule, as the released code does (``depthg.method.released.pil_nearest_resize``,
docs/fidelity.md §3.8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from depthg.method.released import pil_nearest_resize

__all__ = ["Camera", "Resize", "PAPER_RESIZE", "RELEASED_RESIZE", "RESIZES", "resize_center_crop", "resized_size", "center_crop_box",
           "bilinear_resize", "nearest_exact_resize"]


def resized_size(h: int, w: int, res: int) -> tuple[int, int]:
    """torchvision ``Resize(res)``: the short side becomes ``res``, the aspect ratio is kept."""
    if h <= w:
        return res, int(res * w / h)
    return int(res * h / w), res


def center_crop_box(h: int, w: int, ch: int, cw: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``center_crop``."""
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))


def _interpolate(t: torch.Tensor, size: tuple[int, int], **how: Any) -> torch.Tensor:
    """``F.interpolate`` of the last two dims of a (C, H, W) or (H, W) tensor, dtype kept."""
    x = t[None].float() if t.ndim == 3 else t[None, None].float()
    y = F.interpolate(x, size=size, **how)
    y = y[0] if t.ndim == 3 else y[0, 0]
    return y.to(t.dtype) if not t.is_floating_point() else y


def bilinear_resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) or (H, W) -> size (h, w): bilinear with antialiasing (the paper path's image resize)."""
    return _interpolate(t, size, mode="bilinear", align_corners=False, antialias=True)


def nearest_exact_resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) or (H, W) -> size (h, w): torch's ``nearest-exact`` (the paper path's label/depth resize)."""
    return _interpolate(t, size, mode="nearest-exact")


@dataclass(frozen=True)
class Resize:
    """How :func:`resize_center_crop` resizes: ``image`` and ``other`` (label, depth) map a tensor and a
    size (h, w) to the resized tensor; ``name`` is recorded in caches and evaluation results."""

    name: str
    image: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
    other: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


PAPER_RESIZE = Resize("paper", bilinear_resize, nearest_exact_resize)
RELEASED_RESIZE = Resize("released", pil_nearest_resize, pil_nearest_resize)
#: the mode -> resize table, the only one: ``depthg.build.Fidelity``'s presets and the kNN preparation read it.
RESIZES = {r.name: r for r in (PAPER_RESIZE, RELEASED_RESIZE)}


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in one image's pixels: focal lengths ``fx``, ``fy`` and principal point ``cx``, ``cy``
    (pixel centres at integers), and that image's ``height`` x ``width``. Following an image through a crop
    and :func:`resize_center_crop` gives the camera of every training crop (the FPS unprojection's)."""

    fx: float
    fy: float
    cx: float
    cy: float
    height: int
    width: int

    def crop(self, top: int, left: int, height: int, width: int) -> "Camera":
        """The camera of the ``height`` x ``width`` window at (``top``, ``left``)."""
        return Camera(self.fx, self.fy, self.cx - left, self.cy - top, height, width)

    def resized_center_crop(self, res: int) -> "Camera":
        """The camera of :func:`resize_center_crop` (short side to ``res``, centre ``res`` x ``res``); a resize by
        s maps pixel centre u to (u + 0.5) s - 0.5."""
        size = resized_size(self.height, self.width, res)
        top, left = center_crop_box(*size, res, res)
        sy, sx = size[0] / self.height, size[1] / self.width
        return Camera(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5 - left, (self.cy + 0.5) * sy - 0.5 - top,
                      res, res)

    def intrinsics(self) -> list[float]:
        """``[fx, fy, cx, cy]``."""
        return [self.fx, self.fy, self.cx, self.cy]


def resize_center_crop(item: dict[str, Any], res: int, resize: Resize = PAPER_RESIZE) -> dict[str, Any]:
    """A copy of ``item`` with img/label/depth (and their ``*_pos``) resized by ``resize`` and centre-cropped.

    ``img`` (3, H, W) float, ``label`` (H, W) int64, ``depth`` (1, H, W) float must share H, W; the output
    tensors are (…, res, res).
    """
    out = dict(item)
    for suffix in ("", "_pos"):
        img_key = "img" + suffix
        if img_key not in item:
            continue
        h, w = item[img_key].shape[-2:]
        size = resized_size(h, w, res)
        top, left = center_crop_box(*size, res, res)
        for key, fn in ((img_key, resize.image), ("label" + suffix, resize.other), ("depth" + suffix, resize.other)):
            if key not in item:
                continue
            t = item[key]
            if tuple(t.shape[-2:]) != (h, w):
                raise ValueError(f"{key} has size {tuple(t.shape[-2:])} but {img_key} has {(h, w)} (item {item.get('key')!r})")
            out[key] = fn(t, size)[..., top : top + res, left : left + res].contiguous()
    return out
