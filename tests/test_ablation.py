"""depthg.lab.ablation without training: variant configs, paired t-intervals, summaries, reading reports."""

from __future__ import annotations

import json
import math

import pytest

from depthg.lab.ablation import (
    DEFAULT_VARIANTS,
    VARIANTS,
    AblationError,
    collect_runs,
    holm_family,
    load_report,
    made_with_weights,
    markdown_table,
    paired_differences,
    report_rows,
    summarise,
    variant_config,
)
from depthg.method.losses import PAPER_DEPTH_SIMILARITY


def test_paired_differences_hand_example():
    # differences 1, 2, 3: mean 2, sd 1, n 3; t_{0.975, 2} = 4.302652729911275 (statistical tables)
    d = paired_differences([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert d["values"] == [1.0, 2.0, 3.0] and d["n"] == 3
    assert math.isclose(d["mean"], 2.0)
    assert math.isclose(d["half_width"], 4.302652729911275 / math.sqrt(3), rel_tol=1e-9)
    assert math.isclose(d["ci"][0], 2.0 - d["half_width"]) and math.isclose(d["ci"][1], 2.0 + d["half_width"])
    assert math.isnan(paired_differences([1.0], [0.0])["half_width"])
    with pytest.raises(ValueError, match="same seeds"):
        paired_differences([1.0, 2.0], [1.0])


def test_variants_cover_the_protocol():
    for name in ("kmeans", "frozen_probe", "stego", "stego_released_depth", "fps_only", "depth_distance",
                 "depth_product", "depth_centred", "depth_quantile", "depthg", "depthg_s5", "depthg_s11", "released"):
        assert name in VARIANTS and name in DEFAULT_VARIANTS
    # the paper's Cityscapes setting: random sampling with the released (constant) depth term, paper otherwise
    cs = variant_config("stego_released_depth", 0)
    assert cs.mode == "paper" and cs.depth_sampling == "random" and cs.depth_similarity == "released"
    assert cs.use_depth and cs.depth_weight > 0
    assert variant_config("kmeans", 0).to_dict() == {**variant_config("stego", 0).to_dict(), "name": "kmeans_seed0",
                                                     "output_dir": "runs/ablation/kmeans/seed0"}
    cfg = variant_config("depthg", 4)
    assert cfg.depth_similarity == PAPER_DEPTH_SIMILARITY and cfg.depth_sampling == "fps" and cfg.seed == 4
    assert variant_config("depthg_s5", 0).feature_samples == 5
    assert variant_config("depthg_s11", 0).feature_samples == 11
    only = variant_config("depth_centred", 0)
    assert only.depth_similarity == "centred" and only.depth_sampling == "random" and only.depth_weight > 0
    assert variant_config("fps_only", 0).depth_weight == 0 and variant_config("fps_only", 0).depth_sampling == "fps"
    rel = variant_config("released", 0)
    assert rel.mode == "released" and rel.depth_similarity == "released"
    with pytest.raises(AblationError, match="unknown ablation variant"):
        variant_config("nope", 0)


def test_world_seed_gets_its_own_cache_folder():
    a = variant_config("stego", 0, overrides=["cache_dir=caches/c"], world_seed=5)
    assert a.world_seed == 5 and a.cache_dir == "caches/c/world5"
    assert variant_config("stego", 0).cache_dir == ".depthg_cache"  # no world seed: the preset's cache
    with pytest.raises(AblationError, match="data_dir"):
        variant_config("stego", 0, overrides=["data_dir=/data/cityscapes"], world_seed=1)


def _runs(values, worlds=(None,)):
    metrics = lambda v: {"cluster": {"miou": v, "accuracy": 2 * v}, "linear": {"miou": v + 1, "accuracy": v + 2}}
    runs = {}
    for variant, vals in values.items():
        per_world = [vals[i:i + 3] for i in range(0, len(vals), 3)]
        runs[variant] = [{"world": w, "seed": s, "final": metrics(v)} for w, vs in zip(worlds, per_world)
                         for s, v in zip((0, 1, 2), vs)]
    return runs


def test_summary_pairs_only_identical_seed_lists(tmp_path):
    summary = summarise(_runs({"stego": [1.0, 2.0, 3.0], "depthg": [2.0, 2.5, 5.0]}))
    paired = summary["depthg"]["paired_vs_stego"]
    assert paired["cluster_miou"]["values"] == [1.0, 0.5, 2.0]
    assert paired["cluster_accuracy"]["values"] == [2.0, 1.0, 4.0]
    assert "paired_vs_stego" not in summary["stego"]
    table = markdown_table(summary, "python -m depthg ablate", {"test_world_seeds": [1]})
    assert "| depthg − stego | +1.17 [" in table and "test_world_seeds = [1]" in table
    # a report on disk reads back into rows with the paired interval as text
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"command": "c", "seeds": [0, 1, 2], "summary": summary}))
    rows = report_rows(load_report(path))
    assert rows[0]["d_unsup_miou"] is None and rows[1]["d_unsup_miou"].startswith("+1.17 [")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"summary": {}}))
    with pytest.raises(AblationError, match="missing key"):
        load_report(bad)


def test_collect_runs_reads_results_files(tmp_path):
    run = tmp_path / "a" / "seed0"
    run.mkdir(parents=True)
    cfg = variant_config("depth_centred", 0).to_dict()
    final = {"cluster": {"miou": 5.0, "accuracy": 30.0}, "linear": {"miou": 6.0, "accuracy": 40.0}}
    (run / "results.json").write_text(json.dumps({"config": cfg, "final": {"metrics": final}, "steps": 300}))
    (tmp_path / "other.json").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps({"something": "else"}))  # not a training run
    (rows,) = collect_runs(tmp_path)
    assert rows["run"] == "a/seed0" and rows["depth"] == "centred" and rows["sampling"] == "random"
    assert rows["unsup_miou"] == 5.0 and rows["world_seed"] == 0 and rows["backbone"] == "embedded"


def test_a_run_counts_as_made_with_weights_only_when_stamped_with_them():
    sha = "a" * 64
    assert made_with_weights({"ablation_backbone_sha256": sha}, sha)
    assert not made_with_weights({"ablation_backbone_sha256": "b" * 64}, sha)
    assert not made_with_weights({}, sha)  # unstamped: which weights made it is unknown, so it is redone
    assert made_with_weights({"ablation_backbone_sha256": None}, None)  # random weights, stamped as such
    assert not made_with_weights({}, None)


def test_summary_pools_worlds_world_major_and_holm_adjusts_the_secondary_comparisons():
    # two worlds x three seeds; world 1's differences to stego are +1, world 2's +3 (depthg), +0.5 / -0.5 (fps)
    stego = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    runs = _runs({"kmeans": [0.0, 1.0, 1.5, 2.0, 2.5, 3.5], "stego": stego,
                  "depthg": [2.0, 3.0, 4.0, 7.0, 8.0, 9.0], "fps_only": [1.5, 1.5, 3.5, 4.5, 4.5, 6.5]},
                 worlds=(1, 2))
    summary = summarise(runs)
    # values are world-major: world 1's seeds, then world 2's
    assert summary["stego"]["cluster_miou"]["values"] == stego
    assert summary["stego"]["runs"] == [[1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]]
    assert summary["stego"]["per_world"]["2"]["cluster_miou"]["values"] == [4.0, 5.0, 6.0]
    paired = summary["depthg"]["paired_vs_stego"]["cluster_miou"]
    assert paired["mean"] == 2.0 and paired["per_world"]["1"]["mean"] == 1.0 and paired["per_world"]["2"]["mean"] == 3.0
    assert paired["random_worlds"]["world_means"] == [1.0, 3.0]
    assert "holm_p" not in paired  # the primary comparison is not adjusted
    # the frozen-feature baseline is compared with stego, not with every variant
    assert "paired_vs_kmeans" in summary["stego"] and "paired_vs_stego" not in summary["kmeans"]
    family = {"fps_only − stego": summary["fps_only"]["paired_vs_stego"]["cluster_miou"],
              "stego − kmeans": summary["stego"]["paired_vs_kmeans"]["cluster_miou"]}
    ps = sorted((d["p"], name) for name, d in family.items())
    # Holm with two tests: the smaller p doubled, the larger at least that and its own p
    assert math.isclose(family[ps[0][1]]["holm_p"], min(1.0, 2 * ps[0][0]))
    assert math.isclose(family[ps[1][1]]["holm_p"], max(min(1.0, 2 * ps[0][0]), ps[1][0]))
    table = markdown_table(summary, "c")
    assert "| world 1 | world 2 |" in table and "| stego − kmeans |" in table


def test_the_probe_baseline_splits_stego_minus_kmeans_outside_the_holm_family():
    values = {"kmeans": [0.0, 1.0, 1.5, 2.0, 2.5, 3.5], "stego": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
              "depthg": [2.0, 3.0, 4.0, 7.0, 8.0, 9.0], "fps_only": [1.5, 1.5, 3.5, 4.5, 4.5, 6.5]}
    without = summarise(_runs(values, worlds=(1, 2)))
    summary = summarise(_runs({**values, "frozen_probe": [0.5, 2.0, 2.0, 3.0, 2.5, 5.0]}, worlds=(1, 2)))
    head = summary["stego"]["paired_vs_frozen_probe"]["cluster_miou"]["values"]
    clusterer = summary["frozen_probe"]["paired_vs_kmeans"]["cluster_miou"]["values"]
    gap = summary["stego"]["paired_vs_kmeans"]["cluster_miou"]["values"]
    # the head's part plus the clusterer's part is STEGO's gap over k-means, run by run
    assert [a + b for a, b in zip(head, clusterer)] == pytest.approx(gap)
    assert head == pytest.approx([0.5, 0.0, 1.0, 1.0, 2.5, 1.0])
    # descriptive: the planned family (and so every Holm-adjusted p) is the same with or without it
    assert holm_family(summary) == holm_family(without)
    assert "paired_vs_stego" not in summary["frozen_probe"]
    rows = {r["variant"]: r for r in report_rows({"summary": summary, "seeds": [0, 1, 2]})}
    assert rows["frozen_probe"]["versus"] == "kmeans" and rows["frozen_probe"]["holm_p"] == "—"


def test_an_ablation_folder_takes_other_worlds_but_not_another_configuration(tmp_path):
    from depthg.lab.ablation import AblationError, ablation_configuration, claim_ablation_folder

    # each world's runs go to out_dir/world<w>, so an ablation of other worlds may share the folder
    claim_ablation_folder(tmp_path, ablation_configuration(world_seeds=[101, 202, 303]))
    claim_ablation_folder(tmp_path, ablation_configuration(world_seeds=[101]))
    claim_ablation_folder(tmp_path, ablation_configuration())
    with pytest.raises(AblationError, match=r"another configuration \(steps: 300 there, 5 now\)"):
        claim_ablation_folder(tmp_path, ablation_configuration(steps=5, world_seeds=[101]))
