"""Every notebook runs headless under papermill in its smoke configuration, and the committed notebooks are
clean (no outputs, a ``parameters`` cell, a markdown cell before every code cell) and thin: no code cell
over 25 lines, no import of a private name, no document named that is not in the repository. Every notebook
ends with "What this shows" written from its own numbers, every figure it shows is readable when projected
(``DEPTHG_CHECK_FIGURES=1``: depthg.lab.lesson), and two runs of 03 and of reproduce_tables give the same
outputs.

The smoke runs write only under ``tmp_path`` (output notebooks, runs, caches, figures): every notebook
that writes files takes ``output_dir`` (and, where it builds data, ``cache_dir``) as parameters.
"""

from __future__ import annotations

import hashlib
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
    # sliders keep their default, "auto": static under papermill (a live interact would wait for ever)
    "02_fps_point_clouds.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "html")},
    "train_cityscapes.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "out"), "cache_dir": str(shared / "cache")},
    # a folder that is not the dataset: the notebooks check it with the loader, report and train nothing
    "train_cocostuff.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "out"), "data_dir": str(tmp / "no_coco")},
    "train_potsdam.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "out"), "data_dir": str(tmp / "no_potsdam")},
    "reproduce_figures.ipynb": lambda tmp, shared: {"output_dir": str(tmp / "figures"), "cache_dir": str(shared / "cache"),
                                                    "runs_dir": str(shared / "runs")},
    "reproduce_tables.ipynb": lambda tmp, shared: {"runs_dir": str(shared / "runs")},
}


# Files a smoke run must leave behind (relative to the test's tmp folder).
EXPECTED_FILES = {
    "01_depth_estimation.ipynb": ["out/depth_results.json"],
    "02_fps_point_clouds.ipynb": ["html/fps_point_cloud.html"],
    "train_cityscapes.ipynb": ["out/results.json", "out/log.jsonl"],
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
    for name in ["01_depth_estimation", "02_fps_point_clouds", "03_depth_feature_correlation", "04_evaluation",
                 "train_cityscapes", "train_cocostuff", "train_potsdam", "reproduce_figures", "reproduce_tables"]:
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
def test_notebook_ends_with_what_this_shows(name):
    """The last section is "What this shows", rendered by depthg.lab.lesson.what_this_shows from numbers the
    notebook computed (not typed into markdown)."""
    nb = nbformat.read(NB_DIR / name, as_version=4)
    headings = [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert headings and headings[-1][1].startswith("## What this shows"), f"{name}: the last section is not 'What this shows'"
    last_code = [c for c in nb.cells[headings[-1][0]:] if c.cell_type == "code"]
    assert last_code and "lesson.what_this_shows(" in last_code[-1].source, f"{name}: 'What this shows' is not computed"


# Executed smoke notebooks, kept for the determinism test (which runs 03 and reproduce_tables a second time).
SMOKE_RUNS: dict[str, Path] = {}


def run_smoke(name: str, tmp_path: Path, shared: Path, monkeypatch) -> dict:
    """Execute ``name`` with papermill in its smoke configuration, checking every figure it shows; returns the
    executed notebook (JSON)."""
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("DEPTHG_CHECK_FIGURES", "1")  # a figure with text under 12 pt as displayed is an error
    for var in ("DEPTHG_WIDGETS", "JPY_SESSION_NAME"):  # headless, whatever runs the tests
        monkeypatch.delenv(var, raising=False)
    params = {"smoke": True, **SMOKE_PARAMS.get(name, lambda tmp, shared: {})(tmp_path, shared)}
    out = tmp_path / f"out_{name}"
    papermill.execute_notebook(
        str(NB_DIR / name), str(out), parameters=params, kernel_name="python3", cwd=str(NB_DIR),
        progress_bar=False, log_output=False,
        execution_timeout=600,  # a hung cell fails the test (and CI) instead of blocking it
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, tmp_path, shared, monkeypatch):
    executed = run_smoke(name, tmp_path, shared, monkeypatch)
    SMOKE_RUNS[name] = tmp_path / f"out_{name}"
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    last = [c for c in executed["cells"] if c["cell_type"] == "code"][-1]
    shown = "".join("".join(o.get("data", {}).get("text/markdown", "")) for o in last["outputs"])
    assert "Findings of this run." in shown and "Exercises." in shown, f"{name}: no computed 'What this shows'"
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


def test_figure_runs_read_one_world_of_an_ablation_folder(tmp_path):
    from depthg.lab.ablation import backbone_sha256, variant_config
    from depthg.lab.notebook import SMOKE, as_overrides, figure_runs

    cache, table = tmp_path / "cache", tmp_path / "miniature_test"
    # what `ablate --world-seed 7 --out-dir <table> world_n_val=3` writes for stego, seed 0
    overrides = [f"cache_dir={cache}", "world_n_val=3"] + as_overrides({k: v for k, v in SMOKE.items() if k != "steps"})
    wanted = variant_config("stego", 0, steps=SMOKE["steps"], out_dir=table / "world7", overrides=overrides, world_seed=7)
    assert Path(wanted.output_dir) == table / "world7" / "stego" / "seed0"
    with pytest.raises(FileNotFoundError, match=r"world7/stego/seed0/results.json.*ablate --world-seed 7 --seeds 0 "
                                                r"--variants stego --out-dir \S*miniature_test world_n_val=3"):
        figure_runs({"STEGO": "stego"}, 0, tmp_path, cache, smoke=True, train_if_missing=False, world_seed=7,
                    overrides=["world_n_val=3"], ablation_dir=table)
    Path(wanted.output_dir).mkdir(parents=True)
    (Path(wanted.output_dir) / "results.json").write_text(json.dumps(
        {"config": wanted.to_dict(), "steps": 4, "ablation_backbone_sha256": backbone_sha256(wanted)}))
    found = figure_runs({"STEGO": "stego"}, 0, tmp_path, cache, smoke=True, train_if_missing=False, world_seed=7,
                        overrides=["world_n_val=3"], ablation_dir=table)
    assert found["STEGO"]["dir"] == table / "world7" / "stego" / "seed0"


def comparable_outputs(executed: dict, tmp: Path) -> list[tuple[int, str, str]]:
    """Every output a reader sees, cell by cell: stdout, text, Markdown, HTML and images (by hash), with the
    test's temporary folder replaced; progress bars (stderr) are left out."""
    found = []
    for i, cell in enumerate(executed["cells"]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                found.append((i, "stdout", "".join(out["text"])))
            for mime, value in sorted(out.get("data", {}).items()):
                value = "".join(value) if isinstance(value, list) else str(value)
                found.append((i, mime, hashlib.sha256(value.encode()).hexdigest() if mime.startswith("image/") else value))
    return [(i, kind, text.replace(str(tmp), "<tmp>")) for i, kind, text in found]


@pytest.mark.parametrize("name", ["03_depth_feature_correlation.ipynb", "reproduce_tables.ipynb"])
def test_two_runs_give_identical_outputs(name, tmp_path, shared, monkeypatch):
    """Every draw is seeded: a second run prints, displays and draws exactly what the first did (figures
    compared by their PNG bytes, the numbers by their text)."""
    first_path = SMOKE_RUNS.get(name)
    if first_path is None or not first_path.is_file():  # run alone: make the first run here
        first_path = tmp_path / "first" / f"out_{name}"
        first_path.parent.mkdir()
        run_smoke(name, first_path.parent, shared, monkeypatch)
    first = comparable_outputs(json.loads(first_path.read_text()), first_path.parent)
    second = comparable_outputs(run_smoke(name, tmp_path, shared, monkeypatch), tmp_path)
    assert len(first) == len(second) > 5
    for a, b in zip(first, second):
        assert a == b, f"{name}: cell {a[0]} ({a[1]}) differs between two runs:\n{a[2][:500]}\n---\n{b[2][:500]}"


def test_the_teaching_parameters_are_validated_too():
    """sliders takes true, false or "auto" (02's default); reproduce_figures' seed a seed or "median"."""
    from depthg.config import ConfigError
    from depthg.lab.notebook import validate_parameters

    params = {"sliders": "false", "n_images": "3", "published": "docs/published.md"}
    validate_parameters(params, "02_fps_point_clouds")
    assert params == {"sliders": False, "n_images": 3, "published": "docs/published.md"}
    validate_parameters(auto := {"sliders": "auto"}, "02_fps_point_clouds")
    assert auto["sliders"] == "auto"
    validate_parameters(median := {"seed": "median"}, "reproduce_figures")
    assert median["seed"] == "median"
    validate_parameters(four := {"seed": "4"}, "reproduce_figures")
    assert four["seed"] == 4
    for params, notebook in (({"sliders": "maybe"}, "02_fps_point_clouds"), ({"seed": "median"}, "train_cityscapes"),
                             ({"probe_steps": 0}, "04_evaluation")):
        with pytest.raises(ConfigError):
            validate_parameters(params, notebook)
