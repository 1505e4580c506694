"""Every notebook runs headless under papermill in its smoke configuration, and the committed notebooks are
clean (no outputs, a ``parameters`` cell, a markdown cell before every code cell).

The smoke runs write only under ``tmp_path`` (output notebooks, runs, caches, figures): every notebook
that writes files takes ``output_dir`` (and, where it builds data, ``cache_dir``) as parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))

# Extra smoke parameters per notebook (besides smoke=True): tmp is the test's own folder, shared one folder
# for the whole module, so that reproduce_tables reads the runs reproduce_figures trained (names sort them
# in that order; run alone, reproduce_tables shows its "no run yet" cells instead).
SMOKE_PARAMS = {
    "01_depth_estimation.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "out")},
    "02_fps_point_clouds.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "html")},
    "train_cityscapes.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "out"), "cache_dir": str(shared / "cache")},
    "train_cocostuff.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "out"), "cache_dir": str(shared / "cache")},
    "train_potsdam.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "out"), "cache_dir": str(shared / "cache")},
    "reproduce_figures.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "figures"), "cache_dir": str(shared / "cache"),
                                                    "runs_dir": str(shared / "runs")},
    "reproduce_tables.ipynb": lambda tmp, shared: {"runs_dir": str(shared / "runs")},
}


# Files a smoke run must leave behind (relative to the test's tmp folder).
EXPECTED_FILES = {
    "01_depth_estimation.ipynb": ["out/depth_results.json"],
    "02_fps_point_clouds.ipynb": ["html/fps_point_cloud.html"],
    "train_cityscapes.ipynb": ["out/results.json", "out/log.jsonl"],
    "train_cocostuff.ipynb": ["out/results.json"],
    "train_potsdam.ipynb": ["out/results.json"],
    "reproduce_figures.ipynb": [f"figures/{f}" for f in (
        "fig1_depth_guidance.png", "fig3_lhp_propagation.png", "fig4_qualitative.png", "fig5_random_vs_fps.png",
        "fps_point_cloud.png", "fps_point_cloud.html", "training_curves.png", "per_class_iou.png",
        "confusion_depthg.png", "captions.md")],
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks_shared")


def test_expected_notebooks_exist():
    for name in ["01_depth_estimation", "02_fps_point_clouds", "03_depth_feature_correlation", "train_cityscapes",
                 "train_cocostuff", "train_potsdam", "reproduce_figures", "reproduce_tables"]:
        assert f"{name}.ipynb" in NOTEBOOKS, f"missing notebooks/{name}.ipynb"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    """No outputs or execution counts are committed; the structure papermill and readers rely on is there."""
    nb = nbformat.read(NB_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{name}: kernelspec must be python3"
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{name}: the first cell must say what it teaches"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and nb.cells[tagged[0]].cell_type == "code", f"{name}: exactly one 'parameters' cell"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.get("outputs") == [], f"{name}: cell {i} carries outputs"
        assert cell.get("execution_count") is None, f"{name}: cell {i} carries an execution count"
        if i != tagged[0]:
            assert nb.cells[i - 1].cell_type == "markdown", f"{name}: code cell {i} has no markdown cell before it"
    assert any(line.startswith("smoke = False") for line in nb.cells[tagged[0]].source.splitlines()), \
        f"{name}: the parameters cell must define smoke = False (the CI runs it with smoke=True)"
    for line in nb.cells[tagged[0]].source.splitlines():
        # papermill splits parameter lines on '='; a second one (e.g. in a comment) makes it skip the line
        assert line.count("=") <= 1, f"{name}: parameter line papermill cannot parse: {line!r}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, tmp_path, shared, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    params = {"smoke": True, **SMOKE_PARAMS.get(name, lambda tmp, shared: {})(tmp_path, shared)}
    out = tmp_path / f"out_{name}"
    papermill.execute_notebook(
        str(NB_DIR / name), str(out), parameters=params, kernel_name="python3", cwd=str(NB_DIR),
        progress_bar=False, log_output=False,
        execution_timeout=600,  # a hung cell fails the test (and CI) instead of blocking it
    )
    executed = json.loads(out.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    for rel in EXPECTED_FILES.get(name, []):
        assert (tmp_path / rel).is_file(), f"{name}: smoke run did not write {rel}"
    # nothing was written next to the notebooks
    assert sorted(p.name for p in NB_DIR.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in NB_DIR.iterdir() if not p.name.startswith(".") and (p.suffix == ".ipynb")
    ), f"{name}: wrote files into notebooks/"
    assert os.environ.get("MPLBACKEND") == "Agg"
