"""The miniature reproduction: does DepthG beat STEGO, and which part does it?

Each variant (``VARIANTS``: the base preset plus the few keys that define it) is run over the same seeds on
one or several synthetic worlds, beside the frozen-feature baselines ``kmeans`` and ``frozen_probe``
(:mod:`depthg.baselines`), and the final weights' cluster and linear accuracy / mIoU (and category mIoU where
the data has categories) are compared with ``stego`` run by run (:mod:`depthg.lab.stats`: paired by world and
seed, pooled over worlds, Holm-adjusted p-values for the secondary comparisons). Choices are made on a
development world and the table is run once on held-out test worlds
(``--world-seed T1 T2 T3 --dev-world-seed D``); each world has its own cache folder. A run whose
``results.json`` holds the same config and backbone is reused.

An ablation folder holds one configuration (preset, steps, worlds, shared overrides: its marker
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

from depthg.backbone import EMBEDDED_DIR, EMBEDDED_JSON
from depthg.baselines import fit_frozen_baseline
from depthg.config import Config, apply_overrides
from depthg.method.losses import DEPTH_SIMILARITIES, PAPER_DEPTH_SIMILARITY
from depthg.train import train
from depthg.lab.stats import holm, paired_differences, pooled_differences
from depthg.utils import DepthGError, atomic_write, folder_lock, owned_output, pool_map, sha256_file, write_json

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "METRICS", "variant_config", "run_ablation", "summarise",
           "paired_differences", "markdown_table", "backbone_sha256", "load_report", "report_rows",
           "collect_runs", "FROZEN_VARIANTS", "PRIMARY", "holm_family", "ABLATION_MARKER",
           "ablation_configuration", "claim_ablation_folder"]

_PAPER_SIMILARITIES = tuple(s for s in DEPTH_SIMILARITIES if s != "released")

#: name -> (mode, overrides, description). ``depthg`` uses paper mode's default depth similarity.
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "kmeans": ("paper", {"use_depth": False, "depth_sampling": "random", "depth_weight": 0.0},
               "frozen features, no head: spherical k-means (unsup.) and a linear probe (linear)"),
    "frozen_probe": ("paper", {"use_depth": False, "depth_sampling": "random", "depth_weight": 0.0},
                     "frozen features, no head: the trainer's cluster probe (unsup.) and a linear probe (linear)"),
    "stego": ("paper", {"use_depth": False, "depth_sampling": "random", "depth_weight": 0.0},
              "STEGO: no depth term, random sampling"),
    "stego_released_depth": ("paper", {"depth_sampling": "random", "depth_similarity": "released"},
                             "STEGO + the released depth term (constant D: a decaying extra pull of self pairs), "
                             "random sampling: the paper's Cityscapes setting"),
    "fps_only": ("paper", {"use_depth": True, "depth_sampling": "fps", "depth_weight": 0.0},
                 "STEGO losses with depth-guided FPS (fov 90° unprojection), no depth term"),
    "fps_intrinsics": ("paper", {"use_depth": True, "depth_sampling": "fps", "depth_weight": 0.0,
                                 "unprojection": "camera"},
                       "STEGO losses with depth-guided FPS in the camera's geometry (calibrated unprojection), "
                       "no depth term"),
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
#: variants that train no head -> their clusterer in :func:`depthg.baselines.fit_frozen_baseline`; the
#: reference rows: ``stego`` is compared with each (STEGO's own effect), the other variants with ``stego``
FROZEN_VARIANTS = {"kmeans": "kmeans", "frozen_probe": "probe"}
#: the held-out table (test world).
DEFAULT_VARIANTS = ("kmeans", "frozen_probe", "stego", "stego_released_depth", "fps_only", "fps_intrinsics",
                    *(f"depth_{s}" for s in _PAPER_SIMILARITIES), "depthg", "depthg_s5", "depthg_s11", "released")
#: (group, metric) pairs read from a run's final evaluation (``category_miou``: where the data has categories).
METRICS = (("cluster", "miou"), ("cluster", "accuracy"), ("linear", "miou"), ("linear", "accuracy"),
           ("cluster", "category_miou"), ("linear", "category_miou"))
_ALL_KEYS = tuple(f"{g}_{m}" for g, m in METRICS)
#: the comparison the miniature's plan names as primary (not adjusted for multiplicity)
PRIMARY = "depthg"


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


def _metric_keys(results: list[dict[str, Any]]) -> list[str]:
    """The ``group_metric`` keys every run of a variant has (category mIoU only where the data has categories)."""
    keys = [f"{g}_{m}" for g, m in METRICS]
    return [k for k in keys if all(_value(r, k) is not None for r in results)]


def _value(run: dict[str, Any], key: str) -> float | None:
    group, metric = key.split("_", 1)
    return run["final"].get(group, {}).get(metric)


def _by_world(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by world (``"world"``; one group ``"-"`` without it), seeds in order, worlds in order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: (r.get("world") is None, r.get("world") or 0, r["seed"])):
        groups.setdefault(str(r.get("world", "-")), []).append(r)
    return groups


def _paired(row: dict[str, Any], base: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """Pooled and per-world paired differences ``row - base`` for each metric of ``keys``."""
    out = {}
    for key in keys:
        per_world = {w: (row["per_world"][w][key]["values"], base["per_world"][w][key]["values"])
                     for w in row["per_world"]}
        pooled = pooled_differences(per_world)
        pooled["per_world"] = {w: paired_differences(*pair) for w, pair in per_world.items()}
        out[key] = pooled
    return out


def summarise(runs: dict[str, list[dict[str, Any]]], primary: str = PRIMARY) -> dict[str, Any]:
    """Per variant: mean ± std over every (world, seed) of the final metrics (``values`` world-major),
    ``per_world`` the same per world, ``paired_vs_stego`` (for ``stego``: ``paired_vs_kmeans`` and
    ``paired_vs_frozen_probe``; for ``frozen_probe``: ``paired_vs_kmeans``) when the (world, seed) runs match:
    pooled over worlds, per world inside (:mod:`depthg.lab.stats`). The secondary comparisons' unsupervised-mIoU
    p-values (every variant − ``stego``, and ``stego`` − ``kmeans``) get Holm's adjustment (``holm_p``);
    ``primary`` (``depthg`` - ``stego``) is the one comparison the plan names in advance and is not adjusted;
    the two comparisons with ``frozen_probe`` are descriptive (they split ``stego`` − ``kmeans``)."""
    out: dict[str, Any] = {}
    for variant, results in runs.items():
        keys = _metric_keys(results)
        worlds = _by_world(results)
        ordered = [r for rs in worlds.values() for r in rs]
        row: dict[str, Any] = {"seeds": [r["seed"] for r in next(iter(worlds.values()))], "worlds": list(worlds),
                               "runs": [[r.get("world"), r["seed"]] for r in ordered]}
        for key in keys:
            vals = [_value(r, key) for r in ordered]
            row[key] = {**_stats(vals), "values": vals}
        row["per_world"] = {w: {key: {**_stats(v := [_value(r, key) for r in rs]), "values": v} for key in keys}
                            for w, rs in worlds.items()}
        out[variant] = row
    # every variant against STEGO; STEGO against each frozen-feature baseline (its own effect), and the
    # cluster-probe baseline against k-means (what the clusterer alone changes): the last two split
    # stego − kmeans into the head's part and the clusterer's part, and are descriptive (not in Holm's family)
    comparisons = ([(v, "stego") for v in out if v != "stego" and v not in FROZEN_VARIANTS]
                   + [("stego", b) for b in FROZEN_VARIANTS] + [("frozen_probe", "kmeans")])
    for variant, base_name in comparisons:
        row, base = out.get(variant), out.get(base_name)
        if row is not None and base is not None and row["runs"] == base["runs"]:
            row[f"paired_vs_{base_name}"] = _paired(row, base, [k for k in _ALL_KEYS if k in row and k in base])
    family = {f"{v} − stego": r["paired_vs_stego"]["cluster_miou"]["p"] for v, r in out.items()
              if "paired_vs_stego" in r and v != primary}
    if "paired_vs_kmeans" in out.get("stego", {}):
        family["stego − kmeans"] = out["stego"]["paired_vs_kmeans"]["cluster_miou"]["p"]
    for name, p_adj in holm(family).items():
        variant, base_name = name.split(" − ")
        out[variant][f"paired_vs_{base_name}"]["cluster_miou"]["holm_p"] = p_adj
    return out


def holm_family(summary: dict[str, Any]) -> dict[str, float]:
    """The Holm-adjusted p-values of the secondary unsupervised-mIoU comparisons in a summary."""
    return {f"{v} − {key[len('paired_vs_'):]}": d["cluster_miou"]["holm_p"]
            for v, r in summary.items() for key, d in r.items()
            if key.startswith("paired_vs_") and "holm_p" in d.get("cluster_miou", {})}


def _missing(value: float | None) -> bool:
    """No value: NaN in memory, null once written as strict JSON (a spread of one seed)."""
    return value is None or math.isnan(value)


def _fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}" if not _missing(s["std"]) else f"{s['mean']:.2f}"


def _fmt_ci(d: dict[str, Any]) -> str:
    if _missing(d["half_width"]):
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


def _fmt_p(p: float | None) -> str:
    if _missing(p):
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _cell(row: dict[str, Any], key: str) -> str:
    return _fmt(row[key]) if key in row else "—"


def markdown_table(summary: dict[str, Any], command: str, protocol: dict[str, Any] | None = None) -> str:
    """The results table, the paired differences (pooled, per world, Holm) and the command, as markdown."""
    lines = ["| variant | description | runs | unsup. mIoU | unsup. Acc | unsup. category mIoU | linear mIoU | "
             "linear Acc |", "|---|---|---|---|---|---|---|---|"]
    for variant, row in summary.items():
        lines.append(f"| {variant} | {VARIANTS[variant][2]} | {len(row['runs'])} | {_cell(row, 'cluster_miou')} | "
                     f"{_cell(row, 'cluster_accuracy')} | {_cell(row, 'cluster_category_miou')} | "
                     f"{_cell(row, 'linear_miou')} | {_cell(row, 'linear_accuracy')} |")
    lines += ["", "Final-step weights on the validation split, percent, mean ± sample std over every (world, seed) "
              "(no model selection)."]
    paired = [(f"{v} − {k[len('paired_vs_'):]}", d) for v, r in summary.items() for k, d in r.items()
              if k.startswith("paired_vs_")]
    if paired:
        worlds = next(iter(summary.values()))["worlds"]
        lines += ["", "Paired per-(world, seed) differences (points), mean [95 % interval]; pooled over worlds with "
                  "the worlds fixed (p, and Holm-adjusted p for the secondary comparisons), over worlds drawn at "
                  "random (t over the world means), and per world:", "",
                  "| comparison | unsup. mIoU, pooled | p | Holm p | random worlds | "
                  + " | ".join(f"world {w}" for w in worlds) + " | unsup. Acc | unsup. category mIoU | linear mIoU |",
                  "|---|---|---|---|---|" + "---|" * len(worlds) + "---|---|---|"]
        for name, d in paired:
            m = d["cluster_miou"]
            per_world = " | ".join(_fmt_ci(m["per_world"][w]) for w in worlds)
            extra = " | ".join(_fmt_ci(d[k]) if k in d else "—"
                               for k in ("cluster_accuracy", "cluster_category_miou", "linear_miou"))
            lines.append(f"| {name} | {_fmt_ci(m)} | {_fmt_p(m['p'])} | {_fmt_p(m.get('holm_p'))} | "
                         f"{_fmt_ci(m['random_worlds'])} | {per_world} | {extra} |")
    if protocol:
        lines += ["", "Protocol: " + ", ".join(f"{k} = {v}" for k, v in protocol.items())]
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def _command(variants: Sequence[str], seeds: Sequence[int], base_preset: str, steps: int | None,
             out_dir: Path, overrides: Sequence[str], world_seeds: Sequence[int] | None,
             dev_world_seed: int | None) -> str:
    args = ["--preset", base_preset]
    if world_seeds:
        args += ["--world-seed", *map(str, world_seeds)]
    if dev_world_seed is not None:
        args += ["--dev-world-seed", str(dev_world_seed)]
    args += ["--variants", *variants, "--seeds", *map(str, seeds)]
    args += (["--steps", str(steps)] if steps is not None else []) + ["--out-dir", str(out_dir), *overrides]
    return "python -m depthg ablate " + shlex.join(args)


def _check_request(variants: Sequence[str], seeds: Sequence[int], world_seeds: Sequence[int] | None,
                   dev_world_seed: int | None, jobs: int = 1) -> None:
    """Refuse an empty or repeated seed list, unknown variants, no jobs, and a test world that is the development
    world."""
    if not seeds:
        raise AblationError("seeds must not be empty")
    if len(set(seeds)) != len(seeds):
        raise AblationError(f"seeds must not repeat, got {list(seeds)}")
    for v in variants:
        if v not in VARIANTS:
            raise AblationError(f"unknown ablation variant {v!r}; known: {list(VARIANTS)}")
    if jobs < 1:
        raise AblationError(f"--jobs must be at least 1, got {jobs}")
    if world_seeds is not None and len(set(world_seeds)) != len(world_seeds):
        raise AblationError(f"world seeds must not repeat, got {list(world_seeds)}")
    if dev_world_seed is not None:
        if not world_seeds:
            raise AblationError("--dev-world-seed needs --world-seed: the test world(s) to report on")
        if dev_world_seed in world_seeds:
            raise AblationError(f"the test worlds (--world-seed {' '.join(map(str, world_seeds))}) must not include "
                                f"the development world (--dev-world-seed {dev_world_seed})")


#: the marker of an ablation folder: the configuration its runs share (:func:`ablation_configuration`)
ABLATION_MARKER = ".depthg-ablation.json"
#: config keys that say where or how fast a run runs, or which (variant, seed) it is, not what it computes
_NOT_CONFIGURATION = ("name", "seed", "output_dir", "cache_dir", "device", "threads", "num_workers")


def ablation_configuration(base_preset: str = "synthetic", steps: int | None = None, overrides: Sequence[str] = (),
                           world_seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """What every run of one ablation shares: the config of its reference run (``stego``, seed 0) without the
    keys that say where it runs, and its worlds. Two ablations with the same configuration may share a folder
    (more variants, seeds or worlds); another configuration (other steps or overrides) may not."""
    cfg = variant_config("stego", 0, base_preset, steps, "ablation", overrides, world_seeds[0] if world_seeds else None)
    out = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_CONFIGURATION}
    out["world_seed"] = list(world_seeds) if world_seeds else cfg.world_seed
    return out


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
    # each world's runs live in their own out_dir/world<w>, so ablations of other worlds may share the folder
    differ = sorted(k for k in set(stored) | set(configuration) if k != "world_seed" and stored.get(k) != configuration.get(k))
    if differ:
        shown = ", ".join(f"{k}: {stored.get(k)!r} there, {configuration.get(k)!r} now" for k in differ[:4])
        raise AblationError(f"the ablation folder {out_dir} holds runs of another configuration ({shown}); its runs "
                            "would be replaced or mixed: choose another --out-dir")


def _run_task(progress: bool, task: tuple[dict[str, Any], str]) -> dict[str, Any]:
    """One (config, variant) of an ablation, in a worker process of :func:`depthg.utils.pool_map` or here."""
    values, variant = task
    return _one_run(Config.from_dict(values), variant, progress)


def _one_run(cfg: Config, variant: str, progress: bool) -> dict[str, Any]:
    """The finished results of ``cfg``'s run: reused when its ``results.json`` holds the same config, steps and
    backbone weights, else made (a frozen-feature fit for a baseline, training otherwise) and stamped."""
    sha = backbone_sha256(cfg)
    results_path = Path(cfg.output_dir) / "results.json"
    if results_path.is_file():
        old = json.loads(results_path.read_text())
        # reuse only a finished run of the same config and the same backbone weights
        if old.get("config") == cfg.to_dict() and old.get("steps") == cfg.steps and made_with_weights(old, sha):
            return old
    print(f"[ablation] world {cfg.world_seed} {variant} seed {cfg.seed}", file=sys.stderr)
    if variant in FROZEN_VARIANTS:  # a stale or unfinished run is redone
        fit_frozen_baseline(cfg, progress=progress, overwrite=True, clusterer=FROZEN_VARIANTS[variant])
    else:
        train(cfg, progress=progress, overwrite=True)
    stamped = json.loads(results_path.read_text())  # the weights next to the run, so a later reuse can check them
    stamped["ablation_backbone_sha256"] = sha
    write_json(results_path, stamped)
    return stamped


def run_ablation(variants: Sequence[str] = DEFAULT_VARIANTS, seeds: Sequence[int] = (0, 1, 2),
                 base_preset: str = "synthetic", steps: int | None = None, out_dir: str | Path = "runs/ablation",
                 overrides: Sequence[str] = (), progress: bool = True, world_seeds: Sequence[int] | None = None,
                 dev_world_seed: int | None = None, jobs: int = 1) -> dict[str, Any]:
    """Run every (world, variant, seed), collect final metrics, write ``ablation.json`` and ``ablation.md``.

    ``world_seeds``: the synthetic worlds (None = the preset's one world), each run in
    ``<out_dir>/world<w>/<variant>/seed<s>``; ``dev_world_seed`` marks them as held-out test worlds of choices
    made on that other world. ``jobs`` > 1 runs that many runs at a time on worker processes (the same numbers:
    each run is a pure function of its config); an interrupted ablation resumes from its finished runs.
    """
    seeds, variants = [int(s) for s in seeds], list(variants)
    world_seeds = [int(w) for w in world_seeds] if world_seeds else None
    _check_request(variants, seeds, world_seeds, dev_world_seed, jobs)
    out_dir = Path(out_dir)
    command = _command(variants, seeds, base_preset, steps, out_dir, overrides, world_seeds, dev_world_seed)
    t0 = time.time()
    with folder_lock(out_dir, "ablation folder (--out-dir)"):
        claim_ablation_folder(out_dir, ablation_configuration(base_preset, steps, overrides, world_seeds))
        tasks = [(variant_config(variant, seed, base_preset, steps, out_dir if world is None else out_dir / f"world{world}",
                                 overrides, world), variant)
                 for world in world_seeds or [None] for variant in variants for seed in seeds]
        # each run is a pure function of its config (threads=1 in the presets), so workers give the serial numbers
        results = pool_map(_run_task, [(cfg.to_dict(), v) for cfg, v in tasks], jobs, shared=progress and jobs <= 1,
                           what="ablation runs")
        runs: dict[str, list[dict[str, Any]]] = {}
        for (cfg, variant), result in zip(tasks, results):
            runs.setdefault(variant, []).append({
                "world": cfg.world_seed if cfg.data_dir is None else None, "seed": cfg.seed,
                "final": result["final"]["metrics"], "wall_time_s": result["wall_time_s"],
                "output_dir": cfg.output_dir, "backbone_sha256": result["ablation_backbone_sha256"],
            })
        report = _report(runs, variants, seeds, base_preset, steps, overrides, world_seeds, dev_world_seed)
        report.update(command=command, wall_time_s=time.time() - t0)
        report["markdown"] = markdown_table(report["summary"], command, report["protocol"])
        write_json(out_dir / "ablation.json", report)  # strict JSON: the spread of one seed is null
        with atomic_write(out_dir / "ablation.md", "w") as handle:
            handle.write(report["markdown"])
    return report


def _report(runs: dict[str, list[dict[str, Any]]], variants: list[str], seeds: list[int], base_preset: str,
            steps: int | None, overrides: Sequence[str], world_seeds: list[int] | None,
            dev_world_seed: int | None) -> dict[str, Any]:
    """The report of finished runs: protocol, summary (:func:`summarise`), Holm family and the runs."""
    shas = {r["backbone_sha256"] for rs in runs.values() for r in rs}
    if len(shas) > 1:
        raise AblationError(f"the runs used different backbone weights ({sorted(map(str, shas))}); rerun "
                            "with a fresh --out-dir")
    ref = variant_config(variants[0], seeds[0], base_preset, steps, "ablation", overrides,
                         world_seeds[0] if world_seeds else None)
    worlds = world_seeds or [ref.world_seed]
    protocol = {"world_seeds": worlds, "role": "test" if dev_world_seed is not None else "development",
                "dev_world_seed": dev_world_seed if dev_world_seed is not None else worlds[0],
                "test_world_seeds": worlds if dev_world_seed is not None else None,
                "val_images": runs[variants[0]][0]["final"].get("n_images"),
                "steps": ref.steps, "backbone": ref.backbone, "backbone_sha256": shas.pop(),
                "primary": f"{PRIMARY} − stego, unsupervised mIoU, final weights (not adjusted)",
                "pooling": "fixed worlds (pooled within-world variance); random worlds reported beside",
                "multiplicity": "Holm over the secondary unsupervised-mIoU comparisons"}
    summary = summarise({v: [{k: r[k] for k in ("world", "seed", "final")} for r in rs] for v, rs in runs.items()})
    return {"base_preset": base_preset, "seeds": seeds, "protocol": protocol,
            "variants": {v: VARIANTS[v][2] for v in variants}, "summary": summary, "holm_p": holm_family(summary),
            "runs": runs}


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
    """One row per variant: description, runs, the metrics and the pooled paired differences to ``stego``
    (for ``stego`` and ``frozen_probe``: to ``kmeans``), with their p and Holm-adjusted p.

    Whatever variants the report holds are listed (a metric a report lacks shows None).
    """
    rows = []
    for variant, row in report["summary"].items():
        base = "kmeans" if variant in ("stego", "frozen_probe") else "stego"
        paired = row.get(f"paired_vs_{base}", {})
        miou = paired.get("cluster_miou", {})
        described = report.get("variants", {}).get(variant) or (VARIANTS[variant][2] if variant in VARIANTS else "")
        rows.append({
            "variant": variant, "description": described,
            "runs": len(row.get("runs", row.get("seeds", []))), "seeds": len(row.get("seeds", [])),
            "unsup_acc": row.get("cluster_accuracy"), "unsup_miou": row.get("cluster_miou"),
            "unsup_category_miou": row.get("cluster_category_miou"),
            "linear_acc": row.get("linear_accuracy"), "linear_miou": row.get("linear_miou"),
            "versus": base if paired else None,
            "d_unsup_miou": _fmt_ci(miou) if miou else None,
            "p": _fmt_p(miou.get("p")) if miou else None, "holm_p": _fmt_p(miou.get("holm_p")) if miou else None,
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
