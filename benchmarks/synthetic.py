"""Speed of the synthetic world: make_world (render + PNG/JSON writes) and streaming render_scene.

Target (issue 4): 200 images at 256x512 in under 60 s on a 2-core CPU. The renderer is single
threaded NumPy; wall seconds depend on what else runs on the (shared) CPU, so the process CPU time
and the load average before/after are recorded beside them.

    .venv/bin/python benchmarks/synthetic.py                 # 200 images at 256x512
    .venv/bin/python benchmarks/synthetic.py --n 50 --size 128 256

Prints a summary and writes benchmarks/results/synthetic.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from depthg.utils import atomic_write
from depthg.world.synthetic import GENERATOR_VERSION, make_world, render_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images written by make_world (train split)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--stream", type=int, default=100, help="render_scene calls at 128x256")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synthetic.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        make_world(Path(tmp) / "world", n_train=args.n, n_val=0, size=tuple(args.size), seed=0, progress=True)
        world_s, world_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        size_mb = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20

    rng = np.random.default_rng(0)
    render_scene(rng, (128, 256))  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.stream):
        render_scene(rng, (128, 256))
    stream_s, stream_cpu = time.perf_counter() - start, time.process_time() - cpu_start

    result = {
        "make_world": {"n_images": args.n, "size": list(args.size), "seconds": round(world_s, 2),
                       "cpu_seconds": round(world_cpu, 2),
                       "images_per_s": round(args.n / world_s, 2), "disk_mb": round(size_mb, 1)},
        "render_scene_128x256": {"n": args.stream, "ms_per_image": round(1000 * stream_s / args.stream, 1),
                                 "cpu_ms_per_image": round(1000 * stream_cpu / args.stream, 1)},
        "target": "200 images at 256x512 in < 60 s",
        "generator_version": GENERATOR_VERSION,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "command": "python benchmarks/synthetic.py " + f"--n {args.n} --size {args.size[0]} {args.size[1]} --stream {args.stream}",
    }
    print(json.dumps(result, indent=2))
    with atomic_write(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")


if __name__ == "__main__":
    main()
