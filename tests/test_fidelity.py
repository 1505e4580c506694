"""Fidelity choices: the mode is a preset of functions and flags, chosen once in depthg.build."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from depthg.method import lhp, losses, released, sampling
from depthg.build import FIDELITY_PRESETS, Fidelity, depth_normalization, fidelity
from depthg.config import MODES, Config
from depthg.data.transforms import PAPER_RESIZE, RELEASED_RESIZE, RESIZES
from depthg.method.schedules import decay_events

ROOT = Path(__file__).resolve().parents[1]


def test_presets_pick_the_paper_or_the_released_functions():
    paper, rel = fidelity(Config(mode="paper")), fidelity(Config(mode="released"))
    assert paper == Fidelity.paper() and rel == Fidelity.released()
    assert (paper.unproject, paper.cells_to_grid, paper.negatives) == (
        sampling.depth_to_points, sampling.indices_to_grid, losses.derangement_negatives)
    assert (paper.lhp_keep_attention, paper.lhp_normalise, paper.resize) == (
        lhp.strongest_attention, lhp.weighted_mean, PAPER_RESIZE)
    assert not (paper.fps_fixed_start or paper.transposed_depth_pairs) and paper.depth_values == "none"
    assert (rel.unproject, rel.cells_to_grid, rel.negatives) == (
        released.radians_unprojection, released.transposed_readout, released.super_perm_negatives)
    assert (rel.lhp_keep_attention, rel.lhp_normalise, rel.resize) == (
        released.weakest_attention, released.divide_by_cell_count, RELEASED_RESIZE)
    assert rel.fps_fixed_start and rel.transposed_depth_pairs and rel.depth_values == "minmax255"
    # "auto" depth values follow the fidelity on five-crops only
    assert depth_normalization(Config(mode="released"), rel, {"crop_dir": "x"}) == "minmax255"
    assert depth_normalization(Config(mode="released"), rel, {"crop_dir": None}) == "none"
    # the resize of each mode comes from the one mode -> resize table the data preparation reads too
    assert (paper.resize, rel.resize) == (RESIZES["paper"], RESIZES["released"])
    assert set(RESIZES) == set(FIDELITY_PRESETS) == set(MODES)


def test_a_run_derives_its_fidelity_once():
    """``fidelity(cfg)`` is called where a run (or a loaded run) is built, and the object is handed down:
    nothing further in re-derives it from the config."""
    import ast

    callers = set()
    for path in sorted((ROOT / "depthg").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fidelity":
                        callers.add(f"{path.relative_to(ROOT).as_posix()}:{fn.name}")
    # calibrate builds the training crops and features as build_run does (without a head or a run folder)
    assert callers == {"depthg/train.py:build_run", "depthg/evaluate.py:evaluate_checkpoint",
                       "depthg/lab/notebook.py:load_trained", "depthg/calibrate.py:_training_view"}


def test_mode_fills_the_timing_flags_unless_set():
    assert (Config(mode="released").decay_after_step, Config(mode="released").sample_decay_at_start) == (True, True)
    assert (Config().decay_after_step, Config().sample_decay_at_start) == (False, False)
    mixed = Config(mode="released", sample_decay_at_start=False)
    assert mixed.decay_after_step and not mixed.sample_decay_at_start


@pytest.mark.parametrize("after_step,at_start", [(False, False), (True, False), (False, True), (True, True)])
def test_decay_events_simulates_the_loop(after_step: bool, at_start: bool) -> None:
    """A loop that fires every ``every`` iterations (at 0 too with ``at_start``) and applies each event from
    its own iteration, or from the next one with ``after_step``, counts what decay_events says."""
    for every in (1, 3, 7):
        applied = 0
        for it in range(60):
            fires = it % every == 0 and (it > 0 or at_start)
            if fires and not after_step:
                applied += 1
            assert decay_events(it, every, after_step, at_start) == applied, (every, it)
            if fires and after_step:
                applied += 1
    assert decay_events(10**6, 0, True, True) == 0  # every = 0: off


def test_method_code_never_reads_the_mode() -> None:
    """Only the config (the preset) and the build layer (which picks the functions) branch on ``mode``;
    method code neither tests it nor passes it on (results.json still records it)."""
    method = sorted(p.relative_to(ROOT / "depthg").as_posix() for p in (ROOT / "depthg" / "method").glob("*.py"))
    for name in method + ["train.py", "train_support.py", "evaluate.py", "data/transforms.py", "data/prepare.py"]:
        text = (ROOT / "depthg" / name).read_text()
        assert not re.search(r"\bmode\s*(==|!=)|self\.mode|mode=(cfg\.)?mode\b", text), name
