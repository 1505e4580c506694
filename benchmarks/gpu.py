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
(e) everything in one JSON file, with the goal it is measured against: the paper's Cityscapes ViT-B/8 run in
    under 30 minutes on one H100-class GPU.

    .venv/bin/python benchmarks/gpu.py                                # on a CUDA machine (<= 8 min)
    .venv/bin/python benchmarks/gpu.py --dry-run --out runs/gpu_dry_run.json  # same code, tiny shapes, CPU, < 1 min

The projection is linear in what was measured and says what it leaves out (depth estimation of the real
images, the dense CRF of the final evaluation). Writes ``benchmarks/results/gpu.json`` (or ``--out``).
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
from depthg.data.transforms import resize_center_crop  # noqa: E402
from depthg.features import CacheOptions, build_feature_cache  # noqa: E402
from depthg.precision import FULL_PRECISION, Precision, amp_context  # noqa: E402
from depthg.method.sampling import numba_available  # noqa: E402
from depthg.build import training_dataset  # noqa: E402
from depthg.train import train  # noqa: E402
from depthg.utils import atomic_write  # noqa: E402

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
    ),
    "dry": dict(
        fps=dict(batch=4, grid=8, n_side=3, repeats=2),
        step=dict(res=32, batch=4, repeats=1, warmup=1, backbone_kwargs=TINY_VIT,
                  backbones={"vit_s8": ("vit_small_patch8_224", "cocostuff_vits8"),
                             "vit_b8": ("vit_base_patch8_224", "cocostuff_vitb8")}),
        run=dict(world_size=[64, 128], n_train=2, n_val=2, iterations=4, recompute_iterations=3,
                 eval_every=2, log_every=1, render_workers=0, eval_images=4,
                 overrides=dict(backbone_kwargs=TINY_VIT, res=32, eval_res=32, batch_size=4, dim=8,
                                feature_samples=3, knn_k=5, num_neighbors=2, eval_batch_size=4, threads=1)),
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
    return {"command": " ".join(["python", *cmd[1:3], *cmd[3:6], *files]), "files": files,
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


def run_section(device: torch.device, size: dict[str, Any], work: Path) -> dict[str, Any]:
    from depthg.data.prepare import prepare_training_data
    from depthg.world import make_world

    # data: render the world in parallel (same bytes as a serial render) and use it as the dataset folder;
    # then five-crop + kNN. Depth is the world's exact depth: no depth model runs.
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
    t0 = time.perf_counter()
    data = prepare_training_data(base, backbone=backbone, progress=False)
    out["prepare_s"] = time.perf_counter() - t0  # five-crop + kNN
    fid = fidelity(base)
    crops = training_dataset(base, fid, data)
    out["n_crops"] = len(crops)

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

    out["eval"] = eval_section(base, device, size["eval_images"])
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


def eval_section(cfg: Config, device: torch.device, n_images: int) -> dict[str, Any]:
    """Seconds per image of the training-time validation (no flip, no CRF) and the final evaluation (flip, no
    CRF) with the run's loader workers, on the validation images cycled to ``n_images``. The in-run
    validations see one batch (the world has few validation images), which leaves the workers idle."""
    from depthg.build import build_models, fidelity, validation_dataset
    from depthg.evaluate import EvalOptions, evaluate_model

    val = _Repeated(validation_dataset(cfg, cfg.data_dir), n_images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(cfg.backbone, None, **cfg.backbone_kwargs).to(device).eval()
    model = build_models(cfg, backbone.embed_dim, int(val.n_classes)).to(device)
    precision, _ = amp_context(cfg, device)
    out: dict[str, Any] = {"n_images": n_images, "num_workers": cfg.num_workers, "batch_size": cfg.eval_batch_size}
    for name, flip in (("validation", False), ("final_eval", True)):
        opts = EvalOptions.of(cfg, fidelity(cfg), flip=flip, crf=False, progress=False, max_images=None)
        t0 = time.perf_counter()
        evaluate_model(backbone, model, val, opts, device=device, amp=precision)
        out[f"{name}_s_per_image"] = (time.perf_counter() - t0) / n_images
    log(f"eval: validation {out['validation_s_per_image'] * 1e3:.1f} ms/image, final {out['final_eval_s_per_image'] * 1e3:.1f} "
        f"ms/image ({cfg.num_workers} loader workers)")
    return out


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
                         "dense CRF of the final evaluation (eval_crf=true in the preset)"],
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
        "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
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
        report["cityscapes_run"] = timed("cityscapes_run", run_section, device, size["run"], Path(tmp))
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
    log(f"{'DRY RUN (not a measurement): ' if args.dry_run else ''}"
        f"projected cityscapes_vitb8 run (feature cache): {cached['training_s'] / 60:.1f} min "
        f"(goal {GOAL_S / 60:.0f} min); total {report['seconds']:.0f} s; wrote {out}")
    return report


if __name__ == "__main__":
    main()
