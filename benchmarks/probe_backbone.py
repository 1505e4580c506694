"""Do a backbone's patch features carry the scene? Linear and kNN probes on synthetic-world labels.

Renders a small synthetic world (``make_world`` with a seed of its own), extracts frozen patch
features for every image, and scores two standard probes at the patch level:

* **linear probe**: multinomial logistic regression (L-BFGS) on standardised patch features, trained
  on the train split, scored on the val split;
* **kNN probe**: each val patch takes the majority label of its k=20 most cosine-similar train patches.

The target of a patch is the majority label of its 8x8 pixels (pixels of unlisted ids are ignored, as
is a patch with none labelled). Accuracy = fraction of val patches correct; mIoU = mean over the classes
present in the val targets of TP / (TP + FP + FN); both in percent. The same probes run on the same
architecture at random initialisation (timm's init, seed 0) and on raw pixels (each patch's 8x8x3
values), so a backbone's gain is read against both.

``--backbone`` takes ``depthg/weights/embedded_vit.json`` (default) or the ``teacher_backbone.json`` a
pretraining run exports every few steps, so progress can be checked during pretraining. World seeds:
1234 is the probe world on which recipe choices were made; 777 is the held-out world of the reported
numbers (see depthg/weights/MODEL_CARD.md). Usage::

    .venv/bin/python benchmarks/probe_backbone.py --world-seed 777 --role "held-out world: report" \\
        --world-dir ~/.cache/depthg/probe_world_777 --out benchmarks/results/probe_backbone.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from depthg import backbone as backbone_mod  # noqa: E402
from depthg.world.synthetic import GENERATOR_VERSION, make_world  # noqa: E402
from depthg.utils import atomic_write, command_line, sha256_file  # noqa: E402

PATCH = 8


def load_split(root: Path, split: str, label_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N,3,H,W) in [0,1] and label maps (N,H,W) in 0..K-1 (-1 = ignore) of one split,
    read straight from the Cityscapes layout ``make_world`` wrote (sorted by file name)."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[label_ids] = np.arange(len(label_ids))
    paths = sorted((root / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))
    if not paths:
        raise FileNotFoundError(f"no images under {root / 'leftImg8bit' / split}")
    imgs, labels = [], []
    for p in paths:
        city, stem = p.parent.name, p.name[: -len("_leftImg8bit.png")]
        lab = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        imgs.append(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1))
        labels.append(torch.from_numpy(lut[np.asarray(Image.open(lab))]))
    return torch.stack(imgs).float() / 255.0, torch.stack(labels)


def patch_targets(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Majority label of each 8x8 patch -> (N, h*w); -1 where a patch has no labelled pixel."""
    n, h, w = labels.shape
    onehot = F.one_hot(labels.clamp(min=0), n_classes).float() * (labels >= 0)[..., None].float()
    counts = F.avg_pool2d(onehot.permute(0, 3, 1, 2), PATCH, PATCH) * PATCH * PATCH  # (N,K,h',w')
    target = counts.argmax(1)
    target[counts.sum(1) == 0] = -1
    return target.flatten(1)


@torch.inference_mode()
def extract(feature_fn, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Patch features (N, h*w, C) for all images, in batches."""
    out = [feature_fn(images[i:i + batch]).flatten(2).transpose(1, 2) for i in range(0, len(images), batch)]
    return torch.cat(out)


def pixel_patches(images: torch.Tensor) -> torch.Tensor:
    """Raw-pixel baseline: the 8x8x3 values of each patch, (N,3*64,h,w)."""
    n, c, h, w = images.shape
    cols = F.unfold(images, PATCH, stride=PATCH)  # (N, 3*64, h'*w')
    return cols.reshape(n, c * PATCH * PATCH, h // PATCH, w // PATCH)


def scores(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> dict[str, Any]:
    """Accuracy, mIoU and per-class IoU (percent; None = class absent from the targets) over valid
    targets; mIoU over the classes present."""
    valid = target >= 0
    p, t = pred[valid], target[valid]
    conf = torch.bincount(t * n_classes + p, minlength=n_classes**2).reshape(n_classes, n_classes).double()
    tp = conf.diag()
    present = conf.sum(1) > 0
    iou = tp / (conf.sum(0) + conf.sum(1) - tp).clamp(min=1)
    return {"accuracy": round(100 * tp.sum().item() / conf.sum().item(), 2),
            "miou": round(100 * iou[present].mean().item(), 2),
            "iou": [round(100 * v, 2) if ok else None for v, ok in zip(iou.tolist(), present.tolist())]}


def linear_probe(xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, n_classes: int,
                 epochs: int = 100, seed: int = 0) -> torch.Tensor:
    """Multinomial logistic regression (a 1x1 conv on the frozen features) trained full-batch with
    L-BFGS on standardised features, small L2 penalty; returns val predictions."""
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    g = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(xtr.shape[1], n_classes, generator=g)).requires_grad_()
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=epochs, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ weight + bias, ytr) + 1e-4 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xva @ weight + bias).argmax(1)


@torch.inference_mode()
def knn_probe(xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, n_classes: int,
              k: int = 20, chunk: int = 2048) -> torch.Tensor:
    """k-NN (cosine) majority vote; ties go to the lowest class id."""
    xtr, xva = F.normalize(xtr, dim=1), F.normalize(xva, dim=1)
    preds = []
    for i in range(0, len(xva), chunk):
        idx = (xva[i:i + chunk] @ xtr.t()).topk(k, dim=1).indices
        votes = F.one_hot(ytr[idx], n_classes).sum(1)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def probe(name: str, feats_tr: torch.Tensor, feats_va: torch.Tensor, ytr: torch.Tensor,
          yva: torch.Tensor, n_classes: int, k: int) -> dict:
    """Both probes on flattened patch features; patches without a target are dropped."""
    xtr, xva = feats_tr.reshape(-1, feats_tr.shape[-1]), feats_va.reshape(-1, feats_va.shape[-1])
    ytr, yva = ytr.reshape(-1), yva.reshape(-1)
    keep = ytr >= 0
    xtr, ytr = xtr[keep].float(), ytr[keep]
    t0 = time.time()
    lin = scores(linear_probe(xtr, ytr, xva.float(), n_classes), yva, n_classes)
    knn = scores(knn_probe(xtr, ytr, xva.float(), n_classes, k), yva, n_classes)
    result = {"linear": lin, "knn": knn, "feature_dim": int(xtr.shape[1]), "seconds": round(time.time() - t0, 1)}
    print(f"{name:>14}: linear acc {lin['accuracy']:6.2f}  mIoU {lin['miou']:6.2f} | "
          f"kNN acc {knn['accuracy']:6.2f}  mIoU {knn['miou']:6.2f}", flush=True)
    return result


def load_named_backbone(meta_path: Path) -> tuple[object, dict]:
    """The backbone an architecture JSON (``embedded_vit.json`` or a pretraining run's
    ``teacher_backbone.json``) describes: its timm name and kwargs with the weights file it names."""
    meta = json.loads(meta_path.read_text())
    weights = meta_path.parent / meta["weights"]
    return backbone_mod.load_backbone(meta["timm_name"], weights=weights, **meta["timm_kwargs"]), meta


def markdown(report: dict) -> str:
    """The report as a markdown table (percent)."""
    w = report["world"]
    lines = [f"# Backbone probe: world seed {w['seed']} ({w['role']})", "",
             f"Command: `{report['command']}`", "",
             f"World: `make_world` seed {w['seed']}, {w['n_train']} train / {w['n_val']} val images at "
             f"{w['size'][0]}x{w['size'][1]}, {w['n_classes']} classes; patch grid "
             f"{report['patch_grid'][0]}x{report['patch_grid'][1]}; target = majority label of each 8x8 patch.",
             f"Backbone: `{report['backbone']['path']}` (sha256 `{report['backbone']['weights_sha256'][:16]}...`"
             + (f", exported at step {report['backbone']['step']}" if "step" in report["backbone"] else "") + ").", "",
             "| features | linear acc | linear mIoU | kNN acc | kNN mIoU |", "|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['linear']['accuracy']:.2f} | {r['linear']['miou']:.2f} | "
                     f"{r['knn']['accuracy']:.2f} | {r['knn']['miou']:.2f} |")
    # per-class linear-probe IoU: which classes the features separate, next to how common each class is
    names = report["world"].get("class_names") or [str(i) for i in report["world"]["label_ids"]]
    share = report["world"].get("val_patch_share") or [None] * len(names)
    rows = [n for n in report["results"] if "iou" in report["results"][n]["linear"]]
    if rows:
        lines += ["", "Per-class linear-probe IoU (val patches; share = fraction of val patches of the class):", "",
                  "| class | share % | " + " | ".join(rows) + " |", "|---|---|" + "---|" * len(rows)]
        for c, name in enumerate(names):
            cells = [report["results"][n]["linear"]["iou"][c] for n in rows]
            lines.append(f"| {name} | {'' if share[c] is None else f'{share[c]:.1f}'} | "
                         + " | ".join("–" if v is None else f"{v:.1f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-dir", default=str(Path.home() / ".cache" / "depthg" / "probe_world"),
                        help="where the probe world is rendered (reused if it exists with these arguments)")
    parser.add_argument("--world-seed", type=int, default=1234)
    parser.add_argument("--role", default="probe world: recipe choices",
                        help="what this world is used for (written into the report)")
    parser.add_argument("--n-train", type=int, default=120)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--backbone", default=str(REPO / "depthg" / "weights" / "embedded_vit.json"),
                        help="architecture JSON of the backbone to probe: depthg/weights/embedded_vit.json "
                             "or a pretraining run's teacher_backbone.json (any checkpoint during training)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the random-init and raw-pixel baselines (faster progress checks)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "probe_backbone.json"),
                        help="JSON report; the markdown table goes next to it (.md)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    root = make_world(args.world_dir, args.n_train, args.n_val, size=tuple(args.size),
                      seed=args.world_seed, progress=True)
    world = json.loads((Path(root) / "world.json").read_text())
    label_ids = list(world["label_ids"])
    n_classes = len(label_ids)
    img_tr, lab_tr = load_split(Path(root), "train", label_ids)
    img_va, lab_va = load_split(Path(root), "val", label_ids)
    ytr, yva = patch_targets(lab_tr, n_classes), patch_targets(lab_va, n_classes)

    meta_path = Path(args.backbone)
    if not meta_path.is_file():
        raise SystemExit(f"depthg: error: no backbone JSON at {meta_path} (expected embedded_vit.json or "
                         "teacher_backbone.json)")
    backbone, meta = load_named_backbone(meta_path)
    candidates = [("backbone", backbone)]
    if not args.no_baselines:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the random-weights warning is the point here
            random_init = backbone_mod.load_backbone(meta["timm_name"], weights=None, **meta["timm_kwargs"])
        candidates += [("random_init", random_init), ("pixels", pixel_patches)]

    results: dict = {}
    for name, fn in candidates:
        results[name] = probe(name, extract(fn, img_tr), extract(fn, img_va), ytr, yva, n_classes, args.k)
    step_file = meta_path.parent / "teacher_backbone_step.json"
    report = {
        "command": command_line("python benchmarks/probe_backbone.py", argv),
        "world": {"seed": args.world_seed, "role": args.role, "n_train": args.n_train, "n_val": args.n_val,
                  "size": list(args.size), "generator_version": GENERATOR_VERSION,
                  "n_classes": n_classes, "label_ids": label_ids,
                  "class_names": [id2label[i].name for i in label_ids],
                  "val_patch_share": [round(100 * v, 2) for v in
                                      (torch.bincount(yva[yva >= 0], minlength=n_classes) / (yva >= 0).sum()).tolist()]},
        "patch_grid": [args.size[0] // PATCH, args.size[1] // PATCH],
        "protocol": {"target": "majority label of each 8x8 patch", "knn_k": args.k,
                     "knn_metric": "cosine", "linear": "logistic regression, L-BFGS, standardised features",
                     "units": "percent"},
        "backbone": {"path": meta_path.name, "timm_name": meta["timm_name"], "timm_kwargs": meta["timm_kwargs"],
                     "weights_sha256": sha256_file(meta_path.parent / meta["weights"]),
                     **(json.loads(step_file.read_text()) if step_file.is_file() else {})},
        "results": results,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    with atomic_write(out, "w") as handle:
        json.dump(report, handle, indent=2)
    with atomic_write(out.with_suffix(".md"), "w") as handle:
        handle.write(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
