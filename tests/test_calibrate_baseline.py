"""Shift calibration (depthg.calibrate) and the frozen-feature baseline (depthg.baselines) on a tiny world."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthg.__main__ import main
from depthg.baselines import fit_frozen_baseline
from depthg.calibrate import PAIRINGS, SHIFT_KEYS, measure_correlations, propose_shifts
from depthg.config import Config, apply_overrides
from depthg.method.head import spherical_kmeans
from tests.test_cli import tiny_overrides


def _tiny(tmp_path, *extra: str) -> Config:
    cfg = Config.preset("synthetic", "paper", use_depth=False, depth_sampling="random", depth_weight=0.0)
    return apply_overrides(cfg, [*tiny_overrides(tmp_path), "world_n_train=3", "steps=3",
                                 f"output_dir={tmp_path / 'run'}", *extra])


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_measured_correlations_follow_the_training_pairings(tmp_path, quiet):
    cfg = _tiny(tmp_path, "centering=none")
    stats = measure_correlations(cfg, progress=False)
    n, s2 = stats.n_crops, cfg.feature_samples ** 2
    assert n == 15 and stats.n_side == cfg.feature_samples  # 3 images x 5 crops
    for kind in PAIRINGS:
        assert stats.values[kind].shape == (n * s2 * s2,)
        assert np.all(np.abs(stats.values[kind]) <= 1 + 1e-5)  # cosine similarities
        assert stats.same_class[kind].shape == stats.values[kind].shape
    # self pairs at the same locations: the diagonal of each crop's S x S block is F(x, x) = 1
    self_blocks = stats.values["self"].reshape(n, s2, s2)
    assert np.allclose(np.diagonal(self_blocks, axis1=1, axis2=2), 1.0, atol=1e-5)
    assert stats.same_class["self"].reshape(n, s2, s2)[:, np.arange(s2), np.arange(s2)].mean() > 0.5
    # the same config draws the same pairs
    again = measure_correlations(cfg, progress=False)
    assert all(np.array_equal(stats.values[k], again.values[k]) for k in PAIRINGS)
    # the rule: every shift is the 0.9 quantile of the random-pair correlations, rounded to 3 decimals
    proposed = propose_shifts(stats)
    b = round(float(np.quantile(stats.values["random"], 0.9)), 3)
    assert proposed == {SHIFT_KEYS[k]: b for k in PAIRINGS}
    pulled = stats.pulled({k: b for k in PAIRINGS})
    assert pulled["random"]["pulled"] == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError):
        propose_shifts(stats, quantile=1.0)


def test_calibrate_command_prints_the_proposal(tmp_path, capsys, quiet):
    report = main(["calibrate", "--preset", "synthetic", "--no-progress", *tiny_overrides(tmp_path),
                   "world_n_train=3", "centering=none"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["proposed"] == report["proposed"] and printed["labels_used"] == "none"
    assert "purity" not in printed["pulled"]["proposed"]["random"]
    assert printed["overrides"].startswith("pos_intra_shift=")
    main(["calibrate", "--preset", "synthetic", "--no-progress", "--labels", *tiny_overrides(tmp_path),
          "world_n_train=3", "centering=none"])
    labelled = json.loads(capsys.readouterr().out)
    assert labelled["pulled"]["config"]["knn"]["purity"] is None or 0 <= labelled["pulled"]["config"]["knn"]["purity"] <= 1
    shares = labelled["fps_class_shares"]
    assert sum(v["cells"] for v in shares.values()) == pytest.approx(1.0)
    assert sum(v["fps"] for v in shares.values()) == pytest.approx(1.0)


def test_fps_class_shares_count_the_picked_cells(tmp_path, quiet):
    from depthg.calibrate import fps_class_shares

    cfg = _tiny(tmp_path, "use_depth=true", "depth_sampling=fps", "feature_samples=4")
    shares = fps_class_shares(cfg, progress=False)
    # with every cell picked (4 x 4 of a 4 x 4 grid) the picks are the cells
    assert all(v["fps"] == pytest.approx(v["cells"]) for v in shares.values())
    fewer = fps_class_shares(apply_overrides(cfg, ["feature_samples=2"]), progress=False)
    assert [v["cells"] for v in fewer.values()] == [v["cells"] for v in shares.values()]
    assert any(v["fps"] != pytest.approx(v["cells"]) for v in fewer.values())


def test_frozen_baseline_is_kmeans_of_the_features_and_the_trainers_linear_probe(tmp_path, quiet):
    cfg = _tiny(tmp_path)
    result = fit_frozen_baseline(cfg, progress=False)
    metrics = result["final"]["metrics"]
    assert 0 <= metrics["cluster"]["miou"] <= 100 and 0 <= metrics["linear"]["accuracy"] <= 100
    assert metrics["cluster"]["category_miou"] >= 0 and "iou_per_category" in metrics["linear"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["final"]["metrics"]["cluster"]["miou"] == metrics["cluster"]["miou"]
    assert (tmp_path / "run" / "config.yaml").is_file() and not (tmp_path / "run" / "checkpoint_last.pt").exists()
    # deterministic: the same config gives the same numbers
    again = fit_frozen_baseline(cfg, progress=False, overwrite=True)["final"]["metrics"]
    assert again["cluster"]["miou"] == metrics["cluster"]["miou"] and again["linear"]["miou"] == metrics["linear"]["miou"]
    # a folder holding another run is refused without overwrite
    with pytest.raises(Exception, match="holds another run"):
        fit_frozen_baseline(cfg, progress=False)


def test_the_probe_baseline_is_the_trainers_cluster_probe_on_the_features(tmp_path, quiet):
    """With the clusterer held fixed: the probe baseline equals training STEGO's cluster probe with an identity
    head, i.e. the trainer's probe loop run by hand on the same batches (a brute-force reference)."""
    from depthg.build import Segmenter
    from depthg.method.head import ClusterProbe, LinearProbe
    from depthg.train import build_run, evaluate_now
    from depthg.train_support import batch_indices, setup_place
    cfg = _tiny(tmp_path, "steps=4")
    result = fit_frozen_baseline(cfg, progress=False, clusterer="probe")
    assert result["clusterer"] == "probe" and "cluster probe" in result["baseline"]
    kmeans = fit_frozen_baseline(cfg.replace(output_dir=str(tmp_path / "km")), progress=False)
    # the linear columns do not depend on the clusterer
    for key in ("miou", "accuracy"):
        assert kmeans["final"]["metrics"]["linear"][key] == result["final"]["metrics"]["linear"][key]
    # reference: a fresh probe initialised as depthg.build.build_models does, fitted step by step by hand
    run = build_run(cfg, setup_place(cfg, False), None)
    probe = ClusterProbe(run.backbone.embed_dim, run.n_classes, generator=torch.Generator().manual_seed(cfg.seed))
    start = probe.clusters.detach().clone()
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.probe_lr)
    for it in range(cfg.steps):
        anchors, _ = batch_indices(it, len(run.source), cfg.batch_size, cfg.seed, run.nns, cfg.num_neighbors)
        feats = F.normalize(run.source.fetch(anchors)["feats"], dim=1)
        # -mean over cells of the best cosine to a unit centroid, written out
        cos = torch.einsum("bchw,kc->bkhw", feats, F.normalize(probe.clusters, dim=1))
        loss = -cos.max(dim=1).values.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(probe.clusters.detach(), start)
    run.model = Segmenter(torch.nn.Identity(), probe, LinearProbe(run.backbone.embed_dim, run.n_classes))
    ref = evaluate_now(run, flip=cfg.eval_flip, crf=cfg.eval_crf)
    assert result["final"]["metrics"]["cluster"]["miou"] == pytest.approx(ref["cluster"]["miou"], abs=1e-9)
    assert result["final"]["metrics"]["cluster"]["accuracy"] == pytest.approx(ref["cluster"]["accuracy"], abs=1e-9)
    with pytest.raises(ValueError, match="clusterer"):
        fit_frozen_baseline(cfg, progress=False, clusterer="gmm")


def test_ablate_reports_kmeans_beside_stego_over_two_worlds(tmp_path, quiet):
    report = main(["ablate", "--world-seed", "3", "4", "--dev-world-seed", "2", "--variants", "kmeans", "stego",
                   "--seeds", "0", "1", "--steps", "1", "--out-dir", str(tmp_path / "abl"), "--no-progress",
                   *tiny_overrides(tmp_path)])
    stego = report["summary"]["stego"]
    assert stego["worlds"] == ["3", "4"] and stego["runs"] == [[3, 0], [3, 1], [4, 0], [4, 1]]
    assert report["protocol"]["test_world_seeds"] == [3, 4]
    gate = stego["paired_vs_kmeans"]["cluster_miou"]
    kmeans = report["summary"]["kmeans"]["cluster_miou"]["values"]
    assert gate["values"] == pytest.approx([a - b for a, b in zip(stego["cluster_miou"]["values"], kmeans)])
    assert set(gate["per_world"]) == {"3", "4"} and "holm_p" in gate
    assert report["holm_p"] == {"stego − kmeans": gate["holm_p"]}
    assert (tmp_path / "abl" / "world4" / "kmeans" / "seed1" / "results.json").is_file()


def test_ablation_on_two_worker_processes_gives_the_serial_numbers(tmp_path, quiet):
    common = ["--world-seed", "5", "--variants", "kmeans", "stego", "--seeds", "0", "1", "--steps", "2",
              "--no-progress", *tiny_overrides(tmp_path)]
    serial = main(["ablate", *common, "--out-dir", str(tmp_path / "serial")])
    parallel = main(["ablate", *common, "--out-dir", str(tmp_path / "parallel"), "--jobs", "2"])
    for variant in ("kmeans", "stego"):
        for key in ("cluster_miou", "cluster_accuracy", "linear_miou"):
            assert parallel["summary"][variant][key]["values"] == serial["summary"][variant][key]["values"]
    with pytest.raises(Exception, match="--jobs"):
        main(["ablate", *common, "--out-dir", str(tmp_path / "none"), "--jobs", "0"])
