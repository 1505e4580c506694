"""What the notebooks share, so that a notebook holds parameters, explanation, calls and plots only.

- :func:`at_root`: a path parameter of a notebook, relative to the repository root wherever the notebook
  runs (Jupyter runs it in ``notebooks/``, ``papermill notebooks/x.ipynb out.ipynb`` in the root).
- :func:`validate_parameters`: a notebook's parameters (papermill's ``-p`` values arrive as text or as the
  wrong type) checked and converted by the CLI's own validators, right after the parameters cell.
- :func:`choose_run`: the configuration a training notebook runs -- the real preset when the dataset folder
  and the backbone weights are given, otherwise the embedded default (the synthetic street world with the
  embedded backbone) -- and the reasons, said in its first output.
- :data:`SMOKE` and :data:`RANDOM_BACKBONE`: the CI smoke sizes and the stand-in backbone used when even
  the embedded weights are missing.
- :func:`load_trained` and :func:`predict_examples`: a finished run loaded back from its checkpoint, and its
  predictions on the first validation images (for prediction grids).
- :func:`figure_runs`, :func:`describe_run` and :func:`example_items`: the runs ``reproduce_figures`` shows
  (read from the miniature reproduction, or trained when missing), the caption text that says what made
  them, and validation crops with their exact depth.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

import depthg
from depthg.lab.ablation import backbone_sha256, made_with_weights, run_ablation, variant_config
from depthg.backbone import Backbone, load_backbone
from depthg.build import (Fidelity, Segmenter, build_backbone, build_models, fidelity, load_checkpoint, load_weights,
                          validation_dataset)
from depthg.config import Config, ConfigError, check_preset, check_value, load_yaml
from depthg.data import build_dataset
from depthg.data.prepare import dataset_root, world_folder
from depthg.data.transforms import resize_center_crop
from depthg.evaluate import EvalOptions, predict_batch
from depthg.train_support import ReplaceOwn
from depthg.utils import get_device, repo_root, sha256_file
from depthg.lab.lesson import shown_path
from depthg.lab.viz import get_palette

__all__ = ["SMOKE", "RANDOM_BACKBONE", "at_root", "validate_parameters", "backbone_problem", "RunChoice", "choose_run",
           "TrainedRun",
           "load_trained", "predict_examples", "as_overrides", "figure_runs", "describe_run", "example_items"]

# The CI smoke configuration: a tiny world, a tiny *random* ViT and 4 steps. The pipeline runs end to end in
# seconds; the numbers mean nothing.
SMOKE: dict[str, Any] = dict(
    world_n_train=6, world_n_val=2, world_size=[64, 128], res=32, eval_res=32, feature_samples=3, knn_k=4,
    num_neighbors=2, steps=4, batch_size=2, eval_every=2, checkpoint_every=0, log_every=1, eval_batch_size=2,
    backbone="vit_small_patch8_224", backbone_kwargs=dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, img_size=64),
)

# Stand-in when the embedded backbone's weights are missing from a checkout: a small random ViT-S/8-shaped
# model. Its features carry no semantics; the notebooks say so.
RANDOM_BACKBONE: dict[str, Any] = dict(
    backbone="vit_small_patch8_224", backbone_kwargs=dict(embed_dim=96, depth=4, num_heads=3, mlp_ratio=2, img_size=128),
)


def at_root(path: str | os.PathLike | None) -> Path | None:
    """A notebook's path parameter as a path that works from the current directory.

    Absolute paths stay as they are; relative ones are relative to the repository root
    (:func:`depthg.utils.repo_root`). When the notebook already runs in the root (papermill from the root)
    they stay relative, so the configs it writes match those of ``python -m depthg ...`` run there.
    """
    if path is None:
        return None
    path = Path(path)
    root = repo_root()
    return path if path.is_absolute() or Path.cwd().resolve() == root.resolve() else root / path


#: how :func:`validate_parameters` checks each notebook parameter: a config key (checked by the config's own
#: validator of that key; None allowed where the flag says so) or a kind: "bool", "count" (an integer >= 1),
#: "overwrite" (true, false or "own"), "sliders" (true, false or "auto"), "seed_or_median" (a seed or "median"),
#: "preset", "names" (a list of names or one comma-separated string), "path"
NOTEBOOK_PARAMETERS: dict[str, str | tuple[str, bool]] = {
    "smoke": "bool", "sliders": "sliders", "train_if_missing": "bool", "overwrite": "overwrite", "preset": "preset",
    "n_examples": "count", "demo_steps": "count", "n_side": "count", "patch": "count", "num_disparities": "count",
    "block_size": "count", "n_images": "count", "probe_steps": "count", "calibrate_crops": "count",
    "depth_models": "names", "runs_dir": "path", "results_dir": "path", "published": "path",
    "ablation_dir": ("output_dir", True),
    "seed": ("seed", False), "steps": ("steps", True), "batch_size": ("batch_size", True), "device": ("device", False),
    "mode": ("mode", False), "world_seed": ("world_seed", True), "lhp_quantile": ("lhp_quantile", False),
    "fov_deg": ("fov_deg", True), "centering": ("centering", True), "backbone": ("backbone", False),
    "data_dir": ("data_dir", True), "weights": ("weights", True), "cache_dir": ("cache_dir", True),
    "output_dir": ("output_dir", True), "size": ("world_size", False),
}
#: where one notebook's parameter means something else than NOTEBOOK_PARAMETERS says
NOTEBOOK_OVERRIDES: dict[str, dict[str, str | tuple[str, bool]]] = {"reproduce_figures": {"seed": "seed_or_median"}}


def validate_parameters(namespace: dict[str, Any], notebook: str) -> None:
    """Check a notebook's parameters in ``namespace`` (the notebook's ``globals()``, right after the parameters
    cell) and store them converted, as the CLI reads ``key=value``: papermill's ``-p overwrite false`` arrives
    as the text "false" (true for Python) and becomes False; ``-p steps 2.7`` or ``-p steps abc`` is an error,
    not 2 steps or a traceback; an unknown ``preset`` is reported. Raises :class:`depthg.config.ConfigError`
    naming the parameter. ``overwrite="own"`` becomes ``ReplaceOwn("notebook <notebook>")``: a rerun replaces
    only a run this notebook made (:func:`depthg.train.train`)."""
    for name, kind in {**NOTEBOOK_PARAMETERS, **NOTEBOOK_OVERRIDES.get(notebook, {})}.items():
        if name in namespace:
            namespace[name] = _checked(name, namespace[name], kind, notebook)


def _checked(name: str, value: Any, kind: str | tuple[str, bool], notebook: str) -> Any:
    """One parameter's value checked and converted (:func:`validate_parameters`)."""
    if isinstance(kind, tuple):
        key, none_ok = kind
        if value is None and none_ok:
            return None
        try:
            return check_value(key, str(value) if isinstance(value, os.PathLike) else value)
        except ConfigError as err:
            raise ConfigError(f"notebook parameter {name!r}: {err}") from None
    if kind == "seed_or_median" and value == "median":
        return value
    if kind == "seed_or_median":
        return _checked(name, value, ("seed", False), notebook)
    if kind == "preset":
        try:
            return check_preset(value)
        except ConfigError as err:
            raise ConfigError(f"notebook parameter {name!r}: {err}") from None
    if kind == "path":
        if isinstance(value, os.PathLike) or (isinstance(value, str) and value):
            return value
        raise ConfigError(f"notebook parameter {name!r} = {value!r}: expected a path")
    if kind == "names":
        names = value.split(",") if isinstance(value, str) else value
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            return [n.strip() for n in names if n.strip()]
        raise ConfigError(f"notebook parameter {name!r} = {value!r}: expected a list of names or one comma-separated string")
    parsed = load_yaml(value, f"notebook parameter {name!r}") if isinstance(value, str) else value
    if kind == "overwrite" and parsed == "own":
        return ReplaceOwn(f"notebook {notebook}")
    if kind == "sliders" and parsed == "auto":
        return parsed
    if kind in ("bool", "overwrite", "sliders") and isinstance(parsed, bool):
        return parsed
    if kind == "count" and isinstance(parsed, int) and not isinstance(parsed, bool) and parsed >= 1:
        return parsed
    expected = {"bool": "true or false", "overwrite": 'true, false or "own"', "sliders": 'true, false or "auto"',
                "count": "an integer >= 1"}[kind]
    raise ConfigError(f"notebook parameter {name!r} = {value!r}: expected {expected}")


def backbone_problem(name: str, weights: str | None, **timm_kwargs: Any) -> str | None:
    """None when the backbone ``name`` loads with ``weights``, else why not (the loader's own message)."""
    try:
        load_backbone(name, weights, **timm_kwargs)
        return None
    except Exception as err:  # missing file, unreachable URL, missing embedded weights: all are reported
        return f"{type(err).__name__}: {err}"


@dataclass
class RunChoice:
    """What a training notebook runs: ``config``; ``real`` is True for the preset on the real dataset;
    ``reasons`` says why the real preset does not run; ``notes`` what else was substituted."""

    config: Config
    real: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    headline: str = ""

    def explain(self) -> str:
        """The lines the notebook prints first: what runs, why, and the key settings."""
        c = self.config
        lines = [self.headline, *self.notes]
        lines.append(f"backbone={c.backbone} weights={c.weights} steps={c.steps} batch={c.batch_size} "
                     f"sampling={c.depth_sampling} S={c.feature_samples} depth_similarity={c.depth_similarity} "
                     f"use_depth={c.use_depth} -> {shown_path(c.output_dir)}")
        return "\n".join(lines)


def choose_run(dataset: str, preset: str, data_dir: str | os.PathLike | None, weights: str | None, *,
               mode: str = "paper", seed: int = 0, device: str = "auto", output_dir: str | os.PathLike,
               cache_dir: str | os.PathLike | None = None, smoke: bool = False, steps: int | None = None,
               batch_size: int | None = None) -> RunChoice:
    """The real preset on the real dataset when both the dataset folder and the backbone weights are given;
    the embedded default (``synthetic`` preset) when neither is, with the reasons. A ``data_dir`` or ``weights``
    that is given but missing (a typo) is an error, never a silent fall back to the synthetic world.

    Args:
        dataset: the dataset's name for the message ("Cityscapes", "COCO-Stuff-27", "Potsdam-3").
        preset: the Config preset for the real data (e.g. ``cityscapes_vitb8``, or ``stego``).
        data_dir: the dataset root (None: the synthetic world); weights: a DINO ``.pth``, ``"dino"``, a URL
            or ``"embedded"`` (None: the synthetic world).
        output_dir, cache_dir: relative paths are taken from the repository root (:func:`at_root`); cache_dir
            None is the Config default.
        smoke: on the embedded default, shrink everything to :data:`SMOKE` (the CI smoke test).
        steps, batch_size: override the preset's when given.
    """
    data_dir = at_root(data_dir)
    cache_dir = at_root(cache_dir if cache_dir is not None else Config().cache_dir)
    reasons = _missing_real_run(preset, data_dir, weights, smoke)
    common = dict(seed=seed, device=device, output_dir=str(at_root(output_dir)), cache_dir=str(cache_dir))
    notes: list[str] = []
    if not reasons:
        backbone = dict(backbone="embedded", weights=None) if weights == "embedded" else dict(weights=str(weights))
        cfg = Config.preset(preset, mode=mode, data_dir=str(data_dir), **common, **backbone)
        headline = f"RUNNING the {preset!r} preset ({mode} mode) on {shown_path(data_dir)} with weights {weights}"
    else:
        headline = (f"NOT running the {dataset} preset: " + "; ".join(reasons) + ".\n"
                    "-> running the embedded default instead: the synthetic world with the `synthetic` preset.")
        cfg = Config.preset("synthetic", mode=mode, **common)
        if smoke:
            cfg = cfg.replace(**SMOKE)
            notes.append("   (smoke run: tiny world, a tiny RANDOM ViT and 4 steps -- the pipeline runs, the numbers "
                         "mean nothing)")
        elif problem := backbone_problem(cfg.backbone, cfg.weights):
            notes.append(f"   the embedded backbone is not available ({problem})\n"
                         "   -> using a small RANDOM ViT-S/8-shaped backbone: the features carry no semantics.")
            cfg = cfg.replace(**RANDOM_BACKBONE)
    if steps is not None:  # validated as given: 2.7 steps is an error, not 2
        cfg = cfg.replace(steps=steps)
    if batch_size is not None:
        cfg = cfg.replace(batch_size=batch_size)
    return RunChoice(cfg, not reasons, reasons, notes, headline)


def _missing_real_run(preset: str, data_dir: Path | None, weights: str | None, smoke: bool) -> list[str]:
    """Why the real preset cannot run: nothing given (the reasons for the fall back), or an error for what was
    given but does not work (a missing dataset folder, weights that do not load)."""
    check_preset(preset)
    shown = None if data_dir is None else shown_path(data_dir)
    if data_dir is None and weights is None:
        return ["dataset not found (data_dir=None)", "no backbone weights given (weights=None)"]
    if smoke and (data_dir is None or not data_dir.is_dir() or weights is None):  # CI: whatever is there
        return [f"dataset not found (data_dir={shown!r})"] + (["no backbone weights given"] if weights is None else [])
    if data_dir is None or weights is None:
        raise ConfigError(f"notebook parameters data_dir={shown!r} and weights={weights!r}: the real preset needs "
                          "both; give both, or neither for the synthetic world")
    if not data_dir.is_dir():
        raise ConfigError(f"notebook parameter data_dir={shown!r}: no such folder (a typo?); give the dataset root, or "
                          "data_dir=None for the synthetic world")
    if smoke:
        return []
    name = "embedded" if weights == "embedded" else Config.preset(preset).backbone
    problem = backbone_problem(name, None if weights == "embedded" else weights)
    if problem:
        raise ConfigError(f"notebook parameter weights={weights!r} cannot be loaded: {problem}")
    return []


def _data_root(cfg: Config) -> Path:
    """The dataset root of a finished run: its synthetic world as it is (training rendered and announced it),
    else :func:`depthg.data.prepare.dataset_root` (``data_dir``, or the world rendered if it went missing)."""
    if cfg.data_dir is None and world_folder(cfg).is_dir():
        return world_folder(cfg)
    return dataset_root(cfg, progress=False)


@dataclass
class TrainedRun:
    """A finished run loaded back: its config and fidelity choices, the frozen backbone, the trained head and
    probes (final weights, eval mode), the validation set and its palette, and the device they are on."""

    config: Config
    fidelity: Fidelity
    backbone: Backbone
    model: Segmenter
    val_set: Any
    palette: np.ndarray
    device: torch.device


def load_trained(run: str | os.PathLike | dict[str, Any], device: str | torch.device = "auto",
                 backbone: Backbone | None = None, checkpoint: str = "checkpoint_last.pt") -> TrainedRun:
    """Load a run's ``checkpoint`` (default: the final weights) with its config.

    ``run`` is the dict :func:`depthg.train.train` returned, its ``results.json`` or the run folder.
    ``backbone``: reuse one already loaded (several runs on the same backbone); otherwise it is built from
    the config. The learned local-hidden-positive buffers (``lhp.*``) are not needed to predict and are
    skipped.
    """
    if not isinstance(run, dict):
        path = at_root(run)
        run = json.loads((path if path.suffix == ".json" else path / "results.json").read_text())
    cfg = Config.from_dict(run["config"])
    # a run started in the root stores root-relative paths; make them work from here
    cfg = cfg.replace(**{k: str(at_root(getattr(cfg, k))) for k in ("output_dir", "cache_dir", "data_dir")
                         if getattr(cfg, k) is not None})
    device = get_device(device if device != "auto" else cfg.device)
    val_set = validation_dataset(cfg, _data_root(cfg))
    if backbone is None:
        with warnings.catch_warnings():
            # training already warned that a random backbone means nothing; loading it again need not repeat it
            warnings.filterwarnings("ignore", message=".*has random weights", category=UserWarning)
            backbone = build_backbone(cfg)
    backbone = backbone.to(device)
    model = build_models(cfg, backbone.embed_dim, int(val_set.n_classes))
    path = Path(cfg.output_dir) / checkpoint
    load_weights(model, load_checkpoint(path)["model"], path, skip="lhp.")
    palette = getattr(val_set, "palette", None)
    palette = get_palette(int(val_set.n_classes)) if palette is None else np.asarray(palette)
    return TrainedRun(cfg, fidelity(cfg), backbone, model.to(device).eval(), val_set, palette, device)


@torch.no_grad()
def predict_examples(trained: TrainedRun, assignment: Any, n: int = 4) -> dict[str, list[Any]]:
    """Predictions on the first ``n`` validation images at the evaluation resolution (flip averaging as
    configured, no CRF). ``assignment`` maps cluster ids to classes (the Hungarian assignment of the run's
    evaluation, ``results["final"]["metrics"]["cluster"]["assignment"]``; -1 = unmatched).

    Returns {"images": (3, R, R) tensors, "labels", "cluster" (matched to classes), "linear"}, each a list of
    (R, R) maps, R = ``eval_res``.
    """
    cfg, m = trained.config, trained.model
    items = [resize_center_crop(trained.val_set[i], res=cfg.eval_res, resize=trained.fidelity.resize)
             for i in range(min(n, len(trained.val_set)))]
    img = torch.stack([it["img"] for it in items]).to(trained.device)
    opts = EvalOptions(flip=cfg.eval_flip, crf=False)
    cluster_logp, linear_logp = predict_batch(trained.backbone, m, img, tuple(img.shape[-2:]), opts)
    matched = torch.as_tensor(assignment)[cluster_logp.argmax(1).cpu()]  # cluster id -> class (-1: unmatched)
    return {"images": [it["img"] for it in items], "labels": [it["label"] for it in items],
            "cluster": list(matched), "linear": list(linear_logp.argmax(1).cpu())}


# config keys that say where a run lives or runs, not what it is
_WHERE = ("output_dir", "cache_dir", "data_dir", "device")


def as_overrides(values: Mapping[str, Any]) -> list[str]:
    """{key: value} as the ``key=value`` strings the CLI and :mod:`depthg.lab.ablation` take (values as JSON,
    which the config parses as YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def figure_runs(variants: Mapping[str, str], seed: int, runs_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                steps: int | None = None, smoke: bool = False, train_if_missing: bool = True,
                world_seed: int | None = None, overrides: Sequence[str] = (),
                ablation_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """The finished runs of the miniature reproduction that the figures show, {label: results dict + "dir"}.

    ``variants`` = {label: ablation variant}, e.g. {"STEGO": "stego", "DepthG": "depthg"}. Each
    run is read from ``runs_dir/ablation/<variant>/seed<seed>/results.json`` (what ``python -m depthg
    ablate --out-dir runs/ablation`` writes), or ``runs_dir/ablation/world<w>/...`` for ``world_seed`` w;
    missing runs are trained here with :func:`depthg.lab.ablation.run_ablation` (same
    configs, same folders), or, with ``train_if_missing=False``, reported with the command that makes them.
    A folder that holds a run with another config (a smoke run, other steps) is an error, never reused.
    ``world_seed``: the synthetic world the runs were trained on (``ablate --world-seed``; None: the preset's).
    ``overrides``: the key=value changes the reproduction's command gave every run (e.g. ``world_n_val=200``).
    ``ablation_dir``: the ``--out-dir`` of that ablation instead of ``runs_dir/ablation`` (e.g. the folder the
    held-out table was run in, so its runs are shown, not trained again).
    ``smoke`` shrinks everything to :data:`SMOKE`; without the embedded weights :data:`RANDOM_BACKBONE`
    stands in (said on stdout).
    """
    runs_dir = Path(runs_dir)
    overrides = [f"cache_dir={cache_dir}", *overrides]
    if smoke:
        overrides += as_overrides({k: v for k, v in SMOKE.items() if k != "steps"})
        steps = SMOKE["steps"]
    elif problem := backbone_problem("embedded", None):
        print(f"The embedded backbone is not available ({problem}).\n-> runs trained here use a small RANDOM "
              "ViT; their figures show mechanics, not semantics.")
        overrides += as_overrides(RANDOM_BACKBONE)
    out_dir = runs_dir / "ablation" if ablation_dir is None else Path(ablation_dir)
    # ablate --world-seed w puts a world's runs in out_dir/world<w>
    run_dir = out_dir if world_seed is None else out_dir / f"world{world_seed}"
    configs = {label: variant_config(v, seed, steps=steps, out_dir=run_dir, overrides=overrides,
                                     world_seed=world_seed) for label, v in variants.items()}
    paths = {label: Path(cfg.output_dir) / "results.json" for label, cfg in configs.items()}
    missing = [variants[label] for label, p in paths.items() if not p.is_file()]
    for label, path in paths.items():
        if path.is_file():  # a run in that folder must be the one asked for (not, e.g., a smoke run)
            stored = json.loads(path.read_text())
            wanted = configs[label].to_dict()
            differ = sorted(k for k, v in Config.from_dict(stored["config"]).to_dict().items()
                            if k not in _WHERE and v != wanted[k])
            if differ:
                raise FileExistsError(f"{path} holds a run with another config (differs in {', '.join(differ)}); "
                                      "move it away or give another runs_dir")
            # a run made with other backbone weights (e.g. before the embedded file changed) is redone
            if not made_with_weights(stored, backbone_sha256(configs[label])):
                print(f"{shown_path(path)}: made with other backbone weights than today's; it is trained again")
                missing.append(variants[label])
    if missing and not train_if_missing:
        world = "" if world_seed is None else f" --world-seed {world_seed}"
        raise FileNotFoundError(f"no runs (or only runs of other weights) at {[str(p) for p in paths.values()]}; make them with: python -m depthg "
                                f"ablate{world} --seeds {seed} --variants {' '.join(missing)} --out-dir {out_dir} "
                                f"{' '.join(overrides[1:])} "
                                "(or set train_if_missing=True)")
    if missing:
        print(f"training {missing} (seed {seed}) with depthg.lab.ablation.run_ablation -- the same runs "
              "`python -m depthg ablate` makes")
        run_ablation(variants=missing, seeds=(seed,), steps=steps, out_dir=out_dir, overrides=overrides,
                     progress=not smoke, world_seeds=None if world_seed is None else [world_seed])
    results = {}
    for label, path in paths.items():
        print(f"{label}: reading {shown_path(path)}")
        results[label] = {**json.loads(path.read_text()), "dir": path.parent}
    return results


def describe_run(result: Mapping[str, Any]) -> str:
    """One sentence for a caption: the data, the backbone and its weights, steps, batch, resolution, mode, seed."""
    c = result["config"]
    if c["data_dir"] is None:
        data = (f"synthetic world ({c['world_n_train']} train / {c['world_n_val']} val images at "
                f"{c['world_size'][0]}x{c['world_size'][1]}, world seed {c['world_seed']})")
    else:
        data = c["data_dir"]
    if c["backbone"] == "embedded":
        pth = Path(depthg.__file__).parent / "weights" / "embedded_vit.pth"
        weights = f"the embedded self-supervised ViT, DINO + patch losses (depthg/weights/embedded_vit.pth, sha256 {sha256_file(pth)[:12]}…)"
    elif c["weights"]:
        weights = f"{c['backbone']} with weights {c['weights']}"
    else:
        weights = f"{c['backbone']} with RANDOM weights {c['backbone_kwargs'] or ''}"
    return (f"data: {data}; backbone: {weights}; {result['steps']} steps, batch {c['batch_size']}, res {c['res']}, "
            f"{c['mode']} mode, seed {c['seed']}")


def example_items(trained: TrainedRun, n: int, crop: bool = True) -> list[dict[str, Any]]:
    """The first ``n`` validation images resized and centre-cropped as the evaluation does (paper-mode
    resize; ``crop=False``: as stored), each {"img", "label", "key", ...}; on the synthetic world with its
    exact depth ("depth", metres), so that depth figures can be drawn (real datasets: no "depth" key)."""
    cfg = trained.config
    root = _data_root(cfg)
    source = trained.val_set
    if cfg.data_dir is None and (root / "depth_gt").is_dir():
        source = build_dataset(cfg.dataset, root, cfg.val_split, depth_dir=root / "depth_gt", classes=cfg.classes)
    items = [source[i] for i in range(min(n, len(source)))]
    return [resize_center_crop(it, res=cfg.eval_res) for it in items] if crop else items
