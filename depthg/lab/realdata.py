"""What a paper run on a real dataset needs, whether a folder holds it, and how long the run will take.

The training notebooks share this: :data:`REAL_RUNS` describes the three paper datasets (layout, preset,
where to get them), :func:`requirements` lists what a real run needs (layout, backbone and depth weights, the
preset's values, the class list), :func:`check_folder` opens a given folder with the dataset's own loader
and reports its errors as they are, and :func:`plan` projects the preparation and training time on a CPU and
a GPU from the measurements in ``benchmarks/results`` (``train_step.json``: this repository's 2-core CPU;
``gpu.json``: one H200), saying which numbers are measured and which are projected from them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from depthg.backbone import DINO_FILES
from depthg.config import Config
from depthg.data import DATASET_CLASSES, build_dataset
from depthg.depth import DEPTH_MODEL_ALIASES
from depthg.utils import DepthGError, repo_root

__all__ = ["RealRun", "REAL_RUNS", "FolderCheck", "requirements", "check_folder", "plan", "plan_markdown", "duration"]


@dataclass(frozen=True)
class RealRun:
    """One paper dataset: its name, registry key, preset, on-disk layout, how to get it, its split sizes
    (``sizes`` = (train images, validation images, where the numbers come from), None when not known) and a
    typical image size (H, W) in pixels (None when not known)."""

    title: str
    dataset: str
    preset: str
    layout: str
    get: str
    sizes: tuple[int, int, str] | None
    image_hw: tuple[int, int] | None


REAL_RUNS: dict[str, RealRun] = {
    "cityscapes": RealRun(
        "Cityscapes-27", "cityscapes", "cityscapes_vitb8",
        "leftImg8bit/{train,val}/{city}/{city}_{seq}_{frame}_leftImg8bit.png\n"
        "gtFine/{train,val}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png\n"
        "disparity/..., camera/...   (optional: stereo depth, depth_source=disparity)",
        "register at cityscapes-dataset.com and download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip",
        (2975, 500, "the official train / val split"), (1024, 2048)),
    "cocostuff": RealRun(
        "COCO-Stuff-27", "cocostuff", "cocostuff_vits8",
        "images/{train2017,val2017}/{id}.jpg\n"
        "annotations/{train2017,val2017}/{id}.png       (182 fine ids, 255 = unlabelled)\n"
        "curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse.txt, Coco164kFull_Stuff_Coarse_7.txt",
        "COCO 2017 images and the COCO-Stuff 164k annotations, with STEGO's curated lists (STEGO's dataset download)",
        (49_600, 2_175, "the size commonly quoted for STEGO's curated lists, not counted here"), (480, 640)),
    "potsdam": RealRun(
        "Potsdam-3", "potsdam", "potsdam_vits8",
        "labelled_train.txt  labelled_test.txt  unlabelled_train.txt  all.txt   (one tile id per line)\n"
        "imgs/{id}.mat   (key 'img': RGB-IR)      gt/{id}.mat   (key 'gt': ISPRS ids 0..5)",
        "the ISPRS Potsdam tiles as STEGO packages them (potsdam.zip of STEGO's dataset download)",
        None, None),
}


def _run(key: str) -> RealRun:
    if key not in REAL_RUNS:
        raise DepthGError(f"unknown real dataset {key!r}; known: {list(REAL_RUNS)}")
    return REAL_RUNS[key]


def requirements(key: str, preset: str | None = None) -> str:
    """Markdown: what a real run of ``preset`` (default: the dataset's paper preset) needs."""
    run = _run(key)
    cfg = Config.preset(preset or run.preset)
    dino = " or ".join(f"`{f}.pth`" for f in DINO_FILES.get(cfg.backbone, ())) or "a DINO checkpoint"
    depth = DEPTH_MODEL_ALIASES.get(cfg.depth_source, cfg.depth_source)
    classes = DATASET_CLASSES.get(f"{cfg.dataset}{cfg.classes}", DATASET_CLASSES.get(cfg.dataset, []))
    values = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("mode", "steps", "batch_size", "res", "eval_res", "dim",
                                                          "feature_samples", "depth_sampling", "depth_weight",
                                                          "eval_crf", "five_crop"))
    return (f"**{run.title}, preset `{cfg.name}`**\n\n"
            f"- **Layout** of `data_dir` (docs/datasets.md):\n\n```\n{run.layout}\n```\n"
            f"- **Get it**: {run.get}.\n"
            f"- **Backbone**: `{cfg.backbone}` with DINO weights: `weights=dino` downloads {dino} once, or give "
            "the local file.\n"
            f"- **Depth**: `depth_source={cfg.depth_source}` ({depth}), estimated once per training image and cached "
            "(local folder or Hugging Face cache; `depth_source=` a `save_pretrained` folder works offline).\n"
            f"- **Preset values**: {values}.\n"
            f"- **Classes** ({len(classes)}): {', '.join(classes)}.\n")


@dataclass
class FolderCheck:
    """The result of :func:`check_folder`: ``ok``, the number of images per split, and what was found."""

    ok: bool
    n_train: int | None = None
    n_val: int | None = None
    lines: list[str] = field(default_factory=list)


def check_folder(key: str, data_dir: str | os.PathLike | None, preset: str | None = None) -> FolderCheck:
    """Open ``data_dir`` with the dataset's loader for the training and validation splits of the preset.

    Nothing is read beyond what the loader checks when it is built (the split lists, that every listed
    image has its label). A problem is reported with the loader's own message (what is missing, where it
    looked, how to get it).
    """
    run = _run(key)
    if data_dir is None:
        return FolderCheck(False, lines=["no data_dir given: nothing to check"])
    cfg = Config.preset(preset or run.preset)
    check = FolderCheck(True)
    for split, attr in ((cfg.train_split, "n_train"), (cfg.val_split, "n_val")):
        kwargs: dict[str, Any] = {"classes": cfg.classes} if cfg.dataset == "cityscapes" else {}
        try:
            n = len(build_dataset(cfg.dataset, data_dir, split, **kwargs))
        except (DepthGError, OSError, ValueError) as err:
            check.ok = False
            check.lines.append(f"{split}: {type(err).__name__}: {err}")
            continue
        setattr(check, attr, n)
        check.lines.append(f"{split}: {n} images found")
    return check


def _load(results_dir: Path, name: str) -> dict[str, Any]:
    path = results_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the plan projects from the committed measurements")
    return json.loads(path.read_text())


def _per_step(cfg: Config, cpu: dict[str, Any], gpu: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """Seconds per training iteration of ``cfg`` (recomputing features, and from the feature cache), on the
    CPU and the GPU, each with how it was obtained."""
    base = "vit_b8" if "base" in cfg.backbone else "vit_s8"
    out: dict[str, tuple[float, str]] = {}
    cpu_row = min(cpu["results"], key=lambda r: (abs(r["batch_size"] - cfg.batch_size), r["sampling"] != "fps"))
    scale = 4.0 if base == "vit_b8" else 1.0  # a ViT-B has four times the multiply-adds of a ViT-S
    batch = cfg.batch_size / cpu_row["batch_size"]
    how = "measured" if scale == 1 and batch == 1 else "projected"
    for kind in ("recompute", "cache"):
        out[f"cpu_{kind}"] = (cpu_row[kind]["sec_per_step"] * scale * batch,
                              f"rate per step {how} (train_step.json: ViT-S/8-sized, batch {cpu_row['batch_size']}"
                              + (", x4 for ViT-B" if scale > 1 else "") + ")")
    gpu_row = next(r for r in gpu["train_step"]["results"] if r["backbone"] == base and r["amp"] == "bf16")
    batch = cfg.batch_size / gpu_row["batch_size"]
    for kind in ("recompute", "cache"):
        out[f"gpu_{kind}"] = (gpu_row[kind]["sec_per_step"] * batch, "rate per step "
                              + ("measured" if batch == 1 else "projected")
                              + f" (gpu.json: {gpu_row['timm_name']}, bf16, batch {gpu_row['batch_size']})")
    out["cpu_crop"] = (cpu["cache_build_s"] / cpu["n_crops"] * scale, "rate per crop measured (train_step.json's cache "
                       "build" + (", x4 for ViT-B)" if scale > 1 else ")"))
    out["gpu_crop"] = (gpu_row["cache_build_s_per_crop"], "measured in gpu.json (feature cache build, bf16)")
    return out


def _area(hw: Any, run: RealRun) -> float:
    """The dataset's typical image area over the measured one (1 when the dataset's is not known)."""
    return (run.image_hw[0] * run.image_hw[1]) / (hw[0] * hw[1]) if run.image_hw else 1.0


def _preparation(run: RealRun, results: Path, gpu: dict[str, Any]) -> tuple[float, float, str]:
    """Seconds per training image of the five-crop + kNN preparation on this CPU and on the GPU machine, and how
    they were obtained: prepare.json (this 2-core CPU, both stages on every core) and gpu.json (its CPU side)."""
    measured = gpu["cityscapes_run"]
    gpu_rate = measured["prepare_s"] / measured["n_train_images"] * _area(measured["world_size"], run)
    how = f"GPU machine: gpu.json's preparation of {measured['world_size'][0]}x{measured['world_size'][1]} images"
    cpu_rate = gpu_rate
    if (results / "prepare.json").is_file():
        bench = _load(results, "prepare.json")
        world, stages = bench["world"], bench["stages"]
        cpu_rate = (stages["five_crop"]["parallel_s"] + stages["knn"]["parallel_s"]) / world["n_train_images"]
        cpu_rate *= _area(world["world_size"], run)
        how += f"; CPU: prepare.json ({world['world_size'][0]}x{world['world_size'][1]} images on this CPU's cores)"
    else:
        how += " (also taken for the CPU: prepare.json is missing)"
    scaled = f", scaled by image area to {run.image_hw[0]}x{run.image_hw[1]}" if run.image_hw else ""
    return cpu_rate, gpu_rate, f"rates per image projected from {how}{scaled}"


def plan(key: str, n_train: int | None = None, n_val: int | None = None, preset: str | None = None,
         results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The preparation and training plan of a real run with projected times on this CPU and on one GPU.

    ``n_train``/``n_val``: image counts (from :func:`check_folder`); None takes the dataset's known sizes
    (:data:`REAL_RUNS`), or leaves the size-dependent steps per 1,000 images when none are known.
    Returns ``{"config", "n_train", "n_val", "sizes_from", "rows", "totals", "notes"}``; each row is a step
    with its CPU and GPU seconds (None: not measured) and how each was obtained.
    """
    run = _run(key)
    cfg = Config.preset(preset or run.preset)
    results = Path(results_dir) if results_dir is not None else repo_root() / "benchmarks" / "results"
    cpu, gpu = _load(results, "train_step.json"), _load(results, "gpu.json")
    sizes_from = "your folder" if n_train is not None else (run.sizes[2] if run.sizes else "unknown: per 1,000 images")
    if n_train is None:
        n_train, n_val = (run.sizes[0], run.sizes[1]) if run.sizes else (1000, 1000)
    crops = n_train * (5 if cfg.five_crop else 1)
    step = _per_step(cfg, cpu, gpu)
    cpu_prep, gpu_prep, prep_how = _preparation(run, results, gpu)
    gpu_eval = gpu["cityscapes_run"]["eval"]["validation_s_per_image"]
    cpu_eval = step["cpu_crop"][0] * (cfg.eval_res / cfg.res) ** 2
    validations = cfg.steps // cfg.eval_every if cfg.eval_every else 0
    rows = [
        ("depth estimation of the training images", None, None, "not measured (ZoeDepth is not installed here)"),
        (f"five-crop + kNN of {n_train:,} images", cpu_prep * n_train, gpu_prep * n_train, prep_how),
        (f"{cfg.steps:,} iterations, features recomputed (the preset)", cfg.steps * step["cpu_recompute"][0],
         cfg.steps * step["gpu_recompute"][0], f"CPU {step['cpu_recompute'][1]}; GPU {step['gpu_recompute'][1]}"),
        (f"or: feature cache of {crops:,} crops + {cfg.steps:,} iterations from it",
         crops * step["cpu_crop"][0] + cfg.steps * step["cpu_cache"][0],
         crops * step["gpu_crop"][0] + cfg.steps * step["gpu_cache"][0],
         f"CPU {step['cpu_cache'][1]}; GPU {step['gpu_cache'][1]}"),
        (f"{validations} validations of {n_val:,} images at {cfg.eval_res} px", validations * n_val * cpu_eval,
         validations * n_val * gpu_eval, "GPU: rate per image measured (gpu.json); CPU: rate projected from the "
         f"cache build's forward pass x ({cfg.eval_res}/{cfg.res})^2"),
        ("final evaluation (dense CRF not included)", n_val * cpu_eval, n_val * gpu_eval, "as the validations"),
    ]
    table = [{"step": r[0], "cpu_s": r[1], "gpu_s": r[2], "how": r[3]} for r in rows]
    totals = {dev: sum(r[f"{dev}_s"] or 0.0 for i, r in enumerate(table) if i != 3) for dev in ("cpu", "gpu")}
    notes = [f"CPU: {cpu['device_name']}, {cpu['cpu_count']} cores, {cpu['torch_threads']} torch thread "
             "(this repository's development machine); GPU: one " + gpu["device_name"] + " (gpu.json).",
             "Totals: preparation + recomputing iterations + validations + final evaluation; depth estimation "
             "and the dense CRF are not included (not measured).",
             "The preparation is projected linearly from a few dozen images; its kNN search over all crop pairs grows "
             "faster than linearly, so on the full dataset it takes longer than shown."]
    return {"config": cfg.name, "n_train": n_train, "n_val": n_val, "sizes_from": sizes_from, "rows": table,
            "totals": totals, "notes": notes}


def duration(seconds: float | None) -> str:
    """Seconds as seconds, minutes, hours or days, as the plan prints them ("not measured" for None)."""
    if seconds is None:
        return "not measured"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 72 * 3600 else f"{seconds / 86400:.1f} days"


def plan_markdown(p: dict[str, Any]) -> str:
    """:func:`plan` as a Markdown table with its totals and notes."""
    lines = [f"**Plan for `{p['config']}`**: {p['n_train']:,} training and {p['n_val']:,} validation images "
             f"({p['sizes_from']}).", "", "| step | 2-core CPU | one GPU | how the time was obtained |",
             "|---|---|---|---|"]
    lines += [f"| {r['step']} | {duration(r['cpu_s'])} | {duration(r['gpu_s'])} | {r['how']} |" for r in p["rows"]]
    lines += [f"| **total** | **{duration(p['totals']['cpu'])}** | **{duration(p['totals']['gpu'])}** | projected |",
              "", *[f"- {n}" for n in p["notes"]]]
    return "\n".join(lines) + "\n"
