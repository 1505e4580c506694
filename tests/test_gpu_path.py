"""The GPU path, checked on the CPU where possible (issue 16), and on CUDA by the tests marked ``cuda``.

1. Validation's "improved" flag is broadcast on the device the backend can move (CUDA for NCCL, CPU for
   gloo): ``collective_device`` / ``broadcast_flag``, run under gloo in 2 processes, and inside a 2-process
   DDP training run that validates.
2. The feature cache and the per-step recomputation run the backbone through one function under one
   precision policy: with CPU bf16 autocast standing in for CUDA AMP, cached features equal recomputed
   ones up to the float16 storage, and training from either gives the same losses.

``benchmarks/gpu.py`` runs the ``cuda``-marked tests on a GPU machine (``pytest -m cuda``).
"""

from __future__ import annotations

import json
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import depthg.train as train_module
import depthg.train_support as train_support
from depthg.backbone import load_backbone
from depthg.config import Config
from depthg.features import CacheOptions, backbone_features, build_feature_cache
from depthg.precision import FULL_PRECISION, Precision, amp_context
from depthg.build import TrainError, load_checkpoint
from depthg.train import train
from depthg.train_support import CropSource, broadcast_flag, collective_device
from depthg.utils import map_threads

# the trainer tests' tiny set-up: a 2+2-image world, a 2-block random ViT, 32-px crops
from test_train import TINY, _quiet_train, tiny_config  # noqa: E402

BF16_CPU = Precision("cpu", torch.bfloat16)
FP16_REL = 2.0**-11  # float16 round-to-nearest: relative error <= half an ulp (10 fraction bits)
FP16_ABS = 2.0**-25  # ... and half the spacing of float16's subnormals below 2**-14


def _tiny_backbone(device: str = "cpu") -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return load_backbone("vit_small_patch8_224", None, **TINY).to(device).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Render the tiny world, crop it, compute kNN and the full-precision feature cache once."""
    root = tmp_path_factory.mktemp("gpu_path")
    _quiet_train(tiny_config(root / "cache", root / "warmup", steps=1))
    return root


# ----------------------------------------------------------------------------------------------------
# 1. the broadcast of validation's "improved" flag
# ----------------------------------------------------------------------------------------------------


def test_collective_device_follows_the_backend():
    assert collective_device("nccl", torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert collective_device("gloo", torch.device("cpu")) == torch.device("cpu")
    assert collective_device("gloo", torch.device("cuda", 0)) == torch.device("cpu")
    with pytest.raises(TrainError, match="nccl"):
        collective_device("nccl", torch.device("cpu"))


def test_broadcast_flag_without_a_process_group_is_the_value():
    assert not dist.is_initialized()
    assert broadcast_flag(True, torch.device("cpu")) is True
    assert broadcast_flag(False, torch.device("cpu")) is False


def _broadcast_worker(rank: int, world: int, port: int, cfg_dict: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # Record the device of every broadcast tensor (validation's flag included) against the backend's.
    seen: list[list[str]] = []
    original = dist.broadcast

    def spy(tensor, src, *args, **kwargs):
        seen.append([str(tensor.device), str(collective_device(dist.get_backend(), torch.device("cpu")))])
        return original(tensor, src, *args, **kwargs)

    dist.broadcast = spy
    dist.init_process_group("gloo")
    # Rank 0's value wins on every rank, whatever the others hold.
    flags = [broadcast_flag(rank == 0, torch.device("cpu")), broadcast_flag(rank != 0, torch.device("cpu"))]
    # A DDP run that validates after every step: validate() broadcasts whether the model improved.
    result = _quiet_train(Config(**cfg_dict))
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"flags": flags, "seen": seen, "is_main": bool(result)}, handle)


def test_broadcast_flag_and_validation_under_gloo_two_processes(prepared, tmp_path):
    cfg = tiny_config(prepared / "cache", tmp_path / "ddp", steps=2, eval_every=1, eval_max_images=2)
    mp.spawn(_broadcast_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["flags"] for r in ranks] == [[True, False], [True, False]]
    for r in ranks:
        # two direct calls + one per validation (2 steps), each on the device the backend moves
        assert len(r["seen"]) >= 4
        assert all(device == expected for device, expected in r["seen"])
    # rank 0 validated and both ranks saved the best checkpoint together (all_gather of RNG states)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records if "val" in rec] == [1, 2]
    best = load_checkpoint(tmp_path / "ddp" / "checkpoint_best.pt")
    assert best["step"] in (1, 2) and len(best["rng"]) == 2


# ----------------------------------------------------------------------------------------------------
# 2. one precision policy for the feature cache and the recomputation
# ----------------------------------------------------------------------------------------------------


class _Crops(torch.utils.data.Dataset):
    """N random 32x32 crops with depth and labels."""

    def __init__(self, n: int = 6, res: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.img = torch.rand(n, 3, res, res, generator=g)
        self.depth = 1.0 + 30.0 * torch.rand(n, 1, res, res, generator=g)
        self.label = torch.randint(0, 5, (n, res, res), generator=g)

    def __len__(self) -> int:
        return len(self.img)

    def __getitem__(self, i: int) -> dict:
        return {"img": self.img[i], "depth": self.depth[i], "label": self.label[i], "key": str(i)}


def _record_autocast(backbone: torch.nn.Module, device_type: str) -> list[tuple[bool, torch.dtype]]:
    """Forward hook: the autocast state each backbone call ran under."""
    seen: list[tuple[bool, torch.dtype]] = []
    backbone.register_forward_hook(lambda *_: seen.append((torch.is_autocast_enabled(device_type),
                                                           torch.get_autocast_dtype(device_type))))
    return seen


def _assert_within_fp16_rounding(cached: torch.Tensor, exact: torch.Tensor) -> None:
    bound = FP16_REL * exact.abs() + FP16_ABS
    excess = ((cached - exact).abs() - bound).max().item()
    assert excess <= 0, f"cache and recomputation differ by more than float16 rounding (excess {excess:.3g})"


def _cache_vs_recompute(tmp_path, cache_precision: Precision, recompute_precision: Precision, device: str = "cpu"):
    backbone = _tiny_backbone(device)
    seen = _record_autocast(backbone, torch.device(device).type)
    crops = _Crops()
    # one batch of all crops for the cache and the recomputation: identical inputs, identical kernels
    options = CacheOptions(batch_size=len(crops), device=device, progress=False, precision=cache_precision)
    cache = build_feature_cache(backbone, crops, tmp_path, {"test": "precision"}, options)
    source = CropSource(crops, backbone, res=32, device=torch.device(device), amp=recompute_precision)
    recomputed = source.fetch(torch.arange(len(crops)))["feats"].cpu()
    return cache, cache.batch(range(len(crops)))["feats"], recomputed, seen


def test_cache_and_recomputation_agree_under_autocast(tmp_path):
    cache, cached, recomputed, seen = _cache_vs_recompute(tmp_path, BF16_CPU, BF16_CPU)
    # both paths ran the backbone under the same autocast policy
    assert seen == [(True, torch.bfloat16), (True, torch.bfloat16)]
    assert cache.manifest["precision"] == "bf16"
    _assert_within_fp16_rounding(cached, recomputed)
    # the policy did something: full-precision features differ from the bf16 ones by more than fp16 rounding
    exact = backbone_features(_tiny_backbone(), torch.stack([it["img"] for it in _Crops()]), FULL_PRECISION)
    with pytest.raises(AssertionError, match="float16 rounding"):
        _assert_within_fp16_rounding(exact, recomputed)


def test_a_full_precision_cache_does_not_match_an_autocast_recomputation(tmp_path):
    # What the cache did before it took the run's policy: the difference is bf16's, not fp16 storage's.
    _, cached, recomputed, seen = _cache_vs_recompute(tmp_path, FULL_PRECISION, BF16_CPU)
    assert seen[0][0] is False and seen[1] == (True, torch.bfloat16)
    with pytest.raises(AssertionError, match="float16 rounding"):
        _assert_within_fp16_rounding(cached, recomputed)


def test_cache_key_separates_precisions(tmp_path):
    crops, backbone = _Crops(), _tiny_backbone()
    full = build_feature_cache(backbone, crops, tmp_path, {"k": 1}, CacheOptions(progress=False))
    bf16_options = CacheOptions(progress=False, precision=BF16_CPU)
    bf16 = build_feature_cache(backbone, crops, tmp_path, {"k": 1}, bf16_options)
    assert full.root != bf16.root and "precision" not in full.manifest
    assert build_feature_cache(backbone, crops, tmp_path, {"k": 1}, bf16_options).root == bf16.root


def test_training_from_cache_equals_recomputation_under_autocast(prepared, monkeypatch):
    # The trainer enables AMP on CUDA only; here its policy is CPU bf16 autocast, for every part of the run.
    monkeypatch.setattr(train_module, "amp_context", lambda cfg, device: (BF16_CPU, None))
    given: list[Precision | None] = []
    original = train_support.build_feature_cache

    def spy(backbone, dataset, root_dir, info, options):
        given.append(options.precision)
        return original(backbone, dataset, root_dir, info, options)

    monkeypatch.setattr(train_support, "build_feature_cache", spy)
    cached = _quiet_train(tiny_config(prepared / "cache", prepared / "amp_cached", steps=1, feature_cache=True))
    direct = _quiet_train(tiny_config(prepared / "cache", prepared / "amp_direct", steps=1, feature_cache=False))
    # the run built its cache under its own policy (on this tiny model the losses alone cannot tell bf16
    # from fp32 features apart: both differences are ~1e-4)
    assert given == [BF16_CPU]
    for key in ("pos_intra", "pos_inter", "neg_inter", "depth", "total"):
        a, b = cached["last_train_losses"][key], direct["last_train_losses"][key]
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), (key, a, b)


# ----------------------------------------------------------------------------------------------------
# 3. what a GPU step waits for: crops read on threads, cache rows moved as stored; same values
# ----------------------------------------------------------------------------------------------------


def test_map_threads_is_the_serial_map():
    items = list(range(23))
    expected = [(x * 7919) % 101 for x in items]
    for workers in (0, 1, 2, 8, 64):
        assert map_threads(lambda x: (x * 7919) % 101, items, workers) == expected
    assert map_threads(str, [], 4) == []
    with pytest.raises(ZeroDivisionError):  # an error in a worker reaches the caller
        map_threads(lambda x: 1 // x, [1, 0, 2], 3)


def test_crop_source_reads_the_same_batch_on_threads():
    crops, backbone = _Crops(n=8), _tiny_backbone()
    idx = torch.tensor([5, 0, 3, 3, 7, 1])
    serial = CropSource(crops, backbone, res=32, device=torch.device("cpu"), amp=FULL_PRECISION).fetch(idx)
    threaded = CropSource(crops, backbone, res=32, device=torch.device("cpu"), amp=FULL_PRECISION, workers=4).fetch(idx)
    assert serial.keys() == threaded.keys()
    for key in serial:
        assert torch.equal(serial[key], threaded[key]), key


def test_cache_rows_as_stored_widen_to_the_float32_rows(tmp_path):
    crops, backbone = _Crops(), _tiny_backbone()
    serial = build_feature_cache(backbone, crops, tmp_path / "a", {"k": 1}, CacheOptions(batch_size=3, progress=False))
    threaded = build_feature_cache(backbone, crops, tmp_path / "b", {"k": 1},
                                   CacheOptions(batch_size=3, progress=False, workers=3))
    for name in ("feats.f16", "depth.f32", "label.i16"):  # threads change nothing in the files
        assert (serial.root / name).read_bytes() == (threaded.root / name).read_bytes(), name
    idx = [4, 0, 4, 2]
    wide, stored = serial.batch(idx), serial.batch(idx, as_stored=True)
    assert (stored["feats"].dtype, stored["label"].dtype, wide["feats"].dtype, wide["label"].dtype) == (
        torch.float16, torch.int16, torch.float32, torch.int64)
    assert torch.equal(stored["feats"].float(), wide["feats"]) and torch.equal(stored["label"].long(), wide["label"])
    assert torch.equal(stored["depth"], wide["depth"])
    fetched = train_support.CachedSource(serial, torch.device("cpu")).fetch(torch.tensor(idx))
    assert all(torch.equal(fetched[k], wide[k]) for k in wide) and fetched["feats"].dtype == torch.float32


def test_loader_threads_leave_training_unchanged(prepared):
    runs = [_quiet_train(tiny_config(prepared / "cache", prepared / f"threads{w}", steps=2, feature_cache=False,
                                     num_workers=w)) for w in (0, 3)]
    assert runs[0]["last_train_losses"] == runs[1]["last_train_losses"]


# ----------------------------------------------------------------------------------------------------
# CUDA only (run by benchmarks/gpu.py on a GPU machine)
# ----------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
def test_nccl_broadcasts_the_flag_from_the_cuda_device(monkeypatch):
    # One process, one GPU: NCCL still refuses a CPU tensor, which is what crashed multi-GPU validation.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        assert broadcast_flag(True, torch.device("cuda", 0)) is True
        assert broadcast_flag(False, torch.device("cuda", 0)) is False
        with pytest.raises((RuntimeError, ValueError)):
            dist.broadcast(torch.tensor([1]), 0)  # the old code's CPU flag
    finally:
        dist.destroy_process_group()


def _nccl_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    flags = [broadcast_flag(rank == 0, torch.device("cuda", rank)), broadcast_flag(rank != 0, torch.device("cuda", rank))]
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(flags, handle)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_broadcast_flag_two_gpus(tmp_path):
    mp.spawn(_nccl_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [[True, False]] * 2


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_cache_and_recomputation_agree(tmp_path, amp):
    precision, _ = amp_context(Config(amp=amp, device="cuda"), torch.device("cuda"))  # the trainer's policy
    assert precision.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    _, cached, recomputed, seen = _cache_vs_recompute(tmp_path, precision, precision, device="cuda")
    assert seen == [(True, precision.dtype)] * 2
    _assert_within_fp16_rounding(cached, recomputed)


@pytest.mark.cuda
@needs_cuda
def test_cuda_training_from_cache_equals_recomputation_with_amp(prepared):
    changes = dict(steps=2, device="cuda", amp="bf16")
    cached = _quiet_train(tiny_config(prepared / "cache", prepared / "cuda_cached", feature_cache=True, **changes))
    direct = _quiet_train(tiny_config(prepared / "cache", prepared / "cuda_direct", feature_cache=False, **changes))
    for key in ("pos_intra", "pos_inter", "neg_inter", "depth", "total"):
        a, b = cached["last_train_losses"][key], direct["last_train_losses"][key]
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), (key, a, b)
