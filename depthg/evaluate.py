"""Evaluate a trained head with the paper's protocol (docs/method.md §9).

Per image: resize + centre-crop to ``eval_res``; code of the image (averaged with the flipped image's
code when ``flip``), upsampled bilinearly to the label size; cluster probe ``log_softmax(2 cos)`` and
linear probe ``log_softmax``; optional dense CRF; argmax. Metrics are accumulated over the whole split
(one Hungarian matching for the clusters). The trainer's validation uses :func:`evaluate_model` with
``flip=False, crf=False``, as the released training-time validation does.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from depthg.build import (Fidelity, Segmenter, build_backbone, build_models, fidelity, load_checkpoint, load_weights,
                          validation_dataset)
from depthg.config import Config, apply_overrides
from depthg.crf import crf_predictions, dense_crf
from depthg.data.common import default_palette
from depthg.data.prepare import dataset_root
from depthg.data.transforms import PAPER_RESIZE, Resize, resize_center_crop
from depthg.features import backbone_fingerprint
from depthg.metrics import UnsupervisedMetrics, category_scores
from depthg.precision import amp_context
from depthg.utils import (DepthGError, atomic_write, get_device, inside, owned_output, partial_dir, publish_dir, sha256_file,
                          timed, transient_bar_leave, write_json)

__all__ = ["evaluate_model", "EvalOptions", "evaluate_checkpoint", "EvaluationError", "predict_batch"]


class EvaluationError(DepthGError, RuntimeError):
    """Evaluation cannot run (missing data, incompatible checkpoint, ...)."""


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "img": torch.stack([it["img"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "key": [it.get("key", str(i)) for i, it in enumerate(items)],
    }


@torch.no_grad()
def predict_batch(backbone: nn.Module, model: Segmenter, img: torch.Tensor, out_size: tuple[int, int],
                  opts: EvalOptions | None = None,
                  amp: Callable[[], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cluster log-probs, linear log-probs), each (B, K, H, W) at ``out_size``, for images (B, 3, h, w);
    ``model`` holds the head and the probes; of ``opts`` (default :class:`EvalOptions`) only ``flip`` (average
    with the mirrored image's code) and ``crf`` (refine with the dense CRF) act here."""
    flip, crf = (opts.flip, opts.crf) if opts is not None else (True, False)
    head, cluster, linear = model.head, model.cluster, model.linear
    ctx = amp if amp is not None else nullcontext
    with ctx():
        code = head(backbone(img)).float()
        if flip:
            code_flip = head(backbone(img.flip(-1))).float().flip(-1)
            code = (code + code_flip) / 2
    code = F.interpolate(code, size=out_size, mode="bilinear", align_corners=False)
    _, cluster_logp = cluster(code, alpha=2.0)
    linear_logp = F.log_softmax(linear(code), dim=1)
    if crf:  # CRF probabilities back to log-probabilities, image by image
        images = img.float().cpu()
        cluster_logp, linear_logp = (
            torch.stack([dense_crf(im, lp.cpu()).clamp_min(1e-12).log() for im, lp in zip(images, logp)]).to(code.device)
            for logp in (cluster_logp, linear_logp)
        )
    return cluster_logp, linear_logp


def _metrics_dict(result: dict[str, Any], class_names: Sequence[str] | None,
                  categories: list[str] | None = None) -> dict[str, Any]:
    out = {
        "accuracy": float(result["accuracy"]),
        "miou": float(result["miou"]),
        "iou": [float(v) for v in result["iou"]],
    }
    if class_names is not None:
        out["iou_per_class"] = {name: float(v) for name, v in zip(class_names, result["iou"])}
    if categories is not None:  # e.g. Cityscapes' 7 categories beside its classes
        scores = category_scores(result, categories)
        out["category_miou"], out["iou_per_category"] = scores["miou"], scores["iou_per_category"]
    if "assignment" in result and result["assignment"] is not None:
        out["assignment"] = [int(a) for a in result["assignment"]]
    return out


@dataclass(frozen=True)
class EvalOptions:
    """How :func:`evaluate_model` evaluates (the protocol above) and what it writes besides the metrics."""

    res: int | None = 320  # resize + centre-crop size (None: items as they are)
    resize: Resize = PAPER_RESIZE  # the run's resize (``depthg.data.transforms``)
    flip: bool = True
    crf: bool = False
    batch_size: int = 8
    max_images: int | None = None  # None: the whole dataset
    num_workers: int = 0
    crf_workers: int = 0  # processes running the dense CRF (0 or 1: in this process; the same labels)
    progress: bool = True
    predictions_dir: Path | None = None  # palette PNGs of the first ``n_predictions`` images go here
    n_predictions: int = 0

    @classmethod
    def of(cls, cfg: Config, fid: Fidelity, **changes: Any) -> "EvalOptions":
        """The evaluation protocol of ``cfg`` (eval_res, eval_flip, eval_crf, eval_batch_size, eval_max_images)
        with the run's resize (``fid``), loader workers (num_workers) and CRF processes (crf_workers, None =
        num_workers), with ``changes`` on top."""
        crf_workers = cfg.num_workers if cfg.crf_workers is None else cfg.crf_workers
        values = dict(res=cfg.eval_res, resize=fid.resize, flip=cfg.eval_flip, crf=cfg.eval_crf,
                      batch_size=cfg.eval_batch_size, max_images=cfg.eval_max_images, num_workers=cfg.num_workers,
                      crf_workers=crf_workers)
        return cls(**{**values, **changes})


Predictions = tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]  # keys, cluster, linear, labels (b, H, W)


def _scores(backbone: nn.Module, model: Segmenter, batch: dict[str, Any], opts: EvalOptions, device: torch.device,
            amp: Callable[[], Any] | None) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, labels on ``device``, cluster log-probs, linear log-probs) of one loader batch, refused when the
    model's predictions are not finite."""
    label = batch["label"].to(device)
    cluster_logp, linear_logp = predict_batch(backbone, model, batch["img"].to(device), tuple(label.shape[-2:]), opts,
                                              amp=amp)
    if not (torch.isfinite(cluster_logp).all() and torch.isfinite(linear_logp).all()):
        raise EvaluationError(f"the model's predictions for {batch['key'][0]!r} (and its batch) are NaN or infinite: "
                              "its weights are not finite or overflow; these metrics would mean nothing")
    return batch, label, cluster_logp, linear_logp


def _predictions(backbone: nn.Module, model: Segmenter, loader: Iterable[dict[str, Any]], opts: EvalOptions,
                 device: torch.device, amp: Callable[[], Any] | None) -> Iterator[Predictions]:
    """The predicted classes of the loader's images, in its order: per batch, or per image with the dense CRF,
    which runs on ``opts.crf_workers`` processes while the next batches are scored (``depthg.crf``)."""
    batches = (_scores(backbone, model, batch, replace(opts, crf=False), device, amp) for batch in loader)
    if not opts.crf:
        for batch, label, cluster_logp, linear_logp in batches:
            yield batch["key"], cluster_logp.argmax(1), linear_logp.argmax(1), label
        return
    waiting: deque[tuple[str, torch.Tensor]] = deque()  # (key, label) of the images handed to the CRF, in order

    def images() -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        for batch, label, cluster_logp, linear_logp in batches:
            for i, key in enumerate(batch["key"]):
                waiting.append((key, label[i]))
                yield batch["img"][i].float(), [cluster_logp[i].cpu(), linear_logp[i].cpu()]

    for cluster_pred, linear_pred in crf_predictions(images(), opts.crf_workers):
        key, label = waiting.popleft()
        yield [key], cluster_pred.to(device)[None], linear_pred.to(device)[None], label[None]


@timed("evaluation")
def evaluate_model(backbone: nn.Module, model: Segmenter, dataset: Any, opts: EvalOptions = EvalOptions(),
                   device: torch.device | str | None = None, amp: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Cluster (Hungarian) and linear metrics of ``model``'s head and probes on ``dataset`` (the protocol above).

    Args:
        dataset: items {"img" (3, H, W) in [0, 1], "label" (H, W) int64, -1 = ignore}; ``n_classes`` and
            optional ``class_names`` / ``palette`` attributes.
        opts: resolution, resize, flip, CRF, batching and the optional prediction PNGs (the first
            N images' matched cluster, linear and ground-truth maps).

    Returns {"cluster": {accuracy, miou, iou, iou_per_class, assignment}, "linear": {...}, "n_images",
    "protocol"}, in percent.
    """
    head, cluster, linear = model.head, model.cluster, model.linear
    device = get_device(device or "auto")
    n_classes = int(dataset.n_classes)
    n_clusters = int(getattr(cluster, "n_clusters", n_classes))
    extra = max(n_clusters - n_classes, 0)
    class_names = list(getattr(dataset, "class_names", [])) or None
    categories = getattr(dataset, "class_categories", None)
    n = len(dataset) if opts.max_images is None else min(opts.max_images, len(dataset))
    if n == 0:
        raise EvaluationError(f"evaluation dataset {dataset!r} is empty")
    transform = (lambda item: item) if opts.res is None else partial(resize_center_crop, res=opts.res, resize=opts.resize)
    was_training = [m.training for m in (head, cluster, linear)]
    for m in (head, cluster, linear):
        m.eval()
    cluster_metrics = UnsupervisedMetrics(n_classes, extra_clusters=extra, hungarian=True)
    linear_metrics = UnsupervisedMetrics(n_classes, extra_clusters=0, hungarian=False)
    kept: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = torch.utils.data.DataLoader(subset, batch_size=opts.batch_size, shuffle=False,
                                         num_workers=opts.num_workers, collate_fn=lambda items: _collate([transform(it) for it in items]))
    bar = tqdm(loader, desc="eval", disable=not opts.progress, leave=transient_bar_leave())
    for keys, cluster_pred, linear_pred, label in _predictions(backbone, model, bar, opts, device, amp):
        cluster_metrics.update(cluster_pred, label)
        linear_metrics.update(linear_pred, label)
        for key, c, l, t in zip(keys, cluster_pred, linear_pred, label):
            if len(kept) < opts.n_predictions:
                kept.append((key, c.cpu(), l.cpu(), t.cpu()))
    for m, flag in zip((head, cluster, linear), was_training):
        m.train(flag)
    cluster_res = cluster_metrics.compute()
    linear_res = linear_metrics.compute()
    result = {
        "cluster": _metrics_dict(cluster_res, class_names, categories),
        "linear": _metrics_dict(linear_res, class_names, categories),
        "n_images": n,
        "protocol": {"res": opts.res, "resize_mode": opts.resize.name, "flip": opts.flip, "crf": opts.crf,
                     "cluster": "log_softmax(2 cos), Hungarian matching over the split",
                     "linear": "log_softmax(logits), no matching", "units": "percent"},
    }
    if result["linear"].get("assignment") is not None:
        result["linear"].pop("assignment")
    if opts.predictions_dir is not None and kept:
        palette = np.asarray(getattr(dataset, "palette", default_palette(n_classes)), dtype=np.uint8)
        _write_predictions(Path(opts.predictions_dir), kept, cluster_res.get("assignment"), palette)
    return result


def _colour(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    valid = (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    return out


def _write_predictions(out_dir: Path, kept: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]],
                       assignment: Sequence[int] | None, palette: np.ndarray) -> None:
    """PNG triplets per image: matched cluster prediction, linear prediction, ground truth."""
    lut = np.asarray(assignment if assignment is not None else range(len(palette)), dtype=np.int64)
    for i, (key, c, l, t) in enumerate(kept):
        stem = f"{i:04d}_" + key.replace("/", "_")
        cluster_cls = lut[c.numpy().clip(0, len(lut) - 1)]
        for suffix, arr in (("cluster", cluster_cls), ("linear", l.numpy()), ("gt", t.numpy())):
            path = out_dir / f"{stem}_{suffix}.png"
            with atomic_write(path, "wb") as handle:
                Image.fromarray(_colour(arr, palette)).save(handle, format="PNG")


#: what marks a file as an evaluation this command wrote (it may replace it)
EVAL_KIND = "depthg evaluation"
#: the marker of a predictions folder (the PNGs of one evaluation; replaced whole by the next)
PREDICTIONS_MARKER = "predictions.json"
_PREDICTION_PNG = re.compile(r"\d{4}_.*_(cluster|linear|gt)\.png")


def is_evaluation(path: Path) -> bool:
    """Whether ``path`` is an evaluation JSON of depthg (its ``kind``, or the keys every evaluation holds)."""
    try:
        data = json.loads(path.read_bytes()[: 1 << 26])
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("kind") == EVAL_KIND or {"checkpoint_sha256", "protocol"} <= set(data))


def is_predictions_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an evaluation's prediction PNGs (its marker, or only such PNGs)."""
    names = [p.name for p in folder.iterdir()]
    return PREDICTIONS_MARKER in names or all(_PREDICTION_PNG.fullmatch(n) for n in names)


def check_finite_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a checkpoint whose weights hold NaN or infinite values (a diverged run)."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise EvaluationError(f"{path}: the weight {key!r} holds NaN or infinite values (the run diverged); "
                                  "evaluating it would give meaningless numbers")


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), *, data_root: str | Path | None = None,
                        output: str | Path | None = None, n_predictions: int = 0, progress: bool = True) -> dict[str, Any]:
    """Evaluate a training checkpoint on its config's validation split; write ``<stem>_eval.json``.

    ``overrides`` are ``key=value`` config changes (``eval_crf=false``, ``data_dir=...``); ``data_root``
    defaults to ``cfg.data_dir`` or the synthetic world; ``n_predictions`` PNGs go into the folder named like
    the JSON (replaced whole by the next evaluation written there). ``output`` is written only where nothing
    but an earlier evaluation is; weights that are not finite are refused.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    check_finite_weights(ckpt["model"], path)
    output = Path(output) if output is not None else path.with_name(f"{path.stem}_eval.json")
    predictions = output.with_suffix("")
    if output.resolve() == path.resolve():
        raise EvaluationError(f"--output {output} is the checkpoint itself; choose another file for the results")
    owned_output(output, "evaluation results", is_evaluation)
    owned_output(predictions, "predictions folder", is_predictions_folder)
    cfg = apply_overrides(Config.from_dict(ckpt["config"], source=str(path)), list(overrides))
    root = data_root if data_root is not None else dataset_root(cfg, progress=False)
    if inside(output, root):  # nothing is written into a dataset folder
        raise EvaluationError(f"refusing to write the evaluation {output}: it is inside the dataset folder {root}; "
                              "pass --output outside it")
    dataset = validation_dataset(cfg, root)
    device = get_device(cfg.device)
    backbone = build_backbone(cfg, device)
    trained_on = (ckpt.get("data") or {}).get("backbone_sha256")
    if trained_on is not None and backbone_fingerprint(backbone) != trained_on:
        raise EvaluationError(f"{path}: the backbone {cfg.backbone!r} (weights {cfg.weights!r}) now loads other weights "
                              "than the head was trained on; evaluate with those weights or train again")
    model = build_models(cfg, backbone.embed_dim, int(dataset.n_classes))
    load_weights(model, ckpt["model"], path, skip="lhp.")
    model.to(device)
    amp, _ = amp_context(cfg, device)
    options = EvalOptions.of(cfg, fidelity(cfg), progress=progress, n_predictions=n_predictions,
                             predictions_dir=partial_dir(predictions) if n_predictions else None)
    if options.predictions_dir is not None and options.predictions_dir.exists():
        shutil.rmtree(options.predictions_dir)  # left by a killed evaluation
    try:
        metrics = evaluate_model(backbone, model, dataset, options, device=device, amp=amp)
    except BaseException:  # an error, Ctrl-C: no half-written predictions folder stays behind
        if options.predictions_dir is not None:
            shutil.rmtree(options.predictions_dir, ignore_errors=True)
        raise
    result = {
        "kind": EVAL_KIND, "checkpoint": str(path), "checkpoint_sha256": sha256_file(path),
        "checkpoint_step": int(ckpt["step"]), "dataset": cfg.dataset, "data_root": str(root), "split": cfg.val_split,
        **metrics, "config": cfg.to_dict(),
    }
    _publish_predictions(options.predictions_dir, predictions, result)
    write_json(output, result)  # strict JSON: an IoU without a value (class absent) is null
    result["output"] = str(output)
    return result


def _publish_predictions(work: Path | None, predictions: Path, result: dict[str, Any]) -> None:
    """Replace the predictions folder of the output whole: by ``work`` (with its marker), or by nothing when this
    evaluation wrote no predictions, so one folder never mixes two evaluations' PNGs."""
    if work is None or not work.is_dir():
        if predictions.is_dir():
            shutil.rmtree(predictions)
        return
    write_json(work / PREDICTIONS_MARKER, {"kind": "depthg predictions", "checkpoint": result["checkpoint"],
                                           "protocol": result["protocol"], "n_images": result["n_images"]})
    publish_dir(work, predictions)
