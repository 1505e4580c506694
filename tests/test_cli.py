"""Command line: the subcommands run in-process on tiny inputs; --help lists only working commands."""

from __future__ import annotations

import json
import warnings

import pytest

from depthg.__main__ import build_parser, main
from depthg.utils import DepthGError

TINY = "backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2, img_size: 64}"


def tiny_overrides(tmp_path) -> list[str]:
    return [
        f"cache_dir={tmp_path / 'cache'}", "backbone=vit_small_patch8_224", TINY, "weights=null", "res=32",
        "eval_res=32", "five_crop=true", "world_n_train=2", "world_n_val=2", "world_size=[64, 128]", "dim=8", "batch_size=4",
        "feature_samples=3", "knn_k=5", "num_neighbors=2", "eval_every=0", "device=cpu", "log_every=1", "threads=1",
    ]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("synthesize", "prepare", "train", "eval", "ablate", "depth", "crop", "knn", "pretrain"):
        assert command in text
    commands = build_parser()._subparsers._group_actions[0].choices
    assert "pretrain" in commands


def test_synthesize_then_train_then_eval(tmp_path, capsys):
    root = main(["synthesize", str(tmp_path / "world"), "--n-train", "1", "--n-val", "1", "--height", "64",
                 "--width", "128", "--no-progress"])
    assert (root / "world.json").is_file()
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = main(["train", "--preset", "synthetic", *tiny_overrides(tmp_path), f"data_dir={root}",
                       "steps=2", f"output_dir={out}", "--no-progress"])
        assert result["steps"] == 2 and (out / "results.json").is_file()
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log if "train" in r] == [1, 2]
        # --resume with more steps continues from step 2
        result = main(["train", "--config", str(out / "config.yaml"), "steps=3", "--resume", "--no-progress"])
        assert result["steps"] == 3
        evaluated = main(["eval", str(out / "checkpoint_last.pt"), "eval_flip=false", "--no-progress",
                          "--predictions", "1"])
    assert evaluated["checkpoint_step"] == 3 and 0 <= evaluated["cluster"]["accuracy"] <= 100


def test_bad_override_is_a_clear_error(tmp_path):
    from depthg.config import ConfigError

    with pytest.raises(ConfigError, match="feature_sample"):
        main(["train", "--preset", "synthetic", "feature_sampels=3"])


def test_ablate_runs_and_writes_table(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = main(["ablate", "--world-seed", "3", "--dev-world-seed", "2", "--variants", "stego", "depthg",
                       "--seeds", "0", "1", "--steps", "1", "--out-dir", str(tmp_path / "abl"), "--no-progress",
                       *tiny_overrides(tmp_path)])
    assert set(report["summary"]) == {"stego", "depthg"}
    assert report["summary"]["stego"]["cluster_miou"]["n"] == 2
    # the held-out protocol is recorded, and the test world lives in its own cache folder
    assert report["protocol"]["test_world_seeds"] == [3] and report["protocol"]["dev_world_seed"] == 2
    assert report["protocol"]["val_images"] == report["runs"]["stego"][0]["final"]["n_images"]
    assert report["protocol"]["steps"] == 1 and report["protocol"]["backbone_sha256"] is None  # random init
    worlds = list((tmp_path / "cache" / "world3").glob("synthetic_world*/world.json"))
    assert worlds and json.loads(worlds[0].read_text())["seed"] == 3
    paired = report["summary"]["depthg"]["paired_vs_stego"]["cluster_miou"]
    stego, depthg = (report["summary"][v]["cluster_miou"]["values"] for v in ("stego", "depthg"))
    assert paired["values"] == [a - b for a, b in zip(depthg, stego)]
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| stego |" in table and "Command: `python -m depthg ablate --preset synthetic --world-seed 3" in table
    # the same world as development and test is refused
    with pytest.raises(DepthGError, match="must not include"):
        main(["ablate", "--world-seed", "2", "--dev-world-seed", "2", "--seeds", "0"])
