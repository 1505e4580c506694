"""The method: STEGO's correlation distillation with DepthG's depth guidance, standing alone.

This package imports only torch, numpy, the standard library and :mod:`depthg.utils` (a test enforces
it), so it can be read, tested or copied without the run around it (config, data, backbone, trainer).
It owns its defaults; ``depthg.config`` reads them from here.

- :mod:`~depthg.method.losses`: correlation tensors, STEGO's correlation loss, the depth similarities and
  the depth-feature loss, the full objective :class:`~depthg.method.losses.DepthGLoss`;
- :mod:`~depthg.method.sampling`: depth -> 3D points, batched farthest point sampling, grid coordinates;
- :mod:`~depthg.method.schedules`: the depth-weight and sample-count decays, counted in iterations;
- :mod:`~depthg.method.head`: the segmentation head, cluster probe and linear probe;
- :mod:`~depthg.method.lhp`: local hidden positives;
- :mod:`~depthg.method.released`: what the released code computes where it departs from the paper, one
  function each (the run picks these or the paper's once, ``depthg.build.Fidelity``).

docs/method.md gives the equations, docs/fidelity.md the paper-versus-released story.
"""

from depthg.method import head, lhp, losses, released, sampling, schedules
from depthg.method.head import ClusterProbe, LinearProbe, SegmentationHead
from depthg.method.lhp import LhpChoices, LocalHiddenPositives
from depthg.method.losses import (
    DEPTH_SIMILARITIES,
    PAPER_DEPTH_SIMILARITY,
    CorrelationTerms,
    DepthGLoss,
    LossInputs,
    depth_similarity,
    tensor_correlation,
)
from depthg.method.sampling import FpsChoices, depth_to_points, farthest_point_sample, fps_grid, random_grid, sample
from depthg.method.schedules import DepthDecaySchedule, SampleCountSchedule

__all__ = [
    "head", "lhp", "losses", "released", "sampling", "schedules",
    "SegmentationHead", "ClusterProbe", "LinearProbe", "LocalHiddenPositives", "LhpChoices",
    "DepthGLoss", "CorrelationTerms", "LossInputs", "DEPTH_SIMILARITIES", "PAPER_DEPTH_SIMILARITY",
    "depth_similarity", "tensor_correlation",
    "FpsChoices", "depth_to_points", "farthest_point_sample", "fps_grid", "random_grid", "sample",
    "DepthDecaySchedule", "SampleCountSchedule",
]
