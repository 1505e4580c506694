"""Evaluate a trained head with the paper's protocol (docs/method.md §9).

Per validation image:

1. resize the short side to ``eval_res`` and centre-crop ``eval_res x eval_res`` (released: nearest for the
   image too; paper mode: bilinear image, nearest label -- ``depthg.data.transforms.resize_center_crop``);
2. frozen backbone -> head code on the patch grid; with ``flip=True`` the code of the horizontally flipped
   image is flipped back and averaged with it (test-time augmentation on the code grid);
3. the code is bilinearly upsampled (align_corners=False) to the label size *before* the 1x1 probes;
4. cluster probe: log_softmax(2 * cos(code, centroids)); linear probe: log_softmax(logits);
5. optional dense CRF on both outputs (``depthg.crf``: 10 iterations, gaussian sxy 1 compat 3,
   bilateral sxy 67 srgb 3 compat 4), then argmax;
6. metrics accumulated over the whole split (``depthg.metrics.UnsupervisedMetrics``): the cluster
   predictions get one Hungarian matching on the split's confusion matrix, the linear ones none.
   Accuracy = pixel accuracy and mIoU = mean IoU over classes present in prediction or ground truth,
   both in percent.

``evaluate_model`` is the building block (also used by the trainer's validation, with ``flip=False`` and
``crf=False`` as the released training-time validation does); ``evaluate_checkpoint`` loads a training
checkpoint, evaluates it and writes a results JSON holding the config and the checkpoint's SHA-256, plus
optional prediction PNGs in the dataset's palette.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from depthg.backbone import load_backbone
from depthg.build import amp_context, build_models, load_checkpoint, validation_dataset
from depthg.config import Config, apply_overrides
from depthg.crf import dense_crf
from depthg.data.prepare import dataset_root
from depthg.data.transforms import resize_center_crop
from depthg.features import backbone_fingerprint
from depthg.metrics import UnsupervisedMetrics
from depthg.utils import DepthGError, atomic_write, get_device, inside, sha256_file

__all__ = ["evaluate_model", "evaluate_checkpoint", "EvaluationError", "predict_batch"]


class EvaluationError(DepthGError, RuntimeError):
    """Evaluation cannot run (missing data, incompatible checkpoint, ...)."""


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "img": torch.stack([it["img"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "key": [it.get("key", str(i)) for i, it in enumerate(items)],
    }


@torch.no_grad()
def predict_batch(backbone: nn.Module, head: nn.Module, cluster: nn.Module, linear: nn.Module, img: torch.Tensor,
                  out_size: tuple[int, int], flip: bool = True, crf: bool = False,
                  amp: Callable[[], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cluster log-probs, linear log-probs), each (B, K, H, W) at ``out_size`` (steps 2-5 above)."""
    ctx = amp if amp is not None else nullcontext
    with ctx():
        code = head(backbone(img)).float()
        if flip:
            code_flip = head(backbone(img.flip(-1))).float().flip(-1)
            code = (code + code_flip) / 2
    code = F.interpolate(code, size=out_size, mode="bilinear", align_corners=False)
    _, cluster_logp = cluster(code, alpha=2.0)
    linear_logp = F.log_softmax(linear(code), dim=1)
    if crf:
        images = img.float().cpu()
        cluster_logp = torch.stack([
            dense_crf(im, lp.cpu()).clamp_min(1e-12).log() for im, lp in zip(images, cluster_logp)
        ]).to(code.device)
        linear_logp = torch.stack([
            dense_crf(im, lp.cpu()).clamp_min(1e-12).log() for im, lp in zip(images, linear_logp)
        ]).to(code.device)
    return cluster_logp, linear_logp


def _metrics_dict(result: dict[str, Any], class_names: Sequence[str] | None) -> dict[str, Any]:
    out = {
        "accuracy": float(result["accuracy"]),
        "miou": float(result["miou"]),
        "iou": [float(v) for v in result["iou"]],
    }
    if class_names is not None:
        out["iou_per_class"] = {name: float(v) for name, v in zip(class_names, result["iou"])}
    if "assignment" in result and result["assignment"] is not None:
        out["assignment"] = [int(a) for a in result["assignment"]]
    return out


def evaluate_model(backbone: nn.Module, head: nn.Module, cluster: nn.Module, linear: nn.Module, dataset: Any,
                   res: int | None = 320, mode: str = "paper", flip: bool = True, crf: bool = False,
                   batch_size: int = 8, device: torch.device | str | None = None, max_images: int | None = None,
                   progress: bool = True, amp: Callable[[], Any] | None = None,
                   predictions_dir: str | Path | None = None, n_predictions: int = 0,
                   num_workers: int = 0) -> dict[str, Any]:
    """Cluster (Hungarian) and linear metrics of a head on ``dataset`` (module docstring, steps 1-6).

    Args:
        dataset: items with "img" (3,H,W) in [0,1] and "label" (H,W) int64 (-1 ignore); ``n_classes``
            and optionally ``class_names`` / ``palette`` attributes.
        res: resize + centre-crop size (None: items are used as they are, all of one size).
        mode: "paper" | "released" image resizing (see module docstring).
        flip: horizontal-flip averaging of the code. crf: dense CRF on both outputs.
        max_images: evaluate only the first N images (None = all).
        predictions_dir / n_predictions: write the first N images' cluster (after matching), linear and
            ground-truth maps as palette PNGs.

    Returns:
        {"cluster": {accuracy, miou, iou, iou_per_class, assignment}, "linear": {...}, "n_images",
         "protocol": {...}} with accuracy/mIoU in percent.
    """
    device = get_device(device or "auto")
    n_classes = int(dataset.n_classes)
    n_clusters = int(getattr(cluster, "n_clusters", n_classes))
    extra = max(n_clusters - n_classes, 0)
    class_names = list(getattr(dataset, "class_names", [])) or None
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n == 0:
        raise EvaluationError(f"evaluation dataset {dataset!r} is empty")
    transform = partial(resize_center_crop, res=res, mode=mode) if res is not None else (lambda item: item)

    was_training = [m.training for m in (head, cluster, linear)]
    for m in (head, cluster, linear):
        m.eval()
    cluster_metrics = UnsupervisedMetrics(n_classes, extra_clusters=extra, hungarian=True)
    linear_metrics = UnsupervisedMetrics(n_classes, extra_clusters=0, hungarian=False)
    kept: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=lambda items: _collate([transform(it) for it in items]))
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        img = batch["img"].to(device)
        label = batch["label"].to(device)
        cluster_logp, linear_logp = predict_batch(backbone, head, cluster, linear, img, tuple(label.shape[-2:]),
                                                  flip=flip, crf=crf, amp=amp)
        cluster_pred, linear_pred = cluster_logp.argmax(1), linear_logp.argmax(1)
        cluster_metrics.update(cluster_pred, label)
        linear_metrics.update(linear_pred, label)
        for key, c, l, t in zip(batch["key"], cluster_pred, linear_pred, label):
            if len(kept) < n_predictions:
                kept.append((key, c.cpu(), l.cpu(), t.cpu()))
    for m, flag in zip((head, cluster, linear), was_training):
        m.train(flag)

    cluster_res = cluster_metrics.compute()
    linear_res = linear_metrics.compute()
    result = {
        "cluster": _metrics_dict(cluster_res, class_names),
        "linear": _metrics_dict(linear_res, class_names),
        "n_images": n,
        "protocol": {"res": res, "resize_mode": mode, "flip": flip, "crf": crf,
                     "cluster": "log_softmax(2 cos), Hungarian matching over the split",
                     "linear": "log_softmax(logits), no matching", "units": "percent"},
    }
    if result["linear"].get("assignment") is not None:
        result["linear"].pop("assignment")
    if predictions_dir is not None and kept:
        palette = np.asarray(getattr(dataset, "palette", _default_palette(n_classes)), dtype=np.uint8)
        _write_predictions(Path(predictions_dir), kept, cluster_res.get("assignment"), palette)
    return result


def _default_palette(n: int) -> np.ndarray:
    gen = np.random.default_rng(0)
    return gen.integers(0, 256, size=(n, 3), dtype=np.uint8)


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


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), *, data_root: str | Path | None = None,
                        output: str | Path | None = None, n_predictions: int = 0, progress: bool = True) -> dict[str, Any]:
    """Evaluate a training checkpoint on its config's validation split with the full protocol.

    Args:
        path: ``checkpoint_last.pt`` / ``checkpoint_best.pt`` written by ``depthg.train``.
        overrides: ``key=value`` config overrides (e.g. ``eval_crf=false``, ``eval_res=320``,
            ``data_dir=/data/cityscapes``, ``val_split=val``).
        data_root: the dataset root (default: ``cfg.data_dir``, or the synthetic world in the cache).
        output: results JSON path (default: next to the checkpoint, ``<stem>_eval.json``).
        n_predictions: write this many prediction PNGs next to the JSON.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    cfg = apply_overrides(Config.from_dict(ckpt["config"], source=str(path)), list(overrides))
    root = data_root if data_root is not None else _data_root(cfg)
    dataset = validation_dataset(cfg, root)
    device = get_device(cfg.device)
    backbone = load_backbone(cfg.backbone, cfg.weights, **cfg.backbone_kwargs).to(device)
    trained_on = (ckpt.get("data") or {}).get("backbone_sha256")
    if trained_on is not None and backbone_fingerprint(backbone) != trained_on:
        raise EvaluationError(f"{path}: the backbone {cfg.backbone!r} (weights {cfg.weights!r}) now loads other weights "
                              "than the head was trained on; evaluate with those weights or train again")
    model = build_models(cfg, backbone.embed_dim, int(dataset.n_classes))
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("lhp.")}
    model.load_state_dict(state)
    model.to(device)
    amp, _ = amp_context(cfg, device)
    output = Path(output) if output is not None else path.with_name(f"{path.stem}_eval.json")
    if inside(output, root):  # nothing is written into a dataset folder
        raise EvaluationError(f"refusing to write the evaluation {output}: it is inside the dataset folder {root}; "
                              "pass --output outside it")
    metrics = evaluate_model(backbone, model.head, model.cluster, model.linear, dataset, res=cfg.eval_res,
                             mode=cfg.mode, flip=cfg.eval_flip, crf=cfg.eval_crf, batch_size=cfg.eval_batch_size,
                             device=device, max_images=cfg.eval_max_images, progress=progress, amp=amp,
                             predictions_dir=output.with_suffix("") if n_predictions else None,
                             n_predictions=n_predictions, num_workers=cfg.num_workers)
    result = {
        "checkpoint": str(path), "checkpoint_sha256": sha256_file(path), "checkpoint_step": int(ckpt["step"]),
        "dataset": cfg.dataset, "data_root": str(root), "split": cfg.val_split, **metrics, "config": cfg.to_dict(),
    }
    with atomic_write(output, "w") as handle:
        json.dump(result, handle, indent=2)
    result["output"] = str(output)
    return result


def _data_root(cfg: Any) -> Path:
    """Dataset root: ``cfg.data_dir`` or the synthetic world that the data preparation renders."""
    return dataset_root(cfg, progress=False)
