"""Where the losses look: depth -> 3D points, batched farthest point sampling (FPS), grid coordinates.

The paper's depth-guided sampling (docs/method.md §6); the released unprojection and read-out are in
:mod:`depthg.method.released`. Grid coordinates are (x, y) in [-1, 1] for ``grid_sample(align_corners=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from depthg.utils import DepthGError


#: where the losses look: STEGO's uniform random locations, or DepthG's farthest points in 3D.
SAMPLING_STRATEGIES: tuple[str, ...] = ("random", "fps")
#: how depth becomes 3D points: a pinhole of field of view ``fov_deg`` over the grid (an unknown camera), or
#: each crop's own calibrated camera (:func:`grid_points`)
UNPROJECTIONS: tuple[str, ...] = ("fov", "camera")


class SamplingError(DepthGError, ValueError):
    """Bad input to a sampling function (wrong shape or range)."""


def _check_depth(depth: torch.Tensor, name: str = "depth") -> None:
    if not isinstance(depth, torch.Tensor) or depth.dim() != 4 or depth.shape[1] != 1:
        shape = tuple(depth.shape) if isinstance(depth, torch.Tensor) else type(depth).__name__
        raise SamplingError(f"{name} must be a (B, 1, H, W) tensor, got {shape}")
    if not depth.is_floating_point():
        raise SamplingError(f"{name} must be a floating point tensor, got {depth.dtype}")


# ----------------------------------------------------------------------------------------------------
# Unprojection
# ----------------------------------------------------------------------------------------------------


def depth_to_points_intrinsics(depth: torch.Tensor, fx: float | torch.Tensor, fy: float | torch.Tensor,
                               cx: float | torch.Tensor, cy: float | torch.Tensor) -> torch.Tensor:
    """Pinhole unprojection: (B, 1, H, W) depth Z -> (B, H*W, 3) points (X, Y, Z), row-major (``r*W + c``).

    X = (c - cx) Z / fx, Y = (r - cy) Z / fy with focal lengths and principal point in pixels (pixel
    centres at integers), one camera for the batch (floats) or one per image ((B,) tensors); depth 0
    (invalid) becomes the camera centre.
    """
    _check_depth(depth)
    b, _, h, w = depth.shape
    fx, fy, cx, cy = (torch.as_tensor(v, dtype=depth.dtype, device=depth.device).reshape(-1, 1, 1)
                      for v in (fx, fy, cx, cy))
    if not (bool((fx > 0).all()) and bool((fy > 0).all())):
        raise SamplingError(f"focal lengths must be positive, got fx={fx.flatten().tolist()}, fy={fy.flatten().tolist()}")
    z = depth[:, 0]
    rows = torch.arange(h, device=depth.device, dtype=depth.dtype).view(1, h, 1)
    cols = torch.arange(w, device=depth.device, dtype=depth.dtype).view(1, 1, w)
    x = (cols - cx) * z / fx
    y = (rows - cy) * z / fy
    return torch.stack([x, y, z], dim=-1).reshape(b, h * w, 3)


def cell_intrinsics(intrinsics: torch.Tensor, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """Per-image pinhole intrinsics (B, 4) ``[fx, fy, cx, cy]`` in the pixels of an ``image_hw`` map -> the same
    camera in the cells of a ``grid_hw`` grid over it (cell centres at integers, as pixel centres are)."""
    if intrinsics.dim() != 2 or intrinsics.shape[1] != 4:
        raise SamplingError(f"intrinsics must be a (B, 4) tensor [fx, fy, cx, cy], got {tuple(intrinsics.shape)}")
    sy, sx = grid_hw[0] / image_hw[0], grid_hw[1] / image_hw[1]
    fx, fy, cx, cy = intrinsics.unbind(1)
    return torch.stack([fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5], dim=1)


def depth_to_points(depth: torch.Tensor, fov_deg: float = 90.0) -> torch.Tensor:
    """:func:`depth_to_points_intrinsics` with square cells, focal (w/2)/tan(fov/2) and the grid's centre
    as principal point: (B, 1, h, w) depth, larger = farther in any unit -> (B, h*w, 3) points."""
    _check_depth(depth)
    if not 0.0 < fov_deg < 180.0:
        raise SamplingError(f"fov_deg must be in (0, 180) degrees, got {fov_deg}")
    h, w = depth.shape[-2:]
    focal = (w / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return depth_to_points_intrinsics(depth, focal, focal, (w - 1) / 2.0, (h - 1) / 2.0)


# ----------------------------------------------------------------------------------------------------
# Farthest point sampling
# ----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _numba_kernel() -> Callable | None:
    """The numba FPS kernel (compiled once), ``None`` without numba. Its arithmetic is the torch path's
    (same dtype, running minimum, picks masked with -inf, first index of the maximum): identical indices."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(cache=False, nogil=True)
    def fps_one(xs, ys, zs, n_samples, start, out):  # pragma: no cover - compiled
        n_points = xs.shape[0]
        dist = np.empty(n_points, dtype=xs.dtype)
        dist[:] = np.inf
        idx = start
        for i in range(n_samples):
            out[i] = idx
            px, py, pz = xs[idx], ys[idx], zs[idx]
            dist[idx] = -np.inf
            for j in range(n_points):  # running minimum (vectorises)
                dx = xs[j] - px
                dy = ys[j] - py
                dz = zs[j] - pz
                dist[j] = min(dist[j], dx * dx + dy * dy + dz * dz)
            best = 0
            best_val = dist[0]
            for j in range(1, n_points):  # first index of the maximum
                if dist[j] > best_val:
                    best_val = dist[j]
                    best = j
            idx = best

    @numba.njit(cache=False, nogil=True)
    def fps_kernel(xs, ys, zs, n_samples, start, out):  # pragma: no cover - compiled
        # serial over the batch: parallel=True measured ~4x slower on 2 cores (thread start-up dominates)
        for b in range(xs.shape[0]):
            fps_one(xs[b], ys[b], zs[b], n_samples, start[b], out[b])

    return fps_kernel


def numba_available() -> bool:
    """True when the compiled CPU FPS kernel can be used (numba importable)."""
    return _numba_kernel() is not None


def _fps_torch(points: torch.Tensor, n_samples: int, start: torch.Tensor) -> torch.Tensor:
    """Batched greedy FPS with torch ops, no host syncs in the loop. Chosen points are masked with -inf,
    which picks what the released argmax over the remaining indices picks, ties included."""
    b, n, _ = points.shape
    xs, ys, zs = (points[..., k].contiguous() for k in range(3))
    out = torch.empty(b, n_samples, dtype=torch.long, device=points.device)
    dist = torch.full((b, n), math.inf, dtype=points.dtype, device=points.device)
    idx = start.view(b, 1)
    for i in range(n_samples):
        out[:, i : i + 1] = idx
        dx = xs - xs.gather(1, idx)
        dy = ys - ys.gather(1, idx)
        dz = zs - zs.gather(1, idx)
        dist = torch.minimum(dist, dx * dx + dy * dy + dz * dz)
        dist.scatter_(1, idx, -math.inf)
        idx = dist.argmax(dim=1, keepdim=True)  # first index of the maximum on CPU and CUDA
    return out


def farthest_point_sample(
    points: torch.Tensor,
    n_samples: int,
    start: int | torch.Tensor = 0,
    backend: Literal["auto", "torch", "numba"] = "auto",
) -> torch.Tensor:
    """Greedy farthest point sampling of every cloud of ``points`` (B, N, 3) -> (B, n_samples) int64 indices.

    Each pick is the point farthest (squared Euclidean) from those chosen so far, ties to the lowest index.
    ``start``: the first pick, an int or a LongTensor (B,). ``backend``: ``"auto"`` is numba for CPU
    tensors when installed, else the torch loop; both give identical indices.
    """
    if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[-1] != 3:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise SamplingError(f"points must be a (B, N, 3) tensor, got {shape}")
    b, n, _ = points.shape
    if not 1 <= int(n_samples) <= n:
        raise SamplingError(f"n_samples must be in [1, N={n}], got {n_samples}")
    n_samples = int(n_samples)
    if points.dtype not in (torch.float32, torch.float64):
        points = points.float()
    points = points.detach()
    if isinstance(start, torch.Tensor):
        if start.shape != (b,) or start.dtype not in (torch.int64, torch.int32):
            raise SamplingError(f"start must be an int or a LongTensor of shape ({b},), got "
                                f"{start.dtype} {tuple(start.shape)}")
        start_t = start.to(device=points.device, dtype=torch.long)
        if bool((start_t < 0).any()) or bool((start_t >= n).any()):
            raise SamplingError(f"start indices must be in [0, {n}), got {start.tolist()}")
    else:
        if not 0 <= int(start) < n:
            raise SamplingError(f"start must be in [0, {n}), got {start}")
        start_t = torch.full((b,), int(start), dtype=torch.long, device=points.device)

    if backend not in ("auto", "torch", "numba"):
        raise SamplingError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    kernel = _numba_kernel() if backend != "torch" and points.device.type == "cpu" else None
    if backend == "numba" and kernel is None:
        raise SamplingError("backend='numba' needs numba installed (pip install numba==0.68.1) and a "
                            "CPU tensor")
    nonfinite = "points contain NaN or inf; check the depth map (NaN/inf depth?)"
    if kernel is None:
        if not bool(torch.isfinite(points).all()):  # one sync, before the loop
            raise SamplingError(nonfinite)
        return _fps_torch(points, n_samples, start_t)
    # CPU + numba: stay in NumPy (no torch intra-op thread wake-ups on a busy 2-core machine).
    pts = points.numpy()
    xs, ys, zs = (np.ascontiguousarray(pts[..., k]) for k in range(3))
    if not (np.isfinite(xs).all() and np.isfinite(ys).all() and np.isfinite(zs).all()):
        raise SamplingError(nonfinite)
    out = np.empty((b, n_samples), dtype=np.int64)
    kernel(xs, ys, zs, n_samples, start_t.numpy(), out)
    return torch.from_numpy(out)


def nearest_sample_distance(points: torch.Tensor, indices: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Distance (N,) or (B, N) from every point of ``points`` (N, 3) / (B, N, 3) to its nearest pick
    ``indices`` (k,) / (B, k); ``chunk`` points per block bound the memory."""
    single = points.dim() == 2
    pts = points[None] if single else points
    idx = indices[None] if indices.dim() == 1 else indices
    if pts.dim() != 3 or pts.shape[-1] != 3 or idx.dim() != 2 or idx.shape[0] != pts.shape[0]:
        raise SamplingError(f"expected points (N, 3) / (B, N, 3) and indices (k,) / (B, k) with the same B, "
                            f"got {tuple(points.shape)} and {tuple(indices.shape)}")
    idx = idx.long().to(pts.device)
    if idx.numel() == 0 or idx.shape[1] == 0:
        raise SamplingError("nearest_sample_distance: no picks given")
    if bool((idx < 0).any()) or bool((idx >= pts.shape[1]).any()):
        raise SamplingError(f"pick indices must be in [0, {pts.shape[1]}), got min {int(idx.min())}, max {int(idx.max())}")
    pts = pts.double()  # exact enough that the covering radius is the same whatever the chunking
    picks = torch.gather(pts, 1, idx[..., None].expand(-1, -1, 3))  # (B, k, 3)
    out = torch.cat([torch.cdist(pts[:, s:s + chunk], picks).amin(dim=2) for s in range(0, pts.shape[1], chunk)], dim=1)
    return out[0] if single else out


def covering_radius(points: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The largest distance of any point to its nearest pick (scalar, or (B,) for a batch), the quantity
    greedy FPS keeps within a factor 2 of optimal. Shapes as in :func:`nearest_sample_distance`."""
    return nearest_sample_distance(points, indices).amax(dim=-1)


# ----------------------------------------------------------------------------------------------------
# Indices <-> grid coordinates, sampling
# ----------------------------------------------------------------------------------------------------


def indices_to_grid(indices: torch.Tensor, h: int, w: int, n_side: int) -> torch.Tensor:
    """Flat cell indices (B, n_side**2) ``r*w + c`` on an h x w grid -> (B, n_side, n_side, 2) coordinates
    x = 2c/(w-1) - 1, y = 2r/(h-1) - 1, in selection order: :func:`sample` reads exactly those cells."""
    if indices.dim() != 2 or indices.shape[1] != n_side * n_side:
        raise SamplingError(f"indices must have shape (B, n_side**2 = {n_side * n_side}), got "
                            f"{tuple(indices.shape)}")
    indices = indices.long()
    rows = torch.div(indices, w, rounding_mode="floor").to(torch.float32)
    cols = (indices % w).to(torch.float32)
    grid = torch.stack([2.0 * cols / max(w - 1, 1) - 1.0, 2.0 * rows / max(h - 1, 1) - 1.0], dim=-1)
    return grid.view(indices.shape[0], n_side, n_side, 2)


def random_grid(
    batch: int,
    n_side: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """STEGO's random locations (B, n_side, n_side, 2), uniform in [-1, 1]^2, drawn on the generator's
    device and moved to ``device`` (the same seed gives the same grid on every device)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    grid = torch.rand(batch, n_side, n_side, 2, generator=generator, device=gen_device) * 2.0 - 1.0
    return grid.to(device) if device is not None else grid


def sample(t: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Read a (B, C, h, w) map at (B, S, S, 2) (x, y) coordinates -> (B, C, S, S), bilinear as STEGO."""
    if t.dim() != 4 or grid.dim() != 4 or grid.shape[-1] != 2 or grid.shape[0] != t.shape[0]:
        raise SamplingError(f"sample expects t (B, C, h, w) and grid (B, S, S, 2) with the same B, got "
                            f"{tuple(t.shape)} and {tuple(grid.shape)}")
    return F.grid_sample(t, grid.to(dtype=t.dtype, device=t.device), mode="bilinear",
                         padding_mode="border", align_corners=True)


Unproject = Callable[[torch.Tensor, float], torch.Tensor]
CellsToGrid = Callable[[torch.Tensor, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class FpsChoices:
    """How :func:`fps_grid` unprojects the pooled depth and reads its cells out as coordinates: the paper's
    functions (the defaults) or the released ones (``depthg.build.Fidelity.fps``)."""

    unproject: Unproject = depth_to_points
    cells_to_grid: CellsToGrid = indices_to_grid


def grid_points(depth: torch.Tensor, grid_hw: tuple[int, int], fov_deg: float = 90.0,
                intrinsics: torch.Tensor | None = None, unproject: Unproject = depth_to_points) -> torch.Tensor:
    """The 3D points (B, h*w, 3) of a depth map (B, 1, H, W) average-pooled to the feature grid ``grid_hw``:
    unprojected with each image's own camera when ``intrinsics`` (B, 4) ``[fx, fy, cx, cy]`` in the depth
    map's pixels are given, else with ``unproject`` at the field of view ``fov_deg`` (an unknown camera)."""
    pooled = F.adaptive_avg_pool2d(depth, grid_hw)
    if intrinsics is None:
        return unproject(pooled, fov_deg)
    k = cell_intrinsics(intrinsics.to(device=depth.device, dtype=depth.dtype), tuple(depth.shape[-2:]), grid_hw)
    return depth_to_points_intrinsics(pooled, *k.unbind(1))


def fps_grid(
    depth: torch.Tensor,
    grid_hw: tuple[int, int],
    n_side: int,
    fov_deg: float = 90.0,
    start: int | torch.Tensor = 0,
    choices: FpsChoices = FpsChoices(),
    intrinsics: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depth-guided FPS coordinates (B, n_side, n_side, 2): pool ``depth`` (B, 1, H, W) to ``grid_hw``,
    unproject (:func:`grid_points`: each image's ``intrinsics`` (B, 4), else ``fov_deg``), pick n_side**2
    cells by FPS from ``start``, turn them into coordinates, each step with the paper's or the released
    function (``choices``).
    """
    _check_depth(depth)
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if n_side * n_side > h * w:
        raise SamplingError(f"cannot sample n_side**2 = {n_side * n_side} cells from a {h}x{w} grid")
    points = grid_points(depth, (h, w), fov_deg, intrinsics, choices.unproject)
    indices = farthest_point_sample(points, n_side * n_side, start=start)
    return choices.cells_to_grid(indices.to(depth.device), h, w, n_side)
