"""The preparation stages of a first run on this CPU: one worker against all cores, measured in one run.

On a synthetic world in the Cityscapes layout (the synthetic preset's settings, five-cropped as the
real-data presets are; 48 + 24 images at twice its resolution, so that the parallel stages have work), each
stage runs with ``num_workers=0`` (everything in this process) and with every core, alternating, twice each,
every run into a fresh folder; the fastest run of each counts (the least disturbed by other processes on a
shared machine), and all outputs are compared:

* ``depth``: ``estimate_depth_for_dataset``, images read and processed by loader workers, PNGs written on
  threads. The network is a tiny random Depth Anything: the workers parallelise the reading, the processor
  and the writing around it, not the network (on a GPU it runs on the device);
* ``five_crop``: ``five_crop`` on the worker-process pool, one source image per task;
* ``knn``: ``compute_knn`` with the embedded backbone (loader workers read and resize the crops; the exact
  search is the same code either way);
* ``feature_cache``: ``build_feature_cache`` (reading threads);
* ``final_eval``: ``evaluate_model`` with flip and the dense CRF on worker processes (``crf_workers``).

The fork server that the process pools fork from is started once per process (it imports the library):
``pool_start_s`` says what that cost, before the parallel runs. Identity: the same bytes for files (depth
PNGs, crops and index, feature memmaps), the same neighbour table, the same metrics.

    .venv/bin/python benchmarks/prepare.py                                      # about 9 minutes on 2 shared cores
    .venv/bin/python benchmarks/prepare.py --dry-run --out runs/prepare_dry.json  # seconds (CI)

Writes ``benchmarks/results/prepare.json``: ``stages[name]`` with ``serial_s``, ``parallel_s`` (the fastest
runs), ``speedup`` (serial / parallel), ``identical``, every run's seconds; the machine, its load average
before and after, the command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from depthg.backbone import load_backbone  # noqa: E402
from depthg.build import build_models, fidelity, validation_dataset  # noqa: E402
from depthg.config import Config  # noqa: E402
from depthg.data import build_dataset  # noqa: E402
from depthg.data import prepare as P  # noqa: E402
from depthg.data.transforms import resize_center_crop  # noqa: E402
from depthg.depth import build_tiny_random_depth_model, estimate_depth_for_dataset, load_depth_model  # noqa: E402
from depthg.evaluate import EvalOptions, evaluate_model  # noqa: E402
from depthg.features import CacheOptions, build_feature_cache  # noqa: E402
from depthg.utils import atomic_write, command_line, pool_map  # noqa: E402
from depthg.world import make_world  # noqa: E402

#: World sizes: the measurement (a few minutes on 2 cores) and the dry run (seconds, same code and keys).
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(n_train=48, n_val=24, world_size=[512, 1024], repeats=2),
    "dry": dict(n_train=3, n_val=2, world_size=[64, 128], repeats=1),
}
STAGES = ("depth", "five_crop", "knn", "feature_cache", "final_eval")


def log(msg: str) -> None:
    print(f"[prepare.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def files_digest(folder: Path, pattern: str = "*") -> str:
    """SHA-256 over the relative paths and bytes of every file below ``folder`` matching ``pattern``."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob(pattern) if p.is_file() and not p.name.endswith(".lock")):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# the stages: each runs with ``workers`` into ``out`` and returns what identifies its output
# ----------------------------------------------------------------------------------------------------
def depth_stage(cfg: Config, workers: int, out: Path, model_dir: Path) -> str:
    model = load_depth_model(model_dir, device="cpu")
    raw = build_dataset("cityscapes", cfg.data_dir, cfg.train_split, classes="world")
    estimate_depth_for_dataset(raw, model, out, batch_size=cfg.eval_batch_size, progress=False, num_workers=workers)
    return files_digest(out, "*.png")


def five_crop_stage(cfg: Config, workers: int, out: Path, depth_dir: Path) -> str:
    raw = build_dataset("cityscapes", cfg.data_dir, cfg.train_split, classes="world", depth_dir=depth_dir)
    P.five_crop(raw, out, cfg.crop_ratio, progress=False, workers=workers)
    return files_digest(out)


def knn_stage(cfg: Config, workers: int, out: Path, crops: Any, backbone: torch.nn.Module) -> str:
    settings = P.KnnSettings.of(cfg.replace(num_workers=workers), len(crops))
    with np.load(P.compute_knn(crops, backbone, out / "nns.npz", settings, progress=False)) as data:
        return hashlib.sha256(data["nns"].tobytes()).hexdigest()


def feature_cache_stage(cfg: Config, workers: int, out: Path, crops: Any, backbone: torch.nn.Module) -> str:
    transform = partial(resize_center_crop, res=cfg.res, resize=fidelity(cfg).resize)
    options = CacheOptions(batch_size=cfg.batch_size, device="cpu", transform=transform, progress=False, workers=workers)
    cache = build_feature_cache(backbone, crops, out, {"benchmark": "prepare"}, options)
    return files_digest(cache.root, "*.*[0-9]")  # the memmaps (feats.f16, depth.f32, label.i16)


def final_eval_stage(cfg: Config, workers: int, out: Path, backbone: torch.nn.Module) -> str:
    val = validation_dataset(cfg, cfg.data_dir)
    torch.manual_seed(0)  # the same random head and probes in both runs
    model = build_models(cfg, backbone.embed_dim, int(val.n_classes))
    opts = EvalOptions.of(cfg, fidelity(cfg), flip=True, crf=True, progress=False, crf_workers=workers)
    result = evaluate_model(backbone, model, val, opts, device="cpu")
    return json.dumps({g: result[g] for g in ("cluster", "linear")}, sort_keys=True)


def timed_pair(name: str, run: Callable[[int, Path], str], work: Path, workers: int, repeats: int) -> dict[str, Any]:
    """``run`` with 0 workers and with ``workers``, alternating, ``repeats`` times each, every run into a fresh
    folder: the fastest of each (the least disturbed by other processes on the machine), and whether every
    output is the same."""
    runs: dict[str, list[float]] = {"serial": [], "parallel": []}
    digests = set()
    for _ in range(repeats):
        for label, n in (("serial", 0), ("parallel", workers)):
            out = work / f"{name}_{label}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            digests.add(run(n, out))
            runs[label].append(time.perf_counter() - t0)
    row: dict[str, Any] = {"serial_s": min(runs["serial"]), "parallel_s": min(runs["parallel"])}
    row.update(workers=workers, speedup=row["serial_s"] / row["parallel_s"], identical=len(digests) == 1,
               serial_runs_s=runs["serial"], parallel_runs_s=runs["parallel"])
    log(f"{name:13s} serial {row['serial_s']:6.2f} s, {workers} workers {row['parallel_s']:6.2f} s "
        f"(x{row['speedup']:.2f}, fastest of {repeats}), identical: {row['identical']}")
    return row


def measure(size: dict[str, Any], work: Path, workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Render the world, then time every stage serial vs parallel (``size["repeats"]`` times, alternating);
    (world facts, stages)."""
    t0 = time.perf_counter()
    world = make_world(work / "world", size["n_train"], size["n_val"], size=tuple(size["world_size"]), seed=0,
                       progress=False, num_workers=workers)
    cfg = Config.preset("synthetic", "paper").replace(data_dir=str(world), cache_dir=str(work / "cache"), device="cpu")
    info = {"world_size": size["world_size"], "n_train_images": size["n_train"], "n_val_images": size["n_val"],
            "render_s": time.perf_counter() - t0, "preset": "synthetic", "res": cfg.res, "eval_res": cfg.eval_res,
            "batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch_size}
    t0 = time.perf_counter()
    list(pool_map(P._crop_item, [], workers))  # the fork server's one start in this process
    info["pool_start_s"] = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = build_tiny_random_depth_model(work / "depth_model")
        backbone = load_backbone(cfg.backbone, cfg.weights, **cfg.backbone_kwargs)
    pair = partial(timed_pair, work=work, workers=workers, repeats=size["repeats"])
    stages: dict[str, Any] = {"depth": pair("depth", partial(depth_stage, cfg, model_dir=model_dir))}
    # the world's exact depth is what the preset crops
    stages["five_crop"] = pair("five_crop", partial(five_crop_stage, cfg, depth_dir=world / "depth_gt"))
    crops = P.CroppedDataset(work / "five_crop_serial", cfg.train_split, with_depth=False)
    stages["knn"] = pair("knn", partial(knn_stage, cfg, crops=crops, backbone=backbone))
    with_depth = P.CroppedDataset(work / "five_crop_serial", cfg.train_split)
    stages["feature_cache"] = pair("feature_cache", partial(feature_cache_stage, cfg, crops=with_depth, backbone=backbone))
    stages["final_eval"] = pair("final_eval", partial(final_eval_stage, cfg, backbone=backbone))
    info.update(n_crops=len(crops), n_classes=len(crops.class_names))
    return info, stages


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return {"cpu": model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny world (seconds), same code and keys")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prepare.json"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the parallel runs' workers")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        info, stages = measure(SIZES["dry" if args.dry_run else "full"], Path(tmp), max(args.workers, 2))
    report = {
        "benchmark": "prepare", "dry_run": args.dry_run,
        "note": ("dry run: a tiny world through the same code; its numbers test the script and measure nothing"
                 if args.dry_run else "one run on this machine; other processes may share its cores (load average)"),
        "command": command_line("python benchmarks/prepare.py", argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "world": info, "stages": stages, "seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    log(f"{'DRY RUN (not a measurement): ' if args.dry_run else ''}wrote {out} ({report['seconds']:.0f} s; load "
        f"average {report['load_average_before'][0]:.2f} -> {report['load_average_after'][0]:.2f})")
    return report


if __name__ == "__main__":
    main()
