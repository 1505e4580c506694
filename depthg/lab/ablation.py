"""The miniature reproduction: does DepthG beat STEGO, and which part does it?

Each variant (``VARIANTS``: the base preset plus the few keys that define it) is trained over the same
seeds, and the final weights' cluster and linear accuracy / mIoU are compared with ``stego`` seed by
seed (:func:`paired_differences`: mean and 95 % t-interval). Choices are made on a development world and
the table is run once on a held-out test world (``--world-seed T --dev-world-seed D``); each world has
its own cache folder. A run whose ``results.json`` holds the same config and backbone is reused.

An ablation folder holds one configuration (preset, steps, world, shared overrides: its marker
``.depthg-ablation.json``): another configuration there is refused rather than replacing or mixing runs,
and one command at a time writes into it (:func:`depthg.utils.folder_lock`).
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

from scipy import stats

from depthg.backbone import EMBEDDED_DIR, EMBEDDED_JSON
from depthg.config import Config, apply_overrides
from depthg.method.losses import DEPTH_SIMILARITIES, PAPER_DEPTH_SIMILARITY
from depthg.train import train
from depthg.utils import DepthGError, atomic_write, folder_lock, owned_output, sha256_file, write_json

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "METRICS", "variant_config", "run_ablation", "summarise",
           "paired_differences", "markdown_table", "backbone_sha256", "load_report", "report_rows",
           "collect_runs", "ABLATION_MARKER", "ablation_configuration", "claim_ablation_folder"]

_PAPER_SIMILARITIES = tuple(s for s in DEPTH_SIMILARITIES if s != "released")

#: name -> (mode, overrides, description). ``depthg`` uses paper mode's default depth similarity.
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "stego": ("paper", {"use_depth": False, "depth_sampling": "random", "depth_weight": 0.0},
              "STEGO: no depth term, random sampling"),
    "fps_only": ("paper", {"use_depth": True, "depth_sampling": "fps", "depth_weight": 0.0},
                 "STEGO losses with depth-guided FPS, no depth term"),
    **{f"depth_{sim}": ("paper", {"depth_sampling": "random", "depth_similarity": sim},
                        f"depth term only ({sim} similarity), random sampling")
       for sim in _PAPER_SIMILARITIES},
    **{f"depthg_{sim}": ("paper", {"depth_sampling": "fps", "depth_similarity": sim},
                         f"DepthG, paper mode: {sim} depth term + FPS")
       for sim in _PAPER_SIMILARITIES},
    "depthg": ("paper", {"depth_sampling": "fps"},
               f"DepthG, paper mode (default {PAPER_DEPTH_SIMILARITY} depth term + FPS, S=8)"),
    "depthg_s5": ("paper", {"depth_sampling": "fps", "feature_samples": 5},
                  "DepthG, paper mode, S=5 (25 sampled points)"),
    "depthg_s11": ("paper", {"depth_sampling": "fps", "feature_samples": 11},
                   "DepthG, paper mode, S=11 (121 sampled points)"),
    "released": ("released", {"depth_sampling": "fps"},
                 "DepthG, released mode (constant depth term, released FPS, x3 schedules)"),
}
#: the held-out table (test world).
DEFAULT_VARIANTS = ("stego", "fps_only", *(f"depth_{s}" for s in _PAPER_SIMILARITIES), "depthg",
                    "depthg_s5", "depthg_s11", "released")
#: (group, metric) pairs read from a run's final evaluation.
METRICS = (("cluster", "miou"), ("cluster", "accuracy"), ("linear", "miou"), ("linear", "accuracy"))


class AblationError(DepthGError, ValueError):
    """Unknown variant, empty or repeated seed list, or a test world equal to the development world."""


def variant_config(variant: str, seed: int, base_preset: str = "synthetic", steps: int | None = None,
                   out_dir: str | Path = "runs/ablation", overrides: Sequence[str] = (),
                   world_seed: int | None = None) -> Config:
    """The config of one run: base preset in the variant's mode + shared overrides + the variant's keys.

    ``world_seed`` (synthetic world only) puts that world and its caches in ``<cache_dir>/world<seed>``.
    """
    if variant not in VARIANTS:
        raise AblationError(f"unknown ablation variant {variant!r}; known: {list(VARIANTS)}")
    mode, changes, _ = VARIANTS[variant]
    cfg = Config.preset(base_preset, mode)
    cfg = apply_overrides(cfg, list(overrides))  # shared overrides first (e.g. cache_dir, device) ...
    values = {**cfg.to_dict(), **changes, "seed": seed, "name": f"{variant}_seed{seed}",
              "output_dir": str(Path(out_dir) / variant / f"seed{seed}")}
    if world_seed is not None:
        if cfg.data_dir is not None:
            raise AblationError(f"--world-seed {world_seed} applies to the synthetic world, but data_dir is "
                                f"set to {cfg.data_dir!r}")
        values.update(world_seed=world_seed, cache_dir=str(Path(cfg.cache_dir) / f"world{world_seed}"))
    if steps is not None:
        values["steps"] = steps
    return Config(**values)  # ... the variant's defining keys win


def backbone_sha256(cfg: Config) -> str | None:
    """SHA-256 of the weights file a run loads (embedded ``.pth`` or ``weights``); None for random weights."""
    if cfg.backbone == "embedded":
        meta = json.loads((Path(EMBEDDED_DIR) / EMBEDDED_JSON).read_text())
        path = Path(EMBEDDED_DIR) / str(meta["weights"])
    elif cfg.weights is not None and Path(cfg.weights).is_file():
        path = Path(cfg.weights)
    else:
        return None
    return sha256_file(path)


def made_with_weights(result: dict[str, Any], sha: str | None) -> bool:
    """Whether a finished run (its ``results.json``) was made with the backbone weights ``sha``, as stamped
    by :func:`run_ablation`; an unstamped run cannot show which weights it used, so it does not count."""
    return "ablation_backbone_sha256" in result and result["ablation_backbone_sha256"] == sha


def _stats(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": mean, "std": std, "n": len(values)}


def paired_differences(values: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of the per-seed differences ``values - base`` and its t-interval half-width (NaN for one seed)."""
    if len(values) != len(base):
        raise AblationError(f"paired differences need the same seeds: {len(values)} vs {len(base)} values")
    diffs = [a - b for a, b in zip(values, base)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n > 1:
        half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    else:
        half = math.nan
    return {"mean": mean, "half_width": half, "ci": [mean - half, mean + half], "n": n,
            "confidence": confidence, "values": diffs}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: mean ± std over seeds of the final metrics, and ``paired_vs_stego`` when seeds match."""
    out: dict[str, Any] = {}
    for variant, results in runs.items():
        row: dict[str, Any] = {"seeds": [r["seed"] for r in results]}
        for group, metric in METRICS:
            vals = [r["final"][group][metric] for r in results]
            row[f"{group}_{metric}"] = {**_stats(vals), "values": vals}
        out[variant] = row
    if "stego" in out:
        base = out["stego"]
        for variant, row in out.items():
            if variant == "stego" or row["seeds"] != base["seeds"]:
                continue
            row["paired_vs_stego"] = {f"{g}_{m}": paired_differences(row[f"{g}_{m}"]["values"],
                                                                     base[f"{g}_{m}"]["values"])
                                      for g, m in METRICS}
    return out


def _missing(value: float | None) -> bool:
    """No value: NaN in memory, null once written as strict JSON (a spread of one seed)."""
    return value is None or math.isnan(value)


def _fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}" if not _missing(s["std"]) else f"{s['mean']:.2f}"


def _fmt_ci(d: dict[str, Any]) -> str:
    if _missing(d["half_width"]):
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} ± {d['half_width']:.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


def markdown_table(summary: dict[str, Any], command: str, protocol: dict[str, Any] | None = None) -> str:
    """The results table, the paired differences to ``stego`` and the command, as markdown."""
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
              "(no model selection)."]
    paired = {v: r["paired_vs_stego"] for v, r in summary.items() if "paired_vs_stego" in r}
    if paired:
        lines += ["", "Paired per-seed difference to `stego` (points), mean ± 95 % t-interval half-width "
                  "[interval]:", "",
                  "| variant | unsup. mIoU | unsup. Acc | linear mIoU | linear Acc |", "|---|---|---|---|---|"]
        for variant, d in paired.items():
            lines.append(f"| {variant} − stego | {_fmt_ci(d['cluster_miou'])} | {_fmt_ci(d['cluster_accuracy'])} | "
                         f"{_fmt_ci(d['linear_miou'])} | {_fmt_ci(d['linear_accuracy'])} |")
    if protocol:
        lines += ["", "Protocol: " + ", ".join(f"{k} = {v}" for k, v in protocol.items())]
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def _command(variants: Sequence[str], seeds: Sequence[int], base_preset: str, steps: int | None,
             out_dir: Path, overrides: Sequence[str], world_seed: int | None, dev_world_seed: int | None) -> str:
    args = ["--preset", base_preset]
    if world_seed is not None:
        args += ["--world-seed", str(world_seed)]
    if dev_world_seed is not None:
        args += ["--dev-world-seed", str(dev_world_seed)]
    args += ["--variants", *variants, "--seeds", *map(str, seeds)]
    args += (["--steps", str(steps)] if steps is not None else []) + ["--out-dir", str(out_dir), *overrides]
    return "python -m depthg ablate " + shlex.join(args)


#: the marker of an ablation folder: the configuration its runs share (:func:`ablation_configuration`)
ABLATION_MARKER = ".depthg-ablation.json"
#: config keys that say where or how fast a run runs, or which (variant, seed) it is, not what it computes
_NOT_CONFIGURATION = ("name", "seed", "output_dir", "cache_dir", "device", "threads", "num_workers")


def ablation_configuration(base_preset: str = "synthetic", steps: int | None = None, overrides: Sequence[str] = (),
                           world_seed: int | None = None) -> dict[str, Any]:
    """What every run of one ablation shares: the config of its reference run (``stego``, seed 0) without the
    keys that say where it runs. Two ablations with the same configuration may share a folder (more variants,
    more seeds); another configuration (other steps, world or overrides) may not."""
    cfg = variant_config("stego", 0, base_preset, steps, "ablation", overrides, world_seed)
    return {k: v for k, v in cfg.to_dict().items() if k not in _NOT_CONFIGURATION}


def claim_ablation_folder(out_dir: Path, configuration: dict[str, Any]) -> None:
    """Mark ``out_dir`` with ``configuration``, or check that its marker holds the same one; a folder of files
    ablate did not make, or of another configuration, is refused (its runs would be replaced or mixed)."""
    owned_output(out_dir, "ablation folder (--out-dir)", ABLATION_MARKER)
    marker = out_dir / ABLATION_MARKER
    if not marker.is_file():
        write_json(marker, {"kind": "depthg ablation", "configuration": configuration})
        return
    try:
        stored = json.loads(marker.read_text())["configuration"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AblationError(f"cannot read {marker} ({type(err).__name__}: {err}); choose another --out-dir") from None
    differ = sorted(k for k in set(stored) | set(configuration) if stored.get(k) != configuration.get(k))
    if differ:
        shown = ", ".join(f"{k}: {stored.get(k)!r} there, {configuration.get(k)!r} now" for k in differ[:4])
        raise AblationError(f"the ablation folder {out_dir} holds runs of another configuration ({shown}); its runs "
                            "would be replaced or mixed: choose another --out-dir")


def run_ablation(variants: Sequence[str] = DEFAULT_VARIANTS, seeds: Sequence[int] = (0, 1, 2),
                 base_preset: str = "synthetic", steps: int | None = None, out_dir: str | Path = "runs/ablation",
                 overrides: Sequence[str] = (), progress: bool = True, world_seed: int | None = None,
                 dev_world_seed: int | None = None) -> dict[str, Any]:
    """Train every (variant, seed), collect final metrics, write ``ablation.json`` and ``ablation.md``.

    ``world_seed`` is the synthetic world (None = the preset's); ``dev_world_seed`` marks the run as the
    held-out test of choices made on that other world. ``out_dir`` is held for the whole call and must hold
    this configuration's runs or none (:func:`claim_ablation_folder`).
    """
    seeds, variants = _checked_plan(variants, seeds, world_seed, dev_world_seed)
    out_dir = Path(out_dir)
    command = _command(variants, seeds, base_preset, steps, out_dir, overrides, world_seed, dev_world_seed)
    t0 = time.time()
    runs: dict[str, list[dict[str, Any]]] = {}
    shas: set[str | None] = set()
    with folder_lock(out_dir, "ablation folder (--out-dir)"):
        claim_ablation_folder(out_dir, ablation_configuration(base_preset, steps, overrides, world_seed))
        for variant in variants:
            for seed in seeds:
                cfg = variant_config(variant, seed, base_preset, steps, out_dir, overrides, world_seed)
                sha = backbone_sha256(cfg)
                result = _train_or_reuse(cfg, sha, progress, f"{variant} seed {seed}")
                shas.add(sha)
                runs.setdefault(variant, []).append({
                    "seed": seed, "final": result["final"]["metrics"], "wall_time_s": result["wall_time_s"],
                    "output_dir": cfg.output_dir, "backbone_sha256": sha,
                })
        if len(shas) > 1:
            raise AblationError(f"the runs used different backbone weights ({sorted(map(str, shas))}); rerun "
                                "with a fresh --out-dir")
        ref = variant_config(variants[0], seeds[0], base_preset, steps, out_dir, overrides, world_seed)
        protocol = {"world_seed": ref.world_seed, "role": "test" if dev_world_seed is not None else "development",
                    "dev_world_seed": dev_world_seed if dev_world_seed is not None else ref.world_seed,
                    "test_world_seed": ref.world_seed if dev_world_seed is not None else None,
                    "steps": ref.steps, "backbone": ref.backbone, "backbone_sha256": shas.pop()}
        summary = summarise({v: [{"seed": r["seed"], "final": r["final"]} for r in rs] for v, rs in runs.items()})
        md = markdown_table(summary, command, protocol)
        report = {"command": command, "base_preset": base_preset, "seeds": seeds, "protocol": protocol,
                  "variants": {v: VARIANTS[v][2] for v in variants}, "summary": summary, "runs": runs,
                  "wall_time_s": time.time() - t0, "markdown": md}
        write_json(out_dir / "ablation.json", report)  # strict JSON: the spread of one seed is null
        with atomic_write(out_dir / "ablation.md", "w") as handle:
            handle.write(md)
    return report


def _checked_plan(variants: Sequence[str], seeds: Sequence[int], world_seed: int | None,
                  dev_world_seed: int | None) -> tuple[list[int], list[str]]:
    """The seeds and variants of an ablation, checked: known variants, distinct seeds, a test world that is not
    the development world."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise AblationError("seeds must not be empty")
    if len(set(seeds)) != len(seeds):
        raise AblationError(f"seeds must not repeat, got {seeds}")
    variants = list(variants)
    for v in variants:
        if v not in VARIANTS:
            raise AblationError(f"unknown ablation variant {v!r}; known: {list(VARIANTS)}")
    if dev_world_seed is not None:
        if world_seed is None:
            raise AblationError("--dev-world-seed needs --world-seed: the test world to report on")
        if dev_world_seed == world_seed:
            raise AblationError(f"the test world (--world-seed {world_seed}) must differ from the development "
                                f"world (--dev-world-seed {dev_world_seed})")
    return seeds, variants


def _train_or_reuse(cfg: Config, sha: str | None, progress: bool, what: str) -> dict[str, Any]:
    """The finished run of ``cfg``: reused when its ``results.json`` holds the same config, steps and backbone
    weights; else trained (replacing a stale or unfinished run of this folder) and stamped with the weights."""
    results_path = Path(cfg.output_dir) / "results.json"
    if results_path.is_file():
        old = json.loads(results_path.read_text())
        if old.get("config") == cfg.to_dict() and old.get("steps") == cfg.steps and made_with_weights(old, sha):
            return old
    print(f"[ablation] {what}", file=sys.stderr)
    result = train(cfg, progress=progress, overwrite=True)
    stamped = json.loads(results_path.read_text())  # the weights next to the run, so a later reuse can check them
    stamped["ablation_backbone_sha256"] = sha
    write_json(results_path, stamped)
    return result


def load_report(path: str | Path) -> dict[str, Any]:
    """Read an ablation report (``ablation.json`` or ``benchmarks/results/miniature_*.json``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation report not found: {path}")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AblationError(f"{path} is not valid JSON ({err.msg})") from None
    missing = [k for k in ("command", "seeds", "summary") if k not in report]
    if missing:
        raise AblationError(f"{path} is not an ablation report: missing key(s) {missing}")
    return report


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: description, seeds, the four metrics and the paired differences to ``stego``."""
    rows = []
    for variant, row in report["summary"].items():
        paired = row.get("paired_vs_stego", {})
        rows.append({
            "variant": variant, "description": report.get("variants", {}).get(variant, ""),
            "seeds": len(row["seeds"]), "unsup_acc": row["cluster_accuracy"], "unsup_miou": row["cluster_miou"],
            "linear_acc": row["linear_accuracy"], "linear_miou": row["linear_miou"],
            "d_unsup_miou": _fmt_ci(paired["cluster_miou"]) if "cluster_miou" in paired else None,
            "d_unsup_acc": _fmt_ci(paired["cluster_accuracy"]) if "cluster_accuracy" in paired else None,
            "d_linear_miou": _fmt_ci(paired["linear_miou"]) if "linear_miou" in paired else None,
        })
    return rows


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every finished training run (``results.json``) under ``root``: what made it and its final metrics."""
    root = Path(root)
    runs = []
    for path in sorted(root.rglob("results.json")) if root.is_dir() else []:
        try:
            result = json.loads(path.read_text())
            cfg, final = result["config"], result["final"]["metrics"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # not a training run's results file
        if final is None:
            continue
        random_weights = not cfg.get("weights") and cfg["backbone"] != "embedded"
        runs.append({
            "run": str(path.parent.relative_to(root)), "dataset": cfg["dataset"],
            "data": "synthetic world" if cfg.get("data_dir") is None else cfg["data_dir"],
            "world_seed": cfg.get("world_seed") if cfg.get("data_dir") is None else None,
            "backbone": cfg["backbone"] + (" (random weights)" if random_weights else ""),
            "mode": cfg["mode"],
            "depth": "off" if not cfg.get("use_depth") or not cfg.get("depth_weight") else cfg["depth_similarity"],
            "sampling": cfg["depth_sampling"], "steps": result.get("steps"), "seed": cfg.get("seed"),
            "unsup_acc": final["cluster"]["accuracy"], "unsup_miou": final["cluster"]["miou"],
            "linear_acc": final["linear"]["accuracy"], "linear_miou": final["linear"]["miou"],
        })
    return runs
