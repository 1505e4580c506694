"""Benchmark: batched farthest point sampling vs the released per-image NumPy loop.

The reference re-types the released algorithm (docs/fidelity.md §3.5): for each image, copy the points to
host memory, start at index 0, and per iteration gather the remaining points, compute their squared
distance to the last pick, update the running minimum, take the argmax over the remaining points and
delete the chosen index from the remaining-index array. The workbench's ``farthest_point_sample`` runs
over the whole batch at once (numba kernel on CPU when installed, torch loop otherwise / on CUDA).

Workload: smooth synthetic depth maps with values 0..255 (vertical ramp plus
low-frequency noise), pooled to 28x28, released unprojection (fov 90 "radians"), S = 11 (121 points),
B in {16, 32}. All timings in one process; medians over repeats. Indices are checked to be identical.

Usage::

    .venv/bin/python benchmarks/fps.py                 # CPU
    .venv/bin/python benchmarks/fps.py --device cuda   # candidate on the GPU, reference on the CPU

Writes benchmarks/results/fps.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depthg.method.released import radians_unprojection  # noqa: E402
from depthg.method.sampling import farthest_point_sample, numba_available  # noqa: E402
from depthg.utils import atomic_write, command_line  # noqa: E402


def released_fps_numpy(points: np.ndarray, n_samples: int) -> np.ndarray:
    """One image, the released algorithm: start 0, squared distance, remaining-index deletion."""
    remaining = np.arange(points.shape[0])
    dists = np.full(points.shape[0], np.inf, dtype=points.dtype)
    chosen = np.zeros(n_samples, dtype=np.int64)
    last = 0
    remaining = np.delete(remaining, 0)
    for i in range(1, n_samples):
        candidates = points[remaining]
        diff = candidates - points[last]
        d = diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2]
        dists[remaining] = np.minimum(dists[remaining], d)
        pos = int(np.argmax(dists[remaining]))
        last = int(remaining[pos])
        chosen[i] = last
        remaining = np.delete(remaining, pos)
    return chosen


def released_fps_batch(points: torch.Tensor, n_samples: int) -> np.ndarray:
    """The released per-image loop, including the device->host copy per image."""
    return np.stack([released_fps_numpy(points[b].cpu().numpy(), n_samples) for b in range(points.shape[0])])


def synthetic_depth(batch: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Smooth depth maps in 0..255: a vertical ramp (far at the top) plus low-frequency noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(1.0, 0.0, size).view(1, 1, size, 1).expand(batch, 1, size, size)
    noise = F.interpolate(torch.rand(batch, 1, 6, 6, generator=g), size=(size, size), mode="bicubic",
                          align_corners=False)
    depth = 0.7 * ramp + 0.3 * noise
    depth = (depth - depth.amin((2, 3), keepdim=True)) / (depth.amax((2, 3), keepdim=True)
                                                          - depth.amin((2, 3), keepdim=True))
    return (depth * 255.0).round()


def time_ms(fn, sync: bool = False) -> float:
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def benchmark_fps(batch: int, grid: int, n_side: int, repeats: int,
                  contenders: dict[str, tuple[str, torch.device]]) -> dict:
    """One batch size: the released per-image loop (on the CPU) against each contender.

    ``contenders`` maps a name to (``farthest_point_sample`` backend, device of the points). Returns
    ``{"batch", "n_points", "n_samples", "reference_ms", "reference_min_ms", "<name>_ms", "<name>_min_ms",
    "<name>_identical", "<name>_speedup", "<name>_speedup_min"}``: medians and minima over ``repeats``,
    the contenders interleaved repeat by repeat; CUDA contenders are timed between synchronisations.
    """
    n_samples = n_side**2
    depth = synthetic_depth(batch)
    pooled = F.adaptive_avg_pool2d(depth, (grid, grid))
    points_cpu = radians_unprojection(pooled, 90.0)
    reference = released_fps_batch(points_cpu, n_samples)
    row: dict = {"batch": batch, "n_points": grid**2, "n_samples": n_samples}
    points = {name: points_cpu.to(device) for name, (_, device) in contenders.items()}
    for name, (backend, _) in contenders.items():
        got = farthest_point_sample(points[name], n_samples, start=0, backend=backend)  # warm-up / compile
        row[f"{name}_identical"] = bool(np.array_equal(got.cpu().numpy(), reference))
    # Interleave the contenders repeat by repeat, so that load from other processes on a shared
    # machine hits all of them alike; report median (headline) and minimum.
    fns = {"reference": (lambda: released_fps_batch(points_cpu, n_samples), False)}
    for name, (backend, device) in contenders.items():
        fns[name] = (lambda name=name, backend=backend: farthest_point_sample(points[name], n_samples, start=0,
                                                                              backend=backend),
                     device.type == "cuda")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, sync) in fns.items():
            times[name].append(time_ms(fn, sync=sync))
    for name, ts in times.items():
        row[f"{name}_ms"] = float(np.median(ts))
        row[f"{name}_min_ms"] = float(np.min(ts))
    for name in contenders:
        row[f"{name}_speedup"] = row["reference_ms"] / row[f"{name}_ms"]
        row[f"{name}_speedup_min"] = row["reference_min_ms"] / row[f"{name}_min_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="device of the candidate ('cpu' or 'cuda')")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--n-side", type=int, default=11)
    parser.add_argument("--grid", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fps.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = device.type == "cuda"
    # numba first in each repeat: torch's intra-op threads may keep spinning for a while after a torch
    # call, which on a 2-core machine would be charged to whatever runs right after it.
    backends = (["numba"] if numba_available() and device.type == "cpu" else []) + ["torch"]

    results = []
    for batch in args.batches:
        row = benchmark_fps(batch, args.grid, args.n_side, args.repeats, {b: (b, device) for b in backends})
        results.append(row)
        print(f"B={batch:3d}  reference {row['reference_ms']:8.2f} ms  " + "  ".join(
            f"{b} {row[f'{b}_ms']:7.2f} ms ({row[f'{b}_speedup']:5.1f}x, identical={row[f'{b}_identical']})"
            for b in backends))

    report = {
        "benchmark": "farthest_point_sample vs released per-image NumPy FPS",
        "command": command_line("python benchmarks/fps.py"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if sync else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": numba_available(),
        "repeats": args.repeats,
        "results": results,
    }
    out = Path(args.out)
    with atomic_write(out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
