"""The synthetic street world: procedurally rendered scenes with exact depth and Cityscapes labels.

It is the dataset that exists on every machine (written in the real Cityscapes layout by
:func:`make_world`, so the Cityscapes code path runs on it unchanged) and the image stream the embedded
backbone was pretrained on (:func:`render_scene`). The method itself (``depthg/`` outside this
package) does not depend on it except where the data preparation builds the default world.
``depthg.world.pretrain`` (imported on demand: it needs timm and torchvision) trains the embedded
backbone on this world's image stream.
"""

from __future__ import annotations

from .synthetic import (
    BASELINE,
    DEPTH_SCALE,
    GENERATOR_VERSION,
    MAX_DEPTH,
    WORLD_LABEL_IDS,
    SyntheticWorldError,
    depth_to_disparity_png,
    depth_to_gt_png,
    make_world,
    render_scene,
    world_stem,
)

__all__ = [
    "GENERATOR_VERSION", "MAX_DEPTH", "DEPTH_SCALE", "BASELINE", "WORLD_LABEL_IDS", "SyntheticWorldError",
    "render_scene", "make_world", "world_stem", "depth_to_disparity_png", "depth_to_gt_png",
]
