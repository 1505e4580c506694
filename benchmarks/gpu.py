"""The GPU benchmark: what a first GPU user needs to know, in one run of at most 8 minutes on one GPU.

(a) the CUDA-only tests (``pytest -m cuda``: FPS on CUDA = CPU, NCCL broadcast of validation's flag,
    feature cache = recomputation under AMP, a CUDA training run from the cache and from recomputation);
(b) batched farthest point sampling on CUDA against the numba CPU kernel and the released per-image NumPy
    loop, B = 32, 784 -> 121 points (``benchmarks/fps.py``'s workload and timing, identical indices checked);
(c) one training step from the feature cache and with recomputed features, AMP off and on, for ViT-S/8 and
    ViT-B/8 backbones at 224 px, batch 32, random weights (``benchmarks/train_step.py``'s step);
(d) ``depthg.train.train`` on the ``cityscapes_vitb8`` preset (paper mode, its AMP policy) on a synthetic
    world rendered at Cityscapes resolution (1024 x 2048): 200 iterations from the feature cache and 20
    that recompute features (the preset's default), each projected to the full 2,334-iteration
    run with Cityscapes' sizes (2,975 training images -> 14,875 five-crops, 500 validation images); the
    evaluations' rate is measured on the validation images cycled to 128, so every loader worker is busy;
(e) the stages a first run waits for before and after training, each measured on the same world: monocular
    depth of the 1024 x 2048 images by the preset's ZoeDepth (and Depth Anything V2-Small) built at their real
    size from a transformers config with random weights (the same cost as the trained ones; nothing is
    downloaded), five-crop on the worker pool, kNN features and the exact neighbour search at Cityscapes' size,
    the final evaluation with the dense CRF on worker processes; ``first_run`` projects the whole first run
    from raw images (depth, five-crop, kNN, feature cache, training with validations, final evaluation);
(f) everything in one JSON file, with the goal it is measured against: the paper's Cityscapes ViT-B/8 run in
    under 30 minutes on one H100-class GPU (``goal``: training from the caches; ``first_run``: from raw images).

    .venv/bin/python benchmarks/gpu.py                                # on a CUDA machine (<= 8 min)
    .venv/bin/python benchmarks/gpu.py --dry-run --out runs/gpu_dry_run.json  # same code, tiny shapes, CPU, < 1 min

The projections are linear in what was measured (the neighbour search is timed at full size). Writes
``benchmarks/results/gpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fps import benchmark_fps  # noqa: E402
from train_step import RandomCrops, run_config  # noqa: E402

from depthg.backbone import load_backbone  # noqa: E402
from depthg.build import fidelity  # noqa: E402
from depthg.config import RELEASED_ITERATIONS, Config  # noqa: E402
from depthg.data import build_dataset  # noqa: E402
from depthg.data.transforms import resize_center_crop  # noqa: E402
from depthg.features import CacheOptions, build_feature_cache  # noqa: E402
from depthg.precision import FULL_PRECISION, Precision, amp_context  # noqa: E402
from depthg.method.sampling import numba_available  # noqa: E402
from depthg.build import training_dataset  # noqa: E402
from depthg.train import train  # noqa: E402
from depthg.utils import StageClock, atomic_write, command_line  # noqa: E402

GOAL_S = 30 * 60  # the paper's Cityscapes ViT-B/8 run in under 30 minutes on one H100-class GPU
CITYSCAPES_TRAIN_IMAGES = 2975
CITYSCAPES_CROPS = 5 * CITYSCAPES_TRAIN_IMAGES  # five-crop of every training image
CITYSCAPES_VAL_IMAGES = 500
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, img_size=64)

# Sizes of each part: the real measurement and the dry run (same code, tiny shapes, CPU).
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        fps=dict(batch=32, grid=28, n_side=11, repeats=20),
        step=dict(res=224, batch=32, repeats=10, warmup=3, backbone_kwargs={},
                  backbones={"vit_s8": ("vit_small_patch8_224", "cocostuff_vits8"),
                             "vit_b8": ("vit_base_patch8_224", "cocostuff_vitb8")}),
        run=dict(world_size=[1024, 2048], n_train=16, n_val=8, iterations=200, recompute_iterations=20,
                 eval_every=100, log_every=10, render_workers=min(8, os.cpu_count() or 1), eval_images=128,
                 overrides={}),
        stages=dict(tiny_depth=False, knn_crops=512, knn_search_n=CITYSCAPES_CROPS, knn_dim=768, crf_images=64),
    ),
    "dry": dict(
        fps=dict(batch=4, grid=8, n_side=3, repeats=2),
        step=dict(res=32, batch=4, repeats=1, warmup=1, backbone_kwargs=TINY_VIT,
                  backbones={"vit_s8": ("vit_small_patch8_224", "cocostuff_vits8"),
                             "vit_b8": ("vit_base_patch8_224", "cocostuff_vitb8")}),
        run=dict(world_size=[64, 128], n_train=2, n_val=2, iterations=4, recompute_iterations=3,
                 eval_every=2, log_every=1, render_workers=0, eval_images=4,
                 overrides=dict(backbone_kwargs=TINY_VIT, res=32, eval_res=32, batch_size=4, dim=8,
                                feature_samples=3, knn_k=5, num_neighbors=2, eval_batch_size=4, threads=1,
                                num_workers=2)),
        stages=dict(tiny_depth=True, knn_crops=16, knn_search_n=64, knn_dim=8, crf_images=4),
    ),
}


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def amp_policy(device: torch.device, on: bool) -> tuple[Precision, torch.amp.GradScaler | None]:
    """AMP off = full precision; on = the trainer's policy on CUDA (bf16 where supported), CPU bf16 autocast
    in the dry run (the same code path; the trainer itself never autocasts on the CPU)."""
    if not on:
        return FULL_PRECISION, None
    if device.type == "cuda":
        return amp_context(Config(amp="auto", device="cuda"), device)
    return Precision("cpu", torch.bfloat16), None


# ----------------------------------------------------------------------------------------------------
# (a) CUDA-only tests
# ----------------------------------------------------------------------------------------------------


def cuda_test_files() -> list[str]:
    """Test files holding tests marked ``cuda`` (so collection does not import the whole suite)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "@pytest.mark.cuda" in p.read_text())


def run_cuda_tests(timeout_s: int = 300) -> dict[str, Any]:
    """``pytest -m cuda`` on those files; counts from pytest's JUnit XML report."""
    files = cuda_test_files()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               f"--junitxml={report}", *files]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        seconds = time.perf_counter() - t0
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed: list[str] = []
        if report.is_file():
            root = ET.parse(report).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in counts}
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return {"command": command_line("python", [*cmd[1:3], *cmd[3:6], *files]), "files": files,
            "returncode": proc.returncode, "seconds": seconds,
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"],
            "failed_tests": failed, "summary": lines[-1] if lines else proc.stderr.strip()[-500:],
            "output_tail": (proc.stdout + proc.stderr)[-6000:] if proc.returncode else ""}


# ----------------------------------------------------------------------------------------------------
# (b) farthest point sampling
# ----------------------------------------------------------------------------------------------------


def fps_section(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """The released per-image loop vs the numba CPU kernel vs the batched torch loop on ``device``."""
    contenders = {"numba_cpu": ("numba" if numba_available() else "torch", torch.device("cpu")),
                  "torch_device": ("torch", device)}
    row = benchmark_fps(size["batch"], size["grid"], size["n_side"], size["repeats"], contenders)
    row.update(device=str(device), numba=numba_available(),
               torch_device_vs_numba_cpu=row["numba_cpu_ms"] / row["torch_device_ms"])
    return row


# ----------------------------------------------------------------------------------------------------
# (c) one training step: cache vs recomputation, AMP off / on
# ----------------------------------------------------------------------------------------------------


def step_section(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for label, (name, preset) in size["backbones"].items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: fine for timing
            backbone = load_backbone(name, None, **size["backbone_kwargs"]).to(device).eval()
        base = Config.preset(preset, "paper")
        cfg = base.replace(batch_size=size["batch"], res=size["res"],
                           feature_samples=min(base.feature_samples, size["res"] // backbone.patch_size))
        data = RandomCrops(2 * size["batch"], size["res"], 27)
        for amp_on in (False, True):
            precision, scaler = amp_policy(device, amp_on)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                options = CacheOptions(batch_size=16, device=device, progress=False, precision=precision)
                cache = build_feature_cache(backbone, data, tmp, {"bench": name, "res": size["res"]}, options)
                build_s = time.perf_counter() - t0
                row: dict[str, Any] = {"backbone": label, "timm_name": name, "embed_dim": backbone.embed_dim,
                                       "preset": preset, "sampling": cfg.depth_sampling, "res": size["res"],
                                       "batch_size": size["batch"], "amp": precision.name,
                                       "cache_build_s_per_crop": build_s / len(data)}
                for source in ("recompute", "cache"):
                    row[source] = run_config(cfg, backbone, data, cache, device, source == "cache", size["repeats"],
                                             size["warmup"], precision=precision, scaler=scaler)
                del cache
            row["speedup_cache_vs_recompute"] = row["recompute"]["sec_per_step"] / row["cache"]["sec_per_step"]
            rows.append(row)
            log(f"step {label} amp={precision.name:4s}: recompute {row['recompute']['sec_per_step'] * 1e3:8.1f} ms, "
                f"cache {row['cache']['sec_per_step'] * 1e3:8.1f} ms")
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # AMP speed-up per backbone and source
    for label in size["backbones"]:
        off, on = [r for r in rows if r["backbone"] == label]
        for source in ("recompute", "cache"):
            on[f"speedup_amp_vs_fp32_{source}"] = off[source]["sec_per_step"] / on[source]["sec_per_step"]
    return {"repeats": size["repeats"], "warmup": size["warmup"], "results": rows}


# ----------------------------------------------------------------------------------------------------
# (d) the cityscapes_vitb8 preset on a Cityscapes-resolution synthetic world, projected to 2,334 iterations
# ----------------------------------------------------------------------------------------------------


def _log_times(log_path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train record times, validation record times) by step, seconds since the run started."""
    train_t: dict[int, float] = {}
    val_t: dict[int, float] = {}
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        (val_t if "val" in rec else train_t)[int(rec["step"])] = float(rec["time"])
    return train_t, val_t


def seconds_per_iteration(train_t: dict[int, float], val_t: dict[int, float]) -> float:
    """Mean time of an iteration over logging intervals that hold no validation.

    A validation at step v runs after step v's train record, so it falls in the interval (s1, s2] of
    consecutive train records when s1 <= v < s2.
    """
    steps = sorted(train_t)
    clean = [(s1, s2) for s1, s2 in zip(steps, steps[1:]) if not any(s1 <= v < s2 for v in val_t)]
    if not clean:
        raise RuntimeError("no logging interval without validation: lower log_every")
    return sum(train_t[b] - train_t[a] for a, b in clean) / sum(b - a for a, b in clean)


def run_section(device: torch.device, size: dict[str, Any], work: Path, stages: dict[str, Any]) -> dict[str, Any]:
    from depthg.data.prepare import prepare_training_data
    from depthg.world import make_world

    # data: render the world in parallel (same bytes as a serial render) and use it as the dataset folder;
    # then five-crop + kNN. Depth is the world's exact depth here: the depth models are timed on the same
    # images afterwards (depth_section).
    t0 = time.perf_counter()
    world = make_world(work / "world", size["n_train"], size["n_val"], size=tuple(size["world_size"]), seed=0,
                       progress=False, num_workers=size["render_workers"])
    render_s = time.perf_counter() - t0
    base = Config.preset("cityscapes_vitb8", "paper").replace(
        data_dir=str(world), classes="world", depth_source="gt", weights=None, cache_dir=str(work / "cache"),
        eval_crf=False, checkpoint_every=0, log_every=size["log_every"], device=str(device), **size["overrides"])
    out: dict[str, Any] = {"preset": "cityscapes_vitb8", "mode": base.mode, "amp": base.amp,
                           "world_size": size["world_size"], "n_train_images": size["n_train"],
                           "n_val_images": size["n_val"], "batch_size": base.batch_size, "res": base.res,
                           "eval_res": base.eval_res, "eval_every": base.eval_every, "render_world_s": render_s}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(base.backbone, None, **base.backbone_kwargs).to(device).eval()
    out["pool_start_s"] = pool_start_s(base.num_workers)  # the fork server's one start, before five-crop
    clock = StageClock().start()
    t0 = time.perf_counter()
    data = prepare_training_data(base, backbone=backbone, progress=False)
    out["prepare_s"] = time.perf_counter() - t0  # five-crop + kNN
    clock.stop()
    out["five_crop_s"], out["knn_s"] = clock.seconds["five-crop"], clock.seconds["kNN"]
    fid = fidelity(base)
    crops = training_dataset(base, fid, data)
    out["n_crops"] = len(crops)
    out["knn"] = knn_section(base, backbone, crops, device, stages)

    # the feature cache's build rate under the run's precision policy (PNG crops -> backbone -> fp16 memmap)
    precision, _ = amp_context(base, device)
    out["precision"] = precision.name
    t0 = time.perf_counter()
    transform = partial(resize_center_crop, res=base.res, resize=fid.resize)
    options = CacheOptions(batch_size=base.batch_size, device=device, transform=transform, progress=False,
                           precision=precision, workers=base.num_workers)
    build_feature_cache(backbone, crops, work / "cache_timing", {"timing": True}, options)
    out["cache_build_s_per_crop"] = (time.perf_counter() - t0) / len(crops)
    del backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()

    out["eval"] = eval_section(base, device, size["eval_images"], stages["crf_images"])
    out["depth"] = depth_section(base, device, work, stages["tiny_depth"])
    runs: dict[str, Any] = {}
    for name, cache, iterations in (("feature_cache", True, size["iterations"]),
                                    ("recompute", False, size["recompute_iterations"])):
        cfg = base.replace(steps=iterations, feature_cache=cache, eval_every=size["eval_every"],
                           eval_max_images=size["n_val"], output_dir=str(work / f"run_{name}"), name=name)
        log(f"run {name}: {iterations} iterations")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train(cfg, progress=False, data=data)
        train_t, val_t = _log_times(Path(cfg.output_dir) / "log.jsonl")
        s_it = seconds_per_iteration(train_t, val_t)
        val_s = [val_t[v] - train_t[v] for v in sorted(val_t)]
        last = max([*train_t.values(), *val_t.values()])
        first = min(train_t)
        row = {
            "iterations": iterations, "eval_every": size["eval_every"], "wall_s": result["wall_time_s"],
            "s_per_iteration": s_it, "iterations_per_s": 1.0 / s_it,
            "setup_s": train_t[first] - first * s_it,  # backbone, datasets, feature cache (if any), models
            # in-run evaluations: one batch of n_val images (the projection uses out["eval"] instead)
            "validation_s_per_image": float(np.mean(val_s)) / size["n_val"],
            "final_eval_s_per_image": (result["wall_time_s"] - last) / size["n_val"],
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        }
        row["projection"] = project(row, out, cache)
        runs[name] = row
        log(f"run {name}: {s_it * 1e3:.1f} ms/iteration -> projected {row['projection']['training_s'] / 60:.1f} min")
    out["runs"] = runs
    return out


class _Repeated(torch.utils.data.Dataset):
    """``dataset``'s items cycled to ``n`` (its class attributes kept): enough batches to keep every loader worker busy."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset, self.n = dataset, n
        for name in ("n_classes", "class_names", "palette"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset[i % len(self.dataset)]


def eval_section(cfg: Config, device: torch.device, n_images: int, crf_images: int) -> dict[str, Any]:
    """Seconds per image of the training-time validation (no flip, no CRF) and the final evaluation (flip, no
    CRF) with the run's loader workers, on the validation images cycled to ``n_images``, and of the final
    evaluation with the dense CRF on ``crf_workers`` processes (the preset's protocol) on ``crf_images``. The
    in-run validations see one batch (the world has few validation images), which leaves the workers idle."""
    from depthg.build import build_models, fidelity, validation_dataset
    from depthg.evaluate import EvalOptions, evaluate_model

    val = _Repeated(validation_dataset(cfg, cfg.data_dir), n_images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(cfg.backbone, None, **cfg.backbone_kwargs).to(device).eval()
    model = build_models(cfg, backbone.embed_dim, int(val.n_classes)).to(device)
    precision, _ = amp_context(cfg, device)
    out: dict[str, Any] = {"n_images": n_images, "num_workers": cfg.num_workers, "batch_size": cfg.eval_batch_size}
    for name, flip, crf, n in (("validation", False, False, n_images), ("final_eval", True, False, n_images),
                               ("final_eval_crf", True, True, crf_images)):
        opts = EvalOptions.of(cfg, fidelity(cfg), flip=flip, crf=crf, progress=False, max_images=n)
        t0 = time.perf_counter()
        evaluate_model(backbone, model, val, opts, device=device, amp=precision)
        out[f"{name}_s_per_image"] = (time.perf_counter() - t0) / n
    out.update(crf_images=crf_images, crf_workers=EvalOptions.of(cfg, fidelity(cfg)).crf_workers)
    log(f"eval: validation {out['validation_s_per_image'] * 1e3:.1f} ms/image, final {out['final_eval_s_per_image'] * 1e3:.1f} "
        f"ms/image ({cfg.num_workers} loader workers), final with CRF {out['final_eval_crf_s_per_image'] * 1e3:.1f} "
        f"ms/image ({out['crf_workers']} CRF processes)")
    return out


# ----------------------------------------------------------------------------------------------------
# (e) the preparation stages: pool start, kNN, depth; the whole first run from raw images
# ----------------------------------------------------------------------------------------------------


def pool_start_s(workers: int) -> float:
    """Seconds to start the worker pool the first time in a process (the fork server imports the library once;
    later pools fork from it at once): a fixed cost of the five-crop, not a per-image one."""
    from depthg.data import prepare
    from depthg.utils import pool_map

    t0 = time.perf_counter()
    list(pool_map(prepare._crop_item, [], workers))
    return time.perf_counter() - t0


def knn_section(cfg: Config, backbone: torch.nn.Module, crops: Any, device: torch.device,
                stages: dict[str, Any]) -> dict[str, Any]:
    """The kNN stage's two parts at their real cost: descriptors of the crops cycled to ``knn_crops`` (full
    precision, the run's batch and loader workers), and the exact neighbour search over ``knn_search_n``
    random descriptors of the backbone's width (float64 on the device; quadratic in N, so timed at full N)."""
    from depthg.data.prepare import KnnSettings, _knn_descriptors, knn_search

    settings = KnnSettings.of(cfg, len(crops))
    items = _Repeated(crops, stages["knn_crops"])
    t0 = time.perf_counter()
    _knn_descriptors(items, backbone, settings, device, progress=False)
    features_s = time.perf_counter() - t0
    n, dim = stages["knn_search_n"], stages["knn_dim"]
    desc = torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    knn_search(desc[: min(n, 256)].to(device), min(cfg.knn_k, 255), device=device)  # warm-up (kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    knn_search(desc.to(device), min(cfg.knn_k, n - 1), chunk_size=settings.chunk_size, device=device)
    _sync(device)
    search_s = time.perf_counter() - t0
    log(f"kNN: features {features_s / len(items) * 1e3:.1f} ms/crop, search over {n} x {dim} {search_s:.2f} s")
    return {"feature_crops": len(items), "features_s_per_crop": features_s / len(items), "search_n": n,
            "search_dim": dim, "search_s": search_s}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def zoedepth(tiny: bool) -> tuple[torch.nn.Module, Any, str]:
    """ZoeDepth (the preset's depth source, ZoeD_N: BEiT-L/16 at 384, NYU bins) from transformers' default config,
    random weights, with the released processor's settings (384 x 512, keep aspect, multiple of 32, padding);
    a tiny one in the dry run. (model, processor, kind)."""
    from transformers import BeitConfig, ZoeDepthConfig, ZoeDepthForDepthEstimation, ZoeDepthImageProcessor

    if not tiny:
        return ZoeDepthForDepthEstimation(ZoeDepthConfig()), ZoeDepthImageProcessor(ensure_multiple_of=32), "metric"
    backbone = BeitConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                          intermediate_size=64, out_indices=[1, 2, 3, 4], use_relative_position_bias=True,
                          reshape_hidden_states=False)
    config = ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                            bottleneck_features=16, bin_embedding_dim=16, num_attractors=[4, 4, 2, 1],
                            num_relative_features=8, reassemble_factors=[4, 2, 1, 0.5],
                            bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0, "name": "nyu"}])
    processor = ZoeDepthImageProcessor(size={"height": 32, "width": 64}, ensure_multiple_of=32)
    return ZoeDepthForDepthEstimation(config), processor, "metric"


def depth_anything_v2_small(tiny: bool) -> tuple[torch.nn.Module, Any, str]:
    """Depth Anything V2-Small (DINOv2 ViT-S/14 + DPT head, relative depth at 518 px, keep aspect, multiple of
    14) at its real size with random weights; a tiny one in the dry run. (model, processor, kind)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    width, heads, neck, fusion, head, side = (384, 6, [48, 96, 192, 384], 64, 32, 518) if not tiny else \
        (32, 2, [8, 16, 32, 32], 16, 8, 56)
    backbone = Dinov2Config(image_size=518 if not tiny else 56, patch_size=14, hidden_size=width, num_hidden_layers=12,
                            num_attention_heads=heads, out_features=["stage3", "stage6", "stage9", "stage12"],
                            reshape_hidden_states=False, layerscale_value=1.0)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=width, patch_size=14,
                                 neck_hidden_sizes=neck, reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=fusion,
                                 head_hidden_size=head, depth_estimation_type="relative", max_depth=1)
    processor = DPTImageProcessor(size={"height": side, "width": side}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                  do_pad=False, resample=3, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    return DepthAnythingForDepthEstimation(config), processor, "relative"


def depth_section(cfg: Config, device: torch.device, work: Path, tiny: bool) -> dict[str, Any]:
    """Seconds per training image of ``estimate_depth_for_dataset`` on the world's 1024 x 2048 images with each
    model (loader workers, batches of eval_batch_size, the run's autocast): one warm-up pass, then a timed one
    into a fresh cache. ``zoedepth`` is the preset's source and goes into the projection."""
    from depthg.depth import DepthModel, estimate_depth_for_dataset

    raw = build_dataset("cityscapes", cfg.data_dir, cfg.train_split, classes="world")
    precision, _ = amp_context(cfg, device)
    out: dict[str, Any] = {"images": len(raw), "image_size": list(raw[0]["img"].shape[1:]), "precision": precision.name,
                           "batch_size": cfg.eval_batch_size, "num_workers": cfg.num_workers, "models": {}}
    for name, make in (("zoedepth", zoedepth), ("depth_anything_v2_small", depth_anything_v2_small)):
        with warnings.catch_warnings(), torch.device(device):
            warnings.simplefilter("ignore")
            net, processor, kind = make(tiny)
        model = DepthModel(net.eval(), processor, name, kind, device)  # type: ignore[arg-type]
        times = []
        for attempt in ("warmup", "timed"):
            _sync(device)
            t0 = time.perf_counter()
            estimate_depth_for_dataset(raw, model, work / "depth" / f"{name}_{attempt}", batch_size=cfg.eval_batch_size,
                                       progress=False, num_workers=cfg.num_workers, precision=precision)
            _sync(device)
            times.append(time.perf_counter() - t0)
        shape = list(processor(images=[raw.load_image_tensor(0)], return_tensors="pt", do_rescale=False)["pixel_values"].shape)
        out["models"][name] = {"s_per_image": times[1] / len(raw), "warmup_s": times[0], "kind": kind,
                               "parameters": sum(p.numel() for p in net.parameters()), "network_input": shape[1:]}
        log(f"depth {name}: {times[1] / len(raw) * 1e3:.1f} ms/image ({out['models'][name]['parameters'] / 1e6:.1f} M "
            f"parameters, input {shape[2]}x{shape[3]}, {precision.name})")
        del net, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def first_run(run: dict[str, Any]) -> dict[str, Any]:
    """The first cityscapes_vitb8 run from raw Cityscapes-sized images, stage by stage, linear in the measured rates
    (the feature-cache run's training; the final evaluation of the last and the best weights, with the CRF)."""
    projection = run["runs"]["feature_cache"]["projection"]
    knn, evals = run["knn"], run["eval"]
    five_crop_rate = run["five_crop_s"] / run["n_train_images"]
    stages = {
        "depth": dict(item="training image", items=CITYSCAPES_TRAIN_IMAGES, model="zoedepth (random weights, real size)",
                      s_per_item=run["depth"]["models"]["zoedepth"]["s_per_image"]),
        "five_crop": dict(item="training image", items=CITYSCAPES_TRAIN_IMAGES, s_per_item=five_crop_rate,
                          fixed_s=run["pool_start_s"]),
        "knn": dict(item="crop", items=CITYSCAPES_CROPS, s_per_item=knn["features_s_per_crop"],
                    fixed_s=knn["search_s"] * (CITYSCAPES_CROPS / knn["search_n"]) ** 2),
        "feature_cache": dict(item="crop", items=CITYSCAPES_CROPS, s_per_item=run["cache_build_s_per_crop"]),
        "training": dict(item="iteration", items=RELEASED_ITERATIONS, s_per_item=run["runs"]["feature_cache"]["s_per_iteration"],
                         fixed_s=projection["validation_s"], validations=projection["validations"]),
        "final_eval": dict(item="validation image (last and best weights: 2 evaluations, flip + CRF)",
                           items=2 * CITYSCAPES_VAL_IMAGES, s_per_item=evals["final_eval_crf_s_per_image"]),
    }
    for stage in stages.values():
        stage["projected_s"] = stage["items"] * stage["s_per_item"] + stage.get("fixed_s", 0.0)
    total = sum(stage["projected_s"] for stage in stages.values())
    return {"what": "the first cityscapes_vitb8 run from raw Cityscapes-sized images (2,975 training, 500 validation)",
            "stages": stages, "projected_s": total, "goal_s": GOAL_S, "meets_goal": total <= GOAL_S}



def project(row: dict[str, Any], data: dict[str, Any], cache: bool) -> dict[str, Any]:
    """The full preset run on Cityscapes' sizes, linear in the measured rates."""
    n_validations = RELEASED_ITERATIONS // data["eval_every"] + (RELEASED_ITERATIONS % data["eval_every"] != 0)
    parts = {
        "iterations_s": RELEASED_ITERATIONS * row["s_per_iteration"],
        "validation_s": n_validations * CITYSCAPES_VAL_IMAGES * data["eval"]["validation_s_per_image"],
        "final_eval_s": CITYSCAPES_VAL_IMAGES * data["eval"]["final_eval_s_per_image"],
        "feature_cache_build_s": CITYSCAPES_CROPS * data["cache_build_s_per_crop"] if cache else 0.0,
    }
    training_s = sum(parts.values())
    prepare_s = data["prepare_s"] / data["n_train_images"] * CITYSCAPES_TRAIN_IMAGES
    return {
        "iterations": RELEASED_ITERATIONS, "validations": n_validations,
        "train_crops": CITYSCAPES_CROPS, "val_images": CITYSCAPES_VAL_IMAGES, **parts,
        "training_s": training_s, "five_crop_and_knn_s": prepare_s, "with_preparation_s": training_s + prepare_s,
        "meets_goal": training_s < GOAL_S,
        "not_included": ["depth estimation of the real images (ZoeDepth)",
                         "dense CRF of the final evaluation (eval_crf=true in the preset)",
                         "both are in first_run, the whole first run from raw images"],
    }


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (< 1 min), same code and keys")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    parser.add_argument("--device", default="cuda", help="the GPU to measure (ignored with --dry-run)")
    args = parser.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        device = torch.device(args.device)
        if device.type != "cuda" or not torch.cuda.is_available():
            parser.error(f"device {args.device!r}: no CUDA device here; use --dry-run on a CPU")
        if device.index is None:  # "cuda" -> the current device, with its index (set_device needs one)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    size = SIZES["dry" if args.dry_run else "full"]
    t_start = time.perf_counter()
    sections_s: dict[str, float] = {}
    report: dict[str, Any] = {
        "benchmark": "gpu", "dry_run": args.dry_run,
        "note": ("dry run: tiny shapes on the CPU through the same code; its numbers test the script and "
                 "measure nothing") if args.dry_run else "measured on one GPU; projections are linear in what was measured",
        "command": command_line("python benchmarks/gpu.py", argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "goal": {"what": "the paper's Cityscapes ViT-B/8 run (cityscapes_vitb8, 2,334 iterations) on one H100-class GPU",
                 "seconds": GOAL_S},
    }

    def timed(name: str, fn, *a) -> Any:
        log(f"({name}) ...")
        t0 = time.perf_counter()
        value = fn(*a)
        sections_s[name] = time.perf_counter() - t0
        return value

    report["cuda_tests"] = timed("cuda_tests", run_cuda_tests)
    report["fps"] = timed("fps", fps_section, device, size["fps"])
    report["train_step"] = timed("train_step", step_section, device, size["step"])
    with tempfile.TemporaryDirectory() as tmp:
        report["cityscapes_run"] = timed("cityscapes_run", run_section, device, size["run"], Path(tmp), size["stages"])
    report["first_run"] = first_run(report["cityscapes_run"])
    report["sections_s"] = sections_s
    report["seconds"] = time.perf_counter() - t_start
    cached = report["cityscapes_run"]["runs"]["feature_cache"]["projection"]
    report["goal"].update(projected_s=cached["training_s"], meets_goal=cached["meets_goal"],
                          projected_config="cityscapes_vitb8 with feature_cache=true (cityscapes_run.runs.feature_cache)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    log(f"cuda tests: {report['cuda_tests']['summary']}")
    log(f"fps B={size['fps']['batch']}: released {report['fps']['reference_ms']:.2f} ms, numba "
        f"{report['fps']['numba_cpu_ms']:.2f} ms, torch on {device} {report['fps']['torch_device_ms']:.2f} ms")
    stages = ", ".join(f"{name} {stage['projected_s'] / 60:.1f}" for name, stage in report["first_run"]["stages"].items())
    log(f"{'DRY RUN (not a measurement): ' if args.dry_run else ''}"
        f"projected cityscapes_vitb8 run (feature cache): {cached['training_s'] / 60:.1f} min; first run from raw "
        f"images {report['first_run']['projected_s'] / 60:.1f} min ({stages}) (goal {GOAL_S / 60:.0f} min); total "
        f"{report['seconds']:.0f} s; wrote {out}")
    return report


if __name__ == "__main__":
    main()
