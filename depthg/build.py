"""From a config to the objects a run is made of: fidelity choices, datasets, head and probes, loss,
checkpoints (the precision policy is :mod:`depthg.precision`).

``depthg.train``, ``depthg.evaluate``, the CLI and the notebooks build their objects here, so the trainer
and the evaluator do not import each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from depthg.backbone import Backbone, load_backbone
from depthg.config import Config
from depthg.data import build_dataset
from depthg.data.prepare import CroppedDataset, dataset_kwargs
from depthg.data.transforms import RESIZES, Resize
from depthg.dataset_protocol import item_camera, item_keys
from depthg.method.head import ClusterProbe, LinearProbe, SegmentationHead
from depthg.method.lhp import LhpChoices, strongest_attention, weighted_mean
from depthg.method.losses import CorrelationTerms, DepthGLoss, Negatives, derangement_negatives
from depthg.method.released import (divide_by_cell_count, radians_unprojection, super_perm_negatives,
                                     transposed_readout, weakest_attention)
from depthg.method.sampling import CellsToGrid, FpsChoices, Unproject, depth_to_points, indices_to_grid
from depthg.utils import DepthGError, safe_torch_load

__all__ = ["TrainError", "Fidelity", "fidelity", "FIDELITY_PRESETS", "Segmenter", "build_backbone", "build_models",
           "build_loss", "CHECKPOINT_FORMAT", "load_checkpoint", "load_weights", "dataset_kwargs", "depth_normalization",
           "training_dataset", "validation_dataset", "n_classes_of", "training_cameras"]


class TrainError(DepthGError, RuntimeError):
    """The training run cannot start or continue (bad data size, mismatched checkpoint, ...)."""


# ----------------------------------------------------------------------------------------------------
# fidelity: the paper's computation or the released code's, chosen once per run
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fidelity:
    """Which computation each difference between the paper and the released code uses (docs/fidelity.md).

    The defaults are the paper path; :meth:`released` takes every function of ``depthg.method.released``. A
    run builds one (:func:`fidelity`, in ``build_run`` / ``evaluate_checkpoint`` / ``load_trained``) and hands
    it down: the loss, the sampler, the LHP module, the resize of training and evaluation and the depth
    loader receive its functions and flags; only the config knows the mode. The released timing of the
    decays is two config keys (``decay_after_step``, ``sample_decay_at_start``), the depth similarity one more.
    The resize comes from the one mode -> resize table, ``depthg.data.transforms.RESIZES``, which the data
    preparation (kNN) reads too.
    """

    unproject: Unproject = depth_to_points  # §3.4, FPS and LHP
    cells_to_grid: CellsToGrid = indices_to_grid  # §3.3, the FPS read-out
    fps_fixed_start: bool = False  # §3.5: FPS starts at cell 0 even with fps_random_start
    negatives: Negatives = derangement_negatives  # §3.6
    transposed_depth_pairs: bool = False  # §3.2, with depth_similarity="released"
    resize: Resize = RESIZES["paper"]  # §3.8, training crops, kNN and evaluation
    depth_values: str = "none"  # §3.11, what depth_normalization="auto" gives five-cropped data
    lhp_keep_attention: Callable = strongest_attention  # §3.12
    lhp_normalise: Callable = weighted_mean  # §3.12

    @classmethod
    def paper(cls) -> "Fidelity":
        return cls()

    @classmethod
    def released(cls) -> "Fidelity":
        return cls(unproject=radians_unprojection, cells_to_grid=transposed_readout, fps_fixed_start=True,
                   negatives=super_perm_negatives, transposed_depth_pairs=True, resize=RESIZES["released"],
                   depth_values="minmax255", lhp_keep_attention=weakest_attention,
                   lhp_normalise=divide_by_cell_count)

    @property
    def fps(self) -> FpsChoices:
        """The FPS sampler's unprojection and read-out (``depthg.method.sampling.fps_grid``)."""
        return FpsChoices(self.unproject, self.cells_to_grid)

    @property
    def lhp(self) -> LhpChoices:
        """The LHP module's unprojection, attention mask and normalisation (``depthg.method.lhp``)."""
        return LhpChoices(self.unproject, self.lhp_keep_attention, self.lhp_normalise)


#: the fidelity preset of each ``Config.mode``.
FIDELITY_PRESETS: dict[str, Callable[[], Fidelity]] = {"paper": Fidelity.paper, "released": Fidelity.released}


def fidelity(cfg: Config) -> Fidelity:
    """The fidelity choices of ``cfg.mode`` (validated by :class:`depthg.config.Config`): made once per run
    and passed down, never re-derived from the config further in."""
    return FIDELITY_PRESETS[cfg.mode]()


# ----------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------


class Segmenter(nn.Module):
    """Head + probes in one module so DDP sees one forward; the probes read the *detached* code.

    ``forward(feats, label)``: the head runs on all of ``feats`` (anchors and positives concatenated); the
    probes are trained on the anchors' code only (the first ``len(label)`` rows), as released.
    """

    def __init__(self, head: nn.Module, cluster: nn.Module, linear: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.cluster = cluster
        self.linear = linear

    def forward(self, feats: torch.Tensor, label: torch.Tensor | None) -> dict[str, torch.Tensor]:
        code = self.head(feats)
        n = len(label) if label is not None else len(code)
        detached = code[:n].detach().float()
        cluster_loss, _ = self.cluster(detached, None)
        out = {"code": code, "cluster_loss": cluster_loss}
        if label is not None:
            out["linear_loss"] = self.linear.loss(detached, label)
        return out


def n_classes_of(dataset: Any) -> int:
    return int(dataset.n_classes)


def build_backbone(cfg: Config, device: torch.device | str | None = None) -> Backbone:
    """The run's frozen backbone (``cfg.backbone``, ``weights``, ``backbone_kwargs``), on ``device`` when given.

    The config was validated against the patch size its backbone *name* implies (the embedded one's is a
    constant, ``depthg.config.EMBEDDED_PATCH_SIZE``); here the sizes are checked against the loaded
    model's real patch size, before any data is prepared.
    """
    backbone = load_backbone(cfg.backbone, cfg.weights, **cfg.backbone_kwargs)
    cfg.check_patch_size(backbone.patch_size)
    return backbone.to(device) if device is not None else backbone


def build_models(cfg: Config, in_dim: int, n_classes: int) -> Segmenter:
    """Head, cluster probe and linear probe, initialised from cfg.seed (independent of the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = SegmentationHead(in_dim, cfg.dim, dropout=cfg.dropout)
        cluster = ClusterProbe(cfg.dim, n_classes, extra_clusters=cfg.extra_clusters,
                               generator=torch.Generator().manual_seed(cfg.seed))
        linear = LinearProbe(cfg.dim, n_classes)
    return Segmenter(head, cluster, linear)


def build_loss(cfg: Config, fid: Fidelity) -> DepthGLoss:
    """The STEGO + DepthG objective of ``cfg`` with the fidelity's negatives and depth pairing."""
    return DepthGLoss(CorrelationTerms.from_config(cfg), depth_similarity=cfg.depth_similarity, fov_deg=cfg.fov_deg,
                      negatives=fid.negatives, transposed_depth_pairs=fid.transposed_depth_pairs)


#: the checkpoint format this version writes and reads (``depthg-train-v<N>``)
CHECKPOINT_FORMAT = "depthg-train-v1"
#: what every training checkpoint holds (``save_checkpoint`` in ``depthg.train`` writes more)
CHECKPOINT_KEYS = ("step", "config", "model")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (weights_only); see ``save_checkpoint`` in ``depthg.train`` for its keys.

    A checkpoint of a newer format, one that lacks a key every checkpoint holds or whose weights are not a
    mapping of tensors is refused with a :class:`TrainError` saying so."""
    ckpt = safe_torch_load(path)
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    version = re.fullmatch(r"depthg-train-v(\d+)", found) if isinstance(found, str) else None
    if version is not None and found != CHECKPOINT_FORMAT:
        newer = int(version.group(1)) > int(CHECKPOINT_FORMAT.rsplit("v", 1)[1])
        raise TrainError(f"{path}: a depthg training checkpoint of format {found!r}, written by "
                         f"{'a newer' if newer else 'an older'} version of depthg; this version reads "
                         f"{CHECKPOINT_FORMAT!r}" + ("; update depthg to read it" if newer else ""))
    if found != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a depthg training checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise TrainError(f"{path}: the checkpoint has no {', '.join(map(repr, missing))} (every depthg training "
                         f"checkpoint holds {', '.join(CHECKPOINT_KEYS)}); it is damaged or was edited")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise TrainError(f"{path}: its 'model' is not a mapping of weight names to tensors")
    return ckpt


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, skip: str | None = None) -> None:
    """Load a checkpoint's weights ``state`` into ``model`` (keys starting with ``skip`` left out), with an error
    naming the first keys or shapes that do not fit (renamed keys, a config whose ``dim`` or class count
    differs from the one the weights were trained with) instead of a traceback."""
    if skip is not None:
        state = {k: v for k, v in state.items() if not k.startswith(skip)}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise TrainError(f"{path}: its weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         "(keys renamed, or another model)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise TrainError(f"{path}: the weight {key!r} has shape {tuple(value.shape)} but this config's model needs "
                             f"{tuple(own[key].shape)}: keys that change the model's shape (dim, classes, "
                             "extra_clusters, backbone) must be those the checkpoint was trained with")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------


def depth_normalization(cfg: Config, fid: Fidelity, data: dict[str, Any]) -> str:
    """Depth values fed to the model; ``"auto"``: the fidelity's ``depth_values`` for five-crops (they store
    the parent image's min/max), else the depth cache's own values (metres for metric sources)."""
    if cfg.depth_normalization != "auto":
        return cfg.depth_normalization
    return fid.depth_values if data.get("crop_dir") is not None else "none"


def training_dataset(cfg: Config, fid: Fidelity, data: dict[str, Any]) -> Any:
    """The training crops (or the full images when five_crop is off) with their depth."""
    norm = depth_normalization(cfg, fid, data)
    if data.get("crop_dir") is not None:
        return CroppedDataset(data["crop_dir"], data["train_split"], depth_normalization=norm,
                              with_depth=data.get("depth_dir") is not None)
    if norm != "none":
        raise TrainError(f"depth_normalization={norm!r} needs five-cropped data (five_crop=true)")
    return build_dataset(data["dataset"], data["data_dir"], data["train_split"], depth_dir=data["depth_dir"],
                         **data["dataset_kwargs"])


def training_cameras(cfg: Config, crops: Any) -> torch.Tensor | None:
    """(N, 4) ``[fx, fy, cx, cy]`` of every training crop after :func:`~depthg.data.transforms.resize_center_crop`
    to ``cfg.res``, in its pixels, where ``cfg.unprojection == "camera"``; None with the ``fov`` unprojection."""
    if cfg.unprojection != "camera":
        return None
    rows = []
    for i in range(len(crops)):
        camera = item_camera(crops, i)
        if camera is None:
            raise TrainError(f"config key 'unprojection' = 'camera' needs a calibrated camera for every training image, "
                             f"but {item_keys(crops)[i]!r} has none (Cityscapes and the synthetic world: camera/*.json); "
                             "use unprojection=fov for data without calibration")
        rows.append(camera.resized_center_crop(cfg.res).intrinsics())
    return torch.tensor(rows, dtype=torch.float32)


def validation_dataset(cfg: Config, data_root: str | Path) -> Any:
    """The validation split of ``cfg.dataset`` (full images; evaluation resizes them)."""
    return build_dataset(cfg.dataset, data_root, cfg.val_split, **dataset_kwargs(cfg))
