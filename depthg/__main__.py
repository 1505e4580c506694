"""Command line: ``python -m depthg <command> [options] [key=value ...]``.

Each command is a thin wrapper around one library function, so notebooks and the CLI run the same code.
Commands on a config take ``--preset NAME`` (+ ``--mode``) or ``--config FILE``, then ``key=value``
overrides parsed as YAML: ``python -m depthg train --preset synthetic steps=100 seed=1``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from depthg.lab.ablation import DEFAULT_VARIANTS, run_ablation
from depthg.backbone import load_backbone
from depthg.build import dataset_kwargs
from depthg.calibrate import NULL_QUANTILE, calibration_report, fps_class_shares, measure_correlations
from depthg.config import (MODES, PRESETS, Config, ConfigError, apply_overrides, merge_values, parse_overrides,
                           read_config_file)
from depthg.data import build_dataset
from depthg.data.prepare import (
    CroppedDataset,
    KnnSettings,
    compute_knn,
    five_crop,
    prepare_training_data,
    stereo_depth_for_dataset,
)
from depthg.depth import estimate_depth_for_dataset, load_depth_model
from depthg.evaluate import evaluate_checkpoint
from depthg.precision import amp_context
from depthg.train import train
from depthg.utils import DepthGError, json_text
from depthg.world import make_world, pretrain


def _config_from_args(args: argparse.Namespace) -> Config:
    """The command's config: ``--config FILE`` (+ ``--mode``) or ``--preset NAME`` (+ ``--mode``), with the
    ``key=value`` overrides merged in before the one validation."""
    if args.config and args.preset:
        raise ConfigError("give either --config or --preset, not both")
    if args.config:
        values = read_config_file(args.config)
        if args.mode:  # the mode first (it converts the keys that depend on it), then the overrides
            values = merge_values(values, {"mode": args.mode})
        return Config.from_dict(merge_values(values, parse_overrides(args.overrides)), source=args.config)
    return apply_overrides(Config.preset(args.preset or "synthetic", args.mode or "paper"), args.overrides)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--preset", choices=PRESETS, help="start from a preset (default: synthetic)")
    p.add_argument("--mode", choices=MODES, help="fidelity mode of the preset (default: paper)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (values parsed as YAML)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _print(result: Any) -> None:
    """The command's result on stdout as strict JSON (no NaN: a missing value is null)."""
    print(json_text(result))


def cmd_synthesize(args: argparse.Namespace) -> Any:
    root = make_world(args.root, args.n_train, args.n_val, size=(args.height, args.width), seed=args.seed,
                      n_cities=args.n_cities, progress=not args.no_progress)
    _print({"root": str(root)})
    return root


def cmd_prepare(args: argparse.Namespace) -> Any:
    paths = prepare_training_data(_config_from_args(args), progress=not args.no_progress)
    _print(paths)
    return paths


def _dataset(cfg: Config, split: str, depth_dir: str | None = None) -> Any:
    if cfg.data_dir is None:
        raise ConfigError("this command needs data_dir=... (the dataset root); `prepare` handles the synthetic world")
    return build_dataset(cfg.dataset, cfg.data_dir, split, depth_dir=depth_dir, **dataset_kwargs(cfg))


def cmd_depth(args: argparse.Namespace) -> Any:
    cfg = _config_from_args(args)
    dataset = _dataset(cfg, args.split)
    if cfg.depth_source == "disparity":
        out = stereo_depth_for_dataset(dataset, args.out, progress=not args.no_progress)
    elif cfg.depth_source == "gt":
        raise ConfigError("depth_source=gt: the synthetic world already holds exact depth in <root>/depth_gt")
    else:
        model = load_depth_model(cfg.depth_model or cfg.depth_source, cfg.device)
        out = estimate_depth_for_dataset(dataset, model, args.out, batch_size=args.batch_size,
                                         progress=not args.no_progress, num_workers=cfg.num_workers,
                                         precision=amp_context(cfg, model.device)[0])
    _print({"depth_dir": str(out)})
    return out


def cmd_crop(args: argparse.Namespace) -> Any:
    cfg = _config_from_args(args)
    out = five_crop(_dataset(cfg, args.split, args.depth_dir), args.out, cfg.crop_ratio, progress=not args.no_progress,
                    workers=cfg.num_workers)
    _print({"crop_dir": str(out)})
    return out


def cmd_knn(args: argparse.Namespace) -> Any:
    cfg = _config_from_args(args)
    dataset = CroppedDataset(args.crops, args.split, with_depth=False) if args.crops else _dataset(cfg, args.split)
    backbone = load_backbone(cfg.backbone, cfg.weights, **cfg.backbone_kwargs)
    # the same neighbours `prepare` computes (k = knn_k, images resized by the mode)
    out = compute_knn(dataset, backbone, args.out, KnnSettings.of(cfg, len(dataset)), progress=not args.no_progress)
    _print({"knn_path": str(out)})
    return out


def cmd_train(args: argparse.Namespace) -> Any:
    result = train(_config_from_args(args), resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if result:  # rank 0 only
        _print({k: result[k] for k in ("name", "steps", "wall_time_s", "final", "best_on_val", "paths")})
    return result


def cmd_eval(args: argparse.Namespace) -> Any:
    result = evaluate_checkpoint(args.checkpoint, args.overrides, data_root=args.data_root, output=args.output,
                                 n_predictions=args.predictions, progress=not args.no_progress)
    _print({k: result[k] for k in ("checkpoint", "checkpoint_sha256", "output", "n_images", "protocol")}
           | {g: {m: result[g][m] for m in ("accuracy", "miou")} for g in ("cluster", "linear")})
    return result


def cmd_calibrate(args: argparse.Namespace) -> Any:
    cfg = _config_from_args(args)
    stats = measure_correlations(cfg, progress=not args.no_progress, max_crops=args.max_crops)
    if not args.labels:
        stats.same_class = None  # label purity only where asked for (a development world)
    report = calibration_report(cfg, stats, args.quantile)
    if args.labels and cfg.use_depth:  # where FPS looks, per class, against the cells' shares
        report["fps_class_shares"] = fps_class_shares(cfg, progress=not args.no_progress, max_crops=args.max_crops)
    _print(report)
    return report


def cmd_ablate(args: argparse.Namespace) -> Any:
    result = run_ablation(
        variants=args.variants or list(DEFAULT_VARIANTS), seeds=args.seeds, base_preset=args.preset or "synthetic",
        steps=args.steps, out_dir=args.out_dir, overrides=args.overrides, progress=not args.no_progress,
        world_seeds=args.world_seed, dev_world_seed=args.dev_world_seed, jobs=args.jobs,
    )
    print(result["markdown"])
    return result


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m depthg`` parser: one subcommand per command, each with ``func`` set to its handler."""
    parser = argparse.ArgumentParser(prog="python -m depthg", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    # subcommands are added in the order `--help` lists them
    _add_synthesize_parser(sub)
    _add_preparation_parsers(sub)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_calibrate_parser(sub)
    _add_ablate_parser(sub)
    _add_pretrain_parser(sub)
    return parser


def _add_synthesize_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``synthesize``: render the synthetic world; it needs no config."""
    p = sub.add_parser("synthesize", help="render the synthetic street world (Cityscapes layout)")
    p.add_argument("root", help="output folder")
    p.add_argument("--n-train", type=int, default=48)
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--n-cities", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_synthesize)


def _add_preparation_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``prepare`` (the whole chain) and its single steps ``depth``, ``crop``, ``knn``, each on a config."""
    p = sub.add_parser("prepare", help="depth -> five-crop -> kNN for a config's training split (idempotent)")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("depth", help="estimate depth (or convert stereo) for one split into a depth cache")
    _add_config_args(p)
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="depth cache folder (never inside the dataset)")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=cmd_depth)

    p = sub.add_parser("crop", help="five-crop one split (image, label, depth) into a folder")
    _add_config_args(p)
    p.add_argument("--split", default="train")
    p.add_argument("--depth-dir", default=None, help="depth cache of the split (optional)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_crop)

    p = sub.add_parser("knn", help="kNN positives from backbone features")
    _add_config_args(p)
    p.add_argument("--split", default="train")
    p.add_argument("--crops", default=None, help="five-crop folder (default: the dataset itself)")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=cmd_knn)


def _add_train_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``train``: a config plus whether to resume or replace an existing run."""
    p = sub.add_parser("train", help="train a segmentation head (torchrun for multi-GPU)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint_last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in output_dir (its files go only after the new run's config and data passed)")
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``eval``: a checkpoint (its config travels with it) plus overrides."""
    p = sub.add_parser("eval", help="evaluate a checkpoint (resize, flip, CRF, Hungarian) -> JSON")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval_crf=false")
    p.add_argument("--data-root", default=None)
    p.add_argument("--output", default=None, help="results JSON (default: <checkpoint>_eval.json)")
    p.add_argument("--predictions", type=int, default=0, help="write N prediction PNGs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def _add_calibrate_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``calibrate``: the feature-correlation distributions of a config's backbone and data, and shifts for them."""
    p = sub.add_parser("calibrate", help="measure self/kNN/random feature correlations and propose the loss shifts")
    _add_config_args(p)
    p.add_argument("--quantile", type=float, default=NULL_QUANTILE,
                   help="the rule's quantile of the random-pair correlations (default: %(default)s)")
    p.add_argument("--max-crops", type=int, default=2048, help="training crops sampled (default: %(default)s)")
    p.add_argument("--labels", action="store_true",
                   help="also report how many pulled pairs show one class and each class's share of the FPS picks "
                        "(development data only)")
    p.set_defaults(func=cmd_calibrate)


def _add_ablate_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``ablate``: the miniature reproduction over variants and seeds."""
    p = sub.add_parser("ablate", help="miniature reproduction: STEGO vs DepthG variants over seeds, paired CIs")
    p.add_argument("--preset", choices=PRESETS, default="synthetic")
    p.add_argument("--world-seed", type=int, nargs="+", default=None,
                   help="synthetic world(s) to train and evaluate on (each kept in <cache_dir>/world<seed>)")
    p.add_argument("--dev-world-seed", type=int, default=None,
                   help="the development world the choices were made on; marks these worlds as the held-out test")
    p.add_argument("--variants", nargs="*", default=None,
                   help="variants (default: the held-out table); see depthg.lab.ablation.VARIANTS")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the preset's)")
    p.add_argument("--out-dir", default="runs/ablation")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time on worker processes (same numbers; 2 on a 2-core CPU with threads=1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ablate)


def _add_pretrain_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``pretrain``: the embedded backbone's pretraining; its options are defined in :mod:`depthg.world.pretrain`."""
    p = sub.add_parser("pretrain", help="pretraining (DINO, optional patch losses) of the embedded backbone on the synthetic world")
    pretrain.add_pretrain_arguments(p)
    p.set_defaults(func=pretrain.run_pretrain_from_args)


def main(argv: list[str] | None = None) -> Any:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`train --no-progress seed=1`): argparse leaves those
    # trailing positionals unparsed, so they are appended here; anything else left over is an error.
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args.func(args)


def _cli() -> None:
    """Entry point of ``python -m depthg`` / ``depthg``: bad input ends with its message, Ctrl-C with one line
    and exit code 130 (temporary files are removed on the way out), never with a traceback."""
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        print("depthg: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (DepthGError, OSError) as err:  # bad input, missing/unreadable files, a file where a folder goes
        text = str(err) if not isinstance(err, OSError) or err.filename is None or str(err.filename) in str(err) \
            else f"{err} ({err.filename})"
        print(f"depthg: error: {text}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    _cli()
