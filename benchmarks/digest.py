"""What a content digest of the source files costs on a Cityscapes-sized tree, and which hash to use.

A derived artefact (crops, kNN, features, depth) records the identity of each source file it was made from:
``[size, sha256]`` (``depthg.utils.file_identity``). Hashing reads every byte, so this measures, on real-size
files, what the identity costs against the old ``[size, mtime]`` (a stat):

* the hashes of the standard library (sha256, blake2b, sha1, md5) on the same files, page cache warm;
* sha256 with the files dropped from the page cache first (``posix_fadvise(DONTNEED)``: read from disk);
* ``depthg.utils.file_digest`` a second time (the digest remembered with device, inode, size, mtime and
  ctime: a stat per file) and after reloading the memo a new process would read (``load_digests``).

Cityscapes' train + val images are 3,475 PNGs of 1024x2048 (about 2.2 MB each, 7.6 GB) with a label PNG each.
Writing 3,475 such files here is not needed: ``--n`` files of the same size are hashed and the times are
scaled to 3,475 images by bytes (hashing and reading are linear in bytes). The images are noise on smooth
gradients, tuned to Cityscapes' PNG size; the tree is deleted afterwards.

    .venv/bin/python benchmarks/digest.py               # 150 images + labels, about 350 MB
    .venv/bin/python benchmarks/digest.py --n 50

Prints a summary and writes benchmarks/results/digest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from depthg import utils
from depthg.utils import atomic_write, file_digest, load_digests, save_digests

CITYSCAPES_IMAGES = 3475  # train 2975 + val 500, leftImg8bit 1024x2048
HASHES = ("sha256", "blake2b", "sha1", "md5")


def make_tree(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` image PNGs of 1024x2048 (noise on gradients, about Cityscapes' 2.2 MB) and ``n`` label PNGs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:1024, 0:2048].astype(np.float32)
    files = []
    for i in range(n):
        base = (np.sin(xx / (50 + 10 * i % 70)) + np.cos(yy / 80)) * 60 + 120
        img = base[..., None] + rng.normal(0, 0.9, (1024, 2048, 3)).astype(np.float32) + rng.integers(-20, 20, 3)
        path = root / f"{i:04d}_leftImg8bit.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, compress_level=6)
        label = ((xx // 256 + yy // 128 + i) % 30 + (rng.random((1024, 2048)) < 0.01)).astype(np.uint8)
        Image.fromarray(label).save(root / f"{i:04d}_gtFine_labelIds.png")
        files += [path, root / f"{i:04d}_gtFine_labelIds.png"]
    return files


def drop_from_page_cache(files: list[Path]) -> bool:
    """Ask the kernel to forget the files' cached pages (so the next read comes from disk); False when it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def hash_all(files: list[Path], name: str) -> None:
    for path in files:
        with open(path, "rb") as handle:
            hashlib.file_digest(handle, name)


def measure(files: list[Path], memo: Path) -> dict[str, dict[str, float]]:
    """Seconds for each way of telling whether the files changed (see the module docstring)."""
    out: dict[str, dict[str, float]] = {}
    hash_all(files, "sha256")  # warm the page cache
    out["stat (size, mtime: the old identity)"] = dict(zip(("s", "cpu_s"), timed(
        lambda: [os.stat(p) for p in files])))
    for name in HASHES:
        out[f"{name}, warm"] = dict(zip(("s", "cpu_s"), timed(lambda: hash_all(files, name))))
    if drop_from_page_cache(files):
        out["sha256, cold (read from disk)"] = dict(zip(("s", "cpu_s"), timed(lambda: hash_all(files, "sha256"))))
    time.sleep(2.1)  # files older than file_digest's racy window are remembered
    utils._DIGESTS.clear()
    out["file_digest, first (sha256 + stat)"] = dict(zip(("s", "cpu_s"), timed(
        lambda: [file_digest(p) for p in files])))
    out["file_digest, again (remembered: a stat)"] = dict(zip(("s", "cpu_s"), timed(
        lambda: [file_digest(p) for p in files])))
    save_digests(memo)
    utils._DIGESTS.clear()

    def new_process() -> None:  # what the next `prepare` does: read the memo, then stat each file
        load_digests(memo)
        [file_digest(p) for p in files]

    out["file_digest, next process (memo loaded)"] = dict(zip(("s", "cpu_s"), timed(new_process)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=150, help="images of 1024x2048 written (each with a label)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "digest.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        files = make_tree(Path(tmp), args.n)
        total = sum(p.stat().st_size for p in files)
        timings = measure(files, Path(tmp) / "memo.json")
    scale = CITYSCAPES_IMAGES / args.n
    result = {
        "tree": {"images": args.n, "size": [1024, 2048], "files": len(files), "bytes": total,
                 "mb_per_image": round(total / args.n / 1e6, 2)},
        "measured_s": {k: {m: round(v, 4) for m, v in t.items()} for k, t in timings.items()},
        "gb_per_s": {k: round(total / t["s"] / 1e9, 2) for k, t in timings.items() if t["s"] > 0},
        "cityscapes_extrapolated_s": {k: round(t["s"] * scale, 2) for k, t in timings.items()},
        "cityscapes_extrapolated_cpu_s": {k: round(t["cpu_s"] * scale, 2) for k, t in timings.items()},
        "cityscapes_bytes_extrapolated": round(total * scale),
        "extrapolation": f"x {scale:.2f}: {CITYSCAPES_IMAGES} images (and labels) of the same size",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "openssl": __import__("ssl").OPENSSL_VERSION,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": f"python benchmarks/digest.py --n {args.n}",
        "date": time.strftime("%Y-%m-%d"),
    }
    with atomic_write(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps({k: result[k] for k in ("tree", "gb_per_s", "cityscapes_extrapolated_s",
                                              "cityscapes_extrapolated_cpu_s")}, indent=2))


if __name__ == "__main__":
    main()
