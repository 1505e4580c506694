"""Real data out of the box: the Middlebury 2014 "Motorcycle" stereo pair shipped with scikit-image.

``skimage.data.stereo_motorcycle()`` is a rectified pair with the left image's ground-truth disparity at
741x500 (the benchmark's images down-sampled by 4; Scharstein et al., GCPR 2014). Its calibration here is
the full-resolution ``calib.txt`` divided by 4 (baseline unchanged), giving metric depth of about 2.1 to
5.0 m: the depth reference and the real point cloud the notebooks use. No download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.data import stereo_motorcycle

from depthg.method.sampling import depth_to_points_intrinsics
from depthg.stereo import StereoCalibration, StereoError

from .common import image_to_tensor

__all__ = ["MOTORCYCLE_CALIBRATION", "StereoScene", "load_motorcycle"]

#: calibration of ``skimage.data.stereo_motorcycle()`` at its shipped 741x500 size (pixels; baseline in m)
MOTORCYCLE_CALIBRATION = StereoCalibration(fx=994.978, fy=994.978, cx=311.193, cy=254.877, baseline=0.193001,
                                           doffs=31.086)


@dataclass(frozen=True)
class StereoScene:
    """A rectified pair: ``left``, ``right`` (H, W, 3) uint8, ground-truth ``disparity`` (H, W) float32
    (NaN = unknown) of the left image, and its ``calibration``."""

    name: str
    left: np.ndarray
    right: np.ndarray
    disparity: np.ndarray
    calibration: StereoCalibration

    def __post_init__(self) -> None:
        h, w = self.disparity.shape
        if self.left.shape != (h, w, 3) or self.right.shape != (h, w, 3):
            raise StereoError(f"{self.name}: images {self.left.shape} / {self.right.shape} do not match the "
                              f"disparity {self.disparity.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return tuple(self.disparity.shape)  # type: ignore[return-value]

    @property
    def depth(self) -> np.ndarray:
        """(H, W) float32 ground-truth depth in metres, 0 where there is no ground truth."""
        return self.calibration.disparity_to_depth(self.disparity)[0]

    @property
    def valid(self) -> np.ndarray:
        """(H, W) bool: pixels with ground-truth depth."""
        return self.calibration.disparity_to_depth(self.disparity)[1]

    def image_tensor(self) -> torch.Tensor:
        """The left image as a (3, H, W) float32 tensor in [0, 1] (what the depth estimators take)."""
        return image_to_tensor(self.left)

    def point_cloud(self, stride: int = 1, offset: int | None = None) -> dict[str, np.ndarray]:
        """Unproject the ground-truth depth of pixels (offset + i*stride, offset + j*stride) to 3D.

        ``offset`` defaults to ``stride // 2`` (cell centres, like one point per patch). Returns, for the N
        kept pixels with ground truth in row-major order, ``points`` (N, 3) float32 metres (X right, Y down,
        Z forward), ``colors`` (N, 3) uint8 and ``pixels`` (N, 2) int64 (row, col).
        """
        if stride < 1:
            raise StereoError(f"stride must be >= 1, got {stride}")
        o = stride // 2 if offset is None else int(offset)
        if not 0 <= o < min(self.shape):
            raise StereoError(f"offset must be in [0, {min(self.shape)}), got {o}")
        depth, valid = self.calibration.disparity_to_depth(self.disparity)
        sub = depth[o::stride, o::stride]
        fx, fy, cx, cy = self.calibration.intrinsics
        # the kept pixels form a coarser camera: focal / stride, principal point shifted by the offset
        pts = depth_to_points_intrinsics(torch.from_numpy(np.ascontiguousarray(sub))[None, None],
                                         fx / stride, fy / stride, (cx - o) / stride, (cy - o) / stride)[0]
        rows, cols = np.meshgrid(np.arange(o, self.shape[0], stride), np.arange(o, self.shape[1], stride), indexing="ij")
        keep = valid[o::stride, o::stride].reshape(-1)
        pixels = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1)[keep]
        return {"points": pts.numpy()[keep], "colors": self.left[pixels[:, 0], pixels[:, 1]],
                "pixels": pixels.astype(np.int64)}


def load_motorcycle() -> StereoScene:
    """The Middlebury 2014 "Motorcycle" pair shipped with scikit-image, with its 741x500 calibration."""
    left, right, disparity = stereo_motorcycle()
    return StereoScene("Middlebury 2014 Motorcycle (741x500)", np.ascontiguousarray(left), np.ascontiguousarray(right),
                       np.asarray(disparity, dtype=np.float32), MOTORCYCLE_CALIBRATION)
