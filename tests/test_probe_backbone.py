"""benchmarks/probe_backbone.py: patch targets, scores and the report's per-class table, against hand counts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # for probe_backbone only
import probe_backbone as probe  # noqa: E402


def test_patch_targets_take_each_patch_majority_and_ignore_unlabelled():
    labels = torch.full((1, 8, 16), -1)
    labels[0, :, :8] = 2
    labels[0, :3, :8] = 1          # 24 of 64 pixels: class 2 keeps the majority
    labels[0, :5, 8:] = 0          # 40 labelled pixels of class 0, the rest ignored
    assert probe.patch_targets(labels, 3).tolist() == [[2, 0]]
    assert probe.patch_targets(torch.full((1, 8, 8), -1), 3).tolist() == [[-1]]


def test_scores_match_hand_counts():
    target = torch.tensor([0, 0, 1, 1, 1, -1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2])
    s = probe.scores(pred, target, 4)  # class 3 never occurs: left out of the mean
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1, fn 1 -> 1/2; class 2: tp 1 -> 1
    assert s["accuracy"] == round(100 * 4 / 6, 2)
    assert s["iou"] == [33.33, 50.0, 100.0, None]
    assert s["miou"] == round(100 * (1 / 3 + 1 / 2 + 1) / 3, 2)


def test_markdown_lists_each_class_with_its_share():
    lin = {"accuracy": 50.0, "miou": 40.0, "iou": [30.0, None]}
    report = {"world": {"seed": 7, "role": "test", "n_train": 1, "n_val": 1, "size": [8, 8], "n_classes": 2,
                        "label_ids": [7, 8], "class_names": ["road", "sidewalk"], "val_patch_share": [100.0, 0.0]},
              "command": "x", "patch_grid": [1, 1], "backbone": {"path": "b.json", "weights_sha256": "0" * 64},
              "results": {"backbone": {"linear": lin, "knn": lin}}}
    md = probe.markdown(report)
    assert "| road | 100.0 | 30.0 |" in md and "| sidewalk | 0.0 | – |" in md
    # a file without a recorded step (the embedded weights) names no step; a pretraining export names its own
    assert "(sha256 `0000000000000000...`)." in md and "step" not in md
    report["backbone"]["step"] = 1500
    assert "(sha256 `0000000000000000...`, exported at step 1500)." in probe.markdown(report)
