"""Depth from a rectified stereo pair: calibration, disparity -> metric depth, and OpenCV's SGBM matcher.

A point at column ``x_l`` in the left image and ``x_l - d`` in the right has depth
``Z = baseline * f / (d + doffs)`` (``doffs`` = principal points' column offset, Middlebury's convention).
Depth maps are (H, W) float32 metres with a bool mask; invalid pixels hold 0 ("no depth").
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from depthg.utils import DepthGError

__all__ = ["StereoError", "StereoCalibration", "sgbm_disparity"]


class StereoError(DepthGError, ValueError):
    """Bad input to the stereo functions (shapes, dtypes, calibration or matcher settings)."""


@dataclass(frozen=True)
class StereoCalibration:
    """A rectified rig: left-camera intrinsics ``fx, fy, cx, cy`` (pixels), ``baseline`` (metres), ``doffs``."""

    fx: float
    fy: float
    cx: float
    cy: float
    baseline: float
    doffs: float = 0.0

    def __post_init__(self) -> None:
        if not (self.fx > 0 and self.fy > 0 and self.baseline > 0):
            raise StereoError(f"StereoCalibration needs fx, fy and baseline > 0, got fx={self.fx}, fy={self.fy}, "
                              f"baseline={self.baseline}")

    @property
    def intrinsics(self) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) in pixels."""
        return (self.fx, self.fy, self.cx, self.cy)

    def disparity_to_depth(self, disparity: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) disparity in pixels (+ optional bool mask) -> (depth metres float32, valid bool).

        Invalid: a non-finite or masked disparity, or ``disparity + doffs <= 0`` (no finite positive depth).
        """
        d = np.asarray(disparity, dtype=np.float64)
        if d.ndim != 2:
            raise StereoError(f"disparity must be (H, W), got shape {d.shape}")
        ok = np.isfinite(d)
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            if valid.shape != d.shape:
                raise StereoError(f"valid mask {valid.shape} and disparity {d.shape} differ in shape")
            ok &= valid
        denom = np.where(ok, d + self.doffs, 0.0)
        ok &= denom > 0
        depth = np.zeros_like(d)
        depth[ok] = self.baseline * self.fx / denom[ok]
        return depth.astype(np.float32), ok


def sgbm_disparity(
    left: np.ndarray, right: np.ndarray, num_disparities: int = 64, block_size: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Left-image disparity (H, W) float32 pixels (NaN where none) and its bool mask, of a rectified pair
    of (H, W, 3) RGB or (H, W) grey uint8 images, by OpenCV's 8-direction semi-global matcher searching
    ``[0, num_disparities)`` (a multiple of 16) with an odd ``block_size`` window.
    """
    if num_disparities <= 0 or num_disparities % 16:
        raise StereoError(f"num_disparities must be a positive multiple of 16, got {num_disparities}")
    if block_size < 1 or block_size % 2 == 0:
        raise StereoError(f"block_size must be odd and >= 1, got {block_size}")
    left, right = np.asarray(left), np.asarray(right)
    if left.shape != right.shape or left.ndim not in (2, 3) or (left.ndim == 3 and left.shape[2] != 3):
        raise StereoError(f"left and right must be two (H, W, 3) or (H, W) images of one shape, got "
                          f"{left.shape} and {right.shape}")
    if left.dtype != np.uint8 or right.dtype != np.uint8:
        raise StereoError(f"left and right must be uint8 images, got {left.dtype} and {right.dtype}")
    channels = 1 if left.ndim == 2 else 3
    matcher = cv2.StereoSGBM_create(
        minDisparity=0, numDisparities=num_disparities, blockSize=block_size,
        P1=8 * channels * block_size**2, P2=32 * channels * block_size**2, disp12MaxDiff=1,
        uniquenessRatio=10, speckleWindowSize=100, speckleRange=2, mode=cv2.STEREO_SGBM_MODE_HH,
    )
    # OpenCV wants BGR; the cost is per channel, but keep its channel order anyway
    l_in, r_in = (left, right) if channels == 1 else (left[..., ::-1].copy(), right[..., ::-1].copy())
    raw = matcher.compute(l_in, r_in)  # int16, disparity * 16, -16 where invalid
    valid = raw >= 0
    disparity = np.where(valid, raw.astype(np.float32) / 16.0, np.nan).astype(np.float32)
    return disparity, valid
