"""What every notebook does at its start and at its end, so that it runs the same twice and says what it found.

- :func:`start`: one call after the imports. It seeds every random draw (``random``, NumPy, torch), sets
  the figure style a class can read on a projector (:data:`STYLE`: text of at least :data:`MIN_TEXT_PT`
  points on figures no wider than :data:`DISPLAY_WIDTH_PX` pixels, so JupyterLab never shrinks them) and
  decides whether sliders are live (:func:`live_widgets`).
- :func:`what_this_shows`: the notebook's last section, written from the numbers the run computed.
- :func:`smallest_text` / :func:`check_readable`: the readability rule, measured on a figure. With the
  environment variable ``DEPTHG_CHECK_FIGURES=1`` (the test suite sets it) every figure a notebook displays
  is checked and a figure with smaller text is an error.
- :func:`shown_path`: a path as a notebook prints it (relative to the repository, never the machine's).
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from depthg.utils import DepthGError, repo_root

__all__ = ["STYLE", "MIN_TEXT_PT", "DISPLAY_WIDTH_PX", "FIGURE_WIDTH_IN", "Lesson", "start", "seed_everything",
           "live_widgets", "apply_style", "smallest_text", "check_readable", "what_this_shows", "shown_path",
           "FigureTooSmallError"]

#: Width of JupyterLab's output area on a projector (1280 px screen, file browser open): a figure wider than
#: this is shrunk to fit, and its text with it.
DISPLAY_WIDTH_PX = 900
#: Smallest text, in points as displayed (after any shrinking), that a class can read when projected.
MIN_TEXT_PT = 12.0
#: Default figure width: DISPLAY_WIDTH_PX at the style's 100 dpi, less the inline backend's tight padding.
FIGURE_WIDTH_IN = 8.6

#: matplotlib settings of every notebook: 100 dpi (one point of text = 100/72 px), text of 12-14 pt, figures
#: at most 9 in wide, constrained layout (no ``tight_layout`` warnings with colour bars or 3D axes) and PNGs
#: without a creation date, so two runs draw the same bytes.
STYLE: dict[str, Any] = {
    "figure.dpi": 100, "savefig.dpi": 100, "figure.figsize": (FIGURE_WIDTH_IN, 4.4),
    "font.size": 13, "axes.titlesize": 13, "axes.labelsize": 13, "xtick.labelsize": 12, "ytick.labelsize": 12,
    "legend.fontsize": 12, "legend.title_fontsize": 12, "figure.titlesize": 14,
    "figure.constrained_layout.use": True, "axes.titlelocation": "center", "svg.hashsalt": "depthg",
}


class FigureTooSmallError(DepthGError, ValueError):
    """A figure whose text would be smaller than MIN_TEXT_PT points when displayed."""


@dataclass(frozen=True)
class Lesson:
    """What :func:`start` set up: the seed and whether sliders are live (``live``), and why."""

    seed: int
    live: bool
    why: str


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def live_widgets(sliders: bool | str = "auto") -> tuple[bool, str]:
    """Whether a notebook shows live sliders, and why.

    ``True``/``False`` force it. ``"auto"``: live only in a kernel that a Jupyter server started for an open
    notebook (JupyterLab, Notebook 7), which it marks with the environment variable ``JPY_SESSION_NAME``;
    papermill, nbclient and ``jupyter nbconvert --execute`` start kernels without it and get the static
    pictures (a live ``ipywidgets.interact`` can leave a headless run waiting for ever). The variable
    ``DEPTHG_WIDGETS=static|live`` overrides the guess (e.g. a front end that sets no session name).
    """
    if isinstance(sliders, bool):
        return sliders, f"sliders={sliders}"
    if sliders != "auto":
        raise DepthGError(f"sliders must be True, False or 'auto', got {sliders!r}")
    forced = os.environ.get("DEPTHG_WIDGETS", "").strip().lower()
    if forced in ("static", "live"):
        return forced == "live", f"DEPTHG_WIDGETS={forced}"
    if forced:
        raise DepthGError(f"DEPTHG_WIDGETS must be 'static' or 'live', got {forced!r}")
    if os.environ.get("JPY_SESSION_NAME"):
        return True, "a Jupyter server runs this notebook: sliders are live"
    return False, "no Jupyter front end (papermill or another headless run): static pictures only"


def apply_style() -> None:
    """Apply :data:`STYLE`; with ``DEPTHG_CHECK_FIGURES=1``, check every figure IPython displays."""
    import matplotlib

    matplotlib.rcParams.update(STYLE)
    if os.environ.get("DEPTHG_CHECK_FIGURES") == "1":
        _check_displayed_figures()


def _check_displayed_figures() -> None:
    """Wrap IPython's PNG printer of matplotlib figures with :func:`check_readable` (once per kernel)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from matplotlib.figure import Figure

    formatter = shell.display_formatter.formatters["image/png"]
    printer = formatter.lookup_by_type(Figure) if Figure in formatter.type_printers else None
    if printer is None or getattr(printer, "depthg_checked", False):
        return

    def checked(fig: Figure) -> Any:
        check_readable(fig)
        return printer(fig)

    checked.depthg_checked = True  # type: ignore[attr-defined]
    formatter.for_type(Figure, checked)


def start(seed: int = 0, sliders: bool | str = False, smoke: bool = False) -> Lesson:
    """Seed everything, apply the figure style, decide about live sliders (:func:`live_widgets`).

    ``smoke``: the notebook's CI configuration, which uses a tiny random backbone on purpose and says so in
    its output; the loader's warning about random weights is then not repeated as a warning.
    """
    seed_everything(int(seed))
    if smoke:
        warnings.filterwarnings("ignore", message=r".*has random weights", category=UserWarning)
    apply_style()
    live, why = live_widgets(sliders)
    return Lesson(int(seed), live, why)


def smallest_text(fig: Any, display_px: int = DISPLAY_WIDTH_PX) -> tuple[float, str]:
    """The smallest text of ``fig`` in points as displayed, and that text.

    The figure is drawn as the inline backend shows it (its tight bounding box plus 0.1 in of padding, at
    the figure's dpi); an image wider than ``display_px`` is shrunk to fit, and so is each text's size.
    Hidden and empty texts do not count. ``(inf, "")`` when the figure has no text.
    """
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    width_px = (fig.get_tightbbox(renderer).width + 0.2) * fig.dpi
    scale = min(1.0, display_px / width_px)
    smallest, which = float("inf"), ""
    for text in fig.findobj(Text):
        label = text.get_text().strip()
        if not label or not text.get_visible() or not _drawn(text):
            continue
        size = float(text.get_fontsize()) * scale
        if size < smallest:
            smallest, which = size, label
    return smallest, which


def _drawn(artist: Any) -> bool:
    """Whether an artist and every axes it belongs to are visible (ticks of hidden axes are not drawn)."""
    axes = getattr(artist, "axes", None)
    return axes is None or axes.get_visible()


def check_readable(fig: Any, display_px: int = DISPLAY_WIDTH_PX, min_pt: float = MIN_TEXT_PT) -> None:
    """Raise :class:`FigureTooSmallError` when some text of ``fig`` is displayed below ``min_pt`` points."""
    size, text = smallest_text(fig, display_px)
    if size < min_pt - 1e-6:
        raise FigureTooSmallError(
            f"figure text {text[:60]!r} is {size:.1f} pt when displayed {display_px} px wide (want >= {min_pt:g} "
            f"pt): make the figure narrower (at most {display_px / fig.dpi:.1f} in at {fig.dpi:g} dpi) or its "
            "text larger")


def _bullets(items: Sequence[str], numbered: bool = False) -> str:
    return "\n".join(f"{i}. {s}" if numbered else f"- {s}" for i, s in enumerate(items, 1)) + "\n"


def what_this_shows(findings: Sequence[str], not_shown: Sequence[str], exercises: Sequence[str]) -> Any:
    """The last section of a notebook as Markdown: the findings (sentences the notebook writes from its own
    numbers), what they do not show, and 2-3 exercises (a parameter to change and what to look for)."""
    from IPython.display import Markdown

    if not findings or not not_shown or not 2 <= len(exercises) <= 3:
        raise DepthGError("what_this_shows needs findings, what they do not show and 2-3 exercises")
    return Markdown("**Findings of this run.**\n\n" + _bullets(findings)
                    + "\n**What this does not show.**\n\n" + _bullets(not_shown)
                    + "\n**Exercises.**\n\n" + _bullets(exercises, numbered=True))


def shown_path(path: str | os.PathLike) -> str:
    """A path as a notebook prints it: relative to the repository root when inside it, else with the home
    folder as ``~`` (outputs never carry the machine's absolute paths of the repository)."""
    p = Path(path)
    absolute = p if p.is_absolute() else Path.cwd() / p
    absolute = Path(os.path.normpath(absolute))
    root = repo_root().resolve()
    if absolute.is_relative_to(root):
        return absolute.relative_to(root).as_posix() or "."
    home = Path.home()
    if absolute.is_relative_to(home):
        return "~/" + absolute.relative_to(home).as_posix()
    return str(p)
