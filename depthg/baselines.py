"""The frozen-feature reference row of every table: what the backbone's features give without a head.

STEGO's whole effect is the gap between its trained head and clustering the frozen features directly, so
every comparison reports this baseline beside it (docs/method.md §9.3):

* **unsupervised**: spherical k-means (:func:`depthg.method.head.spherical_kmeans`) of the training crops'
  feature vectors, one cluster per cluster-probe centroid, evaluated exactly as a trained head is (same
  resolution, flip, upsampling and Hungarian matching over the split); or, with ``clusterer="probe"``,
  the trainer's own cluster probe (mini-batch spherical k-means by Adam: its initialisation, learning rate,
  batches and steps) fitted on the features instead of the head's code, so that ``stego`` minus this row is
  what the head adds with the clusterer held fixed;
* **linear**: the trainer's linear probe (same steps, batches, optimiser and learning rate) trained on the
  features instead of the head's code.

:func:`fit_frozen_baseline` builds the run as :func:`depthg.train.train` does (same data preparation,
feature source, kNN file and seeds) and writes the same ``results.json`` (without checkpoints: there are
no head weights).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from depthg.build import Segmenter, TrainError
from depthg.config import Config
from depthg.method.head import ClusterProbe, LinearProbe, spherical_kmeans
from depthg.train import Run, build_run, evaluate_now
from depthg.train_support import ReplaceOwn, RunFolder, batch_indices, checkpoint_to_resume, setup_place
from depthg.utils import torch_threads, write_json

__all__ = ["fit_frozen_baseline", "frozen_features", "KMEANS_MAX_POINTS", "BASELINE_DESCRIPTION", "CLUSTERERS"]

#: feature vectors k-means sees at most (a uniform sample without replacement beyond that), so the baseline
#: stays cheap on real datasets (Cityscapes ViT-B/8: 14,875 crops x 784 cells)
KMEANS_MAX_POINTS = 200_000
#: how the unsupervised columns cluster the frozen features -> what the results file says of it
CLUSTERERS = {
    "kmeans": "spherical k-means",
    "probe": "the trainer's cluster probe (mini-batch spherical k-means by Adam, the trainer's steps and batches)",
}
BASELINE_DESCRIPTION = ("frozen backbone features, no head: {} (unsupervised columns) and the trainer's linear "
                        "probe (linear columns)")


@torch.no_grad()
def frozen_features(run: Run, chunk: int = 256) -> torch.Tensor:
    """Every training crop's feature vectors (N * h * w, C), crop-major, from the run's feature source."""
    rows = []
    for start in range(0, len(run.source), chunk):
        feats = run.source.fetch(torch.arange(start, min(start + chunk, len(run.source))))["feats"]
        rows.append(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).cpu())
    return torch.cat(rows)


def _kmeans_probe(run: Run, generator: torch.Generator) -> ClusterProbe:
    """Spherical k-means of (a sample of at most :data:`KMEANS_MAX_POINTS`) frozen feature vectors."""
    points = frozen_features(run)
    if len(points) > KMEANS_MAX_POINTS:
        points = points[torch.randperm(len(points), generator=generator)[:KMEANS_MAX_POINTS]]
    k = run.n_classes + run.cfg.extra_clusters
    return ClusterProbe.from_centroids(spherical_kmeans(points, k, generator), n_classes=run.n_classes)


def _fitted_probes(run: Run, cluster: ClusterProbe | None) -> LinearProbe:
    """The trainer's linear probe on the frozen features (its initialisation seed, batches, Adam and steps),
    and on the same batches ``cluster`` (if given) as the trainer fits its cluster probe on the code."""
    cfg = run.cfg
    probe = LinearProbe(run.backbone.embed_dim, run.n_classes, generator=cfg.seed).to(run.place.device)
    # one Adam per probe, as the trainer has
    opts = [torch.optim.Adam(m.parameters(), lr=cfg.probe_lr) for m in (probe, cluster) if m is not None]
    for it in range(cfg.steps):
        anchors, _ = batch_indices(it, len(run.source), cfg.batch_size, cfg.seed, run.nns, cfg.num_neighbors)
        batch = run.source.fetch(anchors)
        loss = probe.loss(batch["feats"], batch["label"])
        if cluster is not None:
            loss = loss + cluster(batch["feats"], None)[0]  # the two probes share no parameter
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
    return probe


def fit_frozen_baseline(cfg: Config, *, progress: bool = True, data: dict[str, Any] | None = None,
                        overwrite: bool | ReplaceOwn = False, clusterer: str = "kmeans") -> dict[str, Any]:
    """Fit the frozen-feature baseline of ``cfg``'s run and evaluate it with the run's protocol.

    ``clusterer``: ``"kmeans"`` (spherical k-means, the default) or ``"probe"`` (the trainer's cluster probe,
    fitted on the features by the trainer's steps and batches; see :data:`CLUSTERERS`).

    Writes ``output_dir/{config.yaml, results.json}`` under the run-folder rules of :func:`depthg.train.train`
    (held for the call; another run there refused unless ``overwrite``, and kept until this one is complete)
    and returns the results: ``final.metrics`` as :func:`depthg.train.train` gives them.
    """
    if clusterer not in CLUSTERERS:
        raise ValueError(f"clusterer must be one of {sorted(CLUSTERERS)}, got {clusterer!r}")
    with torch_threads(cfg.threads):
        t_start = time.time()
        place = setup_place(cfg, progress)
        if place.dinfo.enabled:
            raise TrainError("the frozen-feature baseline runs in one process; start it without torchrun")
        checkpoint_to_resume(cfg, place, resume=False, overwrite=overwrite)  # fails fast, before the folder is held
        with RunFolder(place) as folder:
            checkpoint_to_resume(cfg, place, resume=False, overwrite=overwrite)
            run = build_run(cfg, place, data)
            generator = torch.Generator().manual_seed(cfg.seed)
            if clusterer == "kmeans":
                cluster, linear = _kmeans_probe(run, generator), _fitted_probes(run, None)
            else:  # the trainer's probe and its initialisation (depthg.build.build_models), on the features
                cluster = ClusterProbe(run.backbone.embed_dim, run.n_classes, extra_clusters=cfg.extra_clusters,
                                       generator=generator).to(place.device)
                linear = _fitted_probes(run, cluster)
            run.model = Segmenter(nn.Identity(), cluster, linear).to(place.device)
            writer = folder.open(cfg, 0, overwrite.owner if isinstance(overwrite, ReplaceOwn) else None)
            if writer is not None:
                writer.close()
            metrics = evaluate_now(run, flip=cfg.eval_flip, crf=cfg.eval_crf)
            result = {
                "name": cfg.name, "mode": cfg.mode, "steps": cfg.steps, "wall_time_s": time.time() - t_start,
                "baseline": BASELINE_DESCRIPTION.format(CLUSTERERS[clusterer]), "clusterer": clusterer,
                "protocol": {"flip": cfg.eval_flip, "crf": cfg.eval_crf, "eval_res": cfg.eval_res,
                             "split": cfg.val_split},
                "final": {"step": cfg.steps, "note": f"{CLUSTERERS[clusterer]} of the frozen features; linear probe "
                          "after the last step", "metrics": metrics},
                "best_on_val": {"step": None, "selected_by": None, "note": "no model selection", "metrics": None},
                "paths": {"output_dir": str(place.out_dir), **{k: str(v) for k, v in run.data.items()}},
                "config": cfg.to_dict(),
            }
            write_json(place.out_dir / "results.json", result)
            folder.first_step_passed()  # the replaced run goes once this one is complete
    return result
