"""DINO self-distillation of a small ViT on freshly rendered synthetic-world images.

Why this file exists: without DINO weights (no network here) every run on the embedded default would
use a random ViT whose features mean nothing. This file trains the workbench's *own* small
self-supervised backbone, the ``embedded`` backbone of ``depthg.backbone.load_backbone`` (issue 7),
with the recipe of DINO (Caron et al., ICCV 2021, facebookresearch/dino ``main_dino.py``), written
from the paper's description in one flat file:

* **student / teacher**: two ViTs of the same architecture (timm ``VisionTransformer``, patch 8, so
  the feature grid at 128 px is 16x16, the role ViT-S/8 plays at 224 px) each followed by a DINO
  head (MLP -> bottleneck -> L2-normalised prototypes = a weight-normalised linear layer whose norm
  is fixed to 1). Only the student gets gradients; the teacher is an exponential moving average
  (EMA) of the student with a momentum that follows a cosine schedule to 1 (from 0.992, DINOv2's
  default; DINO v1 uses 0.996 with far longer runs).
* **centring and sharpening**: the teacher's outputs are centred and sharpened with a low
  temperature (DINO: 0.04 warmed up linearly to 0.07; default here: constant 0.02, see "Collapse");
  the student uses 0.1. The loss is the cross-entropy between the teacher's distribution on each
  global crop and the student's on every *other* crop. Centring is either DINO v1's (``centering="ema"``: subtract an EMA of the batch
  mean) or DINOv2's Sinkhorn-Knopp balanced assignment (``centering="sinkhorn"``, the default),
  plus DINOv2's KoLeo regulariser on the student's CLS tokens (``koleo_weight=0.1``).
* **multi-crop**: 2 global crops and ``n_local`` small local crops per image, each with random
  resized cropping, flips, colour jitter, grayscale, Gaussian blur and (second global crop only)
  solarisation -- all vectorised over the batch and driven by one ``torch.Generator``.
* **schedules**: AdamW, learning rate with linear warm-up then cosine decay, weight decay cosine
  from 0.04 to 0.4, per-parameter gradient clipping, and the last head layer frozen during the
  first epoch-equivalent (DINO's ``freeze_last_layer``).

Collapse, and why the defaults differ from DINO v1's. On this budget (~1,000 steps of batch 32 on
one shared CPU core, ~100x fewer images than one ImageNet epoch of DINO) five runs were stopped
after 100-400 steps because the teacher drifted to the *uniform* output: its per-sample entropy
rose towards ln(out_dim), the loss sat at ~ln(out_dim), and linear / kNN probes of the teacher equal
those of a random ViT. DINO v1's EMA centring with out_dim 2048 (teacher temperature 0.04->0.07 or
constant 0.04, momentum 0.996 or 0.99, lr 3e-4 or 5e-4; after 200 steps the teacher mapped all images
to nearly the same bottleneck vector, mean cosine 0.94), Sinkhorn-Knopp + KoLeo with out_dim 2048
and 0.04->0.07, and with out_dim 256 at 0.04, all did so. What trained was DINOv2's Sinkhorn-Knopp
centring + KoLeo with few prototypes (256, bottleneck 64) and a sharper teacher (constant 0.02):
the teacher's entropy then *falls* (4.2 -> ~3.8 nats of ln 256 = 5.55 by step 570) and the probes
rise above random init. These are the defaults; ``centering="ema"``, ``koleo_weight=0``,
``out_dim=65536``, ``teacher_temp=0.07``, ``warmup_teacher_temp=0.04`` and
``momentum_teacher=0.996`` give DINO v1's recipe for longer runs (e.g. on a GPU). The logs of all
six runs are summarised in depthg/weights/MODEL_CARD.md.

Data: a *pool* of images rendered by ``depthg.data.synthetic.render_scene`` (the same procedural
street world the workbench trains and evaluates on). Rendering costs ~0.04 s per 128x256 image on
this CPU (measured), far more than one crop, so the pool is filled once and then refreshed gradually: every step the
``refresh_per_step`` oldest images are replaced by new renders (round robin). This is done in the
main loop, not a background thread, so that a run is a pure function of its seed and a resumed
run is bit-identical to an uninterrupted one on the same machine. Image ``k`` of the stream is
rendered from the seed sequence ``(seed, 7919, k)``, so the stream never repeats an image and never
reproduces an image of ``make_world`` (whose images use ``(seed, 0 | 1, index)`` for train | val).
Refreshing 8 images per step costs ~0.3 s against ~1.5 s of training compute per step.

Outputs (all under ``out_dir``, written atomically; nothing goes into the repository):

* ``checkpoint.pth`` -- the full training state (student, teacher, optimiser, step, centre, image
  pool, RNG states), plain tensors only so it loads with ``weights_only=True``;
* ``teacher_backbone.pth`` + ``teacher_backbone.json`` -- the teacher ViT in the official DINO
  "backbone only" format (a flat state_dict with DINO / timm key names: ``cls_token``,
  ``pos_embed``, ``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ..., ``norm.bias``) and the
  architecture ``{"timm_name", "timm_kwargs", "weights"}`` that ``load_backbone("embedded")`` reads. Exported every ``export_every`` steps, so a run cut
  short still leaves its latest teacher behind;
* ``log.jsonl`` -- one JSON line per ``log_every`` steps (loss, schedules, teacher entropy, speed).

Run it with ``python -m depthg pretrain ...`` or ``python -m depthg.pretrain ...``; see
``add_pretrain_arguments`` for the options and ``depthg/weights/MODEL_CARD.md`` for the command that
produced the committed weights.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.ops import roi_align
from tqdm.auto import tqdm

from depthg.backbone import interpolate_pos_embed, save_backbone_dino_format
from depthg.data.synthetic import render_scene
from depthg.utils import DepthGError, atomic_torch_save, atomic_write, get_device, safe_torch_load

TIMM_NAME = "vit_small_patch8_224"  # the ViT-S/8 family; embed_dim/depth/heads are overridden
CHECKPOINT_NAME = "checkpoint.pth"
BACKBONE_NAME = "teacher_backbone.pth"
BACKBONE_JSON = "teacher_backbone.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_VERSION = 1

# Hyper-parameters that define the run. A resumed run must agree on all of them (the schedules and
# the data stream depend on every one); the others (device, stop_at, checkpoint_every, ...) may
# change between a run and its resumption.
RUN_KEYS = (
    "steps", "batch_size", "seed", "embed_dim", "depth", "num_heads", "mlp_ratio", "drop_path",
    "global_size", "local_size", "n_local", "global_scale", "local_scale", "render_size",
    "pool_size", "refresh_per_step", "renderer", "out_dim", "head_hidden_dim", "bottleneck_dim",
    "lr", "min_lr", "warmup_steps", "weight_decay", "weight_decay_end", "momentum_teacher",
    "student_temp", "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_steps",
    "center_momentum", "centering", "koleo_weight", "clip_grad", "freeze_last_layer_steps",
)


class PretrainError(DepthGError, ValueError):
    """Bad pretraining arguments or an incompatible checkpoint to resume from."""


# ----------------------------------------------------------------------------------------------
# Schedules (DINO utils.cosine_scheduler, as pure functions of the optimiser step)


def cosine_schedule(step: int, total: int, start: float, end: float,
                    warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Value at ``step`` of a linear warm-up (``warmup_start`` -> ``start``) over ``warmup_steps``
    followed by a half cosine from ``start`` (first step after warm-up) to ``end`` (last step).

    A pure function of the step, so a resumed run sees exactly the schedule of an uninterrupted one.
    """
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    span = max(total - warmup_steps - 1, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def teacher_temperature(step: int, warmup_temp: float, temp: float, warmup_steps: int) -> float:
    """DINO's teacher temperature: linear from ``warmup_temp`` to ``temp`` then constant.

    DINO observed that a too-high teacher temperature early in training makes it collapse, hence
    the warm-up from a sharp 0.04.
    """
    if step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / warmup_steps


# ----------------------------------------------------------------------------------------------
# Models


def build_vit(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, img_size: int,
              drop_path: float = 0.0) -> nn.Module:
    """A timm ViT with patch 8 and the key names of the official DINO checkpoints.

    ``num_classes=0`` (no classifier); :func:`vit_tokens` runs it on crops of any size (multiple of 8)
    and DINO's head consumes the CLS token. ``dynamic_img_size=True`` makes the patch embedding
    return a (B, h, w, C) grid for any input size.
    """
    return timm.create_model(
        TIMM_NAME, pretrained=False, num_classes=0, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, img_size=img_size, dynamic_img_size=True,
        drop_path_rate=drop_path,
    )


def vit_kwargs(hp: dict[str, Any]) -> dict[str, Any]:
    """The timm keyword arguments that rebuild the exported backbone (written to the JSON)."""
    return dict(embed_dim=hp["embed_dim"], depth=hp["depth"], num_heads=hp["num_heads"],
                mlp_ratio=hp["mlp_ratio"], img_size=hp["global_size"])


class DINOHead(nn.Module):
    """DINO projection head: 3-layer MLP -> bottleneck -> L2 norm -> prototypes.

    The last layer is DINO's weight-normalised linear layer with its norm frozen at 1
    (``norm_last_layer=True``); that is a cosine similarity between the normalised bottleneck
    feature and normalised prototype vectors, which is how it is written here.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_layer, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return x @ F.normalize(self.last_layer, dim=-1).t()


def vit_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """All output tokens (B, 1 + h*w, C) of a timm ViT, after the final LayerNorm, computed DINO's
    way: the positional embedding is resized to the crop's patch grid with DINO's bicubic
    ``interpolate_pos_encoding`` (``depthg.backbone.interpolate_pos_embed``), exactly as
    ``depthg.backbone.Backbone`` does at inference, so the exported weights are used at other
    resolutions the same way they were trained on crops of other sizes.
    """
    tokens = vit.patch_embed(x)  # (B, h, w, C) with dynamic_img_size=True
    grid = tuple(tokens.shape[1:3])
    tokens = tokens.flatten(1, 2)
    pos = interpolate_pos_embed(vit.pos_embed, tuple(vit.patch_embed.grid_size), grid,
                                num_prefix_tokens=1)
    tokens = torch.cat([vit.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + pos
    tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
    return vit.norm(vit.blocks(tokens))


class DINOModel(nn.Module):
    """Backbone + head, run on a list of crops grouped by resolution (DINO's MultiCropWrapper)."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor], return_cls: bool = False):
        """Head outputs (sum of crop batches, K); with ``return_cls`` also the backbone CLS tokens.

        One backbone call per resolution (crops of the same size are concatenated), then one head
        call for all CLS tokens. Output rows follow the order of ``crops``.
        """
        cls_tokens, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            cls_tokens.append(vit_tokens(self.backbone, torch.cat(crops[start:end]))[:, 0])
            start = end
        cls = torch.cat(cls_tokens)
        return (self.head(cls), cls) if return_cls else self.head(cls)


# ----------------------------------------------------------------------------------------------
# Loss


def ema_centered_targets(teacher_out: torch.Tensor, center: torch.Tensor,
                         teacher_temp: float) -> torch.Tensor:
    """DINO v1 teacher targets: softmax of the centred logits sharpened by ``teacher_temp``.

    Centring (subtracting an EMA of the batch mean) prevents one prototype from dominating;
    sharpening (a low temperature) prevents the uniform output. Both are needed (DINO §5.3).
    """
    return F.softmax((teacher_out - center) / teacher_temp, dim=-1)


@torch.no_grad()
def sinkhorn_targets(teacher_out: torch.Tensor, teacher_temp: float, n_iters: int = 3) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp centring of the teacher (SwAV's balanced assignment).

    Alternately normalises ``exp(logits / T)`` so that every prototype receives the same total mass
    over the batch and every sample sums to one; the targets are then sharp *and* spread over the
    prototypes by construction, which is what keeps a short, small-batch run from drifting to the
    uniform output (see the module docstring, "Collapse"). Returns (N, K) rows summing to 1.
    """
    logits = teacher_out.float() / teacher_temp
    q = torch.exp(logits - logits.max()).t()  # (K, N)
    k, n = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


def dino_loss(student_out: torch.Tensor, teacher_probs: torch.Tensor, n_crops: int,
              student_temp: float) -> torch.Tensor:
    """Cross-entropy between the teacher's target distribution on each of the 2 global crops and
    the student's distribution on every *other* crop, averaged over pairs and images.

    ``student_out`` is (n_crops*B, K) with crops stacked crop-major, the 2 global crops first;
    ``teacher_probs`` is (2*B, K), the teacher's targets for the global crops (rows sum to 1).
    """
    student = (student_out / student_temp).chunk(n_crops)
    teacher = teacher_probs.detach().chunk(2)
    total, n_terms = student_out.new_zeros(()), 0
    for iq, q in enumerate(teacher):
        for v in range(n_crops):
            if v == iq:  # the same view seen by both networks is not a prediction task
                continue
            total = total + torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: minus the mean log distance of each L2-normalised feature to its
    nearest neighbour in the batch. It pushes the images of a batch apart in feature space, the
    direct counter to the "every image gives the same CLS token" collapse."""
    x = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


# ----------------------------------------------------------------------------------------------
# Data: image stream and multi-crop augmentation (batched, generator-driven)


def render_fn(renderer: str, size: tuple[int, int]) -> Callable[[int, int], np.ndarray]:
    """Return ``f(seed, k) -> uint8 (H, W, 3)``: image ``k`` of the stream of run seed ``seed``.

    ``"synthetic"`` renders the synthetic street world (``depthg.data.synthetic.render_scene``);
    ``"noise"`` makes smooth random colour fields, only for smoke tests of the training loop.
    """
    if renderer == "synthetic":

        def render(seed: int, k: int) -> np.ndarray:
            rng = np.random.default_rng([seed, 7919, k])
            img = render_scene(rng, size)["img"]
            return np.asarray(img, dtype=np.uint8)

        return render
    if renderer == "noise":

        def noise(seed: int, k: int) -> np.ndarray:
            rng = np.random.default_rng([seed, 7919, k])
            coarse = rng.random((3, 4, 8)).astype(np.float32)
            img = F.interpolate(torch.from_numpy(coarse)[None], size=size, mode="bilinear",
                                align_corners=False)[0]
            return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

        return noise
    raise PretrainError(f"renderer must be 'synthetic' or 'noise', got {renderer!r}")


def render_into(pool: torch.Tensor, slot: int, image: np.ndarray) -> None:
    """Write a rendered uint8 (H, W, 3) image into ``pool[slot]`` (3, H, W), checking its size."""
    if image.shape != (pool.shape[2], pool.shape[3], 3):
        raise PretrainError(f"renderer returned an image of shape {image.shape}, expected "
                            f"{(pool.shape[2], pool.shape[3], 3)}")
    pool[slot] = torch.from_numpy(image).permute(2, 0, 1)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def random_resized_crops(images: torch.Tensor, size: int, scale: tuple[float, float],
                         gen: torch.Generator) -> torch.Tensor:
    """Batched RandomResizedCrop + horizontal flip: one crop per image, resized to ``size``.

    The area fraction is uniform in ``scale`` and the log aspect ratio uniform in
    [log 3/4, log 4/3] (torchvision's defaults, used by DINO); a box larger than the image is
    clamped to it instead of re-sampled (torchvision retries 10 times then falls back). Resampling
    is ``roi_align`` with adaptive sampling, i.e. bilinear with averaging when shrinking.
    """
    b, _, h, w = images.shape
    area = _uniform(b, *scale, gen) * h * w
    log_ratio = _uniform(b, math.log(3 / 4), math.log(4 / 3), gen)
    crop_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=w)
    crop_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=h)
    x0 = torch.rand(b, generator=gen) * (w - crop_w)
    y0 = torch.rand(b, generator=gen) * (h - crop_h)
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + crop_w, y0 + crop_h], 1)
    crops = roi_align(images, boxes, output_size=(size, size), spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def colour_jitter(x: torch.Tensor, gen: torch.Generator, p: float = 0.8, brightness: float = 0.4,
                  contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> torch.Tensor:
    """DINO's ColorJitter(0.4, 0.4, 0.2, 0.1) applied with probability ``p``, batched.

    Differences from torchvision, for vectorisation: a fixed order (brightness, contrast, saturation,
    hue) instead of a random one, and hue rotated in YIQ space instead of HSV.
    """
    b = x.shape[0]
    apply = (torch.rand(b, generator=gen) < p)[:, None, None, None]
    bri = _uniform(b, 1 - brightness, 1 + brightness, gen)[:, None, None, None]
    con = _uniform(b, 1 - contrast, 1 + contrast, gen)[:, None, None, None]
    sat = _uniform(b, 1 - saturation, 1 + saturation, gen)[:, None, None, None]
    theta = _uniform(b, -hue, hue, gen) * 2 * math.pi
    y = (x * bri).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * con + mean).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * sat + g).clamp(0, 1)
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    yiq2rgb = torch.linalg.inv(rgb2yiq)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mix = yiq2rgb @ rot @ rgb2yiq  # (b, 3, 3)
    y = torch.einsum("bij,bjhw->bihw", mix, y).clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    apply = (torch.rand(x.shape[0], generator=gen) < p)[:, None, None, None]
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, gen: torch.Generator, p: float,
                  sigma: tuple[float, float]) -> torch.Tensor:
    """Gaussian blur with a per-image sigma (uniform in ``sigma``) applied with probability ``p``.

    Separable, one grouped convolution per axis for the whole batch; reflect padding.
    """
    b, c, h, w = x.shape
    apply = (torch.rand(b, generator=gen) < p)[:, None, None, None]
    s = _uniform(b, *sigma, gen)
    radius = max(1, math.ceil(3 * sigma[1]))
    radius = min(radius, (min(h, w) - 1) // 2) if min(h, w) > 2 else 0
    if radius == 0:
        return x
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / s[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :],
                 groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None],
                 groups=b * c)
    return torch.where(apply, y.reshape(b, c, h, w), x)


def solarize(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    apply = (torch.rand(x.shape[0], generator=gen) < p)[:, None, None, None]
    return torch.where(apply & (x >= 0.5), 1 - x, x)


def multi_crop(images: torch.Tensor, hp: dict[str, Any], gen: torch.Generator) -> list[torch.Tensor]:
    """DINO's DataAugmentationDINO on a batch of images in [0, 1]: 2 global + ``n_local`` local
    crops, each (B, 3, s, s), ImageNet-normalised (the exported backbone is used by
    ``depthg.backbone.Backbone``, which normalises the same way internally).

    Blur probabilities follow DINO (global 1: 1.0, global 2: 0.1, locals: 0.5); sigma is DINO's
    [0.1, 2.0] px at 224 px scaled to the crop size (our crops are 3-4x smaller).
    """
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[None, :, None, None]
    crops = []
    for i in range(2 + hp["n_local"]):
        is_global = i < 2
        size = hp["global_size"] if is_global else hp["local_size"]
        scale = hp["global_scale"] if is_global else hp["local_scale"]
        x = random_resized_crops(images, size, tuple(scale), gen)
        x = random_grayscale(colour_jitter(x, gen), gen)
        blur_p = (1.0, 0.1)[i] if is_global else 0.5
        x = gaussian_blur(x, gen, blur_p, (0.1 * size / 224, 2.0 * size / 224))
        if i == 1:
            x = solarize(x, gen, 0.2)
        crops.append((x - mean) / std)
    return crops


# ----------------------------------------------------------------------------------------------
# Training


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and norm gains are not regularised (DINO utils)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO clips each parameter's gradient norm separately to ``clip``."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            scale = clip / (norm + 1e-6)
            if scale < 1:
                p.grad.mul_(scale)


def export_backbone(teacher: DINOModel, hp: dict[str, Any], out_dir: Path, step: int) -> Path:
    """Write the teacher ViT as a DINO "backbone only" .pth + its architecture JSON, atomically."""
    state = {k: v.detach().to("cpu", torch.float32).clone().contiguous()
             for k, v in teacher.backbone.state_dict().items()}
    path = out_dir / BACKBONE_NAME
    save_backbone_dino_format(state, path)
    arch = {"timm_name": TIMM_NAME, "timm_kwargs": vit_kwargs(hp), "weights": BACKBONE_NAME}
    with atomic_write(out_dir / BACKBONE_JSON, "w") as handle:
        json.dump(arch, handle, indent=2)
    with atomic_write(out_dir / "teacher_backbone_step.json", "w") as handle:
        json.dump({"step": step, "steps": hp["steps"]}, handle)
    return path


def export_embedded(out_dir: str | Path, weights_dir: str | Path) -> tuple[Path, Path]:
    """Copy the exported teacher of a pretraining run to ``weights_dir`` as ``embedded_vit.pth`` and
    ``embedded_vit.json`` (the files ``load_backbone("embedded")`` reads from depthg/weights/)."""
    out_dir, weights_dir = Path(out_dir), Path(weights_dir)
    src = out_dir / BACKBONE_NAME
    if not src.is_file():
        raise FileNotFoundError(f"no exported teacher backbone at {src}; run pretrain first")
    arch = json.loads((out_dir / BACKBONE_JSON).read_text())
    arch["weights"] = "embedded_vit.pth"
    weights_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(weights_dir / "embedded_vit.pth", "wb") as handle, open(src, "rb") as s:
        shutil.copyfileobj(s, handle)
    with atomic_write(weights_dir / "embedded_vit.json", "w") as handle:
        json.dump(arch, handle, indent=2)
    return weights_dir / "embedded_vit.pth", weights_dir / "embedded_vit.json"


def pretrain(
    out_dir: str | Path,
    steps: int = 950,
    batch_size: int = 32,
    *,
    embed_dim: int = 192,
    depth: int = 6,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    drop_path: float = 0.1,
    global_size: int = 64,
    local_size: int = 32,
    n_local: int = 6,
    global_scale: tuple[float, float] = (0.25, 1.0),
    local_scale: tuple[float, float] = (0.03, 0.25),
    render_size: tuple[int, int] = (128, 256),
    pool_size: int = 512,
    refresh_per_step: int = 8,
    renderer: str = "synthetic",
    out_dim: int = 256,
    head_hidden_dim: int = 512,
    bottleneck_dim: int = 64,
    lr: float = 5e-4,
    min_lr: float = 1e-6,
    warmup_steps: int | None = None,
    weight_decay: float = 0.04,
    weight_decay_end: float = 0.4,
    momentum_teacher: float = 0.992,
    student_temp: float = 0.1,
    teacher_temp: float = 0.02,
    warmup_teacher_temp: float = 0.02,
    warmup_teacher_temp_steps: int | None = None,
    center_momentum: float = 0.9,
    centering: str = "sinkhorn",
    koleo_weight: float = 0.1,
    clip_grad: float = 3.0,
    freeze_last_layer_steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    stop_at: int | None = None,
    max_minutes: float | None = None,
    checkpoint_every: int = 50,
    export_every: int = 50,
    log_every: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a small ViT with DINO on rendered synthetic-world images; return a summary dict.

    ``steps`` optimiser steps of ``batch_size`` images each define every schedule. ``warmup_steps``
    (LR) defaults to 10% of ``steps``, ``warmup_teacher_temp_steps`` to 30% (DINO: 10 and 30 of 100
    epochs), ``freeze_last_layer_steps`` to one epoch-equivalent, ``pool_size // batch_size``.
    ``render_size`` is (H, W) of the rendered images; ``global_scale`` / ``local_scale`` are area
    fractions of them. ``resume=True`` continues from ``out_dir/checkpoint.pth`` (the run's
    hyper-parameters must match). ``stop_at`` stops after that many steps (checkpointing and
    exporting first) without changing the schedules, and ``max_minutes`` does the same when the
    wall-clock budget of this process is used up -- both for time-boxed sessions and tests.
    """
    out_dir = Path(out_dir)
    hp: dict[str, Any] = dict(
        steps=steps, batch_size=batch_size, seed=seed, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path=drop_path, global_size=global_size,
        local_size=local_size, n_local=n_local, global_scale=list(global_scale),
        local_scale=list(local_scale), render_size=list(render_size), pool_size=pool_size,
        refresh_per_step=refresh_per_step, renderer=renderer, out_dim=out_dim,
        head_hidden_dim=head_hidden_dim, bottleneck_dim=bottleneck_dim, lr=lr, min_lr=min_lr,
        warmup_steps=max(1, steps // 10) if warmup_steps is None else warmup_steps,
        weight_decay=weight_decay, weight_decay_end=weight_decay_end,
        momentum_teacher=momentum_teacher, student_temp=student_temp, teacher_temp=teacher_temp,
        warmup_teacher_temp=warmup_teacher_temp,
        warmup_teacher_temp_steps=(max(1, (3 * steps) // 10) if warmup_teacher_temp_steps is None
                                   else warmup_teacher_temp_steps),
        center_momentum=center_momentum, centering=centering, koleo_weight=koleo_weight,
        clip_grad=clip_grad,
        freeze_last_layer_steps=(max(1, pool_size // batch_size) if freeze_last_layer_steps is None
                                 else freeze_last_layer_steps),
    )
    _validate(hp)
    dev = get_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- models: student and teacher start identical; only the student is optimised ----------
    torch.manual_seed(seed)  # parameter init and timm's DropPath use the global torch RNG
    gen = torch.Generator().manual_seed(seed)  # everything about the data and augmentations
    student = DINOModel(
        build_vit(embed_dim, depth, num_heads, mlp_ratio, global_size, drop_path),
        DINOHead(embed_dim, out_dim, head_hidden_dim, bottleneck_dim),
    )
    teacher = DINOModel(
        build_vit(embed_dim, depth, num_heads, mlp_ratio, global_size, 0.0),
        DINOHead(embed_dim, out_dim, head_hidden_dim, bottleneck_dim),
    )
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    student.to(dev).train()
    teacher.to(dev).eval()  # no dropout / BN in the ViT, so eval vs train only affects DropPath (0)
    optimizer = torch.optim.AdamW(_param_groups(student), lr=0.0)  # lr/wd set every step
    center = torch.zeros(1, out_dim, device=dev)

    # --- the image pool ------------------------------------------------------------------------
    render = render_fn(renderer, tuple(render_size))
    pool = torch.zeros(pool_size, 3, render_size[0], render_size[1], dtype=torch.uint8)
    start_step, n_rendered = 0, 0
    ckpt_path = out_dir / CHECKPOINT_NAME
    if resume and ckpt_path.is_file():
        ckpt = safe_torch_load(ckpt_path)
        saved = json.loads(bytes(ckpt["hparams_json"].tolist()).decode())
        diff = [k for k in RUN_KEYS if saved.get(k) != hp[k]]
        if diff:
            raise PretrainError(
                f"cannot resume from {ckpt_path}: hyper-parameters differ: "
                + ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {hp[k]!r})" for k in diff))
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        center.copy_(ckpt["center"])
        pool.copy_(ckpt["pool"])
        gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_step, n_rendered = int(ckpt["step"]), int(ckpt["n_rendered"])
    elif resume:
        print(f"resume: no checkpoint at {ckpt_path}, starting from scratch", file=sys.stderr)
    if n_rendered == 0:
        for k in tqdm(range(pool_size), desc="rendering image pool", disable=not progress):
            render_into(pool, k, render(seed, k))
        n_rendered = pool_size
    with atomic_write(out_dir / "hparams.json", "w") as handle:
        json.dump(hp, handle, indent=2)

    def save_checkpoint(step: int) -> None:
        atomic_torch_save({
            "version": torch.tensor(CHECKPOINT_VERSION),
            "hparams_json": torch.tensor(list(json.dumps(hp).encode()), dtype=torch.uint8),
            "step": torch.tensor(step), "n_rendered": torch.tensor(n_rendered),
            "student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(), "center": center.cpu(), "pool": pool,
            "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
        }, ckpt_path)

    # --- training loop -------------------------------------------------------------------------
    n_crops = 2 + n_local
    last_stop = steps if stop_at is None else min(stop_at, steps)
    t_start = time.time()
    step, record = start_step, {}
    bar = tqdm(range(start_step, last_stop), desc="DINO pretraining", disable=not progress,
               initial=start_step, total=steps, mininterval=5.0)
    if start_step >= last_stop:
        save_checkpoint(step)  # e.g. stop_at=0 saves the initial state
    for step in bar:
        t0 = time.time()
        # refresh the oldest pool images (round robin) with new renders
        for _ in range(refresh_per_step):
            render_into(pool, n_rendered % pool_size, render(seed, n_rendered))
            n_rendered += 1
        idx = torch.randperm(pool_size, generator=gen)[:batch_size]
        crops = [c.to(dev) for c in multi_crop(pool[idx].float() / 255.0, hp, gen)]

        lr_now = cosine_schedule(step, steps, lr, min_lr, hp["warmup_steps"])
        wd_now = cosine_schedule(step, steps, weight_decay, weight_decay_end)
        m_now = cosine_schedule(step, steps, momentum_teacher, 1.0)
        temp_now = teacher_temperature(step, warmup_teacher_temp, teacher_temp,
                                       hp["warmup_teacher_temp_steps"])
        optimizer.param_groups[0].update(lr=lr_now, weight_decay=wd_now)
        optimizer.param_groups[1].update(lr=lr_now)

        with torch.no_grad():
            teacher_out = teacher(crops[:2])
            if centering == "sinkhorn":
                targets = sinkhorn_targets(teacher_out, temp_now)
            else:
                targets = ema_centered_targets(teacher_out, center, temp_now)
        student_out, student_cls = student(crops, return_cls=True)
        loss_dino = dino_loss(student_out, targets, n_crops, student_temp)
        loss_koleo = sum(koleo_loss(c) for c in student_cls[: 2 * batch_size].chunk(2))
        loss = loss_dino + koleo_weight * loss_koleo
        if not torch.isfinite(loss):
            raise RuntimeError(f"pretraining loss is {loss.item()} at step {step}; stopping")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(student, clip_grad)
        if step < hp["freeze_last_layer_steps"]:
            student.head.last_layer.grad = None  # AdamW skips parameters without a gradient
        optimizer.step()
        ema_update(student, teacher, m_now)
        with torch.no_grad():
            center.mul_(center_momentum).add_(teacher_out.mean(0, keepdim=True),
                                               alpha=1 - center_momentum)
            probs = targets
            entropy = -(probs * torch.log(probs + 1e-12)).sum(-1).mean().item()
            mean_p = probs.mean(0)
            batch_entropy = -(mean_p * torch.log(mean_p + 1e-12)).sum().item()

        done = step + 1
        record = dict(step=done, loss=round(loss.item(), 5), dino=round(loss_dino.item(), 5),
                      koleo=round(float(loss_koleo.detach()), 5), lr=lr_now, wd=round(wd_now, 5),
                      momentum=round(m_now, 6), teacher_temp=round(temp_now, 5),
                      teacher_entropy=round(entropy, 4), teacher_batch_entropy=round(batch_entropy, 4),
                      step_s=round(time.time() - t0, 3), elapsed_s=round(time.time() - t_start, 1),
                      n_rendered=n_rendered)
        bar.set_postfix(loss=f"{loss.item():.3f}", H=f"{entropy:.2f}", Hb=f"{batch_entropy:.2f}")
        if done % log_every == 0 or done == last_stop:
            with open(out_dir / LOG_NAME, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        out_of_time = max_minutes is not None and time.time() - t_start > 60 * max_minutes
        if done % checkpoint_every == 0 or done == last_stop or out_of_time:
            save_checkpoint(done)
        if done % export_every == 0 or done == last_stop or out_of_time:
            export_backbone(teacher, hp, out_dir, done)
        if out_of_time:
            print(f"max_minutes={max_minutes} reached after step {done}; checkpoint and teacher saved", file=sys.stderr)
            step = done
            break
        step = done
    bar.close()
    if start_step >= last_stop:
        export_backbone(teacher, hp, out_dir, step)
    return {"step": step, "steps": steps, "out_dir": str(out_dir),
            "backbone": str(out_dir / BACKBONE_NAME), "checkpoint": str(ckpt_path),
            "wall_s": round(time.time() - t_start, 1), "last": record}


def _validate(hp: dict[str, Any]) -> None:
    """Clear errors for arguments that would otherwise fail deep inside the loop."""
    for key in ("steps", "batch_size", "pool_size", "embed_dim", "depth", "num_heads", "out_dim"):
        if not isinstance(hp[key], int) or hp[key] < (0 if key == "steps" else 1):
            raise PretrainError(f"{key} must be a positive integer, got {hp[key]!r}")
    if hp["batch_size"] > hp["pool_size"]:
        raise PretrainError(f"batch_size={hp['batch_size']} exceeds pool_size={hp['pool_size']}")
    if hp["embed_dim"] % hp["num_heads"]:
        raise PretrainError(f"embed_dim={hp['embed_dim']} is not divisible by "
                            f"num_heads={hp['num_heads']}")
    for key in ("global_size", "local_size"):
        if hp[key] % 8 or hp[key] < 8:
            raise PretrainError(f"{key} must be a positive multiple of the patch size 8, "
                                f"got {hp[key]}")
    for key in ("global_scale", "local_scale"):
        lo, hi = hp[key]
        if not 0 < lo <= hi <= 1:
            raise PretrainError(f"{key} must satisfy 0 < low <= high <= 1, got {hp[key]}")
    if hp["centering"] not in ("sinkhorn", "ema"):
        raise PretrainError(f"centering must be 'sinkhorn' or 'ema', got {hp['centering']!r}")
    if hp["n_local"] < 0 or hp["refresh_per_step"] < 0:
        raise PretrainError("n_local and refresh_per_step must be >= 0")


# ----------------------------------------------------------------------------------------------
# Command line (used by `python -m depthg pretrain` and `python -m depthg.pretrain`)


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the pretraining options to ``parser`` (defaults = the recipe of the committed weights)."""
    a = parser.add_argument
    a("--out-dir", default=str(Path.home() / ".cache" / "depthg" / "pretrain"),
      help="where checkpoint, exported teacher and log go (default: ~/.cache/depthg/pretrain)")
    a("--steps", type=int, default=950, help="optimiser steps (all schedules depend on it)")
    a("--batch-size", type=int, default=32)
    a("--embed-dim", type=int, default=192)
    a("--depth", type=int, default=6)
    a("--num-heads", type=int, default=3)
    a("--mlp-ratio", type=float, default=4.0)
    a("--drop-path", type=float, default=0.1)
    a("--global-size", type=int, default=64, help="global crop side in px (multiple of 8)")
    a("--local-size", type=int, default=32, help="local crop side in px (multiple of 8)")
    a("--n-local", type=int, default=6, help="local crops per image")
    a("--global-scale", type=float, nargs=2, default=(0.25, 1.0))
    a("--local-scale", type=float, nargs=2, default=(0.03, 0.25))
    a("--render-size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    a("--pool-size", type=int, default=512, help="rendered images kept in memory")
    a("--refresh-per-step", type=int, default=8, help="pool images re-rendered per step")
    a("--renderer", choices=("synthetic", "noise"), default="synthetic")
    a("--out-dim", type=int, default=256, help="DINO head prototypes")
    a("--head-hidden-dim", type=int, default=512)
    a("--bottleneck-dim", type=int, default=64)
    a("--lr", type=float, default=5e-4, help="peak learning rate")
    a("--min-lr", type=float, default=1e-6)
    a("--warmup-steps", type=int, default=None, help="LR warm-up (default 10%% of steps)")
    a("--weight-decay", type=float, default=0.04)
    a("--weight-decay-end", type=float, default=0.4)
    a("--momentum-teacher", type=float, default=0.992)
    a("--student-temp", type=float, default=0.1)
    a("--teacher-temp", type=float, default=0.02)
    a("--warmup-teacher-temp", type=float, default=0.02)
    a("--warmup-teacher-temp-steps", type=int, default=None, help="default 30%% of steps")
    a("--center-momentum", type=float, default=0.9)
    a("--centering", choices=("sinkhorn", "ema"), default="sinkhorn",
      help="teacher centring: DINOv2's Sinkhorn-Knopp or DINO v1's EMA centre")
    a("--koleo-weight", type=float, default=0.1, help="DINOv2 KoLeo regulariser (0 = off)")
    a("--clip-grad", type=float, default=3.0)
    a("--freeze-last-layer-steps", type=int, default=None,
      help="default: one epoch-equivalent = pool_size // batch_size")
    a("--seed", type=int, default=0)
    a("--device", default="auto")
    a("--threads", type=int, default=None,
      help="torch CPU threads (1 is far faster than 2 on a CPU shared with other processes)")
    a("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pth")
    a("--stop-at", type=int, default=None, help="stop after this step (schedules unchanged)")
    a("--max-minutes", type=float, default=None, help="stop (saving everything) after this long")
    a("--checkpoint-every", type=int, default=50)
    a("--export-every", type=int, default=50)
    a("--log-every", type=int, default=10)
    a("--no-progress", action="store_true")
    a("--export-embedded", default=None, metavar="DIR",
      help="at the end copy the teacher to DIR/embedded_vit.{pth,json} (e.g. depthg/weights)")
    return parser


def run_pretrain_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`pretrain` with parsed :func:`add_pretrain_arguments` options; print a summary."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    summary = pretrain(
        args.out_dir, args.steps, args.batch_size, embed_dim=args.embed_dim, depth=args.depth,
        num_heads=args.num_heads, mlp_ratio=args.mlp_ratio, drop_path=args.drop_path,
        global_size=args.global_size, local_size=args.local_size, n_local=args.n_local,
        global_scale=tuple(args.global_scale), local_scale=tuple(args.local_scale),
        render_size=tuple(args.render_size), pool_size=args.pool_size,
        refresh_per_step=args.refresh_per_step, renderer=args.renderer, out_dim=args.out_dim,
        head_hidden_dim=args.head_hidden_dim, bottleneck_dim=args.bottleneck_dim, lr=args.lr,
        min_lr=args.min_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end, momentum_teacher=args.momentum_teacher,
        student_temp=args.student_temp, teacher_temp=args.teacher_temp,
        warmup_teacher_temp=args.warmup_teacher_temp,
        warmup_teacher_temp_steps=args.warmup_teacher_temp_steps,
        center_momentum=args.center_momentum, centering=args.centering,
        koleo_weight=args.koleo_weight, clip_grad=args.clip_grad,
        freeze_last_layer_steps=args.freeze_last_layer_steps, seed=args.seed, device=args.device,
        resume=args.resume, stop_at=args.stop_at, max_minutes=args.max_minutes,
        checkpoint_every=args.checkpoint_every, export_every=args.export_every,
        log_every=args.log_every, progress=not args.no_progress,
    )
    if args.export_embedded:
        pth, js = export_embedded(args.out_dir, args.export_embedded)
        summary["exported"] = [str(pth), str(js)]
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m depthg.pretrain", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run_pretrain_from_args(add_pretrain_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    main()
