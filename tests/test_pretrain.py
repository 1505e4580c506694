"""Tests of depthg/world/pretrain.py: DINO + iBOT self-distillation of the embedded backbone.

Each test runs a tiny ViT (embed 32, depth 2) for a few steps on tiny renders of the synthetic world
(or smooth random images when the generator is not importable), so the whole file takes seconds.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from depthg.world import pretrain
from depthg.utils import safe_torch_load

try:  # prefer tiny renders of the synthetic world; smooth noise only if the generator is unavailable
    from depthg.world.synthetic import render_scene  # noqa: F401

    RENDERER = "synthetic"
except ImportError:
    RENDERER = "noise"


def tiny_run_kwargs(**over) -> dict:
    """A tiny DINO run: 2 global crops of 32 px and 2 local crops of 16 px from 32x64 renders."""
    kw = dict(steps=3, batch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
              global_size=32, local_size=16, n_local=2, render_size=(32, 64), pool_size=6,
              refresh_per_step=1, renderer=RENDERER, out_dim=64, head_hidden_dim=32,
              bottleneck_dim=16, seed=3, device="cpu", progress=False, checkpoint_every=100,
              export_every=100, log_every=1, ibot_weight=0.0, dense_weight=0.0)
    kw.update(over)
    return kw


# ------------------------------------------------------------------------------------- schedules


def test_cosine_schedule_endpoints_and_warmup():
    # warm-up is linear from warmup_start to start; then a half cosine reaching `end` at the last step
    assert pretrain.cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=2) == 0.0
    assert pretrain.cosine_schedule(1, 10, 1.0, 0.0, warmup_steps=2) == 0.5
    assert pretrain.cosine_schedule(2, 10, 1.0, 0.0, warmup_steps=2) == 1.0
    assert pretrain.cosine_schedule(9, 10, 1.0, 0.0, warmup_steps=2) == pytest.approx(0.0)
    # midpoint of the cosine part (steps 2..9, span 7): value (start+end)/2
    assert pretrain.cosine_schedule(0, 3, 0.996, 1.0) == 0.996
    assert pretrain.cosine_schedule(2, 3, 0.996, 1.0) == pytest.approx(1.0)
    assert pretrain.cosine_schedule(1, 3, 0.996, 1.0) == pytest.approx(0.998)
    assert pretrain.teacher_temperature(0, 0.04, 0.07, 10) == 0.04
    assert pretrain.teacher_temperature(5, 0.04, 0.07, 10) == pytest.approx(0.055)
    assert pretrain.teacher_temperature(50, 0.04, 0.07, 10) == 0.07


# ------------------------------------------------------------------------------------------ loss


def test_dino_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    b, k, n_crops = 3, 5, 4
    s = torch.randn(n_crops * b, k, generator=g)
    t = torch.randn(2 * b, k, generator=g)
    c = torch.randn(1, k, generator=g)
    loss = pretrain.dino_loss(s, pretrain.ema_centered_targets(t, c, 0.05), n_crops, student_temp=0.1)
    # independent reference: explicit loops over images, teacher views and student views
    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue
            pair = 0.0
            for i in range(b):
                logits_t = [(t[iq * b + i, j].item() - c[0, j].item()) / 0.05 for j in range(k)]
                zt = sum(math.exp(x) for x in logits_t)
                logits_s = [s[v * b + i, j].item() / 0.1 for j in range(k)]
                zs = math.log(sum(math.exp(x) for x in logits_s))
                pair += sum(-math.exp(logits_t[j]) / zt * (logits_s[j] - zs) for j in range(k))
            total += pair / b
            terms += 1
    assert terms == 2 * n_crops - 2
    assert loss.item() == pytest.approx(total / terms, rel=1e-5)


def test_sinkhorn_targets_are_balanced_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 6, generator=g) * 0.2
    q = pretrain.sinkhorn_targets(logits, 0.05, n_iters=50)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-4)  # each sample: a distribution
    assert torch.allclose(q.sum(0), torch.full((6,), 2.0), atol=1e-4)  # each prototype: N/K
    # identical samples cannot be told apart: balanced assignment is then uniform
    same = pretrain.sinkhorn_targets(logits[:1].expand(12, 6), 0.05, n_iters=50)
    assert torch.allclose(same, torch.full((12, 6), 1 / 6), atol=1e-4)


def test_koleo_loss_brute_force():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    xn = torch.nn.functional.normalize(x, dim=-1)
    d = torch.cdist(xn, xn) + torch.eye(3) * 10
    assert pretrain.koleo_loss(x).item() == pytest.approx(-torch.log(d.min(1).values).mean().item(), rel=1e-4)


def test_dino_head_is_a_cosine_layer():
    torch.manual_seed(0)
    head = pretrain.DINOHead(8, 10, 16, 4)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 10)
    assert out.abs().max() <= 1 + 1e-6  # normalised features x normalised prototypes
    head.last_layer.data *= 7.0  # the norm of the prototypes has no effect (weight norm, g = 1)
    assert torch.allclose(head(torch.ones(2, 8)), F.normalize(head.mlp(torch.ones(2, 8)), dim=-1)
                          @ F.normalize(head.last_layer, dim=-1).t())


# ---------------------------------------------------------------------------------- augmentations


def test_multi_crop_shapes_and_determinism():
    hp = dict(n_local=3, global_size=16, local_size=8, global_scale=(0.3, 1.0),
              local_scale=(0.05, 0.3))
    images = torch.rand(2, 3, 20, 40, generator=torch.Generator().manual_seed(1))
    a = pretrain.multi_crop(images, hp, torch.Generator().manual_seed(5))
    b = pretrain.multi_crop(images, hp, torch.Generator().manual_seed(5))
    assert [tuple(x.shape) for x in a] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.isfinite(x).all() for x in a)


def test_full_image_crop_is_a_resize():
    # with scale (1, 1) on a square image the box is the whole image: roi_align of a constant image
    # is the constant, and of a horizontal ramp is a (possibly flipped) ramp
    img = torch.linspace(0, 1, 16).expand(1, 3, 16, 16).contiguous()
    out = pretrain.random_resized_crops(img, 8, (1.0, 1.0), torch.Generator().manual_seed(0))
    row = out[0, 0, 0]
    assert torch.allclose(out[0, 0], row.expand(8, 8))
    ramp = F.interpolate(img, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    ref = ramp[0, 0, 0]
    assert torch.allclose(row, ref, atol=0.02) or torch.allclose(row, ref.flip(0), atol=0.02)


# ------------------------------------------------------------------------------------ training run


def test_tiny_run_exports_a_dino_format_backbone(tmp_path, monkeypatch):
    summary = pretrain.pretrain(tmp_path / "run", **tiny_run_kwargs())
    assert summary["step"] == 3
    state = safe_torch_load(tmp_path / "run" / pretrain.BACKBONE_NAME)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    arch = json.loads((tmp_path / "run" / pretrain.BACKBONE_JSON).read_text())
    ref = timm.create_model(arch["timm_name"], pretrained=False, num_classes=0,
                            dynamic_img_size=True, **arch["timm_kwargs"])
    assert set(state) == set(ref.state_dict())  # DINO == timm key names
    assert "cls_token" in state and "blocks.1.attn.qkv.weight" in state and "norm.bias" in state
    ref.load_state_dict(state, strict=True)
    lines = (tmp_path / "run" / pretrain.LOG_NAME).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert all(math.isfinite(json.loads(x)["loss"]) for x in lines)

    # the exported teacher is what load_backbone("embedded") reads once copied to the weights dir
    backbone_mod = pytest.importorskip("depthg.backbone")
    pretrain.export_embedded(tmp_path / "run", tmp_path / "weights")
    monkeypatch.setattr(backbone_mod, "EMBEDDED_DIR", tmp_path / "weights")
    bb = backbone_mod.load_backbone("embedded")
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    # at the training size (no position-embedding interpolation) the backbone is plain timm ...
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = ref.forward_features((img - mean) / std)[:, 1:]
    assert torch.allclose(bb(img).flatten(2).transpose(1, 2), tokens, atol=1e-5)
    # ... and at other sizes it interpolates the position embedding as pretraining did (DINO's way)
    img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    feats = bb(img)
    assert feats.shape == (1, 32, 4, 6)
    with torch.no_grad():
        tokens = pretrain.vit_tokens(ref, (img - mean) / std)[:, 1:]
    assert torch.allclose(feats.flatten(2).transpose(1, 2), tokens, atol=1e-5)


def test_resume_matches_uninterrupted_run(tmp_path):
    # with every loss on: DINO, masked patches (iBOT) and cross-view patches
    full = tmp_path / "full"
    part = tmp_path / "part"
    losses = dict(ibot_weight=1.0, dense_weight=1.0)
    pretrain.pretrain(full, **tiny_run_kwargs(**losses))
    pretrain.pretrain(part, **tiny_run_kwargs(stop_at=2, **losses))
    assert int(safe_torch_load(part / pretrain.CHECKPOINT_NAME)["step"]) == 2
    summary = pretrain.pretrain(part, **tiny_run_kwargs(resume=True, **losses))
    assert summary["step"] == 3
    a, b = safe_torch_load(full / pretrain.CHECKPOINT_NAME), safe_torch_load(part / pretrain.CHECKPOINT_NAME)
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["center"], b["center"]) and torch.equal(a["pool"], b["pool"])
    assert int(b["step"]) == 3


def test_resume_refuses_other_hyperparameters(tmp_path):
    pretrain.pretrain(tmp_path, **tiny_run_kwargs(stop_at=1))
    with pytest.raises(pretrain.PretrainError, match="batch_size"):
        pretrain.pretrain(tmp_path, **tiny_run_kwargs(batch_size=5, resume=True))


def test_teacher_is_an_ema_of_the_student(tmp_path):
    # step 0 state (teacher == student), then one step: teacher1 = m0 teacher0 + (1 - m0) student1
    pretrain.pretrain(tmp_path, **tiny_run_kwargs(stop_at=0, warmup_steps=0, momentum_teacher=0.996))
    s0 = safe_torch_load(tmp_path / pretrain.CHECKPOINT_NAME)
    assert all(torch.equal(s0["student"][k], s0["teacher"][k]) for k in s0["student"])
    pretrain.pretrain(tmp_path, **tiny_run_kwargs(stop_at=1, resume=True, warmup_steps=0,
                                            momentum_teacher=0.996))
    s1 = safe_torch_load(tmp_path / pretrain.CHECKPOINT_NAME)
    m0 = pretrain.cosine_schedule(0, 3, 0.996, 1.0)
    changed = 0
    for k, t1 in s1["teacher"].items():
        expected = m0 * s0["teacher"][k] + (1 - m0) * s1["student"][k]
        assert torch.allclose(t1, expected, atol=1e-7), k
        changed += int(not torch.equal(s1["student"][k], s0["student"][k]))
    assert changed > 0  # the student did learn; the teacher moved only by the EMA
    # the optimiser never saw the teacher: its state covers exactly the student's parameters
    n_student = sum(1 for _ in s1["student"])
    assert len(s1["optimizer"]["state"]) <= n_student


def test_teacher_gets_no_gradients():
    torch.manual_seed(0)
    student = pretrain.DINOModel(pretrain.build_vit(16, 1, 2, 2.0, 16), pretrain.DINOHead(16, 8, 8, 4))
    teacher = pretrain.DINOModel(pretrain.build_vit(16, 1, 2, 2.0, 16), pretrain.DINOHead(16, 8, 8, 4))
    teacher.requires_grad_(False)
    x = [torch.rand(2, 3, 16, 16)] * 2
    with torch.no_grad():
        t = teacher(x)
    loss = pretrain.dino_loss(student(x), pretrain.sinkhorn_targets(t, 0.04), 2, 0.1)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    before = [p.clone() for p in teacher.parameters()]
    pretrain.ema_update(student, teacher, 0.5)
    for p0, pt, ps in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(pt, 0.5 * p0 + 0.5 * ps)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(pretrain.PretrainError, match="global_size"):
        pretrain.pretrain(tmp_path, **tiny_run_kwargs(global_size=30))
    with pytest.raises(pretrain.PretrainError, match="pool_size"):
        pretrain.pretrain(tmp_path, **tiny_run_kwargs(batch_size=10))
    with pytest.raises(pretrain.PretrainError, match="renderer"):
        pretrain.pretrain(tmp_path, **tiny_run_kwargs(renderer="photos"))


def test_cli_arguments_round_trip(tmp_path):
    import argparse

    parser = pretrain.add_pretrain_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out-dir", str(tmp_path), "--steps", "2", "--batch-size", "2",
                              "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
                              "--global-size", "16", "--local-size", "8", "--n-local", "1",
                              "--render-size", "16", "32", "--pool-size", "2",
                              "--renderer", RENDERER, "--out-dim", "16", "--head-hidden-dim", "16",
                              "--bottleneck-dim", "8", "--device", "cpu", "--no-progress",
                              "--export-embedded", str(tmp_path / "w")])
    summary = pretrain.run_pretrain_from_args(args)
    assert summary["step"] == 2
    meta = json.loads((tmp_path / "w" / "embedded_vit.json").read_text())
    assert meta["weights"] == "embedded_vit.pth" and meta["timm_kwargs"]["embed_dim"] == 16
    assert (tmp_path / "w" / "embedded_vit.pth").is_file()


# ------------------------------------------------------------------------------ masked patches (iBOT)


def test_block_masks_cover_the_drawn_fraction():
    gen = torch.Generator().manual_seed(0)
    masks = pretrain.block_masks(400, (16, 16), 0.5, (0.1, 0.5), gen)
    assert masks.shape == (400, 256) and masks.dtype == torch.bool
    covered = masks.float().mean(1)
    masked = covered > 0
    # about half of the crops are masked; a masked crop covers at least 10 % (the lower bound of the
    # range) and rarely much more than 50 % (a last rectangle may overshoot the drawn target)
    assert 0.4 < masked.float().mean() < 0.6
    assert covered[masked].min() >= 0.1 - 1 / 256
    assert covered[masked].median() < 0.5
    assert torch.equal(pretrain.block_masks(400, (16, 16), 0.5, (0.1, 0.5), torch.Generator().manual_seed(0)),
                       masks)
    assert not pretrain.block_masks(20, (4, 4), 0.0, (0.1, 0.5), gen).any()


def test_ibot_loss_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, generator=g), torch.softmax(torch.randn(5, 4, generator=g), -1)
    ref = sum(-sum(t[i, j].item() * (s[i, j].item() / 0.1 - math.log(sum(
        math.exp(s[i, k].item() / 0.1) for k in range(4)))) for j in range(4)) for i in range(5)) / 5
    assert pretrain.ibot_loss(s, t, 0.1).item() == pytest.approx(ref, rel=1e-5)
    assert pretrain.ibot_loss(s[:0], t[:0], 0.1).item() == 0.0


def test_masked_patches_do_not_see_their_pixels():
    # the student's masked tokens are replaced before the transformer: changing the pixels under a
    # masked patch changes nothing, changing an unmasked patch does
    torch.manual_seed(0)
    vit = pretrain.build_vit(16, 1, 2, 2.0, 16)
    token = torch.randn(16)
    x = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 4, dtype=torch.bool)
    mask[0, 0] = True  # top-left 8x8 patch
    y = x.clone()
    y[..., :8, :8] = torch.rand(3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(pretrain.vit_tokens(vit, x, mask, token), pretrain.vit_tokens(vit, y, mask, token))
        assert not torch.allclose(pretrain.vit_tokens(vit, x), pretrain.vit_tokens(vit, y))
        assert torch.equal(pretrain.vit_tokens(vit, x, torch.zeros_like(mask), token), pretrain.vit_tokens(vit, x))


def test_unknown_recipe_option_is_named(tmp_path):
    with pytest.raises(pretrain.PretrainError, match="did you mean 'mask_ratio'"):
        pretrain.pretrain(tmp_path, **tiny_run_kwargs(mask_ratios=(0.1, 0.2)))


def test_dino_only_recipe_has_no_patch_head(tmp_path):
    pretrain.pretrain(tmp_path, **tiny_run_kwargs(ibot_weight=0.0, stop_at=1))
    state = safe_torch_load(tmp_path / pretrain.CHECKPOINT_NAME)
    assert not any(k.startswith("patch_head") or k == "mask_token" for k in state["student"])
    log = [json.loads(x) for x in (tmp_path / pretrain.LOG_NAME).read_text().splitlines()]
    assert log[-1]["ibot"] == 0.0 and log[-1]["masked"] == 0


# ------------------------------------------------------------------------------ cross-view patches


def test_patch_centres_map_back_onto_their_own_grid():
    boxes = torch.tensor([[10.0, 5.0, 74.0, 69.0], [0.0, 0.0, 32.0, 16.0]])
    flip = torch.tensor([False, True])
    centres = pretrain.patch_centres(boxes, flip, (2, 4))
    # first crop, patch (0, 0): 1/8 across and 1/4 down the box; second crop is flipped
    assert torch.allclose(centres[0, 0], torch.tensor([10 + 64 / 8, 5 + 64 / 4]))
    assert torch.allclose(centres[1, 0], torch.tensor([32 - 32 / 8, 16 / 4]))
    coords, inside = pretrain.crop_coordinates(centres, boxes, flip)
    v, u = torch.meshgrid((torch.arange(2) + 0.5) / 2, (torch.arange(4) + 0.5) / 4, indexing="ij")
    expected = torch.stack([2 * u.flatten() - 1, 2 * v.flatten() - 1], -1)
    assert inside.all() and torch.allclose(coords, expected.expand(2, -1, -1), atol=1e-6)


def test_cross_view_targets_follow_the_image_not_the_crop():
    # crop 2 is crop 1 mirrored: the teacher's map sampled for the student's crop 2 must be the
    # mirrored map, so a student that outputs exactly that gets the lowest loss
    grid, k = (4, 4), 6
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    geometry = [(boxes, torch.tensor([False])), (boxes, torch.tensor([True]))]
    g = torch.Generator().manual_seed(0)
    t1 = torch.rand(1, 16, k, generator=g) * 2 - 1  # cosine similarities, as the head outputs
    t2 = t1.reshape(1, 4, 4, k).flip(2).reshape(1, 16, k)  # the same image seen mirrored
    teacher = torch.cat([t1, t2])
    right = pretrain.cross_view_loss(teacher / 0.1 * 0.02, teacher, geometry, grid, 0.02, 0.1)
    wrong = pretrain.cross_view_loss(torch.cat([t2, t1]) / 0.1 * 0.02, teacher, geometry, grid, 0.02, 0.1)
    assert right < wrong
    # disjoint crops share no image location: nothing to predict
    far = [(boxes, torch.tensor([False])), (boxes + 100, torch.tensor([False]))]
    assert pretrain.cross_view_loss(teacher, teacher, far, grid, 0.02, 0.1).item() == 0.0


def test_dense_recipe_preset_fills_only_options_left_at_their_default(tmp_path):
    parser = pretrain.add_pretrain_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out-dir", str(tmp_path), "--recipe", "dense", "--steps", "1",
                              "--batch-size", "2", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
                              "--global-size", "16", "--local-size", "8", "--render-size", "16", "32",
                              "--pool-size", "2", "--renderer", RENDERER, "--out-dim", "16",
                              "--ibot-out-dim", "16", "--head-hidden-dim", "16", "--bottleneck-dim", "8",
                              "--device", "cpu", "--no-progress", "--dense-weight", "0.5"])
    pretrain.run_pretrain_from_args(args)
    hp = json.loads((tmp_path / "hparams.json").read_text())
    assert hp["ibot_weight"] == 1.0 and hp["n_local"] == 4  # from the preset
    assert hp["dense_weight"] == 0.5 and hp["global_size"] == 16 and hp["steps"] == 1  # given


def test_dense_recipe_runs_and_resumes(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain.pretrain(full, **tiny_run_kwargs(dense_weight=1.0))
    pretrain.pretrain(part, **tiny_run_kwargs(dense_weight=1.0, stop_at=2))
    pretrain.pretrain(part, **tiny_run_kwargs(dense_weight=1.0, resume=True))
    a, b = safe_torch_load(full / pretrain.CHECKPOINT_NAME), safe_torch_load(part / pretrain.CHECKPOINT_NAME)
    assert all(torch.equal(a["teacher"][n], b["teacher"][n]) for n in a["teacher"])
    log = [json.loads(x) for x in (full / pretrain.LOG_NAME).read_text().splitlines()]
    assert all(math.isfinite(r["dense"]) for r in log) and any(r["dense"] > 0 for r in log)
