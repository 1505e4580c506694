"""Depth from a rectified stereo pair: calibration, disparity -> metric depth, and a weight-free matcher.

A rectified pair sees a point at column ``x_l`` in the left image and ``x_r = x_l - d`` in the right one;
with focal length f (pixels), baseline B and the principal points' column offset ``doffs = cx_r - cx_l``
(Middlebury's convention; 0 for most rigs), its depth is

    Z = B * f / (d + doffs).

:class:`StereoCalibration` holds these numbers plus the left camera's intrinsics (for unprojection,
:func:`depthg.sampling.depth_to_points_intrinsics`). :func:`sgbm_disparity` runs OpenCV's semi-global
block matcher (Hirschmüller's SGM, ``cv2.StereoSGBM``): a classical depth source that needs no network
weights, used by ``notebooks/01_depth_estimation.ipynb`` as the baseline every monocular network is
compared with.

Depth maps here are (H, W) float32 metres with a boolean mask of valid pixels; invalid pixels hold 0,
the "no depth" value of the workbench's depth caches (``depthg.depth.DepthCache``).
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
    """A rectified stereo rig: the left camera's pinhole intrinsics, the baseline and the disparity offset.

    Attributes:
        fx, fy: focal lengths in pixels (equal for square pixels).
        cx, cy: principal point of the left camera in pixels (column, row; pixel centres at integers).
        baseline: distance between the camera centres in metres.
        doffs: column offset of the principal points, right minus left, in pixels (Middlebury's ``doffs``).
    """

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
        """(fx, fy, cx, cy) in pixels, the arguments of :func:`depthg.sampling.depth_to_points_intrinsics`."""
        return (self.fx, self.fy, self.cx, self.cy)

    def disparity_to_depth(self, disparity: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Metric depth from a left-image disparity map.

        Args:
            disparity: (H, W) disparity in pixels; NaN/inf mark pixels without a value.
            valid: optional (H, W) bool mask of pixels the matcher trusts (ANDed with the finite check).

        Returns:
            depth (H, W) float32 in metres, ``baseline * fx / (disparity + doffs)``, 0 where invalid;
            valid (H, W) bool. A pixel is invalid when its disparity is not finite, masked out, or
            ``disparity + doffs <= 0`` (a point at or behind infinity: no finite positive depth).
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
    left: np.ndarray,
    right: np.ndarray,
    num_disparities: int = 64,
    block_size: int = 5,
    min_disparity: int = 0,
    uniqueness_ratio: int = 10,
    speckle_window_size: int = 100,
    speckle_range: int = 2,
    mode: str = "hh",
) -> tuple[np.ndarray, np.ndarray]:
    """Left-image disparity of a rectified pair with OpenCV's semi-global block matcher (no weights).

    Args:
        left, right: (H, W, 3) uint8 RGB or (H, W) uint8 grey images of a rectified pair.
        num_disparities: size of the searched disparity range, a positive multiple of 16; the range is
            ``[min_disparity, min_disparity + num_disparities)`` pixels and must contain the scene's
            disparities (the Middlebury motorcycle at 741x500 spans about 7..60 px).
        block_size: odd matching window size; smoothness penalties follow OpenCV's recommendation,
            P1 = 8 * channels * block_size**2 and P2 = 32 * channels * block_size**2.
        min_disparity, uniqueness_ratio, speckle_window_size, speckle_range: OpenCV's settings of the
            same names (uniqueness check, speckle filter of small disparity islands).
        mode: "sgbm" (5 directions), "hh" (full 8-direction SGM, Hirschmüller's original) or "3way".

    Returns:
        disparity (H, W) float32 in pixels (OpenCV's 4-bit fixed point divided by 16), NaN where the
        matcher gives no value; valid (H, W) bool. Invalid are the pixels OpenCV marks with
        ``min_disparity - 1``: failed uniqueness or left-right check, speckles, and the leftmost
        ``min_disparity + num_disparities`` columns, whose match could lie outside the right image.
    """
    modes = {"sgbm": cv2.STEREO_SGBM_MODE_SGBM, "hh": cv2.STEREO_SGBM_MODE_HH, "3way": cv2.STEREO_SGBM_MODE_SGBM_3WAY}
    if mode not in modes:
        raise StereoError(f"mode must be one of {sorted(modes)}, got {mode!r}")
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
        minDisparity=min_disparity, numDisparities=num_disparities, blockSize=block_size,
        P1=8 * channels * block_size**2, P2=32 * channels * block_size**2, disp12MaxDiff=1,
        uniquenessRatio=uniqueness_ratio, speckleWindowSize=speckle_window_size, speckleRange=speckle_range,
        mode=modes[mode],
    )
    # OpenCV wants BGR; the cost is per channel, but keep its channel order anyway
    l_in, r_in = (left, right) if channels == 1 else (left[..., ::-1].copy(), right[..., ::-1].copy())
    raw = matcher.compute(l_in, r_in)  # int16, disparity * 16, (min_disparity - 1) * 16 where invalid
    valid = raw >= min_disparity * 16
    disparity = np.where(valid, raw.astype(np.float32) / 16.0, np.nan).astype(np.float32)
    return disparity, valid
