"""Backbone: every official checkpoint format loads and reproduces the source model's features; the
attention read-out matches a manual computation; the module is frozen; unsafe files are refused."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import depthg.backbone as bb
from depthg.backbone import Backbone, dino_url, load_backbone, save_backbone_dino_format
from depthg.utils import DepthGError, UnsafeCheckpointError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def make_source(tiny: dict, seed: int = 123, **overrides) -> torch.nn.Module:
    """A tiny ViT with weights unlike load_backbone's own (seed-0) random init."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **tiny, **overrides}
    model = timm.create_model("vit_small_patch8_224", pretrained=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def reference_features(model: torch.nn.Module, img: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """Independent reference: normalise, forward_features, drop CLS, reshape."""
    with torch.no_grad():
        tokens = model.forward_features((img - MEAN) / STD)[:, 1:]
    b, (h, w) = img.shape[0], (img.shape[2] // patch, img.shape[3] // patch)
    return tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2)


@pytest.fixture
def img() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _save(fmt: str, state: dict, tmp_path: Path, monkeypatch) -> str:
    if fmt == "pth":
        path = tmp_path / "dino_deitsmall8_pretrain.pth"
        save_backbone_dino_format(state, path)
        return str(path)
    if fmt == "full":
        # The layout of DINO's main_dino.py checkpoint.pth: student wrapped in DDP ("module."),
        # teacher not, both behind MultiCropWrapper ("backbone."), DINOHead under "head.", and the
        # command line as an argparse.Namespace.
        teacher = {f"backbone.{k}": v for k, v in state.items()}
        teacher["head.mlp.0.weight"] = torch.zeros(8, 32)
        teacher["head.last_layer.weight_g"] = torch.ones(65, 1)
        student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
        student["module.head.mlp.0.weight"] = torch.zeros(8, 32)
        ckpt = {
            "student": student,
            "teacher": teacher,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "epoch": 3,
            "args": argparse.Namespace(arch="vit_small", patch_size=8, out_dim=65),
            "dino_loss": {"center": torch.zeros(1, 65)},
        }
        path = tmp_path / "checkpoint.pth"
        torch.save(ckpt, path)
        return str(path)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return str(path)
    if fmt == "url":
        src = tmp_path / "src" / "dino_tiny.pth"
        save_backbone_dino_format(state, src)
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
        return src.resolve().as_uri()
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["pth", "full", "safetensors", "url"])
def test_every_format_loads_identical_features(fmt, tiny_vit_kwargs, img, tmp_path, monkeypatch):
    source = make_source(tiny_vit_kwargs)
    weights = _save(fmt, source.state_dict(), tmp_path, monkeypatch)
    backbone = load_backbone("vits8", weights=weights, **tiny_vit_kwargs)
    assert isinstance(backbone, Backbone)
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.timm_model.state_dict()[key], value), key
    with torch.no_grad():
        feats = backbone(img)
    torch.testing.assert_close(feats, reference_features(source, img), rtol=0, atol=1e-6)
    if fmt == "url":
        cached = tmp_path / "hub" / "checkpoints" / "dino_tiny.pth"
        assert cached.is_file()
        shutil.rmtree(tmp_path / "src")  # downloaded once: the second load uses the cache only
        again = load_backbone("vits8", weights=weights, **tiny_vit_kwargs)
        assert torch.equal(again(img), feats)


def test_full_checkpoint_with_ddp_teacher(tiny_vit_kwargs, img, tmp_path):
    source = make_source(tiny_vit_kwargs)
    teacher = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
    teacher["module.head.last_layer.weight_v"] = torch.ones(65, 8)
    torch.save({"teacher": teacher, "student": {}}, tmp_path / "ckpt.pth")
    backbone = load_backbone("vit_small_patch8_224", tmp_path / "ckpt.pth", **tiny_vit_kwargs)
    torch.testing.assert_close(backbone(img), reference_features(source, img), rtol=0, atol=1e-6)


def test_dino_resolves_to_official_url_and_downloads_once(tiny_vit_kwargs, tmp_path, monkeypatch):
    source_file = tmp_path / "tiny.pth"
    save_backbone_dino_format(make_source(tiny_vit_kwargs), source_file)
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        shutil.copyfile(source_file, dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    for _ in range(2):
        load_backbone("vits8", weights="dino", **tiny_vit_kwargs)
    root = "https://dl.fbaipublicfiles.com/dino"
    expected = f"{root}/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth"
    assert calls == [expected]
    assert (tmp_path / "hub" / "checkpoints" / "dino_deitsmall8_300ep_pretrain.pth").is_file()
    assert dino_url("vitb8") == f"{root}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    assert dino_url("vits8", "dino_deitsmall8_pretrain") == f"{root}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
    with pytest.raises(DepthGError, match="not an official DINO file"):
        dino_url("vits8", "dino_vitbase8_pretrain")


def test_failed_download_says_what_to_do(tiny_vit_kwargs, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    missing = (tmp_path / "nowhere" / "w.pth").as_uri()
    with pytest.raises(DepthGError, match="pass its local path"):
        load_backbone("vits8", weights=missing, **tiny_vit_kwargs)


def test_feature_shape_any_divisible_size(tiny_vit_kwargs):
    with pytest.warns(UserWarning, match="not meaningful"):
        backbone = load_backbone("vits8", **tiny_vit_kwargs)
    assert (backbone.patch_size, backbone.embed_dim, backbone.num_heads) == (8, 32, 2)
    x = torch.rand(3, 3, 48, 40)
    assert backbone(x).shape == (3, 32, 6, 5)
    with pytest.raises(DepthGError, match="divisible"):
        backbone(torch.rand(1, 3, 50, 40))
    with pytest.raises(DepthGError, match="normalised"):
        backbone((x - MEAN) / STD)


def test_random_init_is_deterministic_and_leaves_global_rng(tiny_vit_kwargs):
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    with pytest.warns(UserWarning):
        a = load_backbone("vits8", **tiny_vit_kwargs)
    assert torch.equal(torch.rand(1), expected_next)
    with pytest.warns(UserWarning):
        b = load_backbone("vits8", **tiny_vit_kwargs)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def manual_last_attention(model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
    """DINO-style attention of the last block, computed by hand (qkv of the last block, softmax(q k^T))."""
    z = dino_tokens(model, img)
    with torch.no_grad():
        for blk in model.blocks[:-1]:
            z = blk(z)
        blk = model.blocks[-1]
        b, n, c = z.shape
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(blk.norm1(z)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        return torch.softmax(q @ k.transpose(-2, -1) * (c // heads) ** -0.5, dim=-1)


def test_attention_matches_manual_computation(tiny_vit_kwargs, tmp_path):
    source = make_source(tiny_vit_kwargs)
    save_backbone_dino_format(source, tmp_path / "w.pth")
    backbone = load_backbone("vits8", tmp_path / "w.pth", **tiny_vit_kwargs)
    img = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    h, w = 6, 8
    expected = manual_last_attention(source, img)  # (B, heads, 1 + hw, 1 + hw)
    with torch.no_grad():
        feats, full = backbone.last_attention(img)
        patch = backbone.patch_attention(img)
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 2, 1 + h * w), rtol=0, atol=1e-5)
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-6)
    assert patch.shape == (2, h * w, h * w)
    torch.testing.assert_close(patch, expected[:, :, 1:, 1:].mean(1), rtol=0, atol=1e-6)
    # The unfused path used to read attention gives the same features as the fused forward.
    torch.testing.assert_close(feats, backbone(img), rtol=0, atol=1e-5)
    assert backbone.timm_model.blocks[-1].attn.fused_attn == source.blocks[-1].attn.fused_attn


def test_frozen_and_always_eval(tiny_vit_kwargs):
    with pytest.warns(UserWarning):
        backbone = load_backbone("vits8", drop_rate=0.5, **tiny_vit_kwargs)
    parent = torch.nn.Sequential(backbone, torch.nn.Conv2d(32, 4, 1))
    parent.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    assert parent[1].training
    assert not any(p.requires_grad for p in backbone.parameters())
    x = torch.rand(2, 3, 32, 32)
    out1, out2 = parent(x), parent(x)
    assert torch.equal(out1, out2), "dropout inside the backbone must never fire"
    out1.sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert parent[1].weight.grad is not None


class _Evil:
    marker: Path

    def __reduce__(self):
        return (open, (str(_Evil.marker), "w"))


@pytest.mark.parametrize("nested", [False, True])
def test_unsafe_pickle_is_refused_unexecuted(nested, tiny_vit_kwargs, tmp_path):
    _Evil.marker = tmp_path / "pwned"
    payload = {"cls_token": torch.zeros(1, 1, 32), "evil": _Evil()}
    if nested:
        payload = {"teacher": payload}
    path = tmp_path / "evil.pth"
    torch.save(payload, path)
    assert not _Evil.marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_backbone("vits8", weights=path, **tiny_vit_kwargs)
    assert not _Evil.marker.exists(), "loading must not execute anything from the file"


def test_missing_unexpected_and_mismatched_keys_are_listed(tiny_vit_kwargs, tmp_path):
    state = make_source(tiny_vit_kwargs).state_dict()
    del state["blocks.1.norm1.weight"]
    state["blocks.2.extra.weight"] = torch.zeros(3)
    save_backbone_dino_format(state, tmp_path / "bad.pth")
    with pytest.raises(DepthGError) as err:
        load_backbone("vits8", tmp_path / "bad.pth", **tiny_vit_kwargs)
    assert "blocks.1.norm1.weight" in str(err.value) and "blocks.2.extra.weight" in str(err.value)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)

    save_backbone_dino_format(make_source(tiny_vit_kwargs), tmp_path / "small.pth")
    with pytest.raises(DepthGError, match="shape mismatches"):
        load_backbone("vits8", tmp_path / "small.pth", **{**tiny_vit_kwargs, "embed_dim": 48})
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone("vits8", tmp_path / "nope.pth", **tiny_vit_kwargs)


def test_pos_embed_is_resampled_bicubically(tiny_vit_kwargs, tmp_path):
    source = make_source(tiny_vit_kwargs, img_size=32)  # 4x4 grid
    save_backbone_dino_format(source, tmp_path / "w.pth")
    backbone = load_backbone("vits8", tmp_path / "w.pth", **{**tiny_vit_kwargs, "img_size": 64})
    got = backbone.timm_model.pos_embed
    old = source.pos_embed
    assert got.shape == (1, 1 + 64, 32)
    assert torch.equal(got[:, :1], old[:, :1])
    grid = old[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    # DINO's interpolate_pos_encoding: bicubic, scale_factor (new + 0.1) / old, no antialias.
    expected = F.interpolate(grid, scale_factor=(8.1 / 4, 8.1 / 4), mode="bicubic")
    torch.testing.assert_close(got[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 64, 32))


def dino_tokens(model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
    """DINO's vision_transformer.py prepare_tokens, written out by hand."""
    x = (img - MEAN) / STD
    b, _, w, h = x.shape  # DINO's own (swapped) names
    with torch.no_grad():
        tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([model.cls_token.expand(b, -1, -1), tokens], dim=1)
        n = model.pos_embed.shape[1] - 1
        side = int(n**0.5)
        if n == (w // 8) * (h // 8) and w == h:
            return tokens + model.pos_embed
        w0, h0 = w // 8 + 0.1, h // 8 + 0.1
        patch_pos = model.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=(w0 / side, h0 / side), mode="bicubic")
        patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, tokens.shape[-1])
        return tokens + torch.cat([model.pos_embed[:, :1], patch_pos], dim=1)


def dino_forward(model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
    """DINO's forward: prepare_tokens, blocks, final norm; patch tokens as (B, C, h, w)."""
    b, _, w, h = img.shape
    tokens = dino_tokens(model, img)
    with torch.no_grad():
        for blk in model.blocks:
            tokens = blk(tokens)
        tokens = model.norm(tokens)[:, 1:]
    return tokens.reshape(b, w // 8, h // 8, -1).permute(0, 3, 1, 2)


def test_off_grid_inputs_follow_dino_interpolation(tiny_vit_kwargs, tmp_path):
    source = make_source(tiny_vit_kwargs)  # native grid 8x8
    save_backbone_dino_format(source, tmp_path / "w.pth")
    backbone = load_backbone("vits8", tmp_path / "w.pth", **tiny_vit_kwargs)
    big = torch.rand(1, 3, 80, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dino = backbone(big)
        torch.testing.assert_close(dino, dino_forward(source, big), rtol=0, atol=1e-5)
        # timm's own resampling (antialiased, no +0.1 offset) would give other features
        timm_feats = backbone.timm_model.forward_features((big - backbone.mean) / backbone.std)[:, 1:]
    assert not torch.allclose(timm_feats.transpose(1, 2).reshape(dino.shape), dino, atol=1e-4)


def test_names(tiny_vit_kwargs):
    assert bb.resolve_name("vitb8") == "vit_base_patch8_224"
    assert bb.resolve_name("vit_small_patch8_224.dino") == "vit_small_patch8_224"
    with pytest.raises(DepthGError, match="unknown backbone"):
        load_backbone("vit_tiny_imaginary", **tiny_vit_kwargs)
    with pytest.raises(DepthGError, match="weights="):
        load_backbone("vits8", pretrained=True, **tiny_vit_kwargs)
    with pytest.raises(DepthGError, match="must be a timm"):
        load_backbone("resnet18", weights=None)


def test_embedded(tiny_vit_kwargs, img, tmp_path, monkeypatch):
    monkeypatch.setattr(bb, "EMBEDDED_DIR", tmp_path / "weights")
    with pytest.raises(DepthGError, match="python -m depthg pretrain"):
        load_backbone("embedded")
    source = make_source(tiny_vit_kwargs)
    save_backbone_dino_format(source, tmp_path / "weights" / "embedded_vit.pth")
    meta = {"timm_name": "vit_small_patch8_224", "timm_kwargs": tiny_vit_kwargs,
            "weights": "embedded_vit.pth"}
    (tmp_path / "weights" / "embedded_vit.json").write_text(json.dumps(meta))
    backbone = load_backbone("embedded")
    assert backbone.name == "embedded"
    torch.testing.assert_close(backbone(img), reference_features(source, img), rtol=0, atol=1e-6)
    with pytest.raises(DepthGError, match="own weights"):
        load_backbone("embedded", weights=tmp_path / "weights" / "embedded_vit.pth")


def test_the_run_checks_the_loaded_backbones_patch_size(tiny_vit_kwargs, tmp_path, monkeypatch):
    """Config validation knows the embedded backbone's patch size as a constant (8); when the embedded file
    holds another architecture, the run's build_backbone finds it out before any data is prepared."""
    from depthg.build import build_backbone
    from depthg.config import Config, ConfigError

    monkeypatch.setattr(bb, "EMBEDDED_DIR", tmp_path / "weights")
    source = make_source(tiny_vit_kwargs, patch_size=16)
    save_backbone_dino_format(source, tmp_path / "weights" / "embedded_vit.pth")
    meta = {"timm_name": "vit_small_patch8_224", "timm_kwargs": {**tiny_vit_kwargs, "patch_size": 16},
            "weights": "embedded_vit.pth"}
    (tmp_path / "weights" / "embedded_vit.json").write_text(json.dumps(meta))
    cfg = Config(backbone="embedded", res=72, eval_res=64, depth_sampling="random")  # valid for patch 8
    with pytest.raises(ConfigError, match="'res' = 72: expected a multiple of the backbone's patch size 16"):
        build_backbone(cfg)
    assert build_backbone(cfg.replace(res=64)).patch_size == 16


def test_saved_file_is_plain_and_official(tiny_vit_kwargs, tmp_path):
    source = make_source(tiny_vit_kwargs)
    with pytest.warns(UserWarning):
        wrapped = load_backbone("vits8", **tiny_vit_kwargs)
    save_backbone_dino_format(wrapped, tmp_path / "a.pth")
    state = torch.load(tmp_path / "a.pth", weights_only=True)
    assert list(state) == list(source.state_dict())
    assert "mean" not in state and all(type(v) is torch.Tensor for v in state.values())
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"], "no temporary file is left behind"


def test_truncated_safetensors_is_a_clear_backbone_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file({"pos_embed": torch.zeros(1, 5, 8)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(bb.BackboneError, match="not a readable safetensors file"):
        load_backbone("vit_small_patch8_224", weights=str(path))
