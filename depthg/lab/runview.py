"""What the training notebooks show of a finished run, one call per section, so that the three train_*
notebooks share these instead of copying cells: the training log as curves, the evaluation (text and
per-class IoU), predictions next to the labels, and the findings written from the run's own numbers.

Each takes the dict :func:`depthg.train.train` returns (or its ``results.json``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from depthg.lab import viz
from depthg.lab.lesson import shown_path
from depthg.lab.notebook import at_root, load_trained, predict_examples

__all__ = ["training_curves", "evaluation_text", "iou_figure", "predictions_figure", "validation_trend",
           "training_findings", "summary"]

#: the panels of the training log, one quantity each
CURVES = {
    "correlation terms (loss)": ["train/pos_intra", "train/pos_inter", "train/neg_inter", "train/depth"],
    "total and probe losses": ["train/total", "train/cluster", "train/linear"],
    "depth weight λ_depth": ["train/depth_weight"],
    "samples per side S": ["train/n_side"],
    "validation (%)": ["val/cluster_miou", "val/cluster_accuracy", "val/linear_miou"],
}


def _log_path(result: dict[str, Any]) -> Path:
    return Path(at_root(result["config"]["output_dir"])) / "log.jsonl"


def training_curves(result: dict[str, Any], smooth: int = 5) -> Any:
    """The run's ``log.jsonl`` as curves (:data:`CURVES`); returns the figure."""
    cfg = result["config"]
    return viz.plot_training_curves(_log_path(result), groups=CURVES, smooth=smooth,
                                    title=f"training log of {cfg['name']} ({cfg['mode']} mode)")


def evaluation_text(result: dict[str, Any]) -> str:
    """The final and the best-on-validation metrics, one line each."""
    lines = []
    best = result["best_on_val"]
    for tag, m in [("final", result["final"]["metrics"]), (f"best_on_val (step {best['step']})", best["metrics"])]:
        if m is None:
            continue
        c, lin = m["cluster"], m["linear"]
        lines.append(f"{tag:28s} unsupervised: accuracy {c['accuracy']:5.1f} %  mIoU {c['miou']:5.1f} %"
                     f"   linear: accuracy {lin['accuracy']:5.1f} %  mIoU {lin['miou']:5.1f} %")
    return "\n".join(lines)


def _class_names(result: dict[str, Any]) -> list[str] | None:
    return list(result["final"]["metrics"]["cluster"].get("iou_per_class", {}).keys()) or None


def iou_figure(result: dict[str, Any]) -> Any:
    """Per-class IoU of the final weights, unsupervised and linear probe side by side."""
    final = result["final"]["metrics"]
    return viz.plot_iou_bars(None, _class_names(result), compare={"unsupervised (cluster)": final["cluster"]["iou"],
                                                                  "linear probe": final["linear"]["iou"]},
                             title="per-class IoU, final weights")


def predictions_figure(result: dict[str, Any], n: int = 4) -> Any:
    """The first ``n`` validation images, their labels, the matched clusters and the linear probe."""
    trained = load_trained(result)
    examples = predict_examples(trained, result["final"]["metrics"]["cluster"]["assignment"], n=n)
    return viz.plot_predictions(examples["images"], {"ground truth": examples["labels"],
                                                     "unsupervised (matched)": examples["cluster"],
                                                     "linear probe": examples["linear"]},
                                trained.palette, class_names=_class_names(result),
                                title="labels, unsupervised clusters, linear probe (final weights)")


def validation_trend(result: dict[str, Any]) -> dict[str, Any]:
    """The validations logged during training (no flip, no CRF): first, last and best step of the
    unsupervised accuracy and mIoU; empty when the run did not validate."""
    records = [r for r in viz.read_jsonl(_log_path(result)) if "val" in r]
    if not records:
        return {}
    first, last = records[0], records[-1]
    best = max(records, key=lambda r: r["val"]["cluster_miou"])
    trend: dict[str, Any] = {key: {"first": first["val"][key], "last": last["val"][key]}
                             for key in ("cluster_accuracy", "cluster_miou")}
    return trend | {"first_step": first["step"], "last_step": last["step"], "best_step": best["step"],
                    "best_miou": best["val"]["cluster_miou"], "n": len(records)}


def _direction(a: float, b: float) -> str:
    return "raised" if b > a else "lowered" if b < a else "left"


def training_findings(result: dict[str, Any]) -> list[str]:
    """Sentences on what the run found, written from its numbers (results.json and the validation log)."""
    final = result["final"]["metrics"]
    cfg = result["config"]
    data = "the synthetic world" if cfg["data_dir"] is None else f"`{shown_path(cfg['data_dir'])}`"
    found = [f"After {result['steps']} steps on {data}, the final weights score unsupervised accuracy "
             f"{final['cluster']['accuracy']:.1f} % and mIoU {final['cluster']['miou']:.1f} %; the linear probe on the "
             f"same code {final['linear']['accuracy']:.1f} % and {final['linear']['miou']:.1f} %."]
    trend = validation_trend(result)
    if trend:
        acc, miou = trend["cluster_accuracy"], trend["cluster_miou"]
        found.append(f"Training {_direction(acc['first'], acc['last'])} the validation accuracy from "
                     f"{acc['first']:.1f} % (first validation, step {trend['first_step']}) to {acc['last']:.1f} % "
                     f"(step {trend['last_step']}), and {_direction(miou['first'], miou['last'])} the validation mIoU "
                     f"from {miou['first']:.1f} % to "
                     f"{miou['last']:.1f} %; the best validation mIoU, {trend['best_miou']:.1f} %, came at step "
                     f"{trend['best_step']}.")
    iou = [(v, k) for k, v in final["cluster"].get("iou_per_class", {}).items() if v is not None and not math.isnan(v)]
    if iou:
        zero = [k for v, k in iou if v < 1.0]
        found.append(f"{len(zero)} of the {len(iou)} classes present score an unsupervised IoU under 1 %"
                     + (f" ({', '.join(zero[:6])}{', ...' if len(zero) > 6 else ''})." if zero else "."))
    return found


def summary(result: dict[str, Any]) -> str:
    """The headline numbers and where the run lives, as JSON text (paths relative to the repository)."""
    cfg, final = result["config"], result["final"]["metrics"]
    return json.dumps({
        "config": {"preset_or_default": cfg["name"], "mode": cfg["mode"],
                   "data_dir": cfg["data_dir"] and shown_path(cfg["data_dir"]), "backbone": cfg["backbone"],
                   "weights": cfg["weights"], "steps": result["steps"]},
        "unsupervised_accuracy": final["cluster"]["accuracy"], "unsupervised_miou": final["cluster"]["miou"],
        "linear_accuracy": final["linear"]["accuracy"], "linear_miou": final["linear"]["miou"],
        "results_json": shown_path(Path(at_root(cfg["output_dir"])) / "results.json")}, indent=2)
