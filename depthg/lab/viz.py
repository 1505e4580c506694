"""Pictures of the method: palettes, overlays, depth colour maps, point clouds, sample locations,
correlation tensors, training curves, per-class IoU bars and confusion matrices.

Everything here is for notebooks and ``reproduce_figures.ipynb``; nothing here is on the training hot
path, and nothing here *computes* the method (unprojection, FPS, correlations and losses live in
:mod:`depthg.method.sampling`, :mod:`depthg.method.losses` and :mod:`depthg.method.lhp`). The functions take plain tensors or
arrays in the workbench conventions:

- images (3, H, W) or (H, W, 3), float in [0, 1] or uint8;
- depth (1, H, W) or (H, W), larger = farther;
- labels (H, W) int, -1 = ignore;
- ``grid_sample`` coordinates (..., 2) as (x, y) in [-1, 1] with ``align_corners=True``: x = -1 is the
  centre of the first feature column and x = +1 the centre of the last one.

Static figures use matplotlib (PNG export works headless with the Agg backend); interactive 3D uses
plotly, whose HTML export works offline while its PNG export needs kaleido + Chrome, which the
workbench does not install.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import ipywidgets as widgets
import matplotlib
import matplotlib.patches as mpatches
import matplotlib.pyplot as plt
import numpy as np
import plotly.graph_objects as go
import torch
from cityscapesscripts.helpers.labels import id2label
from matplotlib.colors import LogNorm, Normalize
from matplotlib.ticker import MaxNLocator
from plotly.offline import get_plotlyjs

from depthg.data import PALETTES
from depthg.utils import DepthGError, atomic_write

__all__ = [
    "MAX_WIDTH_IN",
    "set_title",
    "suptitle",
    "show_depth",
    "VizError",
    "get_palette",
    "make_palette",
    "to_image_array",
    "to_depth_array",
    "colorize_labels",
    "overlay_labels",
    "colorize_depth",
    "grid_to_cells",
    "cells_to_pixels",
    "indices_to_cells",
    "cells_to_indices",
    "show_image",
    "plot_samples_on_image",
    "plot_samples_on_feature_grid",
    "point_cloud_figure",
    "plot_point_cloud",
    "save_html",
    "slider",
    "add_caption",
    "save_figure",
    "sample_coverage",
    "open3d_farthest_point_indices",
    "plot_correlation_query",
    "plot_correlation_matrix",
    "plot_heatmap_on_image",
    "read_jsonl",
    "plot_training_curves",
    "markdown_table",
    "plot_iou_bars",
    "plot_confusion",
    "plot_predictions",
    "add_class_legend",
]


class VizError(DepthGError, ValueError):
    """A plotting helper got input of the wrong shape, type or range."""


# ----------------------------------------------------------------------------------------------------
# Palettes and conversions
# ----------------------------------------------------------------------------------------------------


def make_palette(n: int, seed: int = 0) -> np.ndarray:
    """A deterministic palette of ``n`` well separated colours, (n, 3) uint8.

    Golden-ratio steps around the hue circle with alternating saturation/value, so neighbouring class
    ids get clearly different colours however many there are. Used when a dataset has no palette of
    its own (cluster ids, the directory dataset).
    """
    if n < 1:
        raise VizError(f"make_palette: n must be >= 1, got {n}")
    golden = 0.618033988749895
    hue = (seed * 0.1234) % 1.0
    colours = []
    for i in range(n):
        hue = (hue + golden) % 1.0
        sat = 0.65 if i % 2 == 0 else 0.9
        val = 0.95 if i % 3 != 2 else 0.7
        colours.append(colorsys.hsv_to_rgb(hue, sat, val))
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def _cityscapes27_palette() -> np.ndarray:
    """The official Cityscapes colours of label ids 7..33 (the 27-class setting, class = id - 7)."""
    return np.asarray([id2label[i].color for i in range(7, 34)], dtype=np.uint8)


def get_palette(name_or_n: str | int, n_classes: int | None = None) -> np.ndarray:
    """The colour palette of a dataset, (K, 3) uint8.

    ``name_or_n`` is a dataset name ("cityscapes", "cocostuff", "potsdam", ...) or a class count.
    Palettes come from :mod:`depthg.data` (``depthg.data.PALETTES``) when it provides one for the name;
    Cityscapes falls back to the official label colours of cityscapesscripts; anything else gets
    :func:`make_palette`. When ``n_classes`` is given and the palette is shorter (e.g. extra clusters),
    it is extended with generated colours so every id has one.
    """
    palette: np.ndarray | None = None
    if isinstance(name_or_n, (int, np.integer)):
        n = int(name_or_n)
        palette = make_palette(n)
    else:
        name = str(name_or_n).lower()
        if name in PALETTES:  # the data package owns the dataset palettes (name -> (K, 3) uint8)
            palette = np.asarray(PALETTES[name])
        if palette is None and name.startswith("cityscapes"):
            palette = _cityscapes27_palette()
        if palette is None:
            palette = make_palette(n_classes or 27)
        if palette.dtype != np.uint8:
            palette = np.asarray(palette, dtype=np.float64)
            if palette.max() <= 1.0:
                palette = palette * 255
            palette = palette.round().clip(0, 255).astype(np.uint8)
    if n_classes is not None and len(palette) < n_classes:
        extra = make_palette(n_classes - len(palette), seed=len(palette))
        palette = np.concatenate([palette, extra], axis=0)
    return palette


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu").numpy()
    return np.asarray(x)


def to_image_array(img: Any) -> np.ndarray:
    """An image as (H, W, 3) float in [0, 1] for matplotlib.

    Accepts (3, H, W) or (H, W, 3), float in [0, 1] or uint8, a tensor or an array, or a batch of one.
    """
    a = _as_numpy(img)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise VizError(f"image: expected (3,H,W) or (H,W,3), got shape {tuple(a.shape)}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = np.transpose(a, (1, 2, 0))
    if a.shape[-1] != 3:
        raise VizError(f"image: expected 3 colour channels, got shape {tuple(a.shape)}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if a.size and (a.min() < -1e-3 or a.max() > 1 + 1e-3):
        raise VizError(
            f"image: float values must lie in [0, 1] (the workbench convention, not ImageNet-normalised); "
            f"got range [{a.min():.3g}, {a.max():.3g}]"
        )
    return a.clip(0.0, 1.0)


def to_depth_array(depth: Any) -> np.ndarray:
    """A depth map as (H, W) float; accepts (H, W), (1, H, W) or (1, 1, H, W)."""
    a = _as_numpy(depth).astype(np.float32)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise VizError(f"depth: expected (H,W) or (1,H,W), got shape {tuple(_as_numpy(depth).shape)}")
    return a


def colorize_labels(labels: Any, palette: np.ndarray, ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Label ids (H, W) → (H, W, 3) uint8 colours; negative ids (ignore) get ``ignore_color``.

    Ids beyond the palette raise instead of wrapping around, so a wrong class count is noticed.
    """
    lab = _as_numpy(labels)
    if lab.ndim == 3 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.ndim != 2:
        raise VizError(f"labels: expected (H,W), got shape {tuple(lab.shape)}")
    lab = lab.astype(np.int64)
    palette = np.asarray(palette, dtype=np.uint8)
    if lab.size and lab.max() >= len(palette):
        raise VizError(
            f"labels: id {int(lab.max())} has no colour in a palette of {len(palette)} entries; "
            "pass get_palette(name, n_classes=...) with enough classes"
        )
    out = np.empty(lab.shape + (3,), dtype=np.uint8)
    out[...] = np.asarray(ignore_color, dtype=np.uint8)
    valid = lab >= 0
    out[valid] = palette[lab[valid]]
    return out


def overlay_labels(img: Any, labels: Any, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a label map over an image, (H, W, 3) float in [0, 1]; ignored pixels show the image."""
    if not 0.0 <= alpha <= 1.0:
        raise VizError(f"overlay_labels: alpha must be in [0, 1], got {alpha}")
    image = to_image_array(img)
    colours = colorize_labels(labels, palette).astype(np.float32) / 255.0
    if colours.shape[:2] != image.shape[:2]:
        raise VizError(f"overlay_labels: image is {image.shape[:2]} but labels are {colours.shape[:2]}")
    lab = _as_numpy(labels)
    lab = lab[0] if lab.ndim == 3 else lab
    a = np.where((lab >= 0)[..., None], alpha, 0.0).astype(np.float32)
    return image * (1 - a) + colours * a


def colorize_depth(
    depth: Any, cmap: str = "magma_r", vmin: float | None = None, vmax: float | None = None,
    scale: str = "linear",
) -> np.ndarray:
    """Depth (larger = farther) → (H, W, 3) float RGB. Default ``magma_r``: near is bright, far is dark.

    ``scale``: "linear"; "log" (metric street scenes span 5–200 m, so a linear map washes out everything
    but the sky); "inverse" (disparity-like). Non-positive values (invalid depth, e.g. Cityscapes
    disparity 0) are drawn black.
    """
    if scale not in ("linear", "log", "inverse"):
        raise VizError(f"colorize_depth: scale must be 'linear', 'log' or 'inverse', got {scale!r}")
    d = to_depth_array(depth)
    valid = np.isfinite(d) & (d > 0)
    if scale != "linear":
        safe = np.where(valid, d, 1.0)
        d = np.log(safe) if scale == "log" else -1.0 / safe  # -1/d keeps "larger = farther"
        if vmin is not None:
            vmin = math.log(vmin) if scale == "log" else -1.0 / vmin
        if vmax is not None:
            vmax = math.log(vmax) if scale == "log" else -1.0 / vmax
    lo = float(d[valid].min()) if vmin is None and valid.any() else (vmin or 0.0)
    hi = float(d[valid].max()) if vmax is None and valid.any() else (vmax if vmax is not None else 1.0)
    scaled = (d - lo) / max(hi - lo, 1e-12)
    rgb = matplotlib.colormaps[cmap](np.clip(scaled, 0, 1))[..., :3].astype(np.float32)
    rgb[~valid] = 0.0
    return rgb


# ----------------------------------------------------------------------------------------------------
# Sample coordinates: grid_sample (x, y) ↔ feature cells ↔ image pixels
# ----------------------------------------------------------------------------------------------------


def grid_to_cells(grid: Any, h: int, w: int) -> np.ndarray:
    """``grid_sample`` coordinates (..., 2) as (x, y) in [-1, 1], ``align_corners=True`` → (..., 2) as
    (row, col) in feature-cell units (fractional where the grid falls between cells).

    With ``align_corners=True`` x = -1 is the centre of column 0 and x = +1 the centre of column w-1, so
    col = (x + 1) / 2 · (w - 1) and row = (y + 1) / 2 · (h - 1). This is the location ``grid_sample``
    really reads, which is how the released code's transposition becomes visible (docs/fidelity.md §3.3).
    """
    g = _as_numpy(grid).astype(np.float64)
    if g.shape[-1] != 2:
        raise VizError(f"grid: last axis must hold (x, y), got shape {tuple(g.shape)}")
    col = (g[..., 0] + 1.0) / 2.0 * (w - 1)
    row = (g[..., 1] + 1.0) / 2.0 * (h - 1)
    return np.stack([row, col], axis=-1)


def indices_to_cells(indices: Any, w: int) -> np.ndarray:
    """Row-major flat indices (index = r·w + c, as :func:`depthg.method.sampling.depth_to_points`) → (..., 2) (row, col)."""
    idx = _as_numpy(indices).astype(np.int64)
    return np.stack([idx // w, idx % w], axis=-1).astype(np.float64)


def cells_to_indices(cells: Any, h: int, w: int) -> np.ndarray:
    """(..., 2) (row, col) cell coordinates → row-major flat indices of the *nearest* cell (rounded,
    clipped to the grid), e.g. to measure the coverage of continuous random ``grid_sample`` locations."""
    c = np.rint(np.asarray(cells, dtype=np.float64))
    r = np.clip(c[..., 0], 0, h - 1).astype(np.int64)
    q = np.clip(c[..., 1], 0, w - 1).astype(np.int64)
    return r * w + q


def cells_to_pixels(cells: np.ndarray, feat_hw: tuple[int, int], img_hw: tuple[int, int]) -> np.ndarray:
    """Feature-cell (row, col) → image pixel (row, col) of the cell centre.

    Cell c of a grid of w cells covers pixels [c·W/w, (c+1)·W/w); its centre, in matplotlib's pixel
    coordinates (pixel i centred at i), is (c + 0.5)·W/w - 0.5.
    """
    cells = np.asarray(cells, dtype=np.float64)
    sy = img_hw[0] / feat_hw[0]
    sx = img_hw[1] / feat_hw[1]
    return np.stack([(cells[..., 0] + 0.5) * sy - 0.5, (cells[..., 1] + 0.5) * sx - 0.5], axis=-1)


# ----------------------------------------------------------------------------------------------------
# matplotlib helpers
# ----------------------------------------------------------------------------------------------------


#: Widest figure the notebooks draw (inches at 100 dpi): JupyterLab shows it unshrunk on a projector.
MAX_WIDTH_IN = 8.6


def _points(fontsize: Any) -> float:
    """A matplotlib font size (points or a name such as "medium") in points."""
    from matplotlib.font_manager import FontProperties

    return float(FontProperties(size=fontsize).get_size_in_points())


def _chars_per_line(width_in: float, fontsize: Any) -> int:
    """How many characters of text at ``fontsize`` (points or a matplotlib size name) fit in ``width_in``."""
    return max(10, int(width_in * 72 / (0.56 * _points(fontsize))))


def set_title(ax, text: str, **kwargs: Any):
    """``ax.set_title`` with the text wrapped to the axes' width, so a long title never runs into the next
    panel or out of the figure."""
    width_in = ax.get_position().width * ax.figure.get_figwidth()
    size = kwargs.get("fontsize", plt.rcParams["axes.titlesize"])
    return ax.set_title(textwrap.fill(str(text), _chars_per_line(width_in, size)), **kwargs)


def suptitle(fig, text: str, **kwargs: Any):
    """``fig.suptitle`` wrapped to the figure's width."""
    size = kwargs.get("fontsize", plt.rcParams["figure.titlesize"])
    return fig.suptitle(textwrap.fill(str(text), _chars_per_line(fig.get_figwidth() * 0.95, size)), **kwargs)


def _axes(ax=None, figsize=(5, 4)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def show_image(ax, img: Any, title: str | None = None):
    """Draw an image (any accepted layout, or an (H, W, 3) array already coloured) without axes ticks."""
    ax.imshow(to_image_array(img), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        set_title(ax, title)
    return ax


def show_depth(
    ax,
    depth: Any,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    scale: str = "linear",
    cmap: str = "magma_r",
    units: str = "m",
    colorbar: bool = True,
):
    """Draw a depth map (larger = farther) with a colour bar in ``units`` and a near/far key.

    Pixels that are not finite or <= 0 (invalid depth) are drawn light grey. ``vmin``/``vmax`` fix the
    colour range, so that several maps (an estimate and its reference) share one scale; by default the
    map's own valid range. ``scale``: "linear" or "log" (street scenes spanning 5–200 m). Default
    ``magma_r``: near is bright, far is dark. Returns the ``AxesImage``.
    """
    if scale not in ("linear", "log"):
        raise VizError(f"show_depth: scale must be 'linear' or 'log', got {scale!r}")
    d = to_depth_array(depth).astype(np.float64)
    valid = np.isfinite(d) & (d > 0)
    if not valid.any():
        raise VizError("show_depth: the depth map has no valid (finite, > 0) pixel")
    lo = float(d[valid].min()) if vmin is None else float(vmin)
    hi = float(d[valid].max()) if vmax is None else float(vmax)
    norm = (LogNorm if scale == "log" else Normalize)(vmin=lo, vmax=max(hi, lo * (1 + 1e-6)))
    colours = matplotlib.colormaps[cmap].with_extremes(bad="0.85")  # invalid pixels: light grey, off the scale
    im = ax.imshow(np.ma.masked_array(d, ~valid), cmap=colours, norm=norm, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        set_title(ax, title)
    if colorbar:
        bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label(f"depth ({units})")
        # the key: which end of the bar is near, which is far
        bar.ax.text(0.5, 1.01, "far", transform=bar.ax.transAxes, ha="center", va="bottom")
        bar.ax.text(0.5, -0.01, "near", transform=bar.ax.transAxes, ha="center", va="top")
    return im


def plot_samples_on_image(
    ax,
    img: Any,
    cells: np.ndarray,
    feat_hw: tuple[int, int],
    color: str = "cyan",
    title: str | None = None,
    size: float = 14,
    marker: str = "o",
    label: str | None = None,
):
    """Draw sample locations given in feature-cell (row, col) units on top of an image.

    ``cells`` comes from :func:`grid_to_cells` (what ``grid_sample`` reads) or :func:`indices_to_cells`
    (what FPS selected); drawing both shows whether they agree.
    """
    if img is not None:
        show_image(ax, img, title)
        img_hw = to_image_array(img).shape[:2]
    else:
        img_hw = tuple(int(v) for v in ax.images[-1].get_array().shape[:2])
        if title:
            set_title(ax, title)
    px = cells_to_pixels(np.asarray(cells).reshape(-1, 2), feat_hw, img_hw)
    ax.scatter(px[:, 1], px[:, 0], s=size, c=color, marker=marker, edgecolors="black", linewidths=0.5,
               label=label)
    return ax


def plot_samples_on_feature_grid(
    ax,
    cells_list: Sequence[np.ndarray],
    feat_hw: tuple[int, int],
    labels: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    background: np.ndarray | None = None,
    title: str | None = None,
    depth_scale: str = "linear",
):
    """Draw one or more sets of sample locations on the h×w feature grid (one square per patch token).

    ``background`` is shown under the grid: a depth map (h, w) / (1, h, w), e.g. the depth pooled to the
    grid, which is what FPS actually sees (coloured with :func:`colorize_depth` and ``depth_scale``), or an
    RGB array (h, w, 3) already coloured.
    """
    h, w = feat_hw
    colors = list(colors or ["tab:red", "tab:cyan", "tab:green", "tab:orange"])
    if background is not None:
        bg = _as_numpy(background)
        rgb = bg if bg.ndim == 3 and bg.shape[-1] == 3 else colorize_depth(bg, scale=depth_scale)
        ax.imshow(rgb, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="white" if background is not None else "0.8", linewidth=0.3)
    ax.tick_params(which="minor", length=0)
    ax.set_aspect("equal")
    for i, cells in enumerate(cells_list):
        c = np.asarray(cells).reshape(-1, 2)
        ax.scatter(c[:, 1], c[:, 0], s=16, c=colors[i % len(colors)], edgecolors="black", linewidths=0.4,
                   label=None if labels is None else labels[i], marker="os^D"[i % 4])
    if labels is not None:
        ax.legend(loc="upper right", framealpha=0.8)
    ax.set_xlabel("feature column")
    ax.set_ylabel("feature row")
    if title:
        set_title(ax, title)
    return ax


def plot_heatmap_on_image(ax, img: Any, heat: Any, title: str | None = None, alpha: float = 0.6,
                          cmap: str = "inferno", mark: tuple[float, float] | None = None,
                          feat_hw: tuple[int, int] | None = None, colorbar: str | None = None,
                          vmin: float | None = None, vmax: float | None = None):
    """A heat map (h, w) upsampled (nearest) over an image; ``mark`` = (row, col) cell drawn as a yellow
    square (the query patch of Fig. 3-style propagation maps). ``colorbar``: the label of a colour bar
    (what the values are, with units), none when None; ``vmin``/``vmax`` fix the colour range, so that
    several maps can share one bar."""
    image = to_image_array(img)
    hm = to_depth_array(heat)
    H, W = image.shape[:2]
    ax.imshow(image)
    im = ax.imshow(hm, cmap=cmap, alpha=alpha, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest",
                   vmin=vmin, vmax=vmax)
    if colorbar is not None:
        bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        bar.solids.set_alpha(1.0)
        bar.set_label(colorbar)
    if mark is not None:
        fh, fw = feat_hw or hm.shape
        (pr, pc), = cells_to_pixels(np.asarray([mark], dtype=np.float64), (fh, fw), (H, W))
        sy, sx = H / fh, W / fw
        ax.add_patch(mpatches.Rectangle((pc - sx / 2, pr - sy / 2), sx, sy, fill=False, edgecolor="yellow",
                                        linewidth=2))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        set_title(ax, title)
    return ax


def slider(description: str, value: float, min: float, max: float, step: float | None = None,
           width: str = "100%"):
    """An ipywidgets slider for a figure that is recomputed when the slider moves.

    Unlike ipywidgets' default (125 px wide, redrawing at every pixel of a drag) it spans ``width`` of
    the output (at most 900 px), shows ``description`` in full, and updates once, when the handle is
    released (``continuous_update=False``). All-integer ``value``/``min``/``max``/``step`` give an
    ``IntSlider`` (step 1 by default), otherwise a ``FloatSlider`` (step: 1/100 of the range). Use it with
    ``ipywidgets.interact(fn, name=viz.slider(...))``.
    """
    numbers = (value, min, max) + (() if step is None else (step,))
    integer = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in numbers)
    if not min <= value <= max:
        raise VizError(f"slider {description!r}: value {value} is outside [{min}, {max}]")
    cls = widgets.IntSlider if integer else widgets.FloatSlider
    step = step if step is not None else (1 if integer else (max - min) / 100)
    return cls(value=value, min=min, max=max, step=step, description=description, continuous_update=False,
               layout=widgets.Layout(width=width, max_width="900px"), style={"description_width": "initial"})


def add_caption(fig, text: str, fontsize: Any = None):
    """Write ``text`` *below* the laid-out figure, wrapped to the figure's width.

    The caption starts under the figure's bottom edge and under any figure legend placed there (the class
    legend of :func:`plot_predictions`), so it never overlaps axis labels or legends; saving with
    :func:`save_figure` (``bbox_inches="tight"``) includes it. Returns the text artist.
    """
    fig.canvas.draw()  # runs the layout engine, so the legends' boxes are where they will be drawn
    top = -0.005
    if fig.legends:
        renderer = fig.canvas.get_renderer()
        for legend in fig.legends:
            box = legend.get_window_extent(renderer).transformed(fig.transFigure.inverted())
            top = min(top, box.y0 - 0.01)
    size = fontsize if fontsize is not None else plt.rcParams["font.size"]
    chars = _chars_per_line(fig.get_figwidth() * 0.98, size)
    return fig.text(0.01, top, textwrap.fill(text, chars), va="top", ha="left", fontsize=size)


def save_figure(fig, path: str | os.PathLike, dpi: int | None = None, caption: str | None = None) -> Path:
    """Save a matplotlib figure as PNG (or any format matplotlib knows) atomically; returns the path.

    ``dpi``: default the figure's own. ``caption``: written under the figure in the saved file only
    (:func:`add_caption`) and taken off again, so the notebook shows the figure without it. PNGs carry no
    creation time, so the same figure saves to the same bytes.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    text = add_caption(fig, caption) if caption else None
    buf = io.BytesIO()
    metadata = {"Software": None} if fmt == "png" else None
    try:
        fig.savefig(buf, format=fmt, dpi=dpi or fig.dpi, bbox_inches="tight", metadata=metadata)
    finally:
        if text is not None:
            text.remove()
    with atomic_write(path, "wb") as handle:
        handle.write(buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------------------
# Point clouds
# ----------------------------------------------------------------------------------------------------


def point_cloud_figure(
    points: Any,
    colors: Any | None = None,
    highlight: Mapping[str, Any] | None = None,
    title: str | None = None,
    point_size: float = 2.0,
    highlight_size: float = 5.0,
    max_points: int | None = 60_000,
    seed: int = 0,
    units: str | None = None,
):
    """An interactive plotly 3D scatter of a point cloud with sample sets highlighted.

    points: (N, 3) in camera coordinates (X right, Y down, Z forward for ``mode="paper"``; the released
      unprojection has Z = -5 d, docs/method.md §6.2); colors: (N, 3) in [0, 1] or uint8 (e.g. the image
      pixels) or None; highlight: {name: indices into points} drawn as larger markers, one trace each.
    max_points: the background cloud is subsampled (seeded) above this size so HTML files stay small;
      highlighted points are always drawn.

    The camera's up vector is -Y so the scene appears upright (image rows grow downwards). The view is
    framed on the data: the box is scaled to the points' extents (longest side 1) and the eye sits behind,
    above and to the left of the camera, outside the box and far enough away that the whole cloud, from the
    nearest road to the farthest wall, is in view (checked in a browser for a 200 m street scene). ``units`` (e.g. "m") goes
    into the axis titles.
    """
    pts = _as_numpy(points).astype(np.float32)
    if pts.ndim == 3 and pts.shape[0] == 1:
        pts = pts[0]
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise VizError(f"point_cloud_figure: points must be (N, 3), got {tuple(pts.shape)}")
    keep = np.arange(len(pts))
    if max_points is not None and len(pts) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(pts), size=max_points, replace=False))
    marker: dict[str, Any] = dict(size=point_size)
    if colors is not None:
        col = _as_numpy(colors)
        if col.ndim == 3 and col.shape[0] == 3:
            col = np.transpose(col, (1, 2, 0))
        col = col.reshape(-1, 3)
        if len(col) != len(pts):
            raise VizError(f"point_cloud_figure: {len(col)} colours for {len(pts)} points")
        col = col.astype(np.float64)
        if col.max() > 1.0:
            col = col / 255.0
        marker["color"] = [f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})" for r, g, b in col[keep]]
    else:
        marker["color"] = pts[keep, 2]
        marker["colorscale"] = "Viridis"
    traces = [go.Scatter3d(x=pts[keep, 0], y=pts[keep, 1], z=pts[keep, 2], mode="markers", marker=marker,
                           name="points", hoverinfo="skip")]
    palette = ["red", "cyan", "lime", "orange", "magenta"]
    for i, (name, idx) in enumerate((highlight or {}).items()):
        ix = _as_numpy(idx).astype(np.int64).reshape(-1)
        if ix.size and (ix.min() < 0 or ix.max() >= len(pts)):
            raise VizError(f"point_cloud_figure: highlight {name!r} has indices outside [0, {len(pts)})")
        traces.append(go.Scatter3d(x=pts[ix, 0], y=pts[ix, 1], z=pts[ix, 2], mode="markers", name=name,
                                   marker=dict(size=highlight_size, color=palette[i % len(palette)],
                                               line=dict(color="black", width=1))))
    fig = go.Figure(traces)
    # box proportional to the data with its longest side 1; the eye outside it, behind, above and to the left
    # of the near face, far enough that the whole box (near road to far sky) stays in view
    extent = np.ptp(pts, axis=0) if len(pts) else np.ones(3)
    ratio = np.maximum(extent / max(float(extent.max()), 1e-12), 0.05)
    eye = dict(x=-0.5 * float(ratio[0]) - 0.9, y=-0.5 * float(ratio[1]) - 0.3, z=-0.5 * float(ratio[2]) - 0.35)
    unit = f" ({units})" if units else ""
    fig.update_layout(
        title=title, margin=dict(l=0, r=0, t=40 if title else 0, b=0), height=520, font=dict(size=15),
        scene=dict(aspectmode="manual", aspectratio=dict(x=float(ratio[0]), y=float(ratio[1]), z=float(ratio[2])),
                   xaxis_title=f"X{unit}", yaxis_title=f"Y{unit}", zaxis_title=f"Z, depth{unit}",
                   camera=dict(up=dict(x=0, y=-1, z=0), eye=eye, center=dict(x=0, y=0, z=0))),
        legend=dict(itemsizing="constant"),
    )
    return fig


def plot_point_cloud(
    ax,
    points: Any,
    colors: Any | None = None,
    highlight: Mapping[str, Any] | None = None,
    title: str | None = None,
    point_size: float = 4.0,
    highlight_size: float = 28.0,
    elev: float = 20.0,
    azim: float = -40.0,
    highlight_colors: Sequence[str] | None = None,
    units: str = "m",
):
    """A static matplotlib 3D view of a point cloud with sample sets highlighted (the PNG counterpart of
    :func:`point_cloud_figure`, whose PNG export would need kaleido + Chrome).

    ``ax`` must be a 3D axes (``fig.add_subplot(projection="3d")``); points (N, 3) in camera coordinates
    (X right, Y down, Z forward). Drawn with height (−Y) up and the box proportional to the data's extent
    in each direction, seen from behind and above the camera (``elev``/``azim``). ``highlight_colors``: one
    colour per highlighted set (default red, cyan, lime, ...); ``units`` goes into the axis labels.
    """
    pts = _as_numpy(points).astype(np.float32).reshape(-1, 3)
    col = None
    if colors is not None:
        c = _as_numpy(colors)
        if c.ndim == 3 and c.shape[0] == 3:
            c = np.transpose(c, (1, 2, 0))
        col = c.reshape(-1, 3).astype(np.float64)
        if len(col) != len(pts):
            raise VizError(f"plot_point_cloud: {len(col)} colours for {len(pts)} points")
        if col.max() > 1.0:
            col = col / 255.0
    # matplotlib's axes: x = X (right), y = Z (depth), z = -Y (height)
    ax.scatter(pts[:, 0], pts[:, 2], -pts[:, 1], c=col if col is not None else pts[:, 2], s=point_size,
               depthshade=False, linewidths=0)
    palette = list(highlight_colors) if highlight_colors else ["red", "cyan", "lime", "orange", "magenta"]
    for i, (name, idx) in enumerate((highlight or {}).items()):
        ix = _as_numpy(idx).astype(np.int64).reshape(-1)
        if ix.size and (ix.min() < 0 or ix.max() >= len(pts)):
            raise VizError(f"plot_point_cloud: highlight {name!r} has indices outside [0, {len(pts)})")
        ax.scatter(pts[ix, 0], pts[ix, 2], -pts[ix, 1], s=highlight_size, c=palette[i % len(palette)],
                   edgecolors="black", linewidths=0.5, depthshade=False, label=name)
    extent = np.ptp(pts, axis=0) if len(pts) else np.ones(3)
    ax.set_box_aspect((max(float(extent[0]), 1e-6), max(float(extent[2]), 1e-6), max(float(extent[1]), 1e-6)))
    ax.xaxis.set_major_locator(MaxNLocator(3))  # the narrow side: few ticks, so they do not collide
    ax.set_xlabel(f"X ({units})")
    ax.set_ylabel(f"Z, depth ({units})")
    ax.set_zlabel(f"height ({units})", labelpad=2)
    ax.view_init(elev=elev, azim=azim)
    if highlight:
        ax.legend(loc="upper left")
    if title:
        set_title(ax, title)
    return ax


def save_html(fig, path: str | os.PathLike, include_plotlyjs: bool | str = True) -> Path:
    """Write a plotly figure as HTML atomically.

    ``include_plotlyjs=True`` embeds plotly.js (~4.9 MB, works offline);
    ``"directory"`` writes a single ``plotly.min.js`` next to the HTML and references it (several figures
    in one folder then share one copy and still work offline). ``"cdn"`` needs a network and is refused.
    """
    if include_plotlyjs == "cdn":
        raise VizError("save_html: include_plotlyjs='cdn' needs a network; use True or 'directory'")
    path = Path(path)
    html = fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True)
    if include_plotlyjs == "directory":
        js = path.parent / "plotly.min.js"
        if not js.exists():
            with atomic_write(js, "w") as handle:
                handle.write(get_plotlyjs())
    with atomic_write(path, "w") as handle:
        handle.write(html)
    return path


def sample_coverage(points: Any, indices: Any, labels: Any | None = None) -> dict[str, float]:
    """How well a sample set covers a point cloud (used to compare FPS with random sampling).

    Returns ``mean_dist`` and ``max_dist`` (the covering radius): the mean / max over *all* points of the
    Euclidean distance to the nearest sample, in the cloud's units (lower = better coverage, FPS
    greedily minimises the max); with ``labels`` (N,) also ``classes_hit``: the fraction of classes present
    in the cloud (ignore < 0 excluded) that have at least one sample.
    """
    pts = torch.as_tensor(_as_numpy(points), dtype=torch.float64).reshape(-1, 3)
    idx = torch.as_tensor(_as_numpy(indices), dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise VizError("sample_coverage: no samples given")
    nearest = torch.cdist(pts, pts[idx]).min(dim=1).values
    out = {"mean_dist": float(nearest.mean()), "max_dist": float(nearest.max())}
    if labels is not None:
        lab = torch.as_tensor(_as_numpy(labels)).reshape(-1).long()
        if lab.numel() != pts.shape[0]:
            raise VizError(f"sample_coverage: {lab.numel()} labels for {pts.shape[0]} points")
        present = set(lab[lab >= 0].tolist())
        hit = set(lab[idx][lab[idx] >= 0].tolist())
        out["classes_hit"] = len(hit) / max(len(present), 1)
    return out


# Run in a child process: importing open3d imports dash, which opens a Jupyter comm that JupyterLab has no
# handler for (an error in the browser console), and in a kernel open3d switches on its WebRTC visualiser,
# which prints into the cell. The child reads the points from argv[1] and writes the selected points to argv[2].
_OPEN3D_FPS = """
import sys
import numpy as np
import open3d as o3d
pts = np.load(sys.argv[1])
pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
down = pcd.farthest_point_down_sample(int(sys.argv[3]), int(sys.argv[4]))
np.save(sys.argv[2], np.asarray(down.points))
"""


def open3d_farthest_point_indices(points: Any, n_samples: int, start_index: int = 0) -> np.ndarray:
    """Farthest point sampling with open3d (``PointCloud.farthest_point_down_sample``) as an independent
    cross-check of :func:`depthg.method.sampling.farthest_point_sample`; returns the selected indices, sorted.

    points: (N, 3) or (1, N, 3). open3d runs in a child Python process (its import would otherwise bring
    dash's Jupyter comm and the WebRTC visualiser into the notebook's kernel). open3d returns the selected
    points in their original order, not indices; they are mapped back to their row indices exactly
    (duplicate points map to their first occurrence, so give clouds without exact duplicates when
    comparing sets).
    """
    pts = _as_numpy(points).astype(np.float64).reshape(-1, 3)
    if not 0 < n_samples <= len(pts):
        raise VizError(f"open3d_farthest_point_indices: n_samples must be in [1, {len(pts)}], got {n_samples}")
    with tempfile.TemporaryDirectory(prefix="depthg_open3d_") as tmp:
        src, dst = Path(tmp) / "points.npy", Path(tmp) / "down.npy"
        np.save(src, pts)
        env = dict(os.environ, OPEN3D_DISABLE_WEB_VISUALIZER="true")
        done = subprocess.run([sys.executable, "-c", _OPEN3D_FPS, str(src), str(dst), str(n_samples), str(start_index)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0 or not dst.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise VizError(f"open3d_farthest_point_indices: open3d failed (exit code {done.returncode}): {tail[0]}")
        down = np.load(dst)
    lookup: dict[bytes, int] = {}
    for i in range(len(pts) - 1, -1, -1):
        lookup[pts[i].tobytes()] = i
    return np.sort(np.asarray([lookup[p.tobytes()] for p in down], dtype=np.int64))


# ----------------------------------------------------------------------------------------------------
# Correlation tensors
# ----------------------------------------------------------------------------------------------------


def plot_correlation_query(ax, corr: Any, query: tuple[int, int], title: str | None = None,
                           vmin: float | None = -1.0, vmax: float | None = 1.0, cmap: str = "RdBu_r",
                           colorbar: str = "correlation"):
    """One slice of a correlation tensor (h, w, i, j) (or a batch of one): the map over (i, j) of the
    query location (h, w) = ``query``. This is how F, S and D look from one sampled point. ``colorbar``
    labels the colour bar (e.g. "cosine similarity F")."""
    c = _as_numpy(corr)
    if c.ndim == 5 and c.shape[0] == 1:
        c = c[0]
    if c.ndim != 4:
        raise VizError(f"correlation: expected (h,w,i,j), got shape {tuple(c.shape)}")
    r, q = query
    im = ax.imshow(c[r, q], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(colorbar)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        set_title(ax, title)
    return ax


def plot_correlation_distributions(values: Mapping[str, Any], shift_sets: Mapping[str, Mapping[str, float]],
                                   same_class: Mapping[str, Any] | None = None, bins: int = 60):
    """One panel per pairing (self, kNN, random): the histogram of the sampled feature correlations F and a
    vertical line per set of shifts (``shift_sets`` = {label: {pairing: b}}); pairs right of a line are pulled
    by that shift, pairs left of it pushed (each title: the share pulled, per set). With ``same_class`` (bool
    per pair) the same-class pairs are drawn as a second, darker histogram. Returns the figure (8.6 in wide)."""
    kinds = list(values)
    fig, axes = plt.subplots(1, len(kinds), figsize=(8.6, 3.6), sharey=False)
    axes = np.atleast_1d(axes)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    styles = ["-", "--", ":", "-."]
    for ax, kind in zip(axes, kinds):
        v = _as_numpy(values[kind]).ravel()
        ax.hist(v, bins=edges, color="0.75", label="all pairs")
        if same_class is not None:
            ax.hist(v[_as_numpy(same_class[kind]).ravel().astype(bool)], bins=edges, color="C0", alpha=0.8,
                    label="same class")
        pulled = []
        for k, (label, shifts) in enumerate(shift_sets.items()):
            ax.axvline(shifts[kind], color=f"C{k + 1}", linestyle=styles[k % len(styles)], linewidth=2, label=label)
            pulled.append(f"{100 * float((v > shifts[kind]).mean()):.0f} %")
        ax.set_xlabel("feature correlation F")
        ax.yaxis.set_major_locator(MaxNLocator(3))
        set_title(ax, f"{kind}: pulled {' / '.join(pulled)}")
    axes[0].set_ylabel("sampled pairs")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2)
    return fig


def plot_correlation_matrix(ax, corr: Any, title: str | None = None, vmin: float | None = -1.0,
                            vmax: float | None = 1.0, cmap: str = "RdBu_r", order: Any | None = None,
                            col_order: Any | None = None, colorbar: str = "correlation"):
    """A correlation tensor (h, w, i, j) flattened to an (hw, ij) matrix.

    ``order`` permutes the rows (e.g. the samples of this crop sorted by depth or by label) so block
    structure becomes visible; ``col_order`` the columns (the other crop's samples). When only ``order``
    is given and the matrix is square it is used for both axes (an intra-image tensor)."""
    c = _as_numpy(corr)
    if c.ndim == 5 and c.shape[0] == 1:
        c = c[0]
    if c.ndim != 4:
        raise VizError(f"correlation: expected (h,w,i,j), got shape {tuple(c.shape)}")
    m = c.reshape(c.shape[0] * c.shape[1], c.shape[2] * c.shape[3])
    if col_order is None and order is not None and m.shape[0] == m.shape[1]:
        col_order = order
    if order is not None:
        m = m[_as_numpy(order).astype(np.int64).reshape(-1)]
    if col_order is not None:
        m = m[:, _as_numpy(col_order).astype(np.int64).reshape(-1)]
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(colorbar)
    ax.set_xlabel("sample (other crop)")
    ax.set_ylabel("sample (this crop)")
    if title:
        set_title(ax, title)
    return ax


# ----------------------------------------------------------------------------------------------------
# Training logs and evaluation results
# ----------------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines log (one JSON object per line, e.g. a run's ``log.jsonl``); blank lines skipped.

    A truncated last line (a run killed mid-write) is skipped; any other bad line raises naming the file
    and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):
                break
            raise VizError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _flatten(rec: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def plot_training_curves(
    records: Iterable[Mapping[str, Any]] | str | os.PathLike | Mapping[str, Any],
    keys: Sequence[str] | None = None,
    x: str = "step",
    groups: Mapping[str, Sequence[str]] | None = None,
    title: str | None = None,
    smooth: int = 1,
    ncols: int = 2,
):
    """Training curves from a run's log records (or the path of its ``log.jsonl``), or from several runs.

    One quantity per axis: each panel's name is its y-axis label, so a group must hold series of one kind
    and one unit (loss terms together; the depth weight λ and the sample count S each in a panel of their
    own, never 0.09 next to 8). ``groups`` = {panel name: [keys]}; without it every key gets its own panel.

    ``records`` is one run (a list of records or a log path) or ``{run name: records or path}`` to overlay
    runs (one colour per series, one line style per run). Nested dicts are flattened with "/"
    (``{"train": {"total": 1}}`` → ``"train/total"``). ``keys`` picks the numeric series to draw (default:
    every numeric key except ``x``); ``smooth`` > 1 applies a trailing moving average (not to schedules:
    series with at most 10 distinct values are drawn as steps, as they change); panels wrap after
    ``ncols`` per row; ``title`` goes above all panels. Records without a key simply leave a gap (losses
    every ``log_every`` steps, metrics every ``eval_every``). Returns the matplotlib figure.
    """

    def load(r: Any) -> list[dict[str, Any]]:
        r = read_jsonl(r) if isinstance(r, (str, os.PathLike)) else list(r)
        return [_flatten(rec) for rec in r]

    if isinstance(records, Mapping) and not any(k == x for k in records):
        runs = {str(name): load(r) for name, r in records.items()}
    else:
        runs = {"": load(records)}
    if not any(runs.values()):
        raise VizError("plot_training_curves: no records to plot")
    numeric = sorted({k for flat in runs.values() for r in flat for k, v in r.items()
                      if k != x and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if groups is None:
        groups = {k: [k] for k in (list(keys) if keys is not None else numeric)}
    panels = {name: [k for k in ks if k in numeric] for name, ks in groups.items()}
    panels = {name: ks for name, ks in panels.items() if ks}
    if not panels:
        raise VizError(f"plot_training_curves: none of the requested keys are in the log; it has {numeric}")
    styles = ["-", "--", ":", "-."]
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(MAX_WIDTH_IN, 3.3 * nrows + (0.5 if title else 0)), squeeze=False)
    for ax, (name, ks) in zip(axes.flat, panels.items()):
        for r_i, (run, flat) in enumerate(runs.items()):
            for k_i, k in enumerate(ks):
                pts = [(r.get(x, i), r[k]) for i, r in enumerate(flat)
                       if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
                if not pts:
                    continue
                xs, ys = map(np.asarray, zip(*pts))
                # a schedule (few distinct values: a weight, a sample count) is drawn as steps, never smoothed
                schedule = len(ys) > 10 and len(np.unique(ys)) <= 10
                if smooth > 1 and len(ys) >= smooth and not schedule:
                    kernel = np.ones(smooth) / smooth
                    ys = np.concatenate([np.cumsum(ys[: smooth - 1]) / np.arange(1, smooth),
                                         np.convolve(ys, kernel, "valid")])
                short = k.split("/", 1)[1] if len({q.split("/")[0] for q in ks}) == 1 and "/" in k else k
                label = f"{run}: {short}" if run else short
                ax.plot(xs, ys, label=label, linewidth=1.2, color=colours[k_i % len(colours)],
                        linestyle=styles[r_i % len(styles)], marker="o" if len(xs) < 20 else None, markersize=3,
                        drawstyle="steps-post" if schedule else "default")
        ax.set_xlabel(x)
        ax.set_ylabel(textwrap.fill(name, 24))
        set_title(ax, name)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        suptitle(fig, title)
    return fig


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int | None = 1,
                   missing: str = "–") -> str:
    """Rows of dicts → a Markdown table with the given columns (in order).

    Floats are printed with ``digits`` decimals (``None``: as written, e.g. published numbers keep their
    own precision), ``None``/NaN/absent values as ``missing``; a value that is a
    dict with "mean" and "std" prints as "mean ± std" (the ablation's per-variant statistics). Pipes inside
    values are escaped so a cell never breaks the table.
    """

    def cell(v: Any) -> str:
        if isinstance(v, Mapping) and "mean" in v:
            mean, std = v.get("mean"), v.get("std")
            if std is None or (isinstance(std, float) and math.isnan(std)):
                return cell(mean)
            return f"{cell(mean)} ± {cell(std)}"
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return missing
        if isinstance(v, float):
            return repr(v) if digits is None else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_iou_bars(iou: Any, class_names: Sequence[str] | None = None, ax=None, title: str | None = None,
                  palette: np.ndarray | None = None, compare: Mapping[str, Any] | None = None):
    """Per-class IoU bars (values in [0, 1] or percent; NaN = class absent, drawn as a gap with 'n/a').

    ``compare`` {name: iou list} adds grouped bars for other runs (e.g. STEGO next to DepthG).
    """
    series = {"": iou} if not compare else dict(compare)
    if compare and iou is not None:
        series = {"this run": iou, **series}
    arrays = {k: np.asarray(_as_numpy(v), dtype=np.float64).reshape(-1) for k, v in series.items()}
    n = len(next(iter(arrays.values())))
    if any(len(a) != n for a in arrays.values()):
        raise VizError("plot_iou_bars: all IoU lists must have the same number of classes")
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise VizError(f"plot_iou_bars: {len(names)} class names for {n} IoU values")
    fig, ax = _axes(ax, figsize=(MAX_WIDTH_IN, 4.6))
    width = 0.8 / len(arrays)
    xs = np.arange(n)
    for s, (name, vals) in enumerate(arrays.items()):
        scale = 100.0 if np.nanmax(np.append(vals, 0)) <= 1.0 else 1.0
        colours = None
        if palette is not None and len(arrays) == 1:
            colours = [tuple(np.asarray(palette[i % len(palette)]) / 255.0) for i in range(n)]
        ax.bar(xs + (s - (len(arrays) - 1) / 2) * width, np.nan_to_num(vals * scale), width=width,
               color=colours, edgecolor="black", linewidth=0.4, label=name or None)
        for i in np.flatnonzero(np.isnan(vals)):
            ax.text(xs[i] + (s - (len(arrays) - 1) / 2) * width, 1, "n/a", rotation=90, ha="center")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=75, ha="right", rotation_mode="anchor")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    if len(arrays) > 1:
        ax.legend()
    if title:
        set_title(ax, title)
    return fig


def plot_confusion(confusion: Any, class_names: Sequence[str] | None = None, ax=None, normalize: bool = True,
                   title: str | None = None, xlabel: str = "predicted (matched cluster)",
                   ylabel: str = "ground truth"):
    """A confusion matrix (rows = ground truth, columns = prediction); ``normalize`` divides each row by
    its total so rows read as "where does this class go" (rows with no pixels stay 0)."""
    m = np.asarray(_as_numpy(confusion), dtype=np.float64)
    if m.ndim != 2:
        raise VizError(f"plot_confusion: expected a 2D matrix, got shape {tuple(m.shape)}")
    if normalize:
        tot = m.sum(axis=1, keepdims=True)
        m = np.divide(m, tot, out=np.zeros_like(m), where=tot > 0)
    n = m.shape[0]
    fig, ax = _axes(ax, figsize=(min(MAX_WIDTH_IN, max(5.0, 0.3 * n + 3.2)), min(8.5, max(4.5, 0.3 * n + 2.5))))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("fraction of the class's pixels" if normalize else "pixels")
    if class_names is not None:
        names = list(class_names)
        ax.set_yticks(range(n))
        ax.set_yticklabels(names[:n])
        if m.shape[1] == len(names):
            ax.set_xticks(range(m.shape[1]))
            ax.set_xticklabels(names, rotation=90)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        set_title(ax, title)
    return fig


def plot_predictions(
    images: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    palette: np.ndarray,
    titles: Sequence[str] | None = None,
    cell_size: float = 2.4,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
):
    """A grid: one row per image, first column the image, then one column per label map in ``columns``
    (e.g. {"ground truth": labels, "STEGO": preds_a, "DepthG": preds_b}); label maps are coloured with
    ``palette`` (ignore / unmatched = black).

    ``class_names`` adds a legend under the grid with the colour of every class that appears in any of the
    maps (and black, when some pixel is ignored or unmatched); ``title`` goes above the grid (say what is
    compared). Returns the figure.
    """
    n = len(images)
    for name, maps in columns.items():
        if len(maps) != n:
            raise VizError(f"plot_predictions: column {name!r} has {len(maps)} maps for {n} images")
    ncol = 1 + len(columns)
    cell = min(cell_size, MAX_WIDTH_IN / ncol)
    aspect = to_image_array(images[0]).shape[0] / to_image_array(images[0]).shape[1] if n else 1.0
    fig, axes = plt.subplots(n, ncol, figsize=(cell * ncol, cell * aspect * n + 1.2), squeeze=False)
    for r in range(n):
        show_image(axes[r, 0], images[r], titles[r] if titles else ("image" if r == 0 else None))
        for c, (name, maps) in enumerate(columns.items(), start=1):
            show_image(axes[r, c], colorize_labels(maps[r], palette), name if r == 0 else None)
    if title:
        suptitle(fig, title)
    if class_names is not None:
        present = np.unique(np.concatenate([_as_numpy(m).reshape(-1) for maps in columns.values() for m in maps]))
        add_class_legend(fig, palette, class_names, present)
    return fig


def add_class_legend(fig, palette: np.ndarray, class_names: Sequence[str], ids: Iterable[int] | None = None,
                     ncol: int | None = None, ignore_label: str = "ignore / unmatched"):
    """A legend of class colours under the figure: one patch per class id in ``ids`` (default: all), in
    ``palette``'s colour with its name from ``class_names``; a negative id adds a black ``ignore_label``
    patch. Returns the legend."""
    names = list(class_names)
    ids = sorted({int(i) for i in (range(len(names)) if ids is None else ids)})
    handles = [mpatches.Patch(facecolor=np.asarray(palette[i]) / 255.0, edgecolor="black", linewidth=0.3,
                              label=names[i] if i < len(names) else f"cluster {i}") for i in ids if i >= 0]
    if any(i < 0 for i in ids):
        handles.append(mpatches.Patch(facecolor="black", label=ignore_label))
    if ncol is None:  # as many columns as fit in the figure's width
        longest = max((len(h.get_label()) for h in handles), default=1)
        entry_in = (longest * 0.6 * _points(plt.rcParams["legend.fontsize"]) + 30) / 72
        ncol = max(1, min(len(handles), int(fig.get_figwidth() / entry_in)))
    return fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
                      frameon=False, title="classes")
