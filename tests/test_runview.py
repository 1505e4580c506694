"""A finished run as the training notebooks show it: the validation trend read from log.jsonl, the findings
written from the run's numbers, and the summary with repository-relative paths."""

from __future__ import annotations

import json
import math

from depthg.lab import runview


def _run(tmp_path, val: list[tuple[int, float, float]]) -> dict:
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "log.jsonl", "w") as f:
        f.write(json.dumps({"step": 10, "train": {"total": 1.0}}) + "\n")
        for step, acc, miou in val:
            f.write(json.dumps({"step": step, "val": {"cluster_accuracy": acc, "cluster_miou": miou}}) + "\n")
    metrics = {"cluster": {"accuracy": 31.5, "miou": 9.4, "iou_per_class": {"road": 60.0, "pole": 0.0, "sky": math.nan}},
               "linear": {"accuracy": 63.6, "miou": 16.2}}
    return {"steps": 300, "final": {"metrics": metrics}, "best_on_val": {"step": 100, "metrics": metrics},
            "config": {"name": "synthetic_paper", "mode": "paper", "data_dir": None, "output_dir": str(out),
                       "backbone": "embedded", "weights": None}}


def test_validation_trend_and_findings_come_from_the_run(tmp_path):
    result = _run(tmp_path, [(100, 40.7, 10.6), (200, 35.0, 10.0), (300, 31.2, 9.3)])
    trend = runview.validation_trend(result)
    assert trend["cluster_accuracy"] == {"first": 40.7, "last": 31.2} and trend["best_step"] == 100 and trend["n"] == 3
    found = runview.training_findings(result)
    assert found[0].startswith("After 300 steps on the synthetic world, the final weights score unsupervised accuracy "
                               "31.5 % and mIoU 9.4 %")
    assert "Training lowered the validation accuracy from 40.7 % (first validation, step 100) to 31.2 % (step 300)" in found[1]
    assert found[2] == "1 of the 2 classes present score an unsupervised IoU under 1 % (pole)."
    summary = json.loads(runview.summary(result))
    assert summary["unsupervised_miou"] == 9.4 and summary["results_json"].endswith("run/results.json")
    assert "best_on_val (step 100)" in runview.evaluation_text(result)


def test_a_run_without_validations_has_no_trend(tmp_path):
    result = _run(tmp_path, [])
    assert runview.validation_trend(result) == {} and len(runview.training_findings(result)) == 2
