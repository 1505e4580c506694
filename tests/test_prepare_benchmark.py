"""benchmarks/prepare.py: the dry run (a tiny world, the same code) measures every stage both ways with
identical outputs, and the committed measurement was written by the script as it is now."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.test_gpu_benchmark import _positive

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "prepare.py"
STAGES = ["depth", "five_crop", "knn", "feature_cache", "final_eval"]


@pytest.fixture(scope="module")
def report(tmp_path_factory, benchmark_dry_run):
    return benchmark_dry_run(SCRIPT, tmp_path_factory.mktemp("prepare_bench") / "prepare.json")


def test_every_stage_is_measured_both_ways_with_identical_outputs(report):
    assert report["dry_run"] is True and "measure nothing" in report["note"]
    assert list(report["stages"]) == STAGES
    for name, stage in report["stages"].items():
        assert stage["identical"] is True, name
        assert _positive(stage["serial_s"]) and _positive(stage["parallel_s"]) and stage["workers"] >= 2
        assert stage["speedup"] == pytest.approx(stage["serial_s"] / stage["parallel_s"])
    assert _positive(report["world"]["pool_start_s"]) and report["world"]["n_crops"] == 5 * report["world"]["n_train_images"]
    assert len(report["load_average_before"]) == 3 and report["machine"]["cpu_count"] >= 1


def test_the_committed_measurement_is_a_run_of_this_script(report):
    committed = json.loads((REPO / "benchmarks" / "results" / "prepare.json").read_text())
    words = shlex.split(committed["command"])
    assert committed["dry_run"] is False and words[:2] == ["python", "benchmarks/prepare.py"]
    assert "--dry-run" not in words
    assert set(committed) == set(report) and list(committed["stages"]) == STAGES
    assert all(committed["stages"][name].keys() == report["stages"][name].keys() for name in STAGES)
    assert all(stage["identical"] for stage in committed["stages"].values())
