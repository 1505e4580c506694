"""Time and peak memory of one DepthG training step: feature cache vs recomputing features, FPS vs random.

One process, same machine, same step code as ``depthg/train.py`` (fetch -> target dropout -> grids ->
head -> DepthGLoss + probes -> backward -> three Adam steps), on random data with a randomly initialised
ViT-S/8-sized backbone (timm ``vit_small_patch8_224``: 384-d, 12 blocks, 6 heads; random weights are fine
for timing). For each batch size in ``--batch-sizes`` and each sampling in {random, fps} it measures:

* ``recompute``: images -> frozen backbone (anchor + kNN positive) each step, as the released code does;
* ``cache``: features read from an fp16 memmap feature cache (``depthg.features``) built beforehand.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's resident-set high-water
mark (``VmHWM``, reset before each configuration through ``/proc/self/clear_refs``), falling back to
``tracemalloc`` (Python allocations only) where that is unavailable.

    python benchmarks/train_step.py                      # 224 px, batch sizes 8 16 32 (slow on a CPU)
    python benchmarks/train_step.py --res 112 --repeats 2  # quicker
    python benchmarks/train_step.py --preset cityscapes_vitb8 --device cuda  # steps/s of the preset (GPU)

Writes ``benchmarks/results/train_step.json`` and prints the cache speed-up per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depthg.method.sampling import fps_grid, random_grid  # noqa: E402
from depthg.backbone import load_backbone  # noqa: E402
from depthg.build import build_loss, build_models, fidelity  # noqa: E402
from depthg.config import Config  # noqa: E402
from depthg.features import CacheOptions, backbone_features, build_feature_cache  # noqa: E402
from depthg.precision import FULL_PRECISION, Precision  # noqa: E402
from depthg.method.losses import LossInputs  # noqa: E402
from depthg.method.schedules import DepthDecaySchedule  # noqa: E402
from depthg.train import channel_dropout, dropout_masks  # noqa: E402
from depthg.train_support import CachedSource  # noqa: E402
from depthg.utils import command_line  # noqa: E402


class RandomCrops(torch.utils.data.Dataset):
    """N random crops with depth and labels, generated once (in memory)."""

    def __init__(self, n: int, res: int, n_classes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.img = torch.rand(n, 3, res, res, generator=g)
        self.depth = 1.0 + 50.0 * torch.rand(n, 1, res, res, generator=g)
        self.label = torch.randint(0, n_classes, (n, res, res), generator=g)

    def __len__(self) -> int:
        return len(self.img)

    def __getitem__(self, i: int) -> dict:
        return {"img": self.img[i], "depth": self.depth[i], "label": self.label[i], "key": f"train/{i:06d}"}


def _reset_peak(device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "rss_high_water"
    except OSError:
        tracemalloc.start()
        tracemalloc.reset_peak()
        return "tracemalloc_python_only"


def _peak_mb(kind: str, device: torch.device) -> float:
    if kind == "cuda_max_memory_allocated":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if kind == "rss_high_water":
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return tracemalloc.get_traced_memory()[1] / 2**20


def run_config(cfg: Config, backbone: torch.nn.Module, data: RandomCrops, cache, device: torch.device,
               use_cache: bool, repeats: int, warmup: int, precision: Precision = FULL_PRECISION,
               scaler: torch.amp.GradScaler | None = None) -> dict:
    """Mean seconds per step and peak memory for one configuration.

    ``precision`` is the run's AMP policy (the trainer's ``amp_context``): the backbone (when recomputing)
    and the head run under it, as in the trainer; ``scaler`` is the fp16 GradScaler, if any. The cache
    should have been built under the same policy.
    """
    model = build_models(cfg, backbone.embed_dim, 27).to(device)
    opts = [torch.optim.Adam(model.head.parameters(), lr=cfg.lr),
            torch.optim.Adam(model.cluster.parameters(), lr=cfg.probe_lr),
            torch.optim.Adam(model.linear.parameters(), lr=cfg.probe_lr)]
    fid = fidelity(cfg)
    loss_fn = build_loss(cfg, fid)
    sched = DepthDecaySchedule(cfg.depth_weight, cfg.depth_shift, cfg.depth_decay_factor, cfg.depth_decay_every,
                               after_step=cfg.decay_after_step)
    gens = {k: torch.Generator().manual_seed(i) for i, k in enumerate(("sample", "dropout", "loss"))}
    cached = CachedSource(cache, device) if use_cache else None
    b, n = cfg.batch_size, len(data)
    grid_hw = (cfg.res // backbone.patch_size,) * 2

    def step(it: int) -> None:
        idx = torch.randint(0, n, (2 * b,), generator=torch.Generator().manual_seed(it))
        if cached is not None:
            batch = cached.fetch(idx)
        else:
            img = data.img[idx].to(device)
            feats = backbone_features(backbone, img, precision)
            batch = {"feats": feats, "depth": data.depth[idx].to(device), "label": data.label[idx].to(device)}
        feats, feats_pos = batch["feats"].split(b)
        depth, depth_pos = batch["depth"].split(b)
        masks = dropout_masks(2 * b, feats.shape[1], cfg.dropout, gens["dropout"])
        target, target_pos = channel_dropout(feats, masks[:b]), channel_dropout(feats_pos, masks[b:])
        if cfg.depth_sampling == "fps":
            g1 = fps_grid(depth, grid_hw, cfg.feature_samples, cfg.fov_deg, 0, fid.fps)
            g2 = fps_grid(depth_pos, grid_hw, cfg.feature_samples, cfg.fov_deg, 0, fid.fps)
        else:
            g1 = random_grid(b, cfg.feature_samples, gens["sample"]).to(device)
            g2 = random_grid(b, cfg.feature_samples, gens["sample"]).to(device)
        with precision():
            out = model(torch.cat([feats, feats_pos]), batch["label"][:b])
        code, code_pos = out["code"].float().split(b)
        w, s = sched.at(it)
        x = LossInputs(target, target_pos, code, code_pos, depth, depth_pos)
        terms = loss_fn(x, (g1, g2), depth_weight=w, depth_shift=s, generator=gens["loss"])
        total = terms["total"] + out["cluster_loss"] + out["linear_loss"]
        for o in opts:
            o.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            for o in opts:
                scaler.step(o)
            scaler.update()
        else:
            total.backward()
            for o in opts:
                o.step()

    for it in range(warmup):
        step(it)
    kind = _reset_peak(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for it in range(warmup, warmup + repeats):
        step(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sec = (time.perf_counter() - t0) / repeats
    peak = _peak_mb(kind, device)
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    return {"sec_per_step": sec, "steps_per_s": 1.0 / sec, "peak_mb": peak, "peak_kind": kind}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cocostuff_vits8", help="loss hyper-parameters (and backbone unless --backbone)")
    p.add_argument("--backbone", default=None, help="default: the preset's (ViT-S/8 for cocostuff_vits8)")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--samplings", nargs="+", default=["random", "fps"], choices=["random", "fps"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--n-crops", type=int, default=64, help="random crops in the fake dataset / cache")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-recompute", action="store_true", help="time only the cached path")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    base = Config.preset(args.preset, "paper")
    name = args.backbone or base.backbone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: fine for timing
        backbone = load_backbone(name, None).to(device)
    data = RandomCrops(max(args.n_crops, 2 * max(args.batch_sizes)), args.res, 27)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        options = CacheOptions(batch_size=16, device=device, progress=False)
        cache = build_feature_cache(backbone, data, tmp, {"bench": name, "res": args.res}, options)
        cache_build_s = time.perf_counter() - t0
        for bs in args.batch_sizes:
            for sampling in args.samplings:
                cfg = base.replace(batch_size=bs, res=args.res, depth_sampling=sampling, use_depth=True,
                                   feature_samples=min(base.feature_samples, args.res // backbone.patch_size))
                row = {"batch_size": bs, "sampling": sampling}
                for use_cache in ([True] if args.no_recompute else [False, True]):
                    r = run_config(cfg, backbone, data, cache, device, use_cache, args.repeats, args.warmup)
                    row["cache" if use_cache else "recompute"] = r
                if "recompute" in row:
                    row["speedup_cache_vs_recompute"] = row["recompute"]["sec_per_step"] / row["cache"]["sec_per_step"]
                results.append(row)
                msg = f"batch {bs:3d} {sampling:6s} cache {row['cache']['sec_per_step'] * 1e3:8.1f} ms/step"
                if "recompute" in row:
                    msg += (f"  recompute {row['recompute']['sec_per_step'] * 1e3:9.1f} ms/step  "
                            f"speed-up x{row['speedup_cache_vs_recompute']:.1f}")
                print(msg, flush=True)
    report = {
        "benchmark": "train_step", "command": command_line("python benchmarks/train_step.py", argv),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "backbone": name, "embed_dim": backbone.embed_dim, "res": args.res, "preset": args.preset,
        "repeats": args.repeats, "warmup": args.warmup, "cache_build_s": cache_build_s, "n_crops": len(data),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
