"""Training loop: it learns, it resumes bit-identically, the feature cache is exact, DDP equals one process."""

from __future__ import annotations

import os
import re
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from depthg.config import Config
from depthg.build import build_models, load_checkpoint
from depthg.train import train
from depthg.train_support import batch_indices

TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, img_size=64)


def tiny_config(cache_dir, output_dir, **changes) -> Config:
    """A tiny synthetic world (2+2 images of 64x128 -> 10 crops), a 2-block ViT, 32-px crops (4x4 grid)."""
    values = dict(
        name="tiny", dataset="cityscapes", data_dir=None, cache_dir=str(cache_dir), output_dir=str(output_dir),
        classes="world", depth_source="gt", backbone="vit_small_patch8_224", backbone_kwargs=TINY,
        res=32, eval_res=32, five_crop=True, world_n_train=2, world_n_val=2, world_size=[64, 128], dim=8, batch_size=4,
        steps=4, feature_samples=3, knn_k=5, num_neighbors=2, eval_every=0, checkpoint_every=0,
        device="cpu", feature_cache=True, sample_decay_every=0, eval_batch_size=4, threads=1,
    )
    values.update(changes)
    return Config(**values)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Render the world, crop it, compute kNN and the feature cache once for the whole module."""
    root = tmp_path_factory.mktemp("train")
    cfg = tiny_config(root / "cache", root / "warmup", steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, progress=False)
    return root


def _quiet_train(cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init backbone warning
        return train(cfg, progress=False, **kw)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    import numpy as np

    nns = np.tile(np.arange(10)[:, None], (1, 4))
    a = [batch_indices(s, 10, 4, 0, nns, 2) for s in range(6)]
    b = [batch_indices(s, 10, 4, 0, nns, 2) for s in range(6)]
    for (i1, p1), (i2, p2) in zip(a, b):
        assert torch.equal(i1, i2) and torch.equal(p1, p2)
    epoch0 = torch.cat([a[0][0], a[1][0]])
    assert len(set(epoch0.tolist())) == 8  # no repeats within an epoch (2 batches of 4 out of 10)
    assert not torch.equal(batch_indices(0, 10, 4, 1, nns, 2)[0], a[0][0])


def test_steps_lower_the_stego_loss(prepared):
    from depthg.backbone import load_backbone
    from depthg.data.transforms import resize_center_crop
    from depthg.method.losses import CorrelationTerms, DepthGLoss, LossInputs
    from depthg.method.sampling import random_grid
    from depthg.build import fidelity, training_dataset
    from depthg.data.prepare import prepare_training_data

    cfg = tiny_config(prepared / "cache", prepared / "stego", use_depth=False, depth_sampling="random",
                      depth_weight=0.0, steps=25, lr=5e-3, dropout=0.0)
    _quiet_train(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(cfg.backbone, None, **TINY)
        data = prepare_training_data(cfg, backbone=backbone, progress=False)
    crops = training_dataset(cfg, fidelity(cfg), data)
    items = [resize_center_crop(crops[i], 32) for i in range(8)]
    img = torch.stack([it["img"] for it in items])
    with torch.no_grad():
        feats = backbone(img)
    gen = torch.Generator().manual_seed(123)
    grid1, grid2 = random_grid(4, 3, gen), random_grid(4, 3, gen)
    loss_fn = DepthGLoss(CorrelationTerms.from_config(cfg, neg_samples=5))

    def stego_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            code = model.head(feats)
            out = loss_fn(LossInputs(feats[:4], feats[4:], code[:4], code[4:]), (grid1, grid2),
                          generator=torch.Generator().manual_seed(7))
        return float(out["total"])

    initial = build_models(cfg, backbone.embed_dim, crops.n_classes)
    trained = build_models(cfg, backbone.embed_dim, crops.n_classes)
    trained.load_state_dict(load_checkpoint(prepared / "stego" / "checkpoint_last.pt")["model"])
    assert stego_loss(trained) < stego_loss(initial) - 1e-3


def test_resume_after_kill_is_bit_identical(prepared, monkeypatch):
    import depthg.train as train_module

    full = tiny_config(prepared / "cache", prepared / "full", steps=6, checkpoint_every=2)
    _quiet_train(full)
    reference = load_checkpoint(prepared / "full" / "checkpoint_last.pt")["model"]

    killed = tiny_config(prepared / "cache", prepared / "killed", steps=6, checkpoint_every=2)
    original = train_module.batch_indices

    def dying(step, *args, **kwargs):
        if step == 3:  # killed during step 3: the last checkpoint is the one after step 2
            raise KeyboardInterrupt("simulated kill")
        return original(step, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_indices", dying)
    with pytest.raises(KeyboardInterrupt):
        _quiet_train(killed)
    assert load_checkpoint(prepared / "killed" / "checkpoint_last.pt")["step"] == 2
    monkeypatch.setattr(train_module, "batch_indices", original)
    _quiet_train(killed, resume=True)
    resumed = load_checkpoint(prepared / "killed" / "checkpoint_last.pt")
    assert resumed["step"] == 6
    for key, value in reference.items():
        assert torch.equal(value, resumed["model"][key]), key


def test_resume_refuses_a_changed_config(prepared):
    from depthg.build import TrainError

    cfg = tiny_config(prepared / "cache", prepared / "full", steps=6, lr=1e-2)
    with pytest.raises(TrainError, match="lr"):
        _quiet_train(cfg, resume=True)


def test_feature_cache_gives_the_same_losses(prepared):
    cached = _quiet_train(tiny_config(prepared / "cache", prepared / "cached", steps=1, feature_cache=True))
    direct = _quiet_train(tiny_config(prepared / "cache", prepared / "direct", steps=1, feature_cache=False))
    for key in ("pos_intra", "pos_inter", "neg_inter", "depth", "total"):
        a, b = cached["last_train_losses"][key], direct["last_train_losses"][key]
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), (key, a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _quiet_train(Config(**cfg_dict))


def test_ddp_two_processes_equal_one_process(prepared):
    # Equivalence condition (depthg/train.py docstring): no head dropout, no negative term, per-image
    # centring (the released form adds back a whole-batch mean).
    changes = dict(steps=3, dropout=0.0, neg_inter_weight=0.0, feature_cache=True, centering="paper")
    single = tiny_config(prepared / "cache", prepared / "single", **changes)
    _quiet_train(single)
    ddp = tiny_config(prepared / "cache", prepared / "ddp", **changes)
    mp.spawn(_ddp_worker, args=(2, _free_port(), ddp.to_dict()), nprocs=2, join=True)
    a = load_checkpoint(prepared / "single" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(prepared / "ddp" / "checkpoint_last.pt")["model"]
    for key in a:
        if key.startswith("head."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # and the weights did move, so the comparison is not trivially about the initialisation
    init = build_models(single, 32, a["cluster.clusters"].shape[0]).state_dict()
    assert not torch.allclose(init["head.linear.weight"], a["head.linear.weight"])


def test_fps_random_start_and_lhp_options_run(prepared):
    fixed = _quiet_train(tiny_config(prepared / "cache", prepared / "fps0", steps=1))
    moved = _quiet_train(tiny_config(prepared / "cache", prepared / "fpsr", steps=1, fps_random_start=True))
    assert fixed["last_train_losses"]["pos_intra"] != moved["last_train_losses"]["pos_intra"]
    lhp = _quiet_train(tiny_config(prepared / "cache", prepared / "lhp", steps=1, lhp=True, lhp_quantile=0.2))
    assert "lhp_total" in lhp["last_train_losses"]


def test_same_config_and_seed_give_the_same_weights_whether_or_not_the_caches_exist(tmp_path):
    # As in `depthg ablate`: in one process a STEGO run (no-depth crops) first, then a DepthG run whose
    # depth crops / kNN / feature cache it builds itself; that run must equal the same config rerun on
    # the now existing caches. Building the kNN draws from the global torch RNG (its DataLoader's base
    # seed) and reusing it does not, so seeding before the data preparation broke this.
    cache = tmp_path / "cache"
    _quiet_train(tiny_config(cache, tmp_path / "stego", steps=2, use_depth=False, depth_sampling="random",
                             depth_weight=0.0))
    _quiet_train(tiny_config(cache, tmp_path / "first", steps=3))
    _quiet_train(tiny_config(cache, tmp_path / "again", steps=3))
    a = load_checkpoint(tmp_path / "first" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(tmp_path / "again" / "checkpoint_last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_validation_does_not_change_the_training_run(prepared):
    # eval_every is a RESUMABLE_CHANGES key: evaluating must not move the training RNG streams.
    quiet = _quiet_train(tiny_config(prepared / "cache", prepared / "noeval", steps=3, eval_every=0))
    evald = _quiet_train(tiny_config(prepared / "cache", prepared / "eval1", steps=3, eval_every=1))
    assert quiet["last_train_losses"] == evald["last_train_losses"]
    a = load_checkpoint(prepared / "noeval" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(prepared / "eval1" / "checkpoint_last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _write_potsdam_tiles(root, n_train: int = 5, n_val: int = 2, size: int = 48) -> None:
    """Potsdam in STEGO's layout (imgs/, gt/, split lists), PNG tiles whose colour follows the label."""
    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    names = [f"t{i}" for i in range(n_train + n_val)]
    for name in names:
        gt = np.repeat(np.repeat(gen.integers(0, 6, (size // 8, size // 8)), 8, 0), 8, 1).astype(np.uint8)
        img = (gt[:, :, None] * np.array([40, 25, 10]) + gen.integers(0, 30, (size, size, 3))).astype(np.uint8)
        Image.fromarray(img).save(root / "imgs" / f"{name}.png")
        Image.fromarray(gt).save(root / "gt" / f"{name}.png")
    (root / "labelled_train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "labelled_test.txt").write_text("\n".join(names[n_train:]) + "\n")


def test_results_name_the_metric_that_selected_the_best_checkpoint(tmp_path):
    """Potsdam selects checkpoint_best by validation cluster accuracy (the released monitor); results.json
    says so, and the best step is the one with the highest logged validation accuracy."""
    import json

    _write_potsdam_tiles(tmp_path / "potsdam")
    cfg = tiny_config(tmp_path / "cache", tmp_path / "run", dataset="potsdam", classes=3, data_dir=str(tmp_path / "potsdam"),
                      use_depth=False, depth_sampling="random", depth_weight=0.0, five_crop=False, batch_size=4,
                      knn_k=3, num_neighbors=2, steps=3, eval_every=1, eval_flip=False)
    result = _quiet_train(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["best_on_val"]["selected_by"] == on_disk["best_on_val"]["selected_by"] \
        == "validation cluster accuracy (no flip, no CRF)"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    accuracy = {r["step"]: r["val"]["cluster_accuracy"] for r in log if "val" in r}
    best = max(accuracy.values())
    assert accuracy[result["best_on_val"]["step"]] == best and min(s for s, a in accuracy.items() if a == best) \
        == result["best_on_val"]["step"]
    # elsewhere the monitor is cluster mIoU, and the label says that
    city = _quiet_train(tiny_config(tmp_path / "cache", tmp_path / "city", steps=1, eval_every=1))
    assert city["best_on_val"]["selected_by"] == "validation cluster mIoU (no flip, no CRF)"


def test_the_run_ends_with_one_line_saying_where_the_time_went(prepared, capsys):
    """Each stage is timed where it runs (the caches are up to date here: cached) and the validations inside the
    training count apart from it; the line is printed with the progress bars."""
    cfg = tiny_config(prepared / "cache", prepared / "timed", steps=2, eval_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("depthg: time: ")]
    assert len(lines) == 1
    names = re.findall(r"(?:^|, )([A-Za-z -]+?) [0-9.]+ (?:s|min)", lines[0][len("depthg: time: "):])
    assert names == ["synthetic world", "depth", "five-crop", "kNN", "feature cache", "training", "validation",
                     "final evaluation", "other"]
    assert "depth 0.0 s (cached)" in lines[0] and "kNN" in lines[0] and "(cached), feature cache" in lines[0]
