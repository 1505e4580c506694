"""Resize-and-centre-crop of dataset items (image, label and depth together).

STEGO/DepthG train on crops resized so the short side is ``res`` and centre-cropped to ``res × res``;
evaluation does the same at 320 (docs/released_golden.md). The released code resizes **everything with
nearest neighbour**, the RGB image included (torchvision ``Resize(res, NEAREST)`` on PIL images),
which aliases the image. Two modes:

* ``mode="paper"`` (default): image bilinear with antialiasing; label and depth with torch's
  ``"nearest-exact"`` (a label cannot be interpolated; interpolating depth would invent depths across
  object borders).
* ``mode="released"``: image, label and depth all with **PIL's NEAREST rule**, reproduced exactly by
  :func:`pil_nearest_indices` (an index gather, so any dtype is copied bit for bit).

The two nearest rules are *not* the same. Both pick the source pixel under the centre of each output
pixel, but PIL walks the output row by adding the scale in double precision, and where a centre falls
exactly on a source-pixel border the accumulated rounding decides the side, while ``nearest-exact``
computes every position afresh in float32. On a Cityscapes frame (2048 x 1024, or its 1024 x 512
five-crop) resized to a 224 px crop, 18.7 % of the pixels come from a different source pixel (10.2 % at
320 px; docs/released_golden.md).

The new size follows torchvision's ``Resize(int)``: short side = ``res``, long side =
``int(res * long / short)``; the crop offset is ``int(round((size - res) / 2))`` as in torchvision's
``center_crop``.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import accumulate, repeat
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = ["resize_center_crop", "resized_size", "center_crop_box", "pil_nearest_indices"]


def resized_size(h: int, w: int, res: int) -> tuple[int, int]:
    """torchvision ``Resize(res)``: the short side becomes ``res``, the aspect ratio is kept."""
    if h <= w:
        return res, int(res * w / h)
    return int(res * h / w), res


def center_crop_box(h: int, w: int, ch: int, cw: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``center_crop``."""
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))


@lru_cache(maxsize=64)
def _pil_nearest_tuple(n_in: int, n_out: int) -> tuple[int, ...]:
    scale = n_in / n_out  # source pixels per output pixel, a Python (C double) float as in PIL
    # position of output pixel k's centre in source coordinates, accumulated by repeated addition
    # (start at half a step, then add the scale) exactly as PIL's affine scaling loop does it
    positions = accumulate(repeat(scale, n_out - 1), initial=scale * 0.5)
    # truncation towards zero picks the source pixel; the clamp only guards the last pixel
    return tuple(min(int(p), n_in - 1) for p in positions)


def pil_nearest_indices(n_in: int, n_out: int) -> torch.Tensor:
    """Source index of every output pixel of PIL's NEAREST resize along one axis, (n_out,) int64.

    PIL (``Image.resize(size, NEAREST)`` with the whole image as the box) places output pixel k at
    source position ``p_k = s/2 + s + ... + s`` (k additions, s = n_in / n_out, in double precision)
    and copies source pixel ``int(p_k)``. Repeated addition is not the same as computing
    ``(k + 0.5) * s`` once: where ``(k + 0.5) * s`` is an exact integer (a tie between two source
    pixels) the accumulated rounding can land on either side, and that is the pixel PIL copies.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    return torch.tensor(_pil_nearest_tuple(int(n_in), int(n_out)), dtype=torch.long)


def _resize(t: torch.Tensor, size: tuple[int, int], how: str) -> torch.Tensor:
    """Resize the last two dims of ``t`` ((C, H, W) or (H, W)) to ``size`` = (h, w)."""
    if how == "pil_nearest":
        rows = pil_nearest_indices(t.shape[-2], size[0]).to(t.device)
        cols = pil_nearest_indices(t.shape[-1], size[1]).to(t.device)
        # a pure gather: every output value is a copy of one input value, dtype kept
        return t.index_select(-2, rows).index_select(-1, cols)
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
    Output tensors are (…, res, res). ``mode="released"`` resizes all three with PIL's NEAREST rule,
    ``mode="paper"`` the image bilinearly and label/depth with torch's ``nearest-exact``.
    """
    if mode not in ("paper", "released"):
        raise ValueError(f"mode must be 'paper' or 'released', got {mode!r}")
    how_img, how_other = ("bilinear", "nearest") if mode == "paper" else ("pil_nearest", "pil_nearest")
    out = dict(item)
    for suffix in ("", "_pos"):
        img_key = "img" + suffix
        if img_key not in item:
            continue
        h, w = item[img_key].shape[-2:]
        size = resized_size(h, w, res)
        top, left = center_crop_box(*size, res, res)
        for key, how in ((img_key, how_img), ("label" + suffix, how_other), ("depth" + suffix, how_other)):
            if key not in item:
                continue
            t = item[key]
            if tuple(t.shape[-2:]) != (h, w):
                raise ValueError(f"{key} has size {tuple(t.shape[-2:])} but {img_key} has {(h, w)} (item {item.get('key')!r})")
            out[key] = _resize(t, size, how)[..., top : top + res, left : left + res].contiguous()
    return out
