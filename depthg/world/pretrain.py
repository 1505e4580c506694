"""Self-supervised pretraining of the embedded ViT on freshly rendered synthetic-world images.

Without DINO weights every run on the embedded default would read a random ViT. This module trains
the workbench's own small backbone (``load_backbone("embedded")``) by self-distillation between a
student ViT and its EMA teacher, with up to three losses:

* **image level (DINO)**, always on: the student's CLS output on every crop (2 global + ``n_local``
  local crops, DINO's augmentations) predicts the teacher's CLS output on the other global crop;
* **masked patches (iBOT / DINOv2)**, ``ibot_weight``: on a share of the global crops, random blocks of
  patches are replaced by a learned mask token before the student sees them; at each masked patch the
  student predicts the teacher's output for the same patch of the unmasked crop;
* **cross-view patches**, ``dense_weight``: each student patch of one global crop predicts the teacher's
  output at the same image location in the other global crop (where the two overlap).

The two patch-level losses train the patch features STEGO and DepthG read. The committed weights use
all three losses with 64 px global crops (``DEFAULTS``); ``DENSE_RECIPE`` (``--recipe dense``) is the
same at 128 px. depthg/weights/MODEL_CARD.md has the commands, wall times and probes of both, and
docs/backbones.md why the defaults differ from DINO v1's.

Heads are DINO heads (MLP -> bottleneck -> L2-normalised prototypes); the teacher's outputs are centred
with DINOv2's Sinkhorn-Knopp balanced assignment (or DINO v1's EMA centre for the CLS head), and the
student's CLS tokens get DINOv2's KoLeo regulariser. Schedules are pure functions of the step, and the
image stream, crops and masks come from one ``torch.Generator``: a resumed run is bit-identical to an
uninterrupted one. Image ``k`` of the stream is rendered from the seed sequence ``(seed, 7919, k)``,
so it never repeats and never reproduces an image of ``make_world`` (which uses ``(seed, 0|1, i)``);
a pool of ``pool_size`` images is kept and ``refresh_per_step`` of them are re-rendered every step.

Outputs under ``out_dir`` (written atomically; nothing goes into the repository): ``checkpoint.pth``
(full state, plain tensors, loads with ``weights_only=True``), ``teacher_backbone.pth`` + ``.json``
(the teacher ViT in DINO's backbone-only format, exported every ``export_every`` steps; probe it with
``benchmarks/probe_backbone.py --backbone``) and ``log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from difflib import get_close_matches
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
from depthg.world.synthetic import render_scene
from depthg.utils import DepthGError, atomic_torch_save, atomic_write, get_device, json_text, safe_torch_load

__all__ = [
    # running it: the function, its command line, the recipes and the files it writes
    "pretrain", "add_pretrain_arguments", "run_pretrain_from_args", "main", "export_embedded", "PretrainError",
    "DEFAULTS", "DENSE_RECIPE", "CHECKPOINT_NAME", "BACKBONE_NAME", "BACKBONE_JSON", "LOG_NAME",
    # its parts, each tested on its own: model, losses, schedules, augmentations, masks, EMA
    "build_vit", "vit_tokens", "DINOHead", "DINOModel", "dino_loss", "ibot_loss", "koleo_loss", "cross_view_loss",
    "ema_centered_targets", "sinkhorn_targets", "cosine_schedule", "teacher_temperature", "multi_crop",
    "random_resized_crops", "block_masks", "patch_centres", "crop_coordinates", "ema_update",
]

TIMM_NAME = "vit_small_patch8_224"  # the ViT-S/8 family; embed_dim/depth/heads are overridden
CHECKPOINT_NAME = "checkpoint.pth"
BACKBONE_NAME = "teacher_backbone.pth"
BACKBONE_JSON = "teacher_backbone.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_VERSION = 2

#: The recipe: every value that defines a run (schedules and data stream depend on all of them), so a
#: resumed run must agree on each. These are the settings of the committed weights (DINO + masked-patch
#: + cross-view patch losses, 64 px global crops, 3400 steps of 32); MODEL_CARD.md has the runs behind them.
DEFAULTS: dict[str, Any] = dict(
    steps=3400, batch_size=32, seed=0,
    # ViT-Tiny width at half depth, patch 8
    embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, drop_path=0.1,
    # multi-crop: 2 global and n_local local crops per image, sizes in px, scales as area fractions
    global_size=64, local_size=32, n_local=6, global_scale=(0.25, 1.0), local_scale=(0.03, 0.25),
    render_size=(128, 256), pool_size=512, refresh_per_step=8, renderer="synthetic",
    # DINO (CLS) head; the patch head serves the masked-patch (iBOT) and cross-view losses when on
    out_dim=256, head_hidden_dim=512, bottleneck_dim=64, ibot_out_dim=256, ibot_weight=1.0,
    mask_prob=0.5, mask_ratio=(0.1, 0.5), dense_weight=1.0,
    # optimisation
    lr=5e-4, min_lr=1e-6, warmup_steps=None, weight_decay=0.04, weight_decay_end=0.4,
    momentum_teacher=0.992, student_temp=0.1, teacher_temp=0.02, warmup_teacher_temp=0.02,
    warmup_teacher_temp_steps=None, center_momentum=0.9, centering="sinkhorn", koleo_weight=0.1,
    clip_grad=3.0, freeze_last_layer_steps=None,
)
RUN_KEYS = tuple(DEFAULTS)

#: The same three losses with 128 px global crops (the resolution of use), fewer and smaller batches.
DENSE_RECIPE: dict[str, Any] = dict(
    steps=600, batch_size=16, global_size=128, local_size=48, n_local=4, local_scale=(0.05, 0.25),
    ibot_weight=1.0, dense_weight=1.0,
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


def vit_tokens(vit: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """All output tokens (B, 1 + h*w, C) of a timm ViT after the final LayerNorm.

    The position embedding is resized to the crop's grid with DINO's bicubic interpolation, exactly as
    ``depthg.backbone.Backbone`` does at inference. ``mask`` (B, h*w) bool replaces those patch
    embeddings by ``mask_token`` (C,) before the position embedding is added (iBOT / DINOv2).
    """
    tokens = vit.patch_embed(x)  # (B, h, w, C) with dynamic_img_size=True
    grid = tuple(tokens.shape[1:3])
    tokens = tokens.flatten(1, 2)
    if mask is not None:
        tokens = torch.where(mask[..., None], mask_token.to(tokens.dtype), tokens)
    pos = interpolate_pos_embed(vit.pos_embed, tuple(vit.patch_embed.grid_size), grid,
                                num_prefix_tokens=1)
    tokens = torch.cat([vit.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + pos
    tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
    return vit.norm(vit.blocks(tokens))


class DINOModel(nn.Module):
    """Backbone + CLS head (+ optional patch head and mask token for the iBOT objective)."""

    def __init__(self, backbone: nn.Module, head: DINOHead, patch_head: DINOHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim)) if patch_head else None

    def forward(self, crops: list[torch.Tensor], return_cls: bool = False):
        """CLS head outputs (sum of crop batches, K), rows in the order of ``crops``; with
        ``return_cls`` also the backbone CLS tokens. One backbone call per crop size."""
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


def ibot_loss(student_patch: torch.Tensor, teacher_probs: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """Cross-entropy between the teacher's targets and the student's outputs at the masked patches.

    Both are (M, K): one row per masked patch of the student's input (the teacher saw it unmasked).
    Returns 0 when no patch is masked.
    """
    if len(student_patch) == 0:
        return student_patch.sum()
    log_p = F.log_softmax(student_patch / student_temp, dim=-1)
    return torch.sum(-teacher_probs.detach() * log_p, dim=-1).mean()


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

    ``"synthetic"`` renders the synthetic street world (``depthg.world.synthetic.render_scene``);
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
                         gen: torch.Generator, geometry: list | None = None) -> torch.Tensor:
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
    if geometry is not None:  # where each crop came from: boxes (B, 4) as x0, y0, x1, y1 and flips (B,)
        geometry.append((boxes[:, 1:], flip))
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


def multi_crop(images: torch.Tensor, hp: dict[str, Any], gen: torch.Generator,
               geometry: list | None = None) -> list[torch.Tensor]:
    """DINO's DataAugmentationDINO on a batch of images in [0, 1]: 2 global + ``n_local`` local
    crops, each (B, 3, s, s), ImageNet-normalised (the exported backbone is used by
    ``depthg.backbone.Backbone``, which normalises the same way internally).

    Blur probabilities follow DINO (global 1: 1.0, global 2: 0.1, locals: 0.5); sigma is DINO's
    [0.1, 2.0] px at 224 px scaled to the crop size (our crops are 3-4x smaller). ``geometry``, if
    given, receives the (boxes, flips) of the two global crops.
    """
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[None, :, None, None]
    crops = []
    for i in range(2 + hp["n_local"]):
        is_global = i < 2
        size = hp["global_size"] if is_global else hp["local_size"]
        scale = hp["global_scale"] if is_global else hp["local_scale"]
        x = random_resized_crops(images, size, tuple(scale), gen, geometry if is_global else None)
        x = random_grayscale(colour_jitter(x, gen), gen)
        blur_p = (1.0, 0.1)[i] if is_global else 0.5
        x = gaussian_blur(x, gen, blur_p, (0.1 * size / 224, 2.0 * size / 224))
        if i == 1:
            x = solarize(x, gen, 0.2)
        crops.append((x - mean) / std)
    return crops


def block_masks(n: int, grid: tuple[int, int], prob: float, ratio: tuple[float, float],
                gen: torch.Generator) -> torch.Tensor:
    """iBOT's block-wise masks (n, h*w) bool: each crop is masked with probability ``prob``; a masked
    crop gets random rectangles (>= 4 patches, aspect 0.3-3.3) until a fraction drawn uniformly from
    ``ratio`` of its patches is covered."""
    h, w = grid
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    chosen = torch.rand(n, generator=gen) < prob
    targets = (_uniform(n, *ratio, gen) * h * w).round().long()
    for i in torch.nonzero(chosen).flatten().tolist():
        for _ in range(50):  # attempts; each adds one rectangle
            missing = int(targets[i]) - int(masks[i].sum())
            if missing <= 0:
                break
            area = float(_uniform(1, 4.0, max(4.0, float(missing)), gen))
            aspect = math.exp(float(_uniform(1, math.log(0.3), math.log(1 / 0.3), gen)))
            bh = min(h, max(1, round(math.sqrt(area * aspect))))
            bw = min(w, max(1, round(math.sqrt(area / aspect))))
            top = int(torch.randint(0, h - bh + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - bw + 1, (1,), generator=gen))
            masks[i, top:top + bh, left:left + bw] = True
    return masks.flatten(1)


def patch_centres(boxes: torch.Tensor, flip: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Image coordinates (B, h*w, 2) as (x, y) of the patch centres of crops cut from ``boxes`` (B, 4)
    and flipped where ``flip`` (B,), on a ``grid`` of (h, w) patches, row-major."""
    h, w = grid
    v, u = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    u, v = u.flatten()[None], v.flatten()[None]  # (1, h*w) in (0, 1) of the crop
    u = torch.where(flip[:, None], 1 - u, u)  # output column j shows source column w-1-j
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack([x0[:, None] + u * (x1 - x0)[:, None], y0[:, None] + v * (y1 - y0)[:, None]], -1)


def crop_coordinates(points: torch.Tensor, boxes: torch.Tensor,
                     flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where image points (B, N, 2) fall in crops (``boxes`` (B, 4), ``flip`` (B,)): ``grid_sample``
    coordinates (B, N, 2) in [-1, 1] (``align_corners=False``) and whether they are inside (B, N)."""
    x0, y0, x1, y1 = (c[:, None] for c in boxes.unbind(1))
    u = (points[..., 0] - x0) / (x1 - x0)
    u = torch.where(flip[:, None], 1 - u, u)
    v = (points[..., 1] - y0) / (y1 - y0)
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    return torch.stack([2 * u - 1, 2 * v - 1], -1), inside


def cross_view_loss(student_patch: torch.Tensor, teacher_patch: torch.Tensor, geometry: list,
                    grid: tuple[int, int], teacher_temp: float, student_temp: float) -> torch.Tensor:
    """Patch-level self-distillation across the two global crops of each image.

    ``student_patch`` / ``teacher_patch`` are (2B, h*w, K) patch-head outputs, crop-major. Each
    student patch of one crop predicts the teacher's output at the same *image* location in the other
    crop (bilinear between the teacher's patches, only where the two crops overlap), with the targets
    Sinkhorn-centred over all overlapping patches. The patch feature must then survive the other crop's
    scale, position and colour augmentation: a dense version of DINO's invariance.
    """
    b = len(student_patch) // 2
    s, t = student_patch.chunk(2), teacher_patch.chunk(2)
    total = student_patch.new_zeros(())
    for a, v in ((0, 1), (1, 0)):  # teacher crop a -> student crop v
        coords, inside = crop_coordinates(patch_centres(*geometry[v], grid), *geometry[a])
        t_map = t[a].transpose(1, 2).reshape(b, -1, *grid)  # (B, K, h, w)
        with torch.no_grad():
            sampled = F.grid_sample(t_map, coords[:, :, None].to(t_map.dtype), mode="bilinear",
                                    align_corners=False)[..., 0].transpose(1, 2)  # (B, h*w, K)
            targets = sinkhorn_targets(sampled[inside], teacher_temp) if inside.any() else sampled[inside]
        total = total + ibot_loss(s[v][inside], targets, student_temp)
    return total / 2


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


@dataclass
class State:
    """Everything a checkpoint holds: models, optimiser, centre, image pool, RNGs and counters."""

    student: DINOModel
    teacher: DINOModel
    optimizer: torch.optim.Optimizer
    center: torch.Tensor  # (1, out_dim) DINO v1's EMA centre of the teacher's CLS outputs
    pool: torch.Tensor  # (pool_size, 3, H, W) uint8 rendered images
    gen: torch.Generator  # data, crops and masks
    step: int = 0
    n_rendered: int = 0


def resolve_hparams(options: dict[str, Any]) -> dict[str, Any]:
    """The run's hyper-parameters: ``DEFAULTS`` updated by ``options``, derived defaults filled in,
    tuples as lists (as they are stored in JSON), validated."""
    unknown = [k for k in options if k not in DEFAULTS]
    if unknown:
        hint = get_close_matches(unknown[0], DEFAULTS, n=1)
        raise PretrainError(f"unknown pretraining option {unknown[0]!r}"
                            + (f"; did you mean {hint[0]!r}?" if hint else ""))
    hp = {k: list(v) if isinstance(v, tuple) else v for k, v in {**DEFAULTS, **options}.items()}
    steps = hp["steps"]
    if hp["warmup_steps"] is None:  # DINO: 10 of 100 epochs
        hp["warmup_steps"] = max(1, steps // 10)
    if hp["warmup_teacher_temp_steps"] is None:  # DINO: 30 of 100 epochs
        hp["warmup_teacher_temp_steps"] = max(1, (3 * steps) // 10)
    if hp["freeze_last_layer_steps"] is None:  # one epoch-equivalent of the pool
        hp["freeze_last_layer_steps"] = max(1, hp["pool_size"] // hp["batch_size"])
    _validate(hp)
    return hp


def build_state(hp: dict[str, Any], dev: torch.device) -> State:
    """Student and teacher start identical (seeded), the pool empty; only the student is optimised."""
    torch.manual_seed(hp["seed"])  # parameter init and timm's DropPath use the global torch RNG
    gen = torch.Generator().manual_seed(hp["seed"])  # everything about data, crops and masks

    def model(drop_path: float) -> DINOModel:
        vit = build_vit(hp["embed_dim"], hp["depth"], hp["num_heads"], hp["mlp_ratio"],
                        hp["global_size"], drop_path)
        head = DINOHead(hp["embed_dim"], hp["out_dim"], hp["head_hidden_dim"], hp["bottleneck_dim"])
        patch_head = (DINOHead(hp["embed_dim"], hp["ibot_out_dim"], hp["head_hidden_dim"],
                               hp["bottleneck_dim"]) if hp["ibot_weight"] + hp["dense_weight"] > 0 else None)
        return DINOModel(vit, head, patch_head)

    student, teacher = model(hp["drop_path"]), model(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    student.to(dev).train()
    teacher.to(dev).eval()  # no dropout / BN in the ViT: eval only switches DropPath off
    optimizer = torch.optim.AdamW(_param_groups(student), lr=0.0)  # lr / wd are set every step
    h, w = hp["render_size"]
    pool = torch.zeros(hp["pool_size"], 3, h, w, dtype=torch.uint8)
    return State(student, teacher, optimizer, torch.zeros(1, hp["out_dim"], device=dev), pool, gen)


def save_checkpoint(state: State, hp: dict[str, Any], path: Path) -> None:
    atomic_torch_save({
        "version": torch.tensor(CHECKPOINT_VERSION),
        "hparams_json": torch.tensor(list(json.dumps(hp).encode()), dtype=torch.uint8),
        "step": torch.tensor(state.step), "n_rendered": torch.tensor(state.n_rendered),
        "student": state.student.state_dict(), "teacher": state.teacher.state_dict(),
        "optimizer": state.optimizer.state_dict(), "center": state.center.cpu(), "pool": state.pool,
        "data_rng": state.gen.get_state(), "torch_rng": torch.get_rng_state(),
    }, path)


def load_checkpoint(state: State, hp: dict[str, Any], path: Path) -> None:
    """Restore ``state`` from ``path``; refuse a checkpoint of another recipe or format."""
    ckpt = safe_torch_load(path)
    saved = json.loads(bytes(ckpt["hparams_json"].tolist()).decode())
    diff = [k for k in RUN_KEYS if saved.get(k, DEFAULTS[k]) != hp[k]]
    if int(ckpt.get("version", 1)) != CHECKPOINT_VERSION or diff:
        reason = (", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {hp[k]!r})" for k in diff)
                  or f"checkpoint format {int(ckpt.get('version', 1))}, expected {CHECKPOINT_VERSION}")
        raise PretrainError(f"cannot resume from {path}: hyper-parameters differ: {reason}")
    state.student.load_state_dict(ckpt["student"])
    state.teacher.load_state_dict(ckpt["teacher"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.center.copy_(ckpt["center"])
    state.pool.copy_(ckpt["pool"])
    state.gen.set_state(ckpt["data_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    state.step, state.n_rendered = int(ckpt["step"]), int(ckpt["n_rendered"])


def train_step(state: State, hp: dict[str, Any], render: Callable[[int, int], np.ndarray],
               dev: torch.device) -> dict[str, Any]:
    """One optimiser step: refresh the pool -> crops and masks -> teacher targets -> student losses
    -> backward -> AdamW -> EMA teacher. Returns the step's log record."""
    t0, step, b = time.time(), state.step, hp["batch_size"]
    # refresh the oldest pool images (round robin) with new renders of the stream
    for _ in range(hp["refresh_per_step"]):
        render_into(state.pool, state.n_rendered % hp["pool_size"], render(hp["seed"], state.n_rendered))
        state.n_rendered += 1
    idx = torch.randperm(hp["pool_size"], generator=state.gen)[:b]
    geometry: list = []  # (boxes, flips) of the two global crops, for the cross-view patch loss
    crops = [c.to(dev) for c in multi_crop(state.pool[idx].float() / 255.0, hp, state.gen, geometry)]
    grid = (hp["global_size"] // 8, hp["global_size"] // 8)
    use_ibot = state.student.patch_head is not None and hp["ibot_weight"] > 0
    use_dense = state.student.patch_head is not None and hp["dense_weight"] > 0
    # masks draw from the data generator only when used, so a DINO-only recipe sees DINO's data stream
    mask = (block_masks(2 * b, grid, hp["mask_prob"], tuple(hp["mask_ratio"]), state.gen).to(dev) if use_ibot
            else None)

    # schedules: pure functions of the step
    lr = cosine_schedule(step, hp["steps"], hp["lr"], hp["min_lr"], hp["warmup_steps"])
    wd = cosine_schedule(step, hp["steps"], hp["weight_decay"], hp["weight_decay_end"])
    momentum = cosine_schedule(step, hp["steps"], hp["momentum_teacher"], 1.0)
    temp = teacher_temperature(step, hp["warmup_teacher_temp"], hp["teacher_temp"],
                               hp["warmup_teacher_temp_steps"])
    state.optimizer.param_groups[0].update(lr=lr, weight_decay=wd)
    state.optimizer.param_groups[1].update(lr=lr)

    # teacher: CLS targets on the 2 unmasked global crops, patch targets where the student is masked
    globals_ = torch.cat(crops[:2])  # (2B, 3, S, S), crop-major
    with torch.no_grad():
        t_tokens = vit_tokens(state.teacher.backbone, globals_)
        t_cls = state.teacher.head(t_tokens[:, 0])
        if hp["centering"] == "sinkhorn":
            targets = sinkhorn_targets(t_cls, temp)
        else:
            targets = ema_centered_targets(t_cls, state.center, temp)
        if use_ibot:
            patch_targets = sinkhorn_targets(state.teacher.patch_head(t_tokens[:, 1:][mask]), temp)
        if use_dense:
            t_patch = state.teacher.patch_head(t_tokens[:, 1:])  # (2B, h*w, K)

    # student: masked global crops and unmasked local crops
    s_tokens = vit_tokens(state.student.backbone, globals_, mask, state.student.mask_token)
    s_cls = [s_tokens[:, 0]]
    if hp["n_local"]:
        s_cls.append(vit_tokens(state.student.backbone, torch.cat(crops[2:]))[:, 0])
    loss_dino = dino_loss(state.student.head(torch.cat(s_cls)), targets, 2 + hp["n_local"],
                          hp["student_temp"])
    loss_ibot = (ibot_loss(state.student.patch_head(s_tokens[:, 1:][mask]), patch_targets,
                           hp["student_temp"]) if use_ibot else loss_dino.new_zeros(()))
    loss_dense = (cross_view_loss(state.student.patch_head(s_tokens[:, 1:]), t_patch, geometry, grid, temp,
                                  hp["student_temp"]) if use_dense else loss_dino.new_zeros(()))
    loss_koleo = sum(koleo_loss(c) for c in s_tokens[:, 0].chunk(2))
    loss = (loss_dino + hp["ibot_weight"] * loss_ibot + hp["dense_weight"] * loss_dense
            + hp["koleo_weight"] * loss_koleo)
    if not torch.isfinite(loss):
        raise RuntimeError(f"pretraining loss is {loss.item()} at step {step}; stopping")

    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(state.student, hp["clip_grad"])
    if step < hp["freeze_last_layer_steps"]:  # AdamW skips parameters without a gradient
        state.student.head.last_layer.grad = None
        if state.student.patch_head is not None:
            state.student.patch_head.last_layer.grad = None
    state.optimizer.step()
    ema_update(state.student, state.teacher, momentum)
    with torch.no_grad():
        state.center.mul_(hp["center_momentum"]).add_(t_cls.mean(0, keepdim=True),
                                                      alpha=1 - hp["center_momentum"])
    state.step += 1
    return dict(step=state.step, loss=round(loss.item(), 5), dino=round(loss_dino.item(), 5),
                ibot=round(loss_ibot.item(), 5), dense=round(loss_dense.item(), 5), koleo=round(float(loss_koleo.detach()), 5),
                lr=lr, wd=round(wd, 5), momentum=round(momentum, 6), teacher_temp=round(temp, 5),
                **_entropies(targets), masked=int(mask.sum()) if use_ibot else 0,
                step_s=round(time.time() - t0, 3), n_rendered=state.n_rendered)


def _entropies(probs: torch.Tensor) -> dict[str, float]:
    """Mean per-sample entropy of the teacher's targets, and the entropy of their batch mean (nats):
    a collapsing teacher shows the first rising to ln K, or the second falling towards 0."""
    mean_p = probs.mean(0)
    return dict(teacher_entropy=round(-(probs * torch.log(probs + 1e-12)).sum(-1).mean().item(), 4),
                teacher_batch_entropy=round(-(mean_p * torch.log(mean_p + 1e-12)).sum().item(), 4))


def pretrain(out_dir: str | Path, *, device: str = "auto", resume: bool = False,
             stop_at: int | None = None, max_minutes: float | None = None, checkpoint_every: int = 50,
             export_every: int = 50, log_every: int = 10, progress: bool = True,
             **options: Any) -> dict[str, Any]:
    """Pretrain the embedded ViT; return a summary dict.

    ``options`` are recipe values overriding ``DEFAULTS`` (``steps`` defines every schedule).
    ``resume=True`` continues from ``out_dir/checkpoint.pth`` (the recipe must match). ``stop_at``
    stops after that many steps without changing the schedules, and ``max_minutes`` does the same when
    this process's wall-clock budget is used up; both checkpoint and export first.
    """
    hp = resolve_hparams(options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = get_device(device)
    state = build_state(hp, dev)
    render = render_fn(hp["renderer"], tuple(hp["render_size"]))
    ckpt_path = out_dir / CHECKPOINT_NAME
    if resume and ckpt_path.is_file():
        load_checkpoint(state, hp, ckpt_path)
    elif resume:
        print(f"resume: no checkpoint at {ckpt_path}, starting from scratch", file=sys.stderr)
    if state.n_rendered == 0:
        for k in tqdm(range(hp["pool_size"]), desc="rendering image pool", disable=not progress):
            render_into(state.pool, k, render(hp["seed"], k))
        state.n_rendered = hp["pool_size"]
    with atomic_write(out_dir / "hparams.json", "w") as handle:
        json.dump(hp, handle, indent=2)

    last = hp["steps"] if stop_at is None else min(stop_at, hp["steps"])
    t_start, record = time.time(), {}
    bar = tqdm(total=hp["steps"], initial=state.step, desc="pretraining", disable=not progress,
               mininterval=5.0)
    if state.step >= last:  # e.g. stop_at=0 saves the initial state
        save_checkpoint(state, hp, ckpt_path)
        export_backbone(state.teacher, hp, out_dir, state.step)
    while state.step < last:
        record = train_step(state, hp, render, dev)
        record["elapsed_s"] = round(time.time() - t_start, 1)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", H=f"{record['teacher_entropy']:.2f}")
        done = state.step
        if done % log_every == 0 or done == last:
            with open(out_dir / LOG_NAME, "a") as handle:
                handle.write(json_text(record, indent=None) + "\n")
        out_of_time = max_minutes is not None and time.time() - t_start > 60 * max_minutes
        if done % checkpoint_every == 0 or done == last or out_of_time:
            save_checkpoint(state, hp, ckpt_path)
        if done % export_every == 0 or done == last or out_of_time:
            export_backbone(state.teacher, hp, out_dir, done)
        if out_of_time:
            print(f"max_minutes={max_minutes} reached after step {done}; checkpoint and teacher saved",
                  file=sys.stderr)
            break
    bar.close()
    return {"step": state.step, "steps": hp["steps"], "out_dir": str(out_dir),
            "backbone": str(out_dir / BACKBONE_NAME), "checkpoint": str(ckpt_path),
            "wall_s": round(time.time() - t_start, 1), "last": record}


def _validate(hp: dict[str, Any]) -> None:
    """Clear errors for values that would otherwise fail deep inside the loop."""
    for key in ("steps", "batch_size", "pool_size", "embed_dim", "depth", "num_heads", "out_dim",
                "ibot_out_dim"):
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
    for key in ("global_scale", "local_scale", "mask_ratio"):
        lo, hi = hp[key]
        if not 0 < lo <= hi <= 1:
            raise PretrainError(f"{key} must satisfy 0 < low <= high <= 1, got {hp[key]}")
    if not 0 <= hp["mask_prob"] <= 1 or hp["ibot_weight"] < 0 or hp["dense_weight"] < 0:
        raise PretrainError(f"mask_prob must be in [0, 1] and ibot_weight >= 0, got "
                            f"{hp['mask_prob']} and {hp['ibot_weight']}")
    if hp["centering"] not in ("sinkhorn", "ema"):
        raise PretrainError(f"centering must be 'sinkhorn' or 'ema', got {hp['centering']!r}")
    if hp["n_local"] < 0 or hp["refresh_per_step"] < 0:
        raise PretrainError("n_local and refresh_per_step must be >= 0")


# ----------------------------------------------------------------------------------------------
# Command line (used by `python -m depthg pretrain` and `python -m depthg.world.pretrain`)

_HELP = {
    "steps": "optimiser steps (every schedule depends on it)",
    "global_size": "global crop side in px (multiple of 8)",
    "local_size": "local crop side in px (multiple of 8)",
    "n_local": "local crops per image",
    "pool_size": "rendered images kept in memory",
    "refresh_per_step": "pool images re-rendered per step",
    "out_dim": "prototypes of the CLS (DINO) head",
    "ibot_out_dim": "prototypes of the patch (iBOT) head",
    "ibot_weight": "weight of the masked-patch loss (0 = DINO only)",
    "dense_weight": "weight of the cross-view patch loss (0 = off)",
    "mask_prob": "fraction of global crops the student sees masked",
    "mask_ratio": "range of the masked fraction of a masked crop's patches",
    "lr": "peak learning rate",
    "warmup_steps": "learning-rate warm-up (default 10%% of steps)",
    "warmup_teacher_temp_steps": "default 30%% of steps",
    "centering": "CLS teacher centring: DINOv2's Sinkhorn-Knopp or DINO v1's EMA centre",
    "koleo_weight": "DINOv2 KoLeo regulariser (0 = off)",
    "freeze_last_layer_steps": "default: one epoch-equivalent = pool_size // batch_size",
}
_CHOICES = {"renderer": ("synthetic", "noise"), "centering": ("sinkhorn", "ema")}


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option per recipe value (defaults: ``DEFAULTS``) and the run options to ``parser``."""
    a = parser.add_argument
    a("--out-dir", default=str(Path.home() / ".cache" / "depthg" / "pretrain"),
      help="where checkpoint, exported teacher and log go (default: ~/.cache/depthg/pretrain)")
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, tuple):
            kind = int if isinstance(value[0], int) else float
            a(flag, type=kind, nargs=len(value), default=value, help=_HELP.get(key))
        elif key in _CHOICES:
            a(flag, choices=_CHOICES[key], default=value, help=_HELP.get(key))
        else:
            kind = int if key.endswith("_steps") or value is None or isinstance(value, int) else type(value)
            a(flag, type=kind, default=value, help=_HELP.get(key))
    a("--recipe", choices=("committed", "dense"), default="committed",
      help="starting values: the committed weights' recipe or DENSE_RECIPE; explicit options win")
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
    recipe = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in DEFAULTS}
    if args.recipe == "dense":  # the preset's values where an option was left at its default
        recipe.update({k: v for k, v in DENSE_RECIPE.items() if recipe[k] == DEFAULTS[k]})
    summary = pretrain(args.out_dir, device=args.device, resume=args.resume, stop_at=args.stop_at,
                       max_minutes=args.max_minutes, checkpoint_every=args.checkpoint_every,
                       export_every=args.export_every, log_every=args.log_every,
                       progress=not args.no_progress, **recipe)
    if args.export_embedded:
        pth, js = export_embedded(args.out_dir, args.export_embedded)
        summary["exported"] = [str(pth), str(js)]
    print(json_text(summary))  # strict JSON, as every command's stdout
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m depthg.world.pretrain", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run_pretrain_from_args(add_pretrain_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    main()
