"""The miniature reproduction: STEGO vs DepthG (paper / released mode), random vs FPS sampling, over seeds.

Issue 7 asks whether depth guidance beats STEGO where anyone can rerun it: on the synthetic world with the
embedded backbone, several variants of one base preset are trained over >= 3 seeds each, and the
unsupervised (cluster, Hungarian) and linear accuracy / mIoU of the *final* weights on the validation
split are reported as mean +- sample standard deviation. Nothing is tuned per variant: every variant is
the base preset plus the few keys that define it (``VARIANTS``).

Cost: the world, its five-crops, the kNN file and the feature cache are prepared once and shared by all
runs (the cache is keyed by backbone, resolution and resize mode, so ``released`` mode -- nearest-resized
images, 0..255 depth -- gets its own), so each run costs only the head training.

Run: ``python -m depthg ablate --seeds 0 1 2`` (writes ``runs/ablation/ablation.{json,md}``).
An interrupted ablation resumes: a run whose ``results.json`` exists with the same config is not redone.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from depthg.config import Config, apply_overrides
from depthg.utils import DepthGError, atomic_write

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "variant_config", "run_ablation", "summarise"]

#: name -> (mode, overrides, description)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "stego": ("paper", {"use_depth": False, "depth_sampling": "random", "depth_weight": 0.0},
              "STEGO: no depth term, random sampling"),
    "depthg_paper_fps": ("paper", {"depth_sampling": "fps"},
                         "DepthG, paper mode: 3D-distance depth term + FPS"),
    "depthg_paper_random": ("paper", {"depth_sampling": "random"},
                            "DepthG, paper mode: 3D-distance depth term, random sampling"),
    "depthg_released": ("released", {"depth_sampling": "fps"},
                        "DepthG, released mode (constant depth term, transposed FPS, x3 schedules)"),
    "fps_only": ("paper", {"use_depth": True, "depth_sampling": "fps", "depth_weight": 0.0},
                 "STEGO losses with FPS sampling only (no depth term)"),
}
DEFAULT_VARIANTS = ("stego", "depthg_paper_fps", "depthg_paper_random", "depthg_released")


class AblationError(DepthGError, ValueError):
    """Unknown variant or empty seed list."""


def variant_config(variant: str, seed: int, base_preset: str = "synthetic", steps: int | None = None,
                   out_dir: str | Path = "runs/ablation", overrides: Sequence[str] = ()) -> Config:
    """The config of one run: base preset in the variant's mode + the variant's keys + shared overrides."""
    if variant not in VARIANTS:
        raise AblationError(f"unknown ablation variant {variant!r}; known: {list(VARIANTS)}")
    mode, changes, _ = VARIANTS[variant]
    cfg = Config.preset(base_preset, mode)
    cfg = apply_overrides(cfg, list(overrides))  # shared overrides first (e.g. cache_dir, device) ...
    values = {**cfg.to_dict(), **changes, "seed": seed, "name": f"{variant}_seed{seed}",
              "output_dir": str(Path(out_dir) / variant / f"seed{seed}")}
    if steps is not None:
        values["steps"] = steps
    return Config(**values)  # ... the variant's defining keys win


def _stats(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": mean, "std": std, "n": len(values)}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """mean +- std over seeds of the final-weights metrics, per variant."""
    out: dict[str, Any] = {}
    for variant, results in runs.items():
        row: dict[str, Any] = {"seeds": [r["seed"] for r in results]}
        for group in ("cluster", "linear"):
            for metric in ("accuracy", "miou"):
                vals = [r["final"][group][metric] for r in results]
                row[f"{group}_{metric}"] = {**_stats(vals), "values": vals}
        out[variant] = row
    return out


def _fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}" if not math.isnan(s["std"]) else f"{s['mean']:.2f}"


def markdown_table(summary: dict[str, Any], command: str) -> str:
    lines = [
        "| variant | description | seeds | unsup. Acc | unsup. mIoU | linear Acc | linear mIoU |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, row in summary.items():
        lines.append(
            f"| {variant} | {VARIANTS[variant][2]} | {len(row['seeds'])} | {_fmt(row['cluster_accuracy'])} | "
            f"{_fmt(row['cluster_miou'])} | {_fmt(row['linear_accuracy'])} | {_fmt(row['linear_miou'])} |"
        )
    lines += ["", "Final-step weights on the validation split, percent, mean ± sample std over seeds "
              "(no model selection).", "", f"Command: `{command}`"]
    if "stego" in summary:
        base = summary["stego"]["cluster_miou"]
        lines.append("")
        for variant, row in summary.items():
            if variant == "stego":
                continue
            diff = row["cluster_miou"]["mean"] - base["mean"]
            noise = max(row["cluster_miou"]["std"], base["std"])
            line = f"- {variant} − stego, unsupervised mIoU: {diff:+.2f} points (largest seed std {noise:.2f})"
            # The variants share seeds (same head init, data order and sampling streams where the
            # variant does not change them), so the per-seed difference is the fairer noise estimate.
            if row["seeds"] == summary["stego"]["seeds"] and len(row["seeds"]) > 1:
                paired = _stats([a - b for a, b in zip(row["cluster_miou"]["values"], base["values"])])
                line += f"; paired per seed {_fmt(paired)}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def run_ablation(variants: Sequence[str] = DEFAULT_VARIANTS, seeds: Sequence[int] = (0, 1, 2),
                 base_preset: str = "synthetic", steps: int | None = None, out_dir: str | Path = "runs/ablation",
                 overrides: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """Train every (variant, seed), collect final metrics, write ``ablation.json`` and ``ablation.md``."""
    from depthg.train import train

    if not seeds:
        raise AblationError("seeds must not be empty")
    for v in variants:
        if v not in VARIANTS:
            raise AblationError(f"unknown ablation variant {v!r}; known: {list(VARIANTS)}")
    out_dir = Path(out_dir)
    command = "python -m depthg ablate " + shlex.join(
        ["--preset", base_preset, "--variants", *variants, "--seeds", *map(str, seeds)]
        + (["--steps", str(steps)] if steps is not None else []) + ["--out-dir", str(out_dir), *overrides])
    t0 = time.time()
    runs: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        for seed in seeds:
            cfg = variant_config(variant, seed, base_preset, steps, out_dir, overrides)
            results_path = Path(cfg.output_dir) / "results.json"
            result = None
            if results_path.is_file():
                old = json.loads(results_path.read_text())
                if old.get("config") == cfg.to_dict() and old.get("steps") == cfg.steps:
                    result = old
            if result is None:
                print(f"[ablation] {variant} seed {seed}", file=sys.stderr)
                result = train(cfg, progress=progress, overwrite=True)  # a stale or unfinished run is redone
            runs.setdefault(variant, []).append({
                "seed": seed, "final": result["final"]["metrics"], "wall_time_s": result["wall_time_s"],
                "output_dir": cfg.output_dir,
            })
    summary = summarise({v: [{"seed": r["seed"], "final": r["final"]} for r in rs] for v, rs in runs.items()})
    md = markdown_table(summary, command)
    report = {"command": command, "base_preset": base_preset, "steps": steps, "seeds": list(seeds),
              "variants": {v: VARIANTS[v][2] for v in variants}, "summary": summary, "runs": runs,
              "wall_time_s": time.time() - t0, "markdown": md}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "ablation.json", "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    with atomic_write(out_dir / "ablation.md", "w") as handle:
        handle.write(md)
    return report
