"""Every notebook runs headless under papermill in its smoke configuration, and the committed notebooks are
clean (no outputs, a ``parameters`` cell, a markdown cell before every code cell) and thin: no code cell
over 25 lines, no import of a private name, no document named that is not in the repository.

The smoke runs write only under ``tmp_path`` (output notebooks, runs, caches, figures): every notebook
that writes files takes ``output_dir`` (and, where it builds data, ``cache_dir``) as parameters.
"""

from __future__ import annotations

import json
import os
import re
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
    # live ipywidgets.interact can hang nbclient's execution (jupyter/nbclient#312); the browser check moves them
    "02_fps_point_clouds.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "html"), "sliders": False},
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


MAX_CELL_LINES = 25
# `from depthg.x import a, _b` / `import depthg._x` / `depthg.x._y(...)`: a private name of the workbench
FROM_IMPORT = re.compile(r"^\s*from\s+([\w.]+)\s+import\s+\(?([^)#\n]*(?:\n[^)#]*)?)\)?", re.M)
PRIVATE_ATTRIBUTE = re.compile(r"\b(?:depthg|viz|sampling|losses|lhp|notebook)(?:\.\w+)*\._[a-zA-Z]\w*")
# a document the text names: a path ending in .md
DOCUMENT = re.compile(r"(?<![\w/.-])((?:\.\.?/)*[\w/.-]*\w\.md)\b")


def private_imports(source: str) -> list[str]:
    """Private names (leading underscore) a cell imports from the workbench or reads off its modules."""
    found = []
    for module, names in FROM_IMPORT.findall(source):
        if module.split(".")[0] == "depthg" or any(p.startswith("_") for p in module.split(".")):
            found += [f"from {module} import {n.strip().split(' as ')[0]}" for n in names.split(",")
                      if n.strip().startswith("_")]
    found += [m for m in re.findall(r"^\s*import\s+(depthg[\w.]*)", source, re.M) if "._" in m]
    found += PRIVATE_ATTRIBUTE.findall(source)
    return found


def outside_documents(source: str) -> list[str]:
    """Documents (``*.md``) a cell names that are not files of this repository (a file name joined onto a
    folder in code, ``out / "captions.md"``, is a file the notebook writes, not a reference)."""
    bad = []
    for ref in DOCUMENT.findall(re.sub(r'/\s*"[\w.-]+\.md"', "", source)):
        candidates = [(ROOT / ref).resolve(), (NB_DIR / ref).resolve()]
        if not any(c.is_file() and c.is_relative_to(ROOT) for c in candidates):
            bad.append(ref)
    return bad


def test_thinness_checks_catch_what_they_should():
    assert private_imports("from depthg.data.prepare import _short_hash, _slug   # naming\n") == [
        "from depthg.data.prepare import _short_hash", "from depthg.data.prepare import _slug"]
    assert private_imports("from depthg.lab.viz import (show_image,\n    _as_numpy)") == ["from depthg.lab.viz import _as_numpy"]
    assert private_imports("x = viz._as_numpy(img)") == ["viz._as_numpy"]
    assert private_imports("from depthg import viz\nfrom depthg.lab.notebook import choose_run\nx = 3 * _y") == []
    assert outside_documents("see docs/method.md §11 and [this](../docs/fidelity.md#33-x)") == []
    assert outside_documents('with atomic_write(output_dir / "captions.md", "w") as f:') == []
    assert outside_documents("see method.md §6 and released_code.md §2.4, ../shared/reference/design.md") == [
        "method.md", "released_code.md", "../shared/reference/design.md"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_thin(name):
    """Parameters, explanation, calls into depthg/ and plots: no long code cell, no private import, no
    document outside the repository."""
    nb = nbformat.read(NB_DIR / name, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            n_lines = len(cell.source.rstrip().splitlines())
            assert n_lines <= MAX_CELL_LINES, f"{name}: code cell {i} has {n_lines} lines (at most {MAX_CELL_LINES})"
            assert not private_imports(cell.source), f"{name}: cell {i} uses private names {private_imports(cell.source)}"
        assert not outside_documents(cell.source), \
            f"{name}: cell {i} names documents that are not in the repository: {outside_documents(cell.source)}"


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


def test_at_root_resolves_against_the_repository_root(tmp_path, monkeypatch):
    from depthg.lab.notebook import at_root

    monkeypatch.chdir(ROOT)
    assert at_root("runs/x") == Path("runs/x")  # in the root: stays relative, as the CLI writes it
    monkeypatch.chdir(NB_DIR)
    assert at_root("runs/x") == ROOT / "runs/x"  # Jupyter runs notebooks in notebooks/
    assert at_root(tmp_path) == tmp_path and at_root(None) is None


def test_choose_run_says_why_and_builds_the_same_configs(tmp_path):
    from depthg.config import Config, apply_overrides
    from depthg.lab.notebook import SMOKE, as_overrides, choose_run

    common = dict(mode="paper", seed=3, device="cpu", output_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    fallback = choose_run("Cityscapes", "cityscapes_vitb8", None, None, **common)
    assert not fallback.real and len(fallback.reasons) == 2
    assert fallback.config.to_dict() == Config.preset("synthetic", mode="paper", seed=3, device="cpu",
                                                      output_dir=str(tmp_path / "out"),
                                                      cache_dir=str(tmp_path / "cache")).to_dict()
    assert "NOT running the Cityscapes preset: dataset not found" in fallback.explain()
    smoke = choose_run("Cityscapes", "cityscapes_vitb8", tmp_path / "missing", "dino", smoke=True, steps=7, **common)
    assert smoke.config.steps == 7 and smoke.config.world_size == SMOKE["world_size"] and "smoke run" in smoke.explain()
    real = choose_run("Cityscapes", "cityscapes_vitb8", tmp_path, "embedded", **common)
    assert real.real and real.reasons == [] and real.config.data_dir == str(tmp_path)
    assert real.config.backbone == "embedded" and real.explain().startswith("RUNNING the 'cityscapes_vitb8' preset")
    # the smoke sizes as CLI overrides give the same config as replacing them directly
    base = Config.preset("synthetic")
    assert apply_overrides(base, as_overrides(SMOKE)).to_dict() == base.replace(**SMOKE).to_dict()


def test_figure_runs_never_reuse_a_run_with_another_config(tmp_path):
    from depthg.lab.ablation import backbone_sha256, variant_config
    from depthg.lab.notebook import SMOKE, as_overrides, figure_runs

    cache = tmp_path / "cache"
    overrides = [f"cache_dir={cache}"] + as_overrides({k: v for k, v in SMOKE.items() if k != "steps"})
    wanted = variant_config("stego", 0, steps=SMOKE["steps"], out_dir=tmp_path / "ablation", overrides=overrides)
    folder = Path(wanted.output_dir)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": wanted.replace(world_n_train=9).to_dict()}))
    with pytest.raises(FileExistsError, match="differs in world_n_train"):
        figure_runs({"STEGO": "stego"}, 0, tmp_path, cache, smoke=True, train_if_missing=False)
    sha = backbone_sha256(wanted)
    (folder / "results.json").write_text(json.dumps({"config": wanted.to_dict(), "steps": 4,
                                                     "ablation_backbone_sha256": sha}))
    assert figure_runs({"STEGO": "stego"}, 0, tmp_path, cache, smoke=True, train_if_missing=False)["STEGO"]["steps"] == 4
    # the same config made with other backbone weights is not reused
    (folder / "results.json").write_text(json.dumps({"config": wanted.to_dict(), "steps": 4,
                                                     "ablation_backbone_sha256": "0" * 64}))
    with pytest.raises(FileNotFoundError, match="only runs of other weights"):
        figure_runs({"STEGO": "stego"}, 0, tmp_path, cache, smoke=True, train_if_missing=False)
