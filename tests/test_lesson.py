"""The notebooks' start and end (depthg.lab.lesson): seeding, live or static widgets, the readability rule for
figures (checked on every figure a notebook shows when DEPTHG_CHECK_FIGURES=1), the "What this shows"
block and printed paths."""

from __future__ import annotations

import random
from pathlib import Path

import matplotlib
import nbformat
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from depthg.lab import lesson  # noqa: E402
from depthg.utils import DepthGError, repo_root  # noqa: E402


def test_start_seeds_every_generator():
    lesson.start(5)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    lesson.start(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    lesson.start(6)
    assert torch.rand(1).item() != first[2]


def test_widgets_are_live_only_under_a_jupyter_server(monkeypatch):
    monkeypatch.delenv("DEPTHG_WIDGETS", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert lesson.live_widgets("auto")[0] is False  # papermill / nbclient: no session name
    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/02_fps_point_clouds.ipynb")  # what jupyter_server sets
    assert lesson.live_widgets("auto")[0] is True
    monkeypatch.setenv("DEPTHG_WIDGETS", "static")
    assert lesson.live_widgets("auto") == (False, "DEPTHG_WIDGETS=static")
    assert lesson.live_widgets(True)[0] is True and lesson.live_widgets(False)[0] is False
    with pytest.raises(DepthGError, match="sliders must be"):
        lesson.live_widgets("yes")


def test_readability_is_measured_at_the_displayed_width():
    lesson.apply_style()
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot([0, 1], [0, 1])
    ax.set_title("a title")
    size, _ = lesson.smallest_text(fig)
    assert size == pytest.approx(12.0)  # the tick labels, nothing shrunk
    lesson.check_readable(fig)
    ax.text(0.5, 0.5, "footnote", fontsize=8)
    assert lesson.smallest_text(fig) == (pytest.approx(8.0), "footnote")
    with pytest.raises(lesson.FigureTooSmallError, match="footnote"):
        lesson.check_readable(fig)
    plt.close(fig)
    wide, ax = plt.subplots(figsize=(18, 3))  # 1800 px: shown at half its size, 12 pt -> about 6 pt
    ax.plot([0, 1], [0, 1])
    assert lesson.smallest_text(wide)[0] < 6.5
    plt.close(wide)


def test_what_this_shows_renders_findings_limits_and_exercises():
    md = lesson.what_this_shows([f"accuracy {41.25:.1f} %"], ["not a GPU run"], ["set a = 1", "set b = 2"]).data
    assert "accuracy 41.2 %" in md and "**What this does not show.**" in md and "2. set b = 2" in md
    with pytest.raises(DepthGError):
        lesson.what_this_shows(["x"], ["y"], ["only one exercise"])


def test_shown_path_is_relative_to_the_repository():
    root = repo_root()
    assert lesson.shown_path(root / "runs" / "x" / "results.json") == "runs/x/results.json"
    assert lesson.shown_path(Path.home() / "data") == "~/data"


def test_a_notebook_figure_with_small_text_is_an_error_when_checked(tmp_path, monkeypatch):
    """The check the notebook smoke tests rely on: with DEPTHG_CHECK_FIGURES=1 a displayed figure with small
    text becomes an error output; a readable one does not."""
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("DEPTHG_CHECK_FIGURES", "1")
    monkeypatch.setenv("PYTHONPATH", str(repo_root()))
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("%matplotlib inline\nimport matplotlib.pyplot as plt\n"
                                          "from depthg.lab import lesson\nlesson.start(0)"),
                nbformat.v4.new_code_cell("fig, ax = plt.subplots()\nax.plot([1, 2])\nplt.show()"),
                nbformat.v4.new_code_cell("fig, ax = plt.subplots()\nax.set_title('tiny', fontsize=7)\nplt.show()")]
    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    with pytest.raises(papermill.PapermillExecutionError, match="FigureTooSmallError"):
        papermill.execute_notebook(str(src), str(out), kernel_name="python3", progress_bar=False)
    code = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    assert any("image/png" in o.get("data", {}) for o in code[1].outputs)  # the readable figure is shown
    assert [o.ename for o in code[2].outputs if o.output_type == "error"] == ["FigureTooSmallError"]
