"""``mode="released"`` against the outputs of the authors' released code (leonsick/depthg@c284180).

``tests/data/released_c284180.pt`` holds small inputs and what the released code computed from them
(tests/data/README.md). Every group of the file is recomputed here by the workbench in released mode
and compared with a fixed tolerance (docs/released_golden.md lists them); a test also checks that it
read every key of its group, so a key added to the file cannot go unchecked.

``python tests/test_released_golden.py`` prints the measured max abs difference of every comparison.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from depthg.method import losses, released
from depthg.backbone import load_backbone
from depthg.build import Fidelity
from depthg.data.transforms import RELEASED_RESIZE, resize_center_crop
from depthg.method.head import ClusterProbe
from depthg.method.lhp import LocalHiddenPositives
from depthg.metrics import UnsupervisedMetrics
from depthg.method.sampling import farthest_point_sample, fps_grid, numba_available, sample

#: the released choices of every function under test (depthg.build.Fidelity)
REL = Fidelity.released()


def released_fps_grid(depth: torch.Tensor, grid_hw: tuple[int, int], n_side: int) -> torch.Tensor:
    """:func:`fps_grid` with the released unprojection and read-out."""
    return fps_grid(depth, grid_hw, n_side, choices=REL.fps)

FIXTURE = Path(__file__).parent / "data" / "released_c284180.pt"
SHA256 = "f80e376f69b7f2b00ec4a9b58d5f8ce73028f8a5ebf8d3aca321f79cada8cf13"

# Absolute tolerances (the fixture's own; losses stay at 1e-6: the paper centring differs by 2.4e-5).
TOL_LOSS = 1e-6
TOL_COORDS = 1e-6
TOL_PERCENT = 1e-4  # the released metrics are computed in float32
TOL_VIT_FEAT = 1e-4
TOL_VIT_ATTN = 1e-5
TOL_POINTS = 1e-5
TOL_LHP_DEPTH = 1e-5
TOL_LHP_ATTN = 1e-6

# Keys no group comparison reads (test_fixture_has_only_known_groups checks the meta keys).
NOT_COMPARED = {"meta.format_version", "meta.released_source_ascii", "meta.generator_ascii"}


class Fixture:
    """Read-only access to the fixture that records which keys were read."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.data[key].clone()

    def f(self, key: str) -> float:
        """A 0-d setting as the Python float the released code was given."""
        return float(self[key])

    def assert_group_read(self, group: str) -> None:
        keys = {k for k in self.data if k.split(".", 1)[0] == group}
        missing = sorted(keys - self.read - NOT_COMPARED)
        assert not missing, f"group {group!r}: keys never compared: {missing}"


@pytest.fixture(scope="module")
def raw() -> dict[str, torch.Tensor]:
    assert hashlib.sha256(FIXTURE.read_bytes()).hexdigest() == SHA256, f"{FIXTURE} is not the recorded file"
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture()
def fx(raw: dict[str, torch.Tensor]) -> Fixture:
    return Fixture(raw)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> float:
    diff = max_abs(a, b)
    assert diff <= tol, f"{what}: max abs difference {diff:.3g} > {tol:g}"
    return diff


# ----------------------------------------------------------------------------------------------------
# Recomputation, one generator per group: yields (key, workbench value, released value, tolerance)
# ----------------------------------------------------------------------------------------------------


def _loss_fn(fx: Fixture, prefix: str, neg_samples: int) -> losses.DepthGLoss:
    assert bool(fx[prefix + "cfg.pointwise"])  # released pointwise centring
    terms = losses.CorrelationTerms(pos_intra_shift=fx.f(prefix + "cfg.pos_intra_shift"),
                               pos_inter_shift=fx.f(prefix + "cfg.pos_inter_shift"),
                               neg_inter_shift=fx.f(prefix + "cfg.neg_inter_shift"),
                               neg_samples=neg_samples, zero_clamp=True, centering="released")
    return losses.DepthGLoss(terms, depth_similarity="released", negatives=REL.negatives,
                        transposed_depth_pairs=REL.transposed_depth_pairs)


def _full_loss(fx: Fixture, group: str, grid1: torch.Tensor, grid2: torch.Tensor, out: str,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """The released forward with its negative permutations replaced by the stored ones."""
    cfg = "loss."  # fps_loss uses the same configuration values
    inputs = [fx[f"{group}.in.{k}"] for k in ("feats", "feats_pos", "code", "code_pos", "depth", "depth_pos")]
    perms = fx[f"{group}.in.neg_perms"]
    shift = fx.f(cfg + "cfg.depth_feat_shift")
    n_neg = int(fx[cfg + "cfg.neg_samples"])
    assert n_neg == perms.shape[0] and int(fx[cfg + "cfg.feature_samples"]) == 7
    queue: list[torch.Tensor] = []

    def stored_perm(size: int, generator=None, device=None) -> torch.Tensor:
        assert size == perms.shape[1]
        return queue.pop(0)

    monkeypatch.setattr(released, "super_perm", stored_perm)
    queue.extend(perms)
    terms = _loss_fn(fx, cfg, n_neg)(losses.LossInputs(*inputs), (grid1, grid2), depth_weight=1.0, depth_shift=shift)
    assert not queue
    for name in ("pos_intra", "pos_inter", "neg_inter", "depth"):
        yield f"{out}.{name}", terms[name], fx[f"{out}.{name}"], TOL_LOSS
    per_pairing = []
    for k in range(n_neg):  # one pairing at a time, to compare each pairing's mean
        queue.append(perms[k])
        per_pairing.append(_loss_fn(fx, cfg, 1)(losses.LossInputs(*inputs), (grid1, grid2))["neg_inter"])
    yield f"{out}.neg_inter_per_pairing", torch.stack(per_pairing), fx[f"{out}.neg_inter_per_pairing"], TOL_LOSS


def compare_helper(fx: Fixture, monkeypatch=None):
    f1, f2, c1, c2 = (fx[f"helper.in.{k}"] for k in ("f1", "f2", "c1", "c2"))
    shift = fx.f("helper.in.shift")
    for pointwise, centering in ((1, "released"), (0, "none")):
        for zero_clamp in (1, 0):
            loss, cd = losses.correlation_loss((f1, f2), (c1, c2), shift, centering=centering, zero_clamp=bool(zero_clamp))
            key = f"helper.out.pointwise{pointwise}_zeroclamp{zero_clamp}.loss_mean"
            yield key, loss, fx[key], TOL_LOSS
            yield "helper.out.cd", cd, fx["helper.out.cd"], TOL_LOSS


def compare_loss(fx: Fixture, monkeypatch):
    # The stored grids are what grid_sample consumed, i.e. after the released sampler swapped the two
    # S axes; the workbench takes the grids as drawn (before that swap) and accounts for it itself.
    grid1 = fx["loss.in.grid1_consumed"].permute(0, 2, 1, 3)
    grid2 = fx["loss.in.grid2_consumed"].permute(0, 2, 1, 3)
    yield from _full_loss(fx, "loss", grid1, grid2, "loss.out", monkeypatch)


def compare_fps(fx: Fixture, monkeypatch=None):
    depth = fx["fps.in.depth"]
    grid_hw = tuple(fx["fps.in.grid_hw"].tolist())
    backends = ["torch"] + (["numba"] if numba_available() else [])
    for s in (5, 7):
        coords01 = fx[f"fps.out.S{s}.coords01"]
        yield f"fps.out.S{s}.coords01", released_fps_grid(depth, grid_hw, s), coords01 * 2 - 1, TOL_COORDS
        points = released.radians_unprojection(F.adaptive_avg_pool2d(depth, grid_hw), 90.0)
        for backend in backends:
            order = farthest_point_sample(points, s * s, backend=backend)
            yield f"fps.out.S{s}.order", order, fx[f"fps.out.S{s}.order"], 0.0


def compare_fps_loss(fx: Fixture, monkeypatch):
    grid_hw = (14, 14)
    for s in (5, 7):
        grid1 = released_fps_grid(fx["fps_loss.in.depth"], grid_hw, s)
        grid2 = released_fps_grid(fx["fps_loss.in.depth_pos"], grid_hw, s)
        # the released sampler reads the grids with their S axes swapped
        yield f"fps_loss.out.S{s}.grid1_consumed", grid1.permute(0, 2, 1, 3), fx[f"fps_loss.out.S{s}.grid1_consumed"], 0.0
        yield f"fps_loss.out.S{s}.grid2_consumed", grid2.permute(0, 2, 1, 3), fx[f"fps_loss.out.S{s}.grid2_consumed"], 0.0
        for key, ours, ref, tol in _full_loss(fx, "fps_loss", grid1, grid2, f"fps_loss.out.S{s}", monkeypatch):
            yield key, ours, ref, tol


def compare_depthcorr(fx: Fixture, monkeypatch=None):
    code, depth = fx["depthcorr.in.code"], fx["depthcorr.in.depth"]
    dd = losses.depth_similarity(depth, depth, "released", size=tuple(code.shape[-2:]))
    yield "depthcorr.out.dd", dd, fx["depthcorr.out.dd"], 0.0
    loss = losses.depth_feature_loss(code, dd, fx.f("depthcorr.in.shift"))
    yield "depthcorr.out.loss_mean", loss, fx["depthcorr.out.loss_mean"], TOL_LOSS


def compare_metrics(fx: Fixture, monkeypatch=None):
    n_classes, extra = int(fx["metrics.cfg.n_classes"]), int(fx["metrics.cfg.extra_clusters"])
    for variant, hungarian in (("hungarian", True), ("identity", False)):
        metrics = UnsupervisedMetrics(n_classes, extra, hungarian=hungarian)
        metrics.update(fx["metrics.in.preds"], fx["metrics.in.target"])
        result = metrics.compute()
        yield "metrics.out.stats", metrics.stats, fx["metrics.out.stats"], 0.0
        if hungarian:
            yield "metrics.out.hungarian.assignment", torch.tensor(result["assignment"]), fx["metrics.out.hungarian.assignment"], 0.0
            yield "metrics.out.hungarian.histogram", result["confusion"], fx["metrics.out.hungarian.histogram"], 0.0
        for name in ("accuracy", "miou"):
            key = f"metrics.out.{variant}.{name}"
            yield key, torch.tensor(result[name], dtype=torch.float64), fx[key], TOL_PERCENT


def compare_cluster(fx: Fixture, monkeypatch=None):
    centroids, code = fx["cluster.in.centroids"], fx["cluster.in.code"]
    probe = ClusterProbe(centroids.shape[1], centroids.shape[0], generator=0)
    with torch.no_grad():
        probe.clusters.copy_(centroids)
        hard_loss, hard_probs = probe(code, None)
        soft_loss, log_probs = probe(code, fx.f("cluster.cfg.alpha"))
    yield "cluster.out.hard_loss", hard_loss, fx["cluster.out.hard_loss"], TOL_LOSS
    yield "cluster.out.hard_probs", hard_probs, fx["cluster.out.hard_probs"], 0.0
    yield "cluster.out.soft_loss", soft_loss, fx["cluster.out.soft_loss"], TOL_LOSS
    yield "cluster.out.log_probs", log_probs, fx["cluster.out.log_probs"], TOL_LOSS


def compare_vit(fx: Fixture, monkeypatch=None, tmp_dir: Path | None = None):
    cfg = {k: int(fx[f"vit.cfg.{k}"]) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
    assert cfg["patch_size"] == 8 and fx.f("vit.cfg.ln_eps") == 1e-6  # timm's ViT LayerNorm eps
    state = {k[len("vit.sd."):]: fx[k] for k in fx.data if k.startswith("vit.sd.")}
    path = Path(tmp_dir) / "released_tiny_vit.pth"
    torch.save(state, path)
    backbone = load_backbone("vit_small_patch8_224", weights=path, img_size=cfg["img_size"], embed_dim=cfg["embed_dim"],
                             depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for res in (64, 80):
        img = fx[f"vit.in.r{res}.img01"]
        # the released ViT was fed ImageNet-normalised images; the workbench normalises internally
        yield f"vit.in.r{res}.img_imagenet", (img - mean) / std, fx[f"vit.in.r{res}.img_imagenet"], 1e-6
        with torch.no_grad():
            feat, attn = backbone.last_attention(img)
            cls_attn = attn[:, :, 0, 1:].reshape(*attn.shape[:2], *backbone.grid_size(img))  # DINO's CLS maps
            patch_attn = backbone.patch_attention(img)
        yield f"vit.out.r{res}.feat", feat, fx[f"vit.out.r{res}.feat"], TOL_VIT_FEAT
        yield f"vit.out.r{res}.cls_attn", cls_attn, fx[f"vit.out.r{res}.cls_attn"], TOL_VIT_ATTN
        yield f"vit.out.r{res}.patch_attn_mean", patch_attn, fx[f"vit.out.r{res}.patch_attn_mean"], TOL_VIT_ATTN


def compare_unproject(fx: Fixture, monkeypatch=None):
    ref = fx["unproject.out.points"]
    ours = released.radians_unprojection(fx["unproject.in.depth"], fx.f("unproject.cfg.fov"))
    yield "unproject.out.points", ours, ref.permute(0, 2, 3, 1).reshape(ref.shape[0], -1, 3), TOL_POINTS


def compare_lhp(fx: Fixture, monkeypatch=None):
    grid_hw = tuple(fx["lhp.in.grid_hw"].tolist())
    lhp = LocalHiddenPositives(grid_hw[0] * grid_hw[1], "depth", fx.f("lhp.cfg.quantile"), choices=REL.lhp)
    weights = lhp.propagation_weights(grid_hw, depth=fx["lhp.in.depth"])
    # The workbench computes exact distances; the released matrix-product distances are checked
    # separately (test_lhp_matmul_weights_differ_only_by_rounding), see docs/released_golden.md.
    yield "lhp.out.weights_exact_cdist", weights, fx["lhp.out.weights_exact_cdist"], TOL_LHP_DEPTH


def compare_lhp_attn(fx: Fixture, monkeypatch=None):
    grid_hw = tuple(fx["lhp_attn.in.grid_hw"].tolist())
    quantile = 1.0 - fx.f("lhp_attn.cfg.quantile")  # the released threshold quantile is 0.99
    lhp = LocalHiddenPositives(grid_hw[0] * grid_hw[1], "attention", quantile, choices=REL.lhp)
    weights = lhp.propagation_weights(grid_hw, attention=fx["lhp_attn.in.attn"][:, :, 1:, 1:].mean(1))
    yield "lhp_attn.out.weights", weights, fx["lhp_attn.out.weights"], TOL_LHP_ATTN


GROUPS = {
    "helper": compare_helper, "loss": compare_loss, "fps": compare_fps, "fps_loss": compare_fps_loss,
    "depthcorr": compare_depthcorr, "metrics": compare_metrics, "cluster": compare_cluster, "vit": compare_vit,
    "unproject": compare_unproject, "lhp": compare_lhp, "lhp_attn": compare_lhp_attn,
}


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------


def test_fixture_has_only_known_groups(raw: dict[str, torch.Tensor]) -> None:
    groups = {k.split(".", 1)[0] for k in raw}
    assert groups == set(GROUPS) | {"meta"}
    assert int(raw["meta.format_version"]) == 1
    assert bytes(raw["meta.released_source_ascii"].tolist()).decode() == "leonsick/depthg@c284180 src/"


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_matches_released(group: str, fx: Fixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kwargs = {"tmp_dir": tmp_path} if group == "vit" else {}
    n = 0
    for key, ours, ref, tol in GROUPS[group](fx, monkeypatch, **kwargs):
        close(ours, ref, tol, key)
        n += 1
    assert n > 0
    if group == "lhp":
        fx.read.add("lhp.out.weights")  # the released matmul distances: their own test below
    fx.assert_group_read(group)


def test_lhp_matmul_weights_differ_only_by_rounding(fx: Fixture) -> None:
    """``lhp.out.weights`` came from the released code's default ``torch.cdist`` (matrix-product
    formula). The workbench's exact distances keep the same entries up to rounding (< 1e-3 where both
    keep an entry) and differ only in which entries sit at a row's 1 % threshold: never on the smooth
    map, on at most 40 of 256 rows of the street map."""
    matmul = fx["lhp.out.weights"]
    exact = fx["lhp.out.weights_exact_cdist"]
    both = (matmul > 0) & (exact > 0)
    assert float((matmul - exact)[both].abs().max()) < 1e-3
    rows_differ = ((matmul > 0) != (exact > 0)).any(-1).sum(-1)
    assert int(rows_differ[1]) == 0 and 0 < int(rows_differ[0]) <= 40
    assert torch.equal(torch.diagonal(exact, dim1=1, dim2=2), torch.ones(2, 256))


def test_released_depth_term_pairs_code_with_transposed_depth(fx: Fixture) -> None:
    """Where the resized depth has exact zeros (map [1]), the released pairing code[h, w] <-> depth[w, h]
    changes the depth term; the plain pairing would miss the fixture by more than 1e-3."""
    code = fx["fps_loss.in.code"]
    depth = fx["fps_loss.in.depth"]
    shift = fx.f("loss.cfg.depth_feat_shift")
    loss_fn = losses.DepthGLoss(losses.CorrelationTerms(centering="released", neg_samples=0), depth_similarity="released",
                           negatives=REL.negatives, transposed_depth_pairs=REL.transposed_depth_pairs)
    for s in (5, 7):
        grid = released_fps_grid(depth, (14, 14), s)
        code_s = sample(code, grid)
        ours = loss_fn.depth_term(code_s, depth, grid, (14, 14), shift)
        plain = losses.depth_feature_loss(code_s, losses.depth_similarity(depth, depth, "released", size=(s, s)), shift)
        theirs = fx[f"fps_loss.out.S{s}.depth"]
        assert abs(float(ours) - float(theirs)) <= TOL_LOSS
        assert abs(float(plain) - float(theirs)) > 1e-3


# Image sizes the released loaders resize: Cityscapes frames and their five-crops, COCO-Stuff
# frames and crops, Potsdam tiles; res 224 (training) and 320 (evaluation).
PIL_CASES = [((1024, 2048), 224), ((1024, 2048), 320), ((512, 1024), 224), ((512, 1024), 320),
             ((480, 640), 224), ((240, 320), 224), ((427, 640), 320), ((200, 200), 224)]


@pytest.mark.parametrize("hw,res", PIL_CASES)
def test_released_resize_is_pil_nearest(hw: tuple[int, int], res: int) -> None:
    """Released-mode resize-and-crop equals torchvision's Resize(res, NEAREST) + CenterCrop(res) on a
    PIL image, i.e. PIL's own resize, for the image, the label and the depth."""
    h, w = hw
    rng = np.random.default_rng(h * 7919 + w + res)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 27, (h, w), dtype=np.uint8)
    depth = rng.integers(0, 256, (h, w), dtype=np.uint8)
    nh, nw = (res, int(res * w / h)) if h <= w else (int(res * h / w), res)
    top, left = int(round((nh - res) / 2.0)), int(round((nw - res) / 2.0))

    def pil(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((nw, nh), Image.NEAREST))[top : top + res, left : left + res]

    item = {"img": torch.from_numpy(img).permute(2, 0, 1).float() / 255.0,
            "label": torch.from_numpy(label).long(),
            "depth": torch.from_numpy(depth).float()[None]}
    out = resize_center_crop(item, res, RELEASED_RESIZE)
    assert np.array_equal((out["img"] * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy(), pil(img))
    assert out["label"].dtype == torch.long and np.array_equal(out["label"].numpy(), pil(label))
    assert out["depth"].shape == (1, res, res) and np.array_equal(out["depth"][0].numpy(), pil(depth).astype(np.float32))


def test_pil_nearest_indices_match_pil_on_many_sizes() -> None:
    """Along one axis, against PIL on an index image, for 400 random (input, output) size pairs."""
    rng = np.random.default_rng(13)
    for n_in, n_out in zip(rng.integers(1, 3000, 400), rng.integers(1, 1200, 400)):
        ramp = np.arange(n_in, dtype=np.int32)[None, :]
        ref = np.asarray(Image.fromarray(ramp).resize((int(n_out), 1), Image.NEAREST))[0]
        assert np.array_equal(released.pil_nearest_indices(int(n_in), int(n_out)).numpy(), ref), (n_in, n_out)


def test_paper_mode_resize_keeps_nearest_exact() -> None:
    """Paper mode is unchanged: label and depth use torch's nearest-exact, which differs from PIL on
    Cityscapes frames (so the two modes really differ there)."""
    h, w, res = 1024, 2048, 224
    label = torch.arange(h * w, dtype=torch.long).view(h, w) % 1009
    out = resize_center_crop({"img": torch.zeros(3, h, w), "label": label}, res)["label"]
    ref = F.interpolate(label[None, None].float(), size=(res, 2 * res), mode="nearest-exact")[0, 0].long()
    assert torch.equal(out, ref[:, res // 2 : res // 2 + res])
    theirs = resize_center_crop({"img": torch.zeros(3, h, w), "label": label}, res, RELEASED_RESIZE)["label"]
    assert not torch.equal(out, theirs)


if __name__ == "__main__":  # print the measured differences (docs/released_golden.md quotes them)
    import tempfile

    data = torch.load(FIXTURE, weights_only=True)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        for group, fn in GROUPS.items():
            worst: dict[str, float] = {}
            for key, ours, ref, tol in fn(Fixture(data), mp, **({"tmp_dir": tmp} if group == "vit" else {})):
                worst[key] = max(worst.get(key, 0.0), max_abs(ours, ref))
            print(f"{group}: max abs diff {max(worst.values()):.3g}")
            for key, diff in worst.items():
                print(f"    {key}: {diff:.3g}")
        lhp = data["lhp.out.weights"] - data["lhp.out.weights_exact_cdist"]
        print(f"lhp.out.weights (released matmul cdist) vs exact: max abs diff {float(lhp.abs().max()):.3g}")
