"""Shared test fixtures. Tests never touch the network or paths outside ``tmp_path``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture
def tiny_vit_kwargs() -> dict:
    """timm keyword arguments for a tiny ViT with the key structure of DINO ViT-S/8."""
    return dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, img_size=64)
