"""Frozen DINO ViT backbone through timm: weights, patch features and last-layer attention.

Builds the ViT with timm (``pretrained=False``, never touching the network) and loads every official
DINO file format offline with our own, pickle-safe loader. Which weights load, and how the ViT is run
off its native grid, is in docs/backbones.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import urllib.error
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from depthg.utils import DepthGError, atomic_torch_save, safe_torch_load

__all__ = [
    "ALIASES",
    "DINO_FILES",
    "Backbone",
    "BackboneError",
    "EMBEDDED_DIR",
    "dino_url",
    "interpolate_pos_embed",
    "load_backbone",
    "resolve_name",
    "save_backbone_dino_format",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Short names used in configs and the paper's tables → timm architecture names.
ALIASES: dict[str, str] = {
    "vits8": "vit_small_patch8_224",
    "vitb8": "vit_base_patch8_224",
    "vits16": "vit_small_patch16_224",
    "vitb16": "vit_base_patch16_224",
}

DINO_URL_ROOT = "https://dl.fbaipublicfiles.com/dino"

#: Official DINO "backbone only" files per architecture; the first is what ``weights="dino"`` loads
#: (the file the released code downloads, docs/backbones.md).
DINO_FILES: dict[str, tuple[str, ...]] = {
    "vit_small_patch8_224": ("dino_deitsmall8_300ep_pretrain", "dino_deitsmall8_pretrain"),
    "vit_base_patch8_224": ("dino_vitbase8_pretrain",),
    "vit_small_patch16_224": ("dino_deitsmall16_pretrain",),
    "vit_base_patch16_224": ("dino_vitbase16_pretrain",),
}

#: Folder of the embedded tiny ViT (``embedded_vit.json`` + ``.pth``); an attribute so tests can move it.
EMBEDDED_DIR = Path(__file__).resolve().parent / "weights"
EMBEDDED_JSON = "embedded_vit.json"


class BackboneError(DepthGError, RuntimeError):
    """A backbone name, weights file or input the loader cannot use (the message says which and why)."""


class Backbone(nn.Module):
    """A frozen timm ViT (``timm_model``, loaded as ``name``) mapping images in [0, 1] to last-layer patch
    features; always in eval mode, no gradients. ``patch_size``, ``embed_dim``, ``num_heads`` size callers' grids.
    """

    timm_model: VisionTransformer

    def __init__(self, timm_model: VisionTransformer, name: str) -> None:
        super().__init__()
        if not isinstance(timm_model, VisionTransformer):
            raise BackboneError(
                f"backbone {name!r}: expected a timm VisionTransformer, got {type(timm_model).__name__}"
            )
        patch = tuple(timm_model.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise BackboneError(f"backbone {name!r}: only square patches are supported, got {patch}")
        self.timm_model = timm_model
        self.name = name
        self.patch_size = int(patch[0])
        self.embed_dim = int(timm_model.embed_dim)
        self.num_heads = int(timm_model.blocks[-1].attn.num_heads)
        # Non-persistent: they are constants, not weights, and must not appear in saved state dicts.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.timm_model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        """No-op: the backbone is always in eval mode (it is frozen)."""
        return super().train(False)

    def _check_image(self, img: torch.Tensor) -> None:
        if not isinstance(img, torch.Tensor) or img.ndim != 4 or img.shape[1] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise BackboneError(f"img: expected a (B, 3, H, W) float tensor in [0, 1], got {shape}")
        if not img.is_floating_point():
            raise BackboneError(f"img: expected a float tensor in [0, 1], got dtype {img.dtype}")
        h, w = img.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise BackboneError(
                f"img: H and W must be divisible by the patch size {self.patch_size}, got {h}x{w}"
            )
        # ImageNet-normalised images reach about -2.1 and 2.6; the slack allows antialiasing overshoot.
        lo, hi = torch.stack(torch.aminmax(img.detach())).tolist()  # one host sync
        if lo < -0.05 or hi > 1.05:
            raise BackboneError(
                f"img: values must lie in [0, 1] (the backbone normalises internally), got range "
                f"[{lo:.3f}, {hi:.3f}]; was the image ImageNet-normalised already?"
            )

    def _tokens(self, img: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalise, then run the ViT up to and including its final LayerNorm: (B, N, C)."""
        self._check_image(img)
        x = (img - self.mean.to(img.dtype)) / self.std.to(img.dtype)
        m = self.timm_model
        if not self._dino_compatible():
            return m.forward_features(x)
        # DINO's forward: patchify, prepend CLS, add the positional embedding resized DINO's way.
        x = m.patch_embed(x)
        if x.ndim == 4:  # dynamic_img_size gives NHWC
            x = x.flatten(1, 2)
        grid = tuple(m.patch_embed.grid_size)
        pos = interpolate_pos_embed(m.pos_embed, grid, self.grid_size(img), num_prefix_tokens=1)
        x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        x = m.norm_pre(m.patch_drop(m.pos_drop(x)))
        return m.norm(m.blocks(x))

    def _dino_compatible(self) -> bool:
        """A plain CLS + patches ViT whose positional embedding covers the CLS token (DINO's layout)."""
        m = self.timm_model
        return (
            m.cls_token is not None
            and m.reg_token is None
            and m.pos_embed is not None
            and not m.no_embed_class
            and m.num_prefix_tokens == 1
        )

    def _to_map(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Drop the prefix (CLS) tokens and reshape the patch tokens to (B, C, h, w)."""
        h, w = hw
        patches = tokens[:, self.timm_model.num_prefix_tokens :, :]
        return patches.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, C, H/p, W/p)``: last block after the final LayerNorm, CLS dropped."""
        tokens = self._tokens(img)
        return self._to_map(tokens, self.grid_size(img))

    def grid_size(self, img: torch.Tensor) -> tuple[int, int]:
        """The feature grid ``(H/p, W/p)`` of an image batch."""
        return img.shape[-2] // self.patch_size, img.shape[-1] // self.patch_size

    @contextlib.contextmanager
    def _capture_last_attention(self) -> Iterator[dict[str, torch.Tensor]]:
        """Materialise the last block's softmaxed attention for one pass (unfused path + ``attn_drop`` hook)."""
        attn = self.timm_model.blocks[-1].attn
        if not hasattr(attn, "fused_attn") or not hasattr(attn, "attn_drop"):
            raise BackboneError(
                f"backbone {self.name!r}: its last attention layer ({type(attn).__name__}) has no "
                "fused_attn/attn_drop, so its attention cannot be read out"
            )
        captured: dict[str, torch.Tensor] = {}

        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            captured["attn"] = output

        old_fused = attn.fused_attn
        attn.fused_attn = False
        handle = attn.attn_drop.register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()
            attn.fused_attn = old_fused

    def last_attention(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and the full last-layer attention ``(B, heads, N, N)`` (rows softmaxed over all N =
        prefix + h*w keys)."""
        with self._capture_last_attention() as captured:
            tokens = self._tokens(img)
        if "attn" not in captured:
            raise BackboneError(f"backbone {self.name!r}: the last-layer attention was not captured")
        return self._to_map(tokens, self.grid_size(img)), captured["attn"]

    def patch_attention(self, img: torch.Tensor) -> torch.Tensor:
        """Last-layer patch -> patch attention averaged over heads ``(B, h*w, h*w)``, row-major cells, prefix
        columns dropped, rows not renormalised."""
        _, attn = self.last_attention(img)
        npt = self.timm_model.num_prefix_tokens
        return attn[:, :, npt:, npt:].mean(dim=1)


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize a positional embedding ``(1, prefix + gh*gw, C)`` to ``new_grid`` exactly as DINO does.

    Bicubic with ``scale_factor = (new + 0.1) / old`` (docs/backbones.md); prefix entries are kept and
    the native grid is returned unchanged.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    scale = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
    grid = F.interpolate(grid.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != tuple(new_grid):
        raise BackboneError(f"pos_embed interpolation gave {tuple(grid.shape[-2:])}, expected {new_grid}")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, grid], dim=1)


def resolve_name(name: str) -> str:
    """Alias (``vits8``) or timm name, optionally with a pretrained tag (``….dino``) → timm name."""
    if not isinstance(name, str) or not name:
        raise BackboneError(f"backbone name: expected a non-empty string, got {name!r}")
    arch = ALIASES.get(name.lower(), name)
    arch = arch.split(".", 1)[0]  # "vit_small_patch8_224.dino" → "vit_small_patch8_224"
    if not timm.is_model(arch):
        raise BackboneError(
            f"unknown backbone {name!r}: expected one of the aliases {sorted(ALIASES)}, 'embedded', or "
            "a timm ViT name such as 'vit_small_patch8_224'"
        )
    return arch


def dino_url(arch: str, which: str = "dino") -> str:
    """Official DINO release URL for an architecture: ``which`` = ``"dino"`` (the default file) or a file stem."""
    arch = resolve_name(arch)
    if arch not in DINO_FILES:
        raise BackboneError(
            f"there is no official DINO release for {arch!r}; DINO weights exist for {sorted(DINO_FILES)}"
        )
    stems = DINO_FILES[arch]
    stem = stems[0] if which == "dino" else which
    if stem not in stems:
        raise BackboneError(f"{which!r} is not an official DINO file for {arch!r}; choose from {stems}")
    return f"{DINO_URL_ROOT}/{stem}/{stem}.pth"


def _is_url(weights: str) -> bool:
    return bool(re.match(r"^(https?|file)://", weights))


def _download_once(url: str) -> Path:
    """Download ``url`` into ``torch.hub.get_dir()/checkpoints`` unless it is already there."""
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    if not filename:
        raise BackboneError(f"weights URL {url!r} does not end in a file name")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache / filename
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        # torch writes to a temporary file and renames it, so an interrupted download leaves nothing.
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except (urllib.error.URLError, OSError) as err:
        raise BackboneError(
            f"could not download backbone weights from {url} ({err}). Without network access, fetch "
            f"the file elsewhere and either pass its local path as weights=... or copy it to {target}"
        ) from None
    return target


def _read_weights_file(path: Path) -> Any:
    """Read a ``.safetensors`` or ``torch.save`` file; only ``argparse.Namespace`` may be unpickled."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as err:  # a truncated or damaged file
            raise BackboneError(f"{path}: not a readable safetensors file ({err}); expected a complete "
                                ".safetensors file of ViT weights") from None
    with torch.serialization.safe_globals([argparse.Namespace]):
        return safe_torch_load(path, map_location="cpu")


def _extract_backbone_state(obj: Any, source: str, model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Pull the ViT ``state_dict`` out of any DINO file layout (teacher, wrappers, prefixes, head dropped)."""
    if not isinstance(obj, Mapping):
        raise BackboneError(f"{source}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    if "teacher" in obj:
        obj = obj["teacher"]
    else:
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    state: dict[str, torch.Tensor] = {}
    model_has_head = any(k.startswith("head.") for k in model_keys)
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise BackboneError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "backbone."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        if key.startswith("head.") and not model_has_head:
            continue
        state[key] = value
    return state


def _load_into(model: VisionTransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state`` into ``model``, resampling pos_embed if the grids differ."""
    own = model.state_dict()
    old, new = state.get("pos_embed"), own.get("pos_embed")
    # Only a different grid is resampled; a different width is an architecture mismatch (listed below).
    if old is not None and new is not None and old.shape[1] != new.shape[1] and old.shape[2] == new.shape[2]:
        npt = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        old_side = int(round((old.shape[1] - npt) ** 0.5))
        if old.ndim != 3 or old_side * old_side != old.shape[1] - npt:
            raise BackboneError(
                f"{source}: pos_embed {tuple(old.shape)} cannot be resampled to {tuple(new.shape)}"
            )
        state = dict(state)
        state["pos_embed"] = interpolate_pos_embed(
            old, (old_side, old_side), tuple(model.patch_embed.grid_size), num_prefix_tokens=npt
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
        raise BackboneError(
            f"{source} does not fit the backbone architecture; " + "; ".join(parts)
            + ". Check the backbone name and timm keyword arguments (e.g. embed_dim, depth)."
        )
    model.load_state_dict(state, strict=True)


def _load_file(model: VisionTransformer, path: Path) -> None:
    """Load a DINO weights file of any layout into ``model`` (strict, pos_embed resampled if needed)."""
    _load_into(model, _extract_backbone_state(_read_weights_file(path), str(path), set(model.state_dict())), str(path))


def _resolve_weights(arch: str, weights: str | os.PathLike) -> Path:
    """Turn a weights argument into a local file (downloading a URL once)."""
    text = os.fspath(weights)
    if _is_url(text):
        return _download_once(text)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if text == "dino" or re.fullmatch(r"dino_\w+_pretrain", text):
        return _download_once(dino_url(arch, text))
    raise FileNotFoundError(
        f"backbone weights not found: {path} (expected a DINO .pth/.safetensors file, an "
        "http(s)/file:// URL, 'dino' or an official DINO file stem, or None for random weights)"
    )


def _create(arch: str, timm_kwargs: dict[str, Any]) -> VisionTransformer:
    """Build the timm ViT without network access, deterministically initialised."""
    if "pretrained" in timm_kwargs or "pretrained_cfg_overlay" in timm_kwargs:
        raise BackboneError(
            "load_backbone builds the ViT with pretrained=False and loads weights itself (no network); "
            "pass the weights as weights='dino' / a file / a URL instead of pretrained=..."
        )
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **timm_kwargs}
    # A fixed seed on a forked RNG: the same random init every time, the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model = timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as err:
            raise BackboneError(
                f"timm could not build {arch!r} with {kwargs}: {err} (the backbone must be a timm "
                "VisionTransformer, e.g. vit_small_patch8_224)"
            ) from None
    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"{arch!r} is a {type(model).__name__}; the backbone must be a timm ViT")
    return model


def _load_embedded(timm_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], Path]:
    """Read ``embedded_vit.json`` → (timm name, timm kwargs, weights path)."""
    meta_path = Path(EMBEDDED_DIR) / EMBEDDED_JSON
    if not meta_path.is_file():
        raise BackboneError(
            f"the embedded backbone is not in this checkout: {meta_path} does not exist. Make it with "
            "`python -m depthg pretrain` (it writes embedded_vit.json and its .pth there), or use a "
            "DINO backbone such as load_backbone('vits8', weights='path/to/dino_deitsmall8_pretrain.pth')"
        )
    try:
        meta = json.loads(meta_path.read_text())
        arch = str(meta["timm_name"])
        kwargs = dict(meta.get("timm_kwargs", {}))
        weights_path = meta_path.parent / str(meta["weights"])
    except (ValueError, KeyError, TypeError) as err:
        raise BackboneError(
            f"{meta_path}: expected JSON with 'timm_name', 'timm_kwargs' and 'weights' ({err!r})"
        ) from None
    if not weights_path.is_file():
        raise BackboneError(
            f"the embedded backbone's weights are missing: {meta_path} names {weights_path}, which does "
            "not exist. Re-create them with `python -m depthg pretrain`."
        )
    kwargs.update(timm_kwargs)
    return arch, kwargs, weights_path


def load_backbone(name: str, weights: str | os.PathLike | None = None, **timm_kwargs: Any) -> Backbone:
    """Build a frozen :class:`Backbone` from a timm ViT name, an alias (:data:`ALIASES`) or ``"embedded"``,
    with ``weights`` a DINO file, URL, ``"dino"``/file stem or None (random; docs/backbones.md);
    ``timm_kwargs`` go to ``timm.create_model``. Unusable names or files raise :class:`BackboneError`.
    """
    if name == "embedded":
        if weights is not None:
            raise BackboneError(
                "load_backbone('embedded') brings its own weights; pass weights=None (to load other "
                "weights into that architecture, use its timm name from embedded_vit.json)"
            )
        arch, kwargs, path = _load_embedded(timm_kwargs)
        arch = resolve_name(arch)
        model = _create(arch, kwargs)
        _load_file(model, path)
        return Backbone(model, "embedded")

    arch = resolve_name(name)
    model = _create(arch, timm_kwargs)
    if weights is None:
        warnings.warn(
            f"backbone {name!r} has random weights (weights=None): its features are not meaningful and "
            "nothing trained on them says anything about DepthG. Pass weights='dino' or a DINO file.",
            UserWarning,
            stacklevel=2,
        )
    else:
        path = _resolve_weights(arch, weights)
        _load_file(model, path)
    return Backbone(model, name)


def save_backbone_dino_format(
    model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike
) -> Path:
    """Write a :class:`Backbone`, timm ViT or state dict as a DINO "backbone only" ``.pth``, atomically."""
    if isinstance(model_or_state, Backbone):
        state = model_or_state.timm_model.state_dict()
    elif isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
    elif isinstance(model_or_state, Mapping):
        state = dict(model_or_state)
    else:
        raise BackboneError(
            f"model_or_state: expected an nn.Module or a state dict, got {type(model_or_state).__name__}"
        )
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise BackboneError(f"model_or_state: entry {key!r} is a {type(value).__name__}, not a tensor")
        plain[key] = value.detach().cpu().contiguous().clone()
    path = Path(path)
    atomic_torch_save(plain, path)
    return path
