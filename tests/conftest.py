"""Shared test fixtures. Tests never touch the network or paths outside ``tmp_path``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def tiny_vit_kwargs() -> dict:
    """timm keyword arguments for a tiny ViT with the key structure of DINO ViT-S/8."""
    return dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, img_size=64)


@pytest.fixture(scope="session")
def benchmark_dry_run():
    """``run(script, out)``: a benchmark script's ``--dry-run --out out`` in a subprocess -> its JSON report."""
    repo = Path(__file__).resolve().parents[1]

    def run(script: Path, out: Path) -> dict:
        proc = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(out)], cwd=repo,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())

    return run
