"""Resize-and-centre-crop of dataset items (image, label and depth together).

STEGO/DepthG train on crops resized so the short side is ``res`` and centre-cropped to ``res × res``
(released_code.md §4.4 "At training time"); evaluation does the same at 320 (§5 "Resize"). The
released code resizes **everything with nearest neighbour**, the RGB image included
(``T.Resize(res, Image.NEAREST)``), which aliases the image. Two modes:

* ``mode="paper"`` (default): image bilinear with antialiasing; label and depth nearest (a label
  cannot be interpolated; interpolating depth would invent depths across object borders).
* ``mode="released"``: everything nearest, bug for bug.

Nearest uses ``"nearest-exact"`` (pixel-centre aligned), which matches PIL's NEAREST that the released
torchvision transforms ran on PIL images. The new size follows torchvision's ``Resize(int)``: short
side = ``res``, long side = ``int(res * long / short)``; the crop offset is
``int(round((size - res) / 2))`` as in torchvision's ``center_crop``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = ["resize_center_crop", "resized_size", "center_crop_box"]


def resized_size(h: int, w: int, res: int) -> tuple[int, int]:
    """torchvision ``Resize(res)``: the short side becomes ``res``, the aspect ratio is kept."""
    if h <= w:
        return res, int(res * w / h)
    return int(res * h / w), res


def center_crop_box(h: int, w: int, ch: int, cw: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``center_crop``."""
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))


def _resize(t: torch.Tensor, size: tuple[int, int], how: str) -> torch.Tensor:
    x = t[None].float() if t.ndim == 3 else t[None, None].float()
    if how == "bilinear":
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    else:
        y = F.interpolate(x, size=size, mode="nearest-exact")
    y = y[0] if t.ndim == 3 else y[0, 0]
    return y.to(t.dtype) if not t.is_floating_point() else y


def resize_center_crop(item: dict[str, Any], res: int, mode: Literal["paper", "released"] = "paper") -> dict[str, Any]:
    """Return a copy of ``item`` with img/label/depth (and their ``*_pos``) resized and centre-cropped.

    ``img`` (3, H, W) float, ``label`` (H, W) int64, ``depth`` (1, H, W) float must share H, W.
    """
    if mode not in ("paper", "released"):
        raise ValueError(f"mode must be 'paper' or 'released', got {mode!r}")
    out = dict(item)
    for suffix in ("", "_pos"):
        img_key = "img" + suffix
        if img_key not in item:
            continue
        h, w = item[img_key].shape[-2:]
        size = resized_size(h, w, res)
        top, left = center_crop_box(*size, res, res)
        for key, how in ((img_key, "bilinear" if mode == "paper" else "nearest"),
                         ("label" + suffix, "nearest"), ("depth" + suffix, "nearest")):
            if key not in item:
                continue
            t = item[key]
            if tuple(t.shape[-2:]) != (h, w):
                raise ValueError(f"{key} has size {tuple(t.shape[-2:])} but {img_key} has {(h, w)} (item {item.get('key')!r})")
            out[key] = _resize(t, size, how)[..., top : top + res, left : left + res].contiguous()
    return out
