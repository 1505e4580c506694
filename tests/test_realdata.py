"""What the training notebooks say about a real run: requirements, the folder check (the loaders' own errors)
and the plan with projected times from the committed measurements."""

from __future__ import annotations

import json

import numpy as np
import pytest

from depthg.lab import realdata
from depthg.utils import repo_root
from test_datasets import write_coco, write_potsdam


@pytest.mark.parametrize("key", list(realdata.REAL_RUNS))
def test_requirements_name_the_layout_weights_preset_and_classes(key):
    text = realdata.requirements(key)
    run = realdata.REAL_RUNS[key]
    assert run.layout.splitlines()[0] in text and "weights=dino" in text and f"`{run.preset}_paper`" in text
    assert "**Classes** (" in text and "steps=2334" in text


def test_folder_check_reports_the_loaders_errors_and_counts(tmp_path):
    missing = realdata.check_folder("cocostuff", tmp_path / "nope")
    assert not missing.ok and all("DatasetNotFoundError" in line and "does not exist" in line for line in missing.lines)
    assert realdata.check_folder("cocostuff", None).lines == ["no data_dir given: nothing to check"]
    write_coco(tmp_path / "coco", "train", ["1", "2", "3"], [np.zeros((4, 4), np.uint8)] * 3)
    write_coco(tmp_path / "coco", "val", ["4"], [np.zeros((4, 4), np.uint8)])
    found = realdata.check_folder("cocostuff", tmp_path / "coco")
    assert found.ok and (found.n_train, found.n_val) == (3, 1)
    write_potsdam(tmp_path / "potsdam")
    assert realdata.check_folder("potsdam", tmp_path / "potsdam").n_train == 2


def test_plan_projects_from_the_committed_measurements(tmp_path):
    p = realdata.plan("cityscapes")
    assert (p["n_train"], p["n_val"]) == (2975, 500) and p["sizes_from"] == "the official train / val split"
    gpu = json.loads((repo_root() / "benchmarks/results/gpu.json").read_text())
    row = next(r for r in gpu["train_step"]["results"] if r["backbone"] == "vit_b8" and r["amp"] == "bf16")
    recompute = next(r for r in p["rows"] if "recomputed" in r["step"])
    assert recompute["gpu_s"] == pytest.approx(2334 * row["recompute"]["sec_per_step"])
    assert "measured" in recompute["how"] and "x4 for ViT-B" in recompute["how"]
    assert p["rows"][0]["cpu_s"] is None and "not measured" in realdata.plan_markdown(p)
    assert p["totals"]["gpu"] == pytest.approx(sum(r["gpu_s"] or 0 for i, r in enumerate(p["rows"]) if i != 3))
    counted = realdata.plan("potsdam", n_train=10, n_val=4)
    assert counted["sizes_from"] == "your folder" and counted["n_val"] == 4
    assert realdata.duration(90) == "90 s" and realdata.duration(7200) == "2.0 h" and realdata.duration(None) == "not measured"
    with pytest.raises(FileNotFoundError, match="train_step.json"):
        realdata.plan("cityscapes", results_dir=tmp_path)
