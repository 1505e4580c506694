"""Evaluation protocol: a head whose clusters are a known permutation of the labels scores 100."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from depthg.build import Segmenter
from depthg.data.transforms import RELEASED_RESIZE
from depthg.evaluate import EvalOptions, evaluate_model
from depthg.method.head import ClusterProbe, LinearProbe, SegmentationHead

K, P, RES = 4, 8, 32  # classes, patch size, image size (4x4 patch grid)


class LabelBackbone(nn.Module):
    """Stub backbone: the image's red channel holds label/K per pixel; features = one-hot per pixel.

    Patch size 1, so the bilinear upsampling of the code to the label size is the identity and the
    labels are exactly recoverable (with coarser patches, bilinear blending at patch corners can
    legitimately flip a few pixels to the neighbours' class).
    """

    patch_size, embed_dim, num_heads, name = 1, K, 1, "stub"

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        label = torch.round(img[:, 0] * K).long().clamp(0, K - 1)
        return F.one_hot(label, K).permute(0, 3, 1, 2).float()


class PatchLabels(torch.utils.data.Dataset):
    """Random per-patch labels, rendered into the image; some pixels ignored (-1)."""

    n_classes = K
    class_names = [f"c{i}" for i in range(K)]
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)

    def __init__(self, n: int = 6, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        grid = torch.randint(0, K, (n, RES // P, RES // P), generator=gen)
        grid[0] = torch.arange(K).repeat(RES // P, 1)  # every class present
        self.labels = grid.repeat_interleave(P, 1).repeat_interleave(P, 2)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        label = self.labels[i].clone()
        img = torch.zeros(3, RES, RES)
        img[0] = label.float() / K
        label[0, :5] = -1  # ignored pixels must not count
        return {"img": img, "label": label, "key": f"val/{i}"}


def _perfect_models(perm: list[int]) -> tuple[nn.Module, nn.Module, nn.Module]:
    head = SegmentationHead(K, K, dropout=0.0)
    with torch.no_grad():
        head.linear.weight.copy_(torch.eye(K)[:, :, None, None])
        head.linear.bias.zero_()
        head.nonlinear[2].weight.zero_()
        head.nonlinear[2].bias.zero_()
    cluster = ClusterProbe(K, K)
    linear = LinearProbe(K, K)
    with torch.no_grad():
        cluster.clusters.copy_(torch.eye(K)[perm])  # cluster k = class perm[k]
        linear.conv.weight.copy_(10 * torch.eye(K)[:, :, None, None])
        linear.conv.bias.zero_()
    return head, cluster, linear


@pytest.mark.parametrize("flip", [False, True])
def test_permuted_clusters_score_100(flip, tmp_path):
    perm = [2, 0, 3, 1]
    head, cluster, linear = _perfect_models(perm)
    opts = EvalOptions(res=None, flip=flip, batch_size=4, progress=False, predictions_dir=tmp_path / "pred",
                       n_predictions=2)
    result = evaluate_model(LabelBackbone(), Segmenter(head, cluster, linear), PatchLabels(), opts, device="cpu")
    assert result["cluster"]["accuracy"] == pytest.approx(100.0)
    assert result["cluster"]["miou"] == pytest.approx(100.0)
    assert result["linear"]["accuracy"] == pytest.approx(100.0)
    assert result["cluster"]["assignment"] == perm  # cluster k -> class perm[k]
    assert set(result["cluster"]["iou_per_class"]) == {"c0", "c1", "c2", "c3"}
    pngs = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert len(pngs) == 6 and pngs[0].endswith("_cluster.png")
    json.dumps({k: v for k, v in result.items()})  # JSON-serialisable


def test_wrong_clusters_score_less_and_resize_path_runs():
    head, cluster, linear = _perfect_models([0, 1, 2, 3])
    with torch.no_grad():
        cluster.clusters.copy_(torch.eye(K)[[0, 0, 2, 3]])  # two clusters on class 0: class 1 is lost
    opts = EvalOptions(res=RES, resize=RELEASED_RESIZE, flip=False, batch_size=3, progress=False)
    result = evaluate_model(LabelBackbone(), Segmenter(head, cluster, linear), PatchLabels(), opts, device="cpu")
    assert result["cluster"]["accuracy"] < 100.0 and result["cluster"]["miou"] < 100.0
    assert result["linear"]["accuracy"] == pytest.approx(100.0)


def test_crf_on_worker_processes_gives_the_serial_evaluation():
    """With the dense CRF, evaluating on 2 CRF processes gives exactly the metrics of the serial path, and both
    equal an independent loop: predict_batch with the CRF, argmax, one confusion matrix over the split."""
    pytest.importorskip("pydensecrf")
    from depthg.evaluate import predict_batch
    from depthg.metrics import UnsupervisedMetrics

    torch.manual_seed(0)
    head, cluster, linear = SegmentationHead(K, K, dropout=0.0), ClusterProbe(K, K), LinearProbe(K, K)  # noisy
    model, data = Segmenter(head, cluster, linear), PatchLabels(n=5)
    model.eval()
    results = [evaluate_model(LabelBackbone(), model, data, EvalOptions(res=None, flip=True, crf=True, batch_size=2,
                                                                        progress=False, crf_workers=w), device="cpu")
               for w in (0, 2)]
    reference = [UnsupervisedMetrics(K, hungarian=True), UnsupervisedMetrics(K, hungarian=False)]
    for start in range(0, len(data), 2):
        items = [data[i] for i in range(start, min(start + 2, len(data)))]
        img, label = torch.stack([it["img"] for it in items]), torch.stack([it["label"] for it in items])
        for metrics, logp in zip(reference, predict_batch(LabelBackbone(), model, img, (RES, RES),
                                                          EvalOptions(flip=True, crf=True))):
            metrics.update(logp.argmax(1), label)
    expected = [m.compute() for m in reference]
    for result in results:
        for group, ref in zip(("cluster", "linear"), expected):
            assert result[group]["accuracy"] == float(ref["accuracy"]) and result[group]["miou"] == float(ref["miou"])
            assert result[group]["iou"] == [float(v) for v in ref["iou"]]
    assert results[0] == results[1] and results[0]["protocol"]["crf"]


def test_evaluate_checkpoint_writes_json_with_hash(tmp_path):
    from depthg.config import Config
    from depthg.train import train
    from depthg.utils import sha256_file

    from depthg.evaluate import evaluate_checkpoint

    tiny = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, img_size=64)
    cfg = Config(name="e", data_dir=None, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"),
                 classes="world", depth_source="gt", backbone="vit_small_patch8_224", backbone_kwargs=tiny,
                 res=32, eval_res=32, five_crop=True, world_n_train=2, world_n_val=2, world_size=[64, 128], dim=8, batch_size=4,
                 steps=1, feature_samples=3, knn_k=5, num_neighbors=2, eval_every=0, device="cpu",
                 feature_cache=True, sample_decay_every=0, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, progress=False)
        ckpt = tmp_path / "run" / "checkpoint_last.pt"
        out = evaluate_checkpoint(ckpt, ["eval_flip=false"], progress=False, n_predictions=1)
    saved = json.loads((tmp_path / "run" / "checkpoint_last_eval.json").read_text())
    assert saved["checkpoint_sha256"] == sha256_file(ckpt)
    assert saved["config"]["eval_flip"] is False and 0.0 <= saved["cluster"]["miou"] <= 100.0
    assert out["protocol"]["flip"] is False
