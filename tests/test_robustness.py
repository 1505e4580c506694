"""Never train on stale or half-built data, never overwrite a run (issue 12): one test per class of failure.

* a derived artefact (crops, kNN, feature cache, depth) follows its sources: edited images, labels, depth,
  another class mapping or other backbone weights make it rebuild, with one line on stderr;
* concurrent builders wait for each other (file lock, build folder renamed into place when complete);
* damaged caches (truncated, zero-filled, replaced files) are rebuilt or refused clearly, never used;
* a run folder holding another run is refused unless resumed or overwritten, and nothing in it is touched
  before the new run has passed validation and preparation;
* nothing is written into a dataset folder;
* user errors end as ``depthg: error: ...`` with exit code 2: no traceback, nothing misleading.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sys
import warnings
from pathlib import Path
from queue import Empty

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from depthg.config import Config, ConfigError
from depthg.data import ImageDirectory
from depthg.data.common import CorruptFileError, read_image
from depthg.data.prepare import (
    CroppedDataset,
    KnnSettings,
    PreparationError,
    compute_knn,
    load_knn,
    prepare_training_data,
)
from depthg.data.transforms import resize_center_crop
from depthg.features import CacheOptions, FeatureCache, FeatureCacheError, build_feature_cache, cache_problem
from depthg.build import TrainError, load_checkpoint
from depthg.train import train
from depthg.world import make_world

TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, img_size=64)


def tiny_config(data_dir, cache_dir, output_dir, **changes) -> Config:
    """2 train images of 64x128 -> 10 crops of 32x64, a 2-block random ViT at 32 px (4x4 grid), 2 steps."""
    values = dict(
        name="tiny", dataset="cityscapes", data_dir=str(data_dir), cache_dir=str(cache_dir),
        output_dir=str(output_dir), classes="world", depth_source="gt", backbone="vit_small_patch8_224",
        backbone_kwargs=TINY, res=32, eval_res=32, dim=8, batch_size=4, steps=2, feature_samples=3, knn_k=5,
        num_neighbors=2, eval_every=0, checkpoint_every=0, device="cpu", feature_cache=True,
        sample_decay_every=0, eval_batch_size=4, threads=1, log_every=1,
    )
    values.update(changes)
    return Config(**values)


def quiet_train(cfg: Config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init backbone warning
        return train(cfg, progress=False, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust") / "world"
    return make_world(root, 2, 2, size=(64, 128), seed=3, progress=False)


def fresh_world(world: Path, tmp_path: Path) -> Path:
    """A private copy of the module's world (tests edit their sources)."""
    return Path(shutil.copytree(world, tmp_path / "world"))


def feature_folders(cache: Path) -> list[Path]:
    return sorted(p.parent for p in (cache / "features").glob("*/manifest.json"))


def tiny_backbone():
    from depthg.backbone import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone("vit_small_patch8_224", None, **TINY)


# ------------------------------------------------------------------------------------------------
# 1. stale artefacts: every derived artefact follows what made it
# ------------------------------------------------------------------------------------------------
def test_edited_image_rebuilds_crops_knn_and_features(world, tmp_path, capfd):
    root = fresh_world(world, tmp_path)
    cfg = tiny_config(root, tmp_path / "cache", tmp_path / "run1")
    quiet_train(cfg)
    knn_path = next((tmp_path / "cache" / "knn").glob("*.npz"))
    with np.load(knn_path) as f:
        key_before = json.loads(str(f["key"]))
    (old_cache,) = feature_folders(tmp_path / "cache")
    capfd.readouterr()

    # edit the first training image after preparation (new content, new size/mtime)
    image = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[0]
    arr = np.asarray(Image.open(image).convert("RGB")).copy()
    Image.fromarray(255 - arr).save(image)
    quiet_train(cfg.replace(output_dir=str(tmp_path / "run2")))
    err = capfd.readouterr().err
    assert "1 source item(s) changed" in err and "recropping" in err
    assert "kNN" in err and "the images' content" in err
    with pytest.raises(TrainError, match="training data changed"):  # a resume would continue on other data
        quiet_train(cfg.replace(steps=3), resume=True)

    # the crops are those of the edited file (an independent five-crop of it: top-left quarter is crop 0)
    crops = CroppedDataset(next(p for p in (tmp_path / "cache" / "crops").glob("*five_crop*") if p.is_dir()), "train")
    top_left = np.asarray(Image.open(image).convert("RGB"))[:32, :64]
    assert torch.equal(crops[0]["img"], torch.from_numpy(top_left.copy()).permute(2, 0, 1).float() / 255)
    with np.load(knn_path) as f:
        key_after = json.loads(str(f["key"]))
    assert key_after["images"] != key_before["images"] and key_after["backbone_sha256"] == key_before["backbone_sha256"]

    # a new feature cache, whose first row is the backbone's features of the *edited* crop
    new_cache = [p for p in feature_folders(tmp_path / "cache") if p != old_cache]
    assert len(new_cache) == 1
    cache = FeatureCache.open(new_cache[0])
    expected = tiny_backbone()(resize_center_crop(crops[0], 32)["img"][None]).detach()
    torch.testing.assert_close(cache.batch([0])["feats"], expected, atol=2e-2, rtol=1e-2)  # fp16 storage
    assert not torch.allclose(FeatureCache.open(old_cache).batch([0])["feats"], cache.batch([0])["feats"], atol=1e-2)


def test_edited_depth_and_other_classes_rebuild_the_features(world, tmp_path, capfd):
    # Potsdam-like: no five-crop, so the feature cache reads the dataset itself (labels mapped by `classes`)
    root = tmp_path / "dir"
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / "imgs" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (root / "depth" / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "imgs" / "train" / f"{i}.png")
        Image.fromarray(np.full((32, 32), i, np.uint8)).save(root / "labels" / "train" / f"{i}.png")
        np.save(root / "depth" / "train" / f"{i}.npy", np.full((32, 32), 1.0 + i, np.float32))
    shutil.copytree(root / "imgs" / "train", root / "imgs" / "val")
    shutil.copytree(root / "labels" / "train", root / "labels" / "val")
    base = dict(dataset="directory", classes=3, five_crop=False, depth_source="none", use_depth=True,
                depth_sampling="random", batch_size=2, num_neighbors=1, knn_k=2)
    quiet_train(tiny_config(root, tmp_path / "cache", tmp_path / "a", **base))
    quiet_train(tiny_config(root, tmp_path / "cache", tmp_path / "b", **{**base, "classes": 4}))
    labels = sorted(np.unique(np.asarray(FeatureCache.open(p).label)).tolist() for p in feature_folders(tmp_path / "cache"))
    assert len(feature_folders(tmp_path / "cache")) == 2
    assert labels == [[-1, 0, 1, 2], [0, 1, 2, 3]]  # classes=3 ignores label 3; classes=4 keeps it

    np.save(root / "depth" / "train" / "0.npy", np.full((32, 32), 9.0, np.float32))  # edit one depth map
    quiet_train(tiny_config(root, tmp_path / "cache", tmp_path / "c", **{**base, "classes": 4}))
    folders = feature_folders(tmp_path / "cache")
    assert len(folders) == 3
    depths = {float(np.asarray(FeatureCache.open(p).depth)[0].max()) for p in folders}
    assert depths == {1.0, 9.0}


def test_depth_cache_follows_its_images_and_its_model(world, tmp_path, capfd):
    from depthg.data import Cityscapes
    from depthg.data.prepare import _depth_model_identity
    from depthg.depth import build_tiny_random_depth_model, estimate_depth_for_dataset, load_depth_model, stale_depth_keys

    root = fresh_world(world, tmp_path)
    folder = build_tiny_random_depth_model(tmp_path / "model")
    model, ident = load_depth_model(folder, device="cpu"), _depth_model_identity(str(folder))
    ds, cache = Cityscapes(root, "train", classes="world"), tmp_path / "depth"
    estimate_depth_for_dataset(ds, model, cache, progress=False, model_identity=ident)
    assert stale_depth_keys(ds, cache, ident) == []
    files = sorted(cache.rglob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    image = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[1]
    Image.fromarray(255 - np.asarray(Image.open(image).convert("RGB"))).save(image)
    assert stale_depth_keys(ds, cache, ident) == [ds.keys[1]]
    capfd.readouterr()
    estimate_depth_for_dataset(ds, model, cache, progress=False, model_identity=ident)
    assert "1 image(s) changed" in capfd.readouterr().err
    assert [p for p in files if p.stat().st_mtime_ns != stamps[p]] == [files[1]]  # only the edited image's map
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")  # "another" model
    assert stale_depth_keys(ds, cache, _depth_model_identity(str(folder))) == ds.keys


class ScaledColour(nn.Module):
    """Stub backbone with a real weight: features = per-channel scaled mean colour of 4x4 patches."""

    name = "scaled-colour"

    def __init__(self, scale: list[float]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale)[None, :, None, None])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(img, 4) * self.scale


class Colours:
    def __init__(self, colours: torch.Tensor) -> None:
        self.colours, self.keys = colours, [f"train/{i}" for i in range(len(colours))]

    def __len__(self) -> int:
        return len(self.colours)

    def __getitem__(self, i: int) -> dict:
        return {"img": self.colours[i][:, None, None].expand(3, 8, 8).clone(), "key": self.keys[i]}


def brute_force(colours: torch.Tensor, scale: torch.Tensor, k: int) -> np.ndarray:
    x = nn.functional.normalize(colours.double() * scale.double(), dim=1)
    sims = (x @ x.T).numpy()
    return np.array([[i] + [j for j in np.argsort(-sims[i], kind="stable") if j != i][:k] for i in range(len(x))])


def test_other_backbone_weights_recompute_the_knn(tmp_path, capfd):
    colours = torch.rand(12, 3, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1
    backbone = ScaledColour([1.0, 1.0, 1.0])
    settings = KnnSettings(k=4, res=8, device="cpu")
    path = compute_knn(Colours(colours), backbone, tmp_path / "nns.npz", settings, progress=False)
    np.testing.assert_array_equal(load_knn(path)[0], brute_force(colours, torch.ones(3), 4))
    stamp = path.stat().st_mtime_ns
    compute_knn(Colours(colours), backbone, path, settings, progress=False)
    assert path.stat().st_mtime_ns == stamp  # same key: reused
    capfd.readouterr()
    with torch.no_grad():  # "retrain" the backbone: same name, same weights string, other weights
        backbone.scale.copy_(torch.tensor([5.0, 0.2, 1.0])[None, :, None, None])
    compute_knn(Colours(colours), backbone, path, settings, progress=False)
    assert "the backbone weights" in capfd.readouterr().err
    np.testing.assert_array_equal(load_knn(path)[0], brute_force(colours, torch.tensor([5.0, 0.2, 1.0]), 4))


# ------------------------------------------------------------------------------------------------
# 2. concurrency: two processes preparing one cache
# ------------------------------------------------------------------------------------------------
def _prepare_and_cache(cfg_dict: dict, barrier, queue) -> None:
    import io

    torch.set_num_threads(1)
    cfg = Config(**cfg_dict)
    backbone = tiny_backbone()
    sys.stderr = io.StringIO()  # the notes, for the parent
    barrier.wait()  # start together
    data = prepare_training_data(cfg, backbone=backbone, progress=False)
    crops = CroppedDataset(data["crop_dir"], "train")
    options = CacheOptions(device="cpu", transform=lambda it: resize_center_crop(it, 32), progress=False)
    cache = build_feature_cache(backbone, crops, Path(cfg.cache_dir) / "features", {"test": 1}, options)
    queue.put(((str(cache.root), cache.manifest["files"], str(data["knn_path"])), sys.stderr.getvalue()))


def test_two_processes_building_one_cache_both_get_the_same_valid_cache(world, tmp_path):
    cfg = tiny_config(world, tmp_path / "cache", tmp_path / "run")
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_prepare_and_cache, args=(cfg.to_dict(), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = []
    try:
        while len(got) < len(procs):
            try:
                got.append(queue.get(timeout=2))
            except Empty:  # a builder that died never answers
                codes = [p.exitcode for p in procs]
                assert all(c in (None, 0) for c in codes), f"a builder process failed (exit codes {codes})"
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    results, notes = zip(*got)
    print("".join(notes))  # usually one process waited for the other ("waiting for another process ...")
    assert results[0] == results[1]  # one folder, the same file hashes, the same kNN file
    root = Path(results[0][0])
    assert cache_problem(root, verify=True) is None
    assert not list((tmp_path / "cache").rglob("*.partial")) and not list((tmp_path / "cache").rglob("*.old-*"))
    assert np.asarray(FeatureCache.open(root).feats).reshape(10, -1).any(axis=1).all()  # no zero rows


# ------------------------------------------------------------------------------------------------
# 3. damaged caches
# ------------------------------------------------------------------------------------------------
def test_damaged_feature_cache_is_refused_and_rebuilt(world, tmp_path, capfd):
    cfg = tiny_config(world, tmp_path / "cache", tmp_path / "run")
    quiet_train(cfg)
    (root,) = feature_folders(tmp_path / "cache")
    good = (root / "feats.f16").read_bytes()
    damages = {
        "zero-filled": lambda: (root / "feats.f16").write_bytes(bytes(len(good))),
        "truncated": lambda: (root / "feats.f16").write_bytes(good[: len(good) // 2]),
        "one flipped byte": lambda: (root / "feats.f16").write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:]),
        "manifest truncated": lambda: (root / "manifest.json").write_text((root / "manifest.json").read_text()[:40]),
        "feature file missing": lambda: (root / "feats.f16").unlink(),
    }
    for i, (what, damage) in enumerate(damages.items()):
        damage()
        with pytest.raises(FeatureCacheError, match="feature cache"):
            FeatureCache.open(root)
        capfd.readouterr()
        quiet_train(cfg.replace(output_dir=str(tmp_path / f"again{i}")))
        err = capfd.readouterr().err
        assert "feature cache" in err and "rebuilding" in err, what
        assert (root / "feats.f16").read_bytes() == good, what  # rebuilt, same bytes as before

    # zero rows are refused at read time even when the hashes were not checked (large caches)
    arr = np.memmap(root / "feats.f16", dtype=np.float16, mode="r+")
    arr[: arr.size // 10] = 0
    arr.flush()
    del arr
    cache = FeatureCache.open(root, verify=False)
    with pytest.raises(FeatureCacheError, match="all zero"):
        cache.batch([0, 1])


def test_damaged_crops_and_knn_are_refused_and_rebuilt(world, tmp_path, capfd):
    cfg = tiny_config(world, tmp_path / "cache", tmp_path / "run", feature_cache=False)
    data = prepare_training_data(cfg, backbone=tiny_backbone(), progress=False)
    crop = Path(data["crop_dir"]) / "img" / "train" / "000003.png"
    good_crop = crop.read_bytes()
    crop.write_bytes(good_crop[: len(good_crop) // 2])
    with pytest.raises(PreparationError, match="000003.png has"):
        CroppedDataset(data["crop_dir"], "train")
    knn = Path(data["knn_path"])
    good_knn = knn.read_bytes()
    knn.write_bytes(good_knn[:200])
    with pytest.raises(PreparationError, match="cannot read kNN file"):
        load_knn(knn)
    capfd.readouterr()
    prepare_training_data(cfg, backbone=tiny_backbone(), progress=False)
    err = capfd.readouterr().err
    assert "missing or modified crop files" in err and "recropping" in err and "unreadable" in err
    assert crop.read_bytes() == good_crop and knn.read_bytes() == good_knn


# ------------------------------------------------------------------------------------------------
# 4. run folders
# ------------------------------------------------------------------------------------------------
def test_occupied_output_folder_is_refused_and_only_replaced_after_preparation(world, tmp_path):
    out = tmp_path / "run"
    first = quiet_train(tiny_config(world, tmp_path / "cache", out, eval_every=1))
    assert first["paths"]["checkpoint_best"] is not None
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "notes.txt").write_text("mine")  # not a run file: never touched

    with pytest.raises(TrainError, match="holds another run"):
        quiet_train(tiny_config(world, tmp_path / "cache", out, seed=1))
    # --overwrite, but the new run fails in preparation (its data_dir does not exist): nothing touched
    with pytest.raises(Exception, match="nothing"):
        quiet_train(tiny_config(tmp_path / "nothing", tmp_path / "cache", out, seed=1), overwrite=True)
    with pytest.raises(ConfigError, match="feature_samples"):  # and a config error comes before everything
        quiet_train(tiny_config(world, tmp_path / "cache", out, feature_samples=9), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "notes.txt"} == before

    second = quiet_train(tiny_config(world, tmp_path / "cache", out, seed=1), overwrite=True)
    assert second["paths"]["checkpoint_best"] is None  # eval_every=0: no best checkpoint of *this* run
    assert not (out / "checkpoint_best.pt").exists() and (out / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]

    # resumed after its final checkpoint: the last logged losses, not an empty dict
    again = quiet_train(tiny_config(world, tmp_path / "cache", out, seed=1), resume=True)
    assert again["last_train_losses"] == second["last_train_losses"] != {}
    with pytest.raises(TrainError, match="either resume"):
        quiet_train(tiny_config(world, tmp_path / "cache", out), resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainError, match="is a file"):
        quiet_train(tiny_config(world, tmp_path / "cache", tmp_path / "file"))


# ------------------------------------------------------------------------------------------------
# 5. nothing is written inside a dataset folder; 6. the CLI's user errors
# ------------------------------------------------------------------------------------------------
def run_cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from depthg.__main__ import _cli

    monkeypatch.setattr(sys, "argv", ["depthg", *argv])
    code = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _cli()
        except SystemExit as exc:
            code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_overrides(root: Path, tmp_path: Path) -> list[str]:
    """The tiny config as CLI overrides (on top of the default preset)."""
    return [f"{k}={json.dumps(v)}" for k, v in tiny_config(root, tmp_path / "cache", tmp_path / "run").to_dict().items()]


def test_nothing_is_written_into_a_dataset_folder(world, tmp_path, monkeypatch, capsys):
    root = fresh_world(world, tmp_path)
    files = sorted(p for p in root.rglob("*"))
    args = cli_overrides(root, tmp_path)
    for argv, what in (
        (["crop", "--out", str(root / "crops"), *args], "five-crop folder"),
        (["crop", "--out", str(root / "leftImg8bit" / "crops"), *args], "five-crop folder"),
        (["knn", "--out", str(root / "nns.npz"), *args], "kNN file"),
        (["prepare", *args, f"cache_dir={root / 'cache'}"], "cache_dir"),
        (["train", *args, f"output_dir={root / 'run'}"], "output_dir"),
    ):
        code, out, err = run_cli(argv, monkeypatch, capsys)
        assert code == 2 and err.startswith("depthg: error:") and "inside the dataset folder" in err, (argv, err)
        assert what in err and "Traceback" not in err
    assert sorted(p for p in root.rglob("*")) == files


def test_cli_user_errors_are_one_clear_line(world, tmp_path, monkeypatch, capsys):
    args = cli_overrides(world, tmp_path)
    # overrides after options; train's stdout is its JSON and nothing else (notes go to stderr)
    code, out, err = run_cli(["train", "--no-progress", *args, "steps=1"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["steps"] == 1
    ckpt = tmp_path / "run" / "checkpoint_last.pt"
    cases = {
        "yaml as checkpoint": (["eval", str(tmp_path / "run" / "config.yaml")], "not a torch checkpoint"),
        "truncated checkpoint": (["eval", str(tmp_path / "cut.pt")], "truncated"),
        "empty checkpoint": (["eval", str(tmp_path / "empty.pt")], "empty"),
        "occupied output_dir": (["train", "--no-progress", *args], "holds another run"),
        "output_dir is a file": (["train", *args, f"output_dir={tmp_path / 'cut.pt'}"], "is a file"),
        "feature_samples > grid": (["train", *args, "feature_samples=5"], "feature_samples"),
        "res not a multiple of the patch": (["prepare", *args, "res=36"], "multiple of the backbone's patch size 8"),
        "classes of another dataset": (["prepare", *args, "dataset=potsdam"], "'classes'"),
        "missing data_dir": (["prepare", *args, f"data_dir={tmp_path / 'none'}"], "none"),
        "--config and --preset": (["prepare", "--config", "x.yaml", "--preset", "synthetic"], "either --config"),
        "eval output inside the dataset": (["eval", str(ckpt), "--output", str(world / "x.json")], "inside the dataset"),
    }
    (tmp_path / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])
    other = load_checkpoint(ckpt)
    other["data"]["backbone_sha256"] = "0" * 64  # as if the backbone's weights changed after training
    torch.save(other, tmp_path / "other.pt")
    cases["eval with other backbone weights"] = (["eval", str(tmp_path / "other.pt")], "other weights")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, (argv, expected) in cases.items():
        code, out, err = run_cli(argv, monkeypatch, capsys)
        assert code == 2 and err.startswith("depthg: error:") and expected in err, (name, err)
        assert "Traceback" not in err and "execute code" not in err and out == "", name
    code, _, err = run_cli(["train", "--no-progress", *args, "--resume", "steps=1"], monkeypatch, capsys)
    assert code == 0 and load_checkpoint(ckpt)["step"] == 1


def test_cli_knn_matches_prepare(world, tmp_path, monkeypatch, capsys):
    args = cli_overrides(world, tmp_path) + ["mode=released", "knn_k=4", "num_neighbors=2"]
    code, out, err = run_cli(["prepare", "--no-progress", *args], monkeypatch, capsys)
    assert code == 0, err
    paths = json.loads(out)
    code, out, err = run_cli(["knn", "--crops", paths["crop_dir"], "--out", str(tmp_path / "cli.npz"),
                              "--no-progress", *args], monkeypatch, capsys)
    assert code == 0, err
    with np.load(paths["knn_path"]) as a, np.load(tmp_path / "cli.npz") as b:
        assert int(a["k"]) == int(b["k"]) == 4 and str(b["mode"]) == "released"
        np.testing.assert_array_equal(a["nns"], b["nns"])


# ------------------------------------------------------------------------------------------------
# 7. inputs: image modes, one class mapping for every split, config checks
# ------------------------------------------------------------------------------------------------
def test_every_image_mode_is_converted_or_refused(tmp_path):
    grey16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    got = read_image(tmp_path / "g16.png")
    assert got.shape == (3, 4, 3) and np.array_equal(got[..., 1], np.rint(grey16 / 65535 * 255).astype(np.uint8))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, [[255, 0], [51, 255]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png")[..., 0].tolist() == [[200, 0], [40, 200]]  # over black
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").tolist() == [[[10, 20, 30], [40, 50, 60]]]
    Image.new("CMYK", (1, 1), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg")[0, 0, 1] < 30 and read_image(tmp_path / "c.jpg")[0, 0, 0] > 200
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(CorruptFileError, match="mode 'F'"):
        read_image(tmp_path / "f.tif")


def test_directory_dataset_has_one_class_mapping_for_all_splits(tmp_path):
    for split, top in (("train", 2), ("val", 4)):
        for i in range(2):
            (tmp_path / "imgs" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "labels" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "imgs" / split / f"{i}.png")
            Image.fromarray(np.full((4, 4), top if i else 0, np.uint8)).save(tmp_path / "labels" / split / f"{i}.png")
    train_set, val_set = ImageDirectory(tmp_path, "train"), ImageDirectory(tmp_path, "val")
    assert train_set.n_classes == val_set.n_classes == 5


def test_config_checks_before_preparation():
    with pytest.raises(ConfigError, match="multiple of the backbone's patch size 8"):
        Config.preset("synthetic", res=100)
    with pytest.raises(ConfigError, match="expected at most 16"):
        Config.preset("synthetic", feature_samples=17)
    with pytest.raises(ConfigError, match="batch_size"):
        Config.preset("synthetic", world_n_train=2)  # 2 images < batch 16
    with pytest.raises(ConfigError, match="'classes'"):
        Config.preset("potsdam_vits8", classes=27)
    named = Config.preset("synthetic", name="mine")
    assert named.name == "mine" and named.output_dir == "runs/mine"
    assert Config.preset("synthetic", "released").mode == "released"
