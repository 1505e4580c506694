"""JupyterLab as a class sees it: ``scripts/check_jupyterlab.py`` in headless Chromium (smoke sizes), and the
script's own judgement of cell outputs on hand-made examples."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_jupyterlab.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_jupyterlab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(*outputs: dict) -> dict:
    full = [{"output_type": "stream", "name": None, "text": "", "ename": None, "evalue": None, "mimes": [],
             "plain": "", **o} for o in outputs]
    return {"index": 3, "execution_count": 1, "outputs": full}


def test_output_problems_flags_errors_and_library_noise():
    check = _script()
    clean = _cell({"name": "stdout", "text": "open3d and depthg.method.sampling pick the same 121 cells: True\n"},
                  {"output_type": "display_data", "mimes": ["image/png", "text/plain"], "plain": "<Figure>"},
                  {"name": "stderr", "text": "train: 100%|##########| 4/4 [00:01<00:00,  3.1it/s]\r"})
    assert check.output_problems([clean]) == []
    error = _cell({"output_type": "error", "ename": "ValueError", "evalue": "bad"})
    assert check.output_problems([error]) == ["cell 3: error output ValueError: bad"]
    noise = _cell({"name": "stdout", "text": "Jupyter environment detected. Enabling Open3D WebVisualizer.\n"
                                             "[Open3D INFO] WebRTC GUI backend enabled.\n"})
    assert "library noise" in check.output_problems([noise])[0]
    warning = _cell({"name": "stderr", "text": "/x.py:3: UserWarning: something\n  warnings.warn(\n"})
    assert check.output_problems([warning])[0].startswith("cell 3: stderr output")
    note = _cell({"name": "stderr", "text": "[ablation] stego seed 0\n"})  # the workbench's own progress note
    assert check.output_problems([note]) == []


def test_slider_notebooks_and_saved_papermill_parameters(tmp_path, monkeypatch):
    """Only a notebook that makes sliders must show one; a notebook saved by papermill gets the check's own
    output folders instead of the ones its run injected."""
    import nbformat

    check = _script()
    assert check.makes_sliders("02_fps_point_clouds.ipynb") and not check.makes_sliders("03_depth_feature_correlation.ipynb")
    saved = nbformat.read(ROOT / "notebooks" / "reproduce_figures.ipynb", as_version=4)
    tagged = next(i for i, c in enumerate(saved.cells) if "parameters" in c.metadata.get("tags", []))
    saved.cells.insert(tagged + 1, nbformat.v4.new_code_cell('output_dir = "figures"',
                                                             metadata={"tags": ["injected-parameters"]}))
    source = tmp_path / "saved"
    source.mkdir()
    nbformat.write(saved, source / "reproduce_figures.ipynb")
    monkeypatch.setattr(check, "NOTEBOOKS", source)
    work = tmp_path / "work" / "notebooks"
    work.mkdir(parents=True)
    check.prepare_notebooks(work, ["reproduce_figures.ipynb"], ["reproduce_figures.ipynb"], smoke=True)
    injected = [c.source for c in nbformat.read(work / "reproduce_figures.ipynb", as_version=4).cells
                if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "output_dir = 'figures'" not in injected[0] and 'output_dir = "figures"' not in injected[0]
    assert f"output_dir = {str(tmp_path / 'work' / 'outputs' / 'reproduce_figures' / 'output_dir')!r}" in injected[0]
    assert "smoke = True" in injected[0]
    # without smoke, a notebook that writes nothing gets no injected cell (JupyterLab never runs an empty one)
    name = "03_depth_feature_correlation.ipynb"
    nbformat.write(nbformat.read(ROOT / "notebooks" / name, as_version=4), source / name)
    check.prepare_notebooks(work, [name], [name], smoke=False)
    assert not [c for c in nbformat.read(work / name, as_version=4).cells
                if "injected-parameters" in c.metadata.get("tags", [])]


def test_jupyterlab_in_a_browser(tmp_path):
    """Start JupyterLab, open every notebook, Run All on 02 (smoke), drag a slider, save and reopen: no dialog,
    no console error, no error output or library noise, no shrunk figure, a figure that is redrawn once, on
    release, and widgets that render again after the notebook was saved and reopened."""
    check = _script()
    if check.find_chromium(None) is None:
        pytest.skip("Debian's chromium is not installed (./setup.sh installs it with apt-get as root or with sudo)")
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(report), "--timeout", "600",
                           "--screenshots", str(tmp_path / "shots")], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    reports = json.loads(report.read_text())
    assert reports[0]["notebook"] == "(JupyterLab start-up)" and not reports[0]["problems"]
    assert reports[-1]["notebook"] == "(repository untouched)" and not reports[-1]["problems"]
    opened = {r["notebook"] for r in reports[1:-1]}
    assert opened == {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    ran = [r for r in reports if r["run"]]
    assert [r["notebook"] for r in ran] == ["02_fps_point_clouds.ipynb"]
    assert ran[0]["cells_run"] == ran[0]["code_cells"] > 0
    assert ran[0]["slider"]["figure_changed"] and ran[0]["slider"]["track_px"] >= 300
    assert ran[0]["reopened"]
