"""The synthetic world: procedurally rendered street scenes with exact depth and Cityscapes labels.

The workbench needs a dataset that exists on every machine, has *exact* depth, and is written in the
real Cityscapes layout so the real Cityscapes code path (loader, disparity -> depth, evaluation) runs
on it unchanged. It is also the pretraining stream of the embedded DINO backbone, so it must carry
enough structure for self-supervised features to mean something: many object classes, textures, lighting, and class appearances that overlap.

How an image is made (all vectorised NumPy, no external renderer, no per-pixel Python loop):

1. ``_build_scene(rng)`` lays out a street from random numbers: a road along +y split into lanes,
   raised sidewalks (curbs), optional parking strips and grass verges, an optional cross street
   with a zebra crossing, buildings / walls / fences / parks along both sides, trees, street lamps,
   traffic signs and lights, cars / trucks / buses in lanes and parked at the curb, pedestrians,
   cyclists (rider + bicycle), and a far backdrop. Every object is one of four primitives: the
   ground plane z = 0, axis-aligned boxes, axis-aligned ellipsoids, and cylinders along x, y or z.
2. ``_render(scene, H, W)`` casts one ray per pixel from a pinhole camera and keeps the nearest hit
   per pixel. Each primitive is only tested against the pixels inside its projected screen-space
   bounding rectangle, which is what makes the 100-300 primitives of an image cheap.
3. Surfaces get procedural albedo (value-noise fBm, bricks, windows, paving, lane markings, ...;
   stripe patterns are box-filtered against the pixel footprint so distant textures do not alias),
   then Lambertian shading with a random sun and hard cast shadows (one shadow ray per lit pixel,
   culled in the sun's orthographic view), hemispherical ambient light, exponential distance fog,
   and a small amount of sensor noise / exposure / vignetting.

Coordinate conventions. World: x to the right of the street, y along the street (forward), z up,
metres; the ground is z = 0. Camera: pinhole with pixel *centres* at integer coordinates, principal
point ``(u0, v0) = ((W-1)/2, (H-1)/2)``, ``fx = fy = 2262.52 * W / 2048`` (the Cityscapes focal length
scaled to the image width), stereo baseline 0.209313 m (Cityscapes). ``pitch > 0`` looks *down*,
``yaw > 0`` turns *left* (right-hand rotations about the Cityscapes vehicle axes y = left, z = up),
roll = 0. The ray of pixel (u, v) is ``d = right*(u-u0)/fx + down*(v-v0)/fy + forward``; because
its forward component is exactly 1, the ray parameter t of a hit *is* the depth (z in camera
coordinates), which is what Cityscapes disparity encodes: ``depth = baseline * fx / disparity``.
Consequence used by the tests: on the flat ground, depth depends only on the row,
``depth(v) = h * cos(a) / sin(pitch + a)`` with ``a = atan((v - v0) / fy)`` (the horizontal
distance is ``h / tan(pitch + a)``).

Deliberate appearance overlaps (so that depth/geometry carries information that colour does not):
road, sidewalk, walls and concrete buildings share greys; terrain (grass) and vegetation share
greens; cars, buses and trucks draw colours from palettes that overlap facades (white, grey, beige,
red, yellow); an overcast sky is as pale as white facades. What separates them is geometry: the road
is a plane at z = 0, the sidewalk a slab 0.1–0.18 m higher with a vertical curb, walls and facades
are vertical, vehicles are small boxes in the lanes, vegetation is round.

Files written by :func:`make_world` (Cityscapes layout; ``stem = {city}_{seq:06d}_000019``; image i
of a split goes to city ``i % n_cities`` as ``seq = i // n_cities``; train cities are ``synth0`` ..
``synth{n_cities-1}``, val cities the next ``n_cities`` names, so the splits share no city):

- ``leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png``  RGB uint8
- ``gtFine/{split}/{city}/{stem}_gtFine_labelIds.png``  uint8 real Cityscapes label ids
- ``gtFine/{split}/{city}/{stem}_gtFine_color.png``     Cityscapes palette (for viewing)
- ``disparity/{split}/{city}/{stem}_disparity.png``     uint16, ``p = round(d * 256) + 1``, 0 = invalid
  (sky, and the rare pixel closer than ``baseline*fx/255.99`` whose disparity would overflow)
- ``camera/{split}/{city}/{stem}_camera.json``          Cityscapes camera JSON
- ``depth_gt/{split}/{city}/{stem}.png``                uint16, ``depth = png * (1/256)`` metres, sky and
  anything farther than ``MAX_DEPTH`` = 200 m is stored as 200 m (``depth_gt/depth_meta.json``;
  the ground keeps its label out to the horizon, only its depth saturates at 200 m)
- ``world.json``  label ids, names, size, seed, counts, generator version.

Every image's random numbers come from ``SeedSequence([seed, split_code, index])`` (train 0, val 1),
and PNGs are written by PIL with fixed settings, so the same arguments give the same bytes (on the
same machine and NumPy version; float rounding of exp/sqrt may differ across CPUs), also with
``num_workers`` > 0. Files are written atomically (``depthg.utils.atomic_write``) and existing
files are skipped, so an interrupted ``make_world`` resumes where it stopped.

Known limitations: hard shadows only (one shadow ray per pixel, computed up to ``SHADOW_RANGE``), no
reflections or inter-reflections, no anti-aliasing of geometry (one ray per pixel, so thin poles break
up at a distance, and labels are exactly as aliased as the image); objects are boxes,
ellipsoids and cylinders; only straight streets with at most one perpendicular cross street; no
ego-vehicle hood, no motorcycles/trains/caravans/trailers/guard rails/bridges/tunnels.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from cityscapesscripts.helpers.labels import id2label, labels
from PIL import Image
from tqdm.auto import tqdm

from depthg.utils import DepthGError, atomic_write, owned_output

__all__ = [
    "GENERATOR_VERSION",
    "MAX_DEPTH",
    "DEPTH_SCALE",
    "BASELINE",
    "WORLD_LABEL_IDS",
    "SyntheticWorldError",
    "render_scene",
    "make_world",
    "world_complete",
    "world_stem",
    "depth_to_disparity_png",
    "depth_to_gt_png",
]

GENERATOR_VERSION = 1
MAX_DEPTH = 200.0  # metres; sky and anything farther is reported as this depth
DEPTH_SCALE = 1.0 / 256.0  # depth_gt PNG: depth [m] = png value * DEPTH_SCALE (max 255.99 m)
BASELINE = 0.209313  # Cityscapes stereo baseline [m]
FX_AT_2048 = 2262.52  # Cityscapes focal length [px] for a 2048-pixel-wide image
FRAME = 19  # Cityscapes annotates the 20th frame of each snippet: {city}_{seq}_000019

# Cityscapes label ids (cityscapesscripts.helpers.labels) that the world renders.
ROAD, SIDEWALK, PARKING = 7, 8, 9
BUILDING, WALL, FENCE = 11, 12, 13
POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN = 17, 19, 20
VEGETATION, TERRAIN, SKY = 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE = 24, 25, 26, 27, 28, 33
WORLD_LABEL_IDS: tuple[int, ...] = (
    ROAD, SIDEWALK, PARKING, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN,
    VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE,
)

_EPS = 1e-4  # minimum ray parameter counted as a hit [m]
SHADOW_RANGE = 120.0  # cast shadows are computed for surfaces closer than this [m] (fog hides the rest)


class SyntheticWorldError(DepthGError, ValueError):
    """Bad arguments to the synthetic world, or a world folder that does not match them."""


# ----------------------------------------------------------------------------------------------
# Procedural patterns: hashed value noise and box-filtered stripes.


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random float32 in [0, 1) per integer lattice point (integer mixing)."""
    h = ix.astype(np.int64).astype(np.uint32) * np.uint32(0x8DA6B343)
    h ^= iy.astype(np.int64).astype(np.uint32) * np.uint32(0xD8163841)
    h ^= np.uint32((seed * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth 2D value noise in [0, 1] with unit lattice spacing."""
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = x0.astype(np.int64), y0.astype(np.int64)
    a, b = _hash01(ix, iy, seed), _hash01(ix + 1, iy, seed)
    c, d = _hash01(ix, iy + 1, seed), _hash01(ix + 1, iy + 1, seed)
    top = a + (b - a) * sx
    bottom = c + (d - c) * sx
    return (top + (bottom - top) * sy).astype(np.float32)


def _fbm(x: np.ndarray, y: np.ndarray, seed: int, freq: float, footprint: np.ndarray,
         octaves: int = 4) -> np.ndarray:
    """Fractal value noise in about [0, 1] (mean 0.5); octaves finer than the pixel fade to their mean.

    ``footprint`` is the size of a pixel on the surface [m]; an octave of frequency f is faded out
    between f*footprint = 0.25 and 0.5, a cheap stand-in for mip-mapping.
    """
    total = np.zeros_like(x, dtype=np.float32)
    amp, norm = 1.0, 0.0
    for k in range(octaves):
        f = freq * (2.0 ** k)
        fade = np.clip(2.0 - 4.0 * f * footprint, 0.0, 1.0)
        n = _value_noise(x * f, y * f, seed + 101 * k)
        total += amp * (0.5 + fade * (n - 0.5))
        norm += amp
        amp *= 0.5
    return total / np.float32(norm)


def _pulse(x: np.ndarray, period: float, duty: float, footprint: np.ndarray) -> np.ndarray:
    """Fraction of [x - fw/2, x + fw/2] covered by a periodic pulse train, on for [0, duty*period).

    Exact box filter of the square wave (via its integral), so stripes seen from afar blend into
    their average colour instead of aliasing.
    """
    on = duty * period

    def integral(s: np.ndarray) -> np.ndarray:
        return np.floor(s / period) * on + np.minimum(np.mod(s, period), on)

    fw = np.maximum(footprint, 1e-4)
    return np.clip((integral(x + fw / 2) - integral(x - fw / 2)) / fw, 0.0, 1.0).astype(np.float32)


def _mix(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-pixel linear blend of colours a (N,3)|(3,) and b (N,3)|(3,) with weights w (N,)."""
    return a + (b - a) * w[:, None]


# ----------------------------------------------------------------------------------------------
# Camera.


@dataclass
class Camera:
    """Pinhole camera on a level street; see the module docstring for the conventions."""

    height: float  # above the ground [m]
    pitch: float  # radians, > 0 looks down
    yaw: float  # radians, > 0 turns left
    x: float  # lateral position in the world [m]
    fx: float
    fy: float
    u0: float
    v0: float
    baseline: float = BASELINE

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World-space unit vectors (right, down, forward) of the camera."""
        cy, sy, cp, sp = math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)
        heading = np.array([-sy, cy, 0.0])
        right = np.array([cy, sy, 0.0])
        up = np.array([0.0, 0.0, 1.0])
        forward = heading * cp - up * sp
        down = -heading * sp - up * cp
        return right, down, forward

    @property
    def origin(self) -> np.ndarray:
        return np.array([self.x, 0.0, self.height])

    def rays(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-pixel ray directions (dx, dy, dz), each (H, W) float32, with forward component 1."""
        right, down, forward = self.axes()
        a = (np.arange(width, dtype=np.float64) - self.u0) / self.fx
        b = (np.arange(height, dtype=np.float64) - self.v0) / self.fy
        dirs = [
            (right[k] * a[None, :] + down[k] * b[:, None] + forward[k]).astype(np.float32)
            for k in range(3)
        ]
        # Exactly-zero components would make the slab test compute 0 * inf = NaN.
        return tuple(np.where(np.abs(d) < 1e-9, np.float32(1e-9), d) for d in dirs)  # type: ignore[return-value]

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel coordinates (u, v) and depth z of world points (N, 3)."""
        right, down, forward = self.axes()
        rel = points - self.origin
        z = rel @ forward
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.fx * (rel @ right) / z + self.u0
            v = self.fy * (rel @ down) / z + self.v0
        return u, v, z

    def to_json(self) -> dict:
        """The Cityscapes camera JSON structure.

        The Cityscapes vehicle frame is placed on the ground right below the camera, so extrinsic
        x = y = 0 and z = camera height; pitch/yaw follow Cityscapes' signs (module docstring).
        """
        return {
            "extrinsic": {
                "baseline": float(self.baseline),
                "pitch": float(self.pitch),
                "roll": 0.0,
                "x": 0.0,
                "y": 0.0,
                "yaw": float(self.yaw),
                "z": float(self.height),
            },
            "intrinsic": {"fx": float(self.fx), "fy": float(self.fy), "u0": float(self.u0), "v0": float(self.v0)},
        }


# ----------------------------------------------------------------------------------------------
# Primitives: every object is described by its axis-aligned bounding box plus a kind.


@dataclass
class _Prim:
    """One renderable primitive.

    kind "box": the box [lo, hi]; "ellipsoid": inscribed in [lo, hi]; "cylinder": along ``axis``
    spanning [lo, hi] on that axis, circular cross-section inscribed in the other two extents.
    ``material`` names an entry of ``_MATERIALS``; ``color`` and ``params`` parameterise it.
    ``cutout`` (fences) makes parts of the surface transparent (rays pass through the gaps).
    """

    kind: str
    lo: np.ndarray
    hi: np.ndarray
    label: int
    material: str
    color: np.ndarray
    axis: int = 2
    params: dict = field(default_factory=dict)
    cutout: bool = False


def _box(lo, hi, label, material, color, **params) -> _Prim:
    return _Prim("box", np.asarray(lo, float), np.asarray(hi, float), label, material, np.asarray(color, np.float32), params=params)


def _ellipsoid(center, radii, label, material, color, **params) -> _Prim:
    c, r = np.asarray(center, float), np.asarray(radii, float)
    return _Prim("ellipsoid", c - r, c + r, label, material, np.asarray(color, np.float32), params=params)


def _cylinder(axis: int, center, radius: float, lo: float, hi: float, label, material, color, **params) -> _Prim:
    """Cylinder along ``axis`` (0=x, 1=y, 2=z) whose axis passes through ``center`` (3-vector)."""
    c = np.asarray(center, float)
    lo_v, hi_v = c - radius, c + radius
    lo_v[axis], hi_v[axis] = lo, hi
    return _Prim("cylinder", lo_v, hi_v, label, material, np.asarray(color, np.float32), axis=axis, params=params)


_Vec = tuple  # three per-ray components (each an array, or a scalar shared by all rays)


def _intersect(prim: _Prim, o: _Vec, d: _Vec, inv: _Vec) -> np.ndarray:
    """Ray parameter of the first hit of ``prim`` per ray (inf where missed).

    ``o``, ``d``, ``inv`` = 1/d are triples of components that broadcast together: camera rays share
    one origin (scalars) and have per-pixel directions; shadow rays have per-point origins and share
    the sun direction. All arithmetic stays in float32.
    """
    shape = np.broadcast(o[0], d[0]).shape
    lo = [float(v) for v in prim.lo]
    hi = [float(v) for v in prim.hi]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if prim.kind == "box":  # slab test
            tn = np.full(shape, -np.inf, np.float32)
            tf = np.full(shape, np.inf, np.float32)
            for k in range(3):
                a = (lo[k] - o[k]) * inv[k]
                b = (hi[k] - o[k]) * inv[k]
                np.maximum(tn, np.minimum(a, b), out=tn)
                np.minimum(tf, np.maximum(a, b), out=tf)
            return np.where((tf >= tn) & (tn > _EPS), tn, np.float32(np.inf))
        if prim.kind == "ellipsoid":  # unit sphere after scaling by the radii
            c = [(lo[k] + hi[k]) / 2 for k in range(3)]
            r = [(hi[k] - lo[k]) / 2 for k in range(3)]
            oo = [(o[k] - c[k]) / r[k] for k in range(3)]
            dd = [d[k] / r[k] for k in range(3)]
            qa = dd[0] * dd[0] + dd[1] * dd[1] + dd[2] * dd[2]
            qb = oo[0] * dd[0] + oo[1] * dd[1] + oo[2] * dd[2]
            qc = oo[0] * oo[0] + oo[1] * oo[1] + oo[2] * oo[2] - 1.0
            disc = qb * qb - qa * qc
            t = (-qb - np.sqrt(np.maximum(disc, 0))) / qa
            return np.broadcast_to(np.where((disc >= 0) & (t > _EPS), t, np.float32(np.inf)), shape).astype(np.float32)
        if prim.kind == "cylinder":  # circle in the two cross-section axes, clipped by two caps
            k = prim.axis
            i, j = [m for m in range(3) if m != k]
            rad = (hi[i] - lo[i]) / 2
            oi, oj = o[i] - (lo[i] + hi[i]) / 2, o[j] - (lo[j] + hi[j]) / 2
            qa = d[i] * d[i] + d[j] * d[j]
            qb = oi * d[i] + oj * d[j]
            qc = oi * oi + oj * oj - rad * rad
            disc = qb * qb - qa * qc
            t_side = (-qb - np.sqrt(np.maximum(disc, 0))) / qa
            along = o[k] + t_side * d[k]
            side_ok = (disc >= 0) & (t_side > _EPS) & (along >= lo[k]) & (along <= hi[k])
            best = np.broadcast_to(np.where(side_ok, t_side, np.float32(np.inf)), shape).astype(np.float32)
            for plane in (lo[k], hi[k]):
                t_cap = (plane - o[k]) * inv[k]
                pi = oi + t_cap * d[i]
                pj = oj + t_cap * d[j]
                cap_ok = (t_cap > _EPS) & (pi * pi + pj * pj <= rad * rad)
                best = np.where(cap_ok & (t_cap < best), t_cap, best)
            return best.astype(np.float32, copy=False)
    raise ValueError(f"unknown primitive kind {prim.kind!r}")


def _hit(prim: _Prim, o: _Vec, d: _Vec, inv: _Vec) -> np.ndarray:
    """:func:`_intersect` plus the see-through gaps of cutout primitives (fences)."""
    t = _intersect(prim, o, d, inv)
    if prim.cutout:
        hit = np.isfinite(t)
        if hit.any():
            def take(x):
                return x[hit] if np.ndim(x) else x

            ph = np.stack([take(o[j]) + t[hit] * take(d[j]) for j in range(3)], axis=1)
            th = t[hit]
            th[~_fence_cutout(prim, ph)] = np.inf
            t[hit] = th
    return t


def _shadowed(prims: list[_Prim], points: np.ndarray, sun: np.ndarray) -> np.ndarray:
    """True for points (M, 3) from which the ray towards the sun hits a primitive.

    Culling: points and primitives are projected onto the plane perpendicular to the sun; a point
    can only be shadowed by a primitive whose projected bounding box contains it. Points are sorted
    along one plane axis so each primitive finds its candidates with a binary search.
    """
    shadow = np.zeros(len(points), bool)
    if not len(points):
        return shadow
    helper = np.array([0.0, 0.0, 1.0]) if abs(sun[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(sun, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(sun, e1)
    a, b, h = points @ e1, points @ e2, points @ sun
    order = np.argsort(a, kind="stable")
    a_sorted = a[order]
    sun32 = tuple(np.float32(v) for v in sun)
    with np.errstate(divide="ignore"):
        inv = tuple(np.float32(1.0 / v) if v != 0 else np.float32(1e9) for v in sun)
    for prim in prims:
        corners = np.array([[x, y, z] for x in (prim.lo[0], prim.hi[0]) for y in (prim.lo[1], prim.hi[1])
                            for z in (prim.lo[2], prim.hi[2])])
        ca, cb, ch = corners @ e1, corners @ e2, corners @ sun
        i0, i1 = np.searchsorted(a_sorted, [ca.min(), ca.max()])
        cand = order[i0:i1]
        cand = cand[(b[cand] >= cb.min()) & (b[cand] <= cb.max()) & (h[cand] < ch.max()) & ~shadow[cand]]
        if not len(cand):
            continue
        o = tuple(points[cand, k].astype(np.float32) for k in range(3))
        shadow[cand[np.isfinite(_hit(prim, o, sun32, inv))]] = True
    return shadow


def _normals(prim: _Prim, p: np.ndarray) -> np.ndarray:
    """Outward unit normals (N, 3) of ``prim`` at surface points p (N, 3)."""
    if prim.kind == "box":
        c = (prim.lo + prim.hi) / 2
        half = np.maximum((prim.hi - prim.lo) / 2, 1e-6)
        q = (p - c) / half
        axis = np.argmax(np.abs(q), axis=1)
        n = np.zeros_like(p)
        n[np.arange(len(p)), axis] = np.sign(q[np.arange(len(p)), axis])
        return n
    if prim.kind == "ellipsoid":
        c = (prim.lo + prim.hi) / 2
        r = (prim.hi - prim.lo) / 2
        n = (p - c) / (r * r)
        return n / np.linalg.norm(n, axis=1, keepdims=True)
    # cylinder
    k = prim.axis
    c = (prim.lo + prim.hi) / 2
    half_len = max((prim.hi[k] - prim.lo[k]) / 2, 1e-6)
    rad = max((prim.hi[(k + 1) % 3] - prim.lo[(k + 1) % 3]) / 2, 1e-6)
    rel = p - c
    axial = rel[:, k] / half_len
    radial = rel.copy()
    radial[:, k] = 0
    rlen = np.linalg.norm(radial, axis=1)
    cap = np.abs(axial) > rlen / rad
    n = radial / np.maximum(rlen, 1e-9)[:, None]
    n[cap] = 0
    n[cap, k] = np.sign(axial[cap])
    return n


def _surface_uv(p: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2D texture coordinates on the plane most aligned with the surface (a one-axis triplanar map).

    Facades facing +-x use (y, z), facing +-y use (x, z), up/down facing use (x, y); ``u`` runs
    along the surface horizontally, ``v`` vertically (or along y on horizontal surfaces).
    """
    dominant = np.argmax(np.abs(n), axis=1)
    u = np.where(dominant == 0, p[:, 1], p[:, 0])
    v = np.where(dominant == 2, p[:, 1], p[:, 2])
    return u.astype(np.float32), v.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Scene description.


@dataclass
class _Layout:
    """Where the ground is road / parking / terrain, and where lane markings go."""

    road_half: float
    n_lanes: int
    two_way: bool
    parking: list[tuple[float, float]]  # x intervals labelled parking
    cross: tuple[float, float] | None  # y interval of the cross street (road for all x)
    crosswalk: tuple[float, float] | None  # y interval of the zebra crossing on the main road
    road_tone: float
    road_seed: int
    terrain_color: np.ndarray


@dataclass
class _Scene:
    camera: Camera
    prims: list[_Prim]
    layout: _Layout
    sun: np.ndarray  # unit vector towards the sun
    sun_strength: float
    ambient: float
    sky_zenith: np.ndarray
    sky_horizon: np.ndarray
    cloudiness: float
    fog_distance: float
    fog_color: np.ndarray
    exposure: float
    noise_seed: int


# Palettes (linear-ish RGB in [0, 1]). Overlaps between them are intended (module docstring).
_GREYS = [(0.32, 0.32, 0.33), (0.42, 0.42, 0.41), (0.52, 0.51, 0.50), (0.62, 0.61, 0.60)]
_FACADES = _GREYS + [
    (0.72, 0.68, 0.60), (0.80, 0.78, 0.74), (0.62, 0.40, 0.30), (0.55, 0.33, 0.26), (0.70, 0.62, 0.46),
    (0.78, 0.72, 0.52), (0.45, 0.40, 0.36), (0.66, 0.56, 0.50), (0.58, 0.62, 0.66),
]
_CARS = [
    (0.80, 0.80, 0.80), (0.60, 0.61, 0.62), (0.42, 0.42, 0.43), (0.12, 0.12, 0.13), (0.15, 0.20, 0.38),
    (0.62, 0.14, 0.12), (0.72, 0.68, 0.60), (0.30, 0.34, 0.30), (0.52, 0.51, 0.50),
]
_BIG_VEHICLES = [(0.80, 0.78, 0.74), (0.78, 0.72, 0.52), (0.62, 0.40, 0.30), (0.80, 0.68, 0.20), (0.25, 0.40, 0.60), (0.62, 0.61, 0.60)]
_CLOTHES = [(0.15, 0.15, 0.17), (0.25, 0.28, 0.40), (0.55, 0.15, 0.15), (0.45, 0.42, 0.38), (0.70, 0.68, 0.62), (0.20, 0.35, 0.25), (0.60, 0.50, 0.30)]
_SKIN = [(0.85, 0.66, 0.52), (0.65, 0.45, 0.32), (0.42, 0.28, 0.20), (0.90, 0.75, 0.62)]
_GREENS = [(0.22, 0.36, 0.12), (0.30, 0.42, 0.16), (0.18, 0.30, 0.14), (0.36, 0.44, 0.18), (0.40, 0.38, 0.16)]
_GRASS = [(0.30, 0.42, 0.16), (0.38, 0.46, 0.20), (0.44, 0.44, 0.26), (0.34, 0.38, 0.18), (0.50, 0.44, 0.30)]
_SIGN_COLORS = [(0.75, 0.08, 0.08), (0.10, 0.25, 0.65), (0.90, 0.75, 0.10), (0.85, 0.85, 0.85), (0.10, 0.45, 0.20)]


def _pick(rng: np.random.Generator, palette: list, jitter: float = 0.04) -> np.ndarray:
    base = np.asarray(palette[int(rng.integers(len(palette)))], np.float32)
    return np.clip(base + rng.normal(0, jitter, 3).astype(np.float32), 0.02, 0.98)


class _Builder:
    """Collects primitives while laying out one street; all randomness comes from ``rng``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.prims: list[_Prim] = []

    def add(self, prim: _Prim) -> None:
        prim.params.setdefault("seed", int(self.rng.integers(1 << 30)))
        self.prims.append(prim)

    # -- objects ---------------------------------------------------------------------------------
    def person(self, x: float, y: float, z0: float, label: int = PERSON, seated: bool = False) -> None:
        rng = self.rng
        h = rng.uniform(1.55, 1.92) if not seated else rng.uniform(0.75, 0.85)
        r = rng.uniform(0.17, 0.24)
        body = _cylinder(2, (x, y, 0), r, z0, z0 + 0.86 * h, label, "person", _pick(rng, _CLOTHES),
                         legs=_pick(rng, _CLOTHES), split=z0 + (0.45 * h if not seated else 0.0))
        head_r = rng.uniform(0.10, 0.12)
        head = _ellipsoid((x, y, z0 + 0.86 * h + head_r * 0.9), (head_r, head_r, head_r * 1.15), label, "plain", _pick(rng, _SKIN))
        self.add(body)
        self.add(head)

    def bicycle(self, x: float, y: float, z0: float) -> None:
        rng = self.rng
        color = _pick(rng, _CARS + _SIGN_COLORS)
        wheel_r = rng.uniform(0.32, 0.36)
        for dy in (-0.55, 0.55):
            self.add(_cylinder(0, (x, y + dy, z0 + wheel_r), wheel_r, x - 0.025, x + 0.025, BICYCLE, "tyre", (0.08, 0.08, 0.08)))
        self.add(_box((x - 0.03, y - 0.55, z0 + wheel_r), (x + 0.03, y + 0.55, z0 + wheel_r + 0.45), BICYCLE, "plain", color))

    def cyclist(self, x: float, y: float, z0: float) -> None:
        self.bicycle(x, y, z0)
        self.person(x, y - 0.1, z0 + 0.85, label=RIDER, seated=True)

    def car(self, x: float, y: float, z0: float = 0.0, oncoming: bool = False) -> None:
        rng = self.rng
        length, width = rng.uniform(3.9, 4.9), rng.uniform(1.68, 1.9)
        h_body, h_cabin = rng.uniform(0.65, 0.9), rng.uniform(0.45, 0.62)
        clear, wheel_r = 0.22, rng.uniform(0.3, 0.35)
        color = _pick(rng, _CARS)
        y0 = y - length / 2
        self.add(_box((x - width / 2, y0, z0 + clear), (x + width / 2, y0 + length, z0 + clear + h_body), CAR, "vehicle", color,
                      front_at_low_y=oncoming))
        c0 = y0 + length * rng.uniform(0.2, 0.3)
        c1 = c0 + length * rng.uniform(0.45, 0.55)
        top = z0 + clear + h_body
        self.add(_box((x - 0.45 * width, c0, top), (x + 0.45 * width, c1, top + h_cabin), CAR, "cabin", color))
        for wy in (y0 + 0.8, y0 + length - 0.8):
            self.add(_cylinder(0, (x, wy, z0 + wheel_r), wheel_r, x - width / 2 + 0.02, x + width / 2 - 0.02, CAR, "tyre", (0.06, 0.06, 0.06)))

    def truck(self, x: float, y: float, oncoming: bool = False) -> None:
        """Cargo box plus a lower cab at the front (the +y end, or the -y end when oncoming)."""
        rng = self.rng
        width, cargo_len, cab_len = 2.5, rng.uniform(5.5, 9.0), 2.2
        cargo_h, cab_h, clear = rng.uniform(3.2, 3.9), rng.uniform(2.6, 3.0), 0.5
        y0 = y - (cargo_len + cab_len + 0.1) / 2
        if oncoming:
            cab, cargo = (y0, y0 + cab_len), (y0 + cab_len + 0.1, y0 + cab_len + 0.1 + cargo_len)
        else:
            cargo, cab = (y0, y0 + cargo_len), (y0 + cargo_len + 0.1, y0 + cargo_len + 0.1 + cab_len)
        self.add(_box((x - width / 2, cargo[0], clear), (x + width / 2, cargo[1], cargo_h), TRUCK, "panel", _pick(rng, _BIG_VEHICLES)))
        self.add(_box((x - width / 2, cab[0], clear), (x + width / 2, cab[1], cab_h), TRUCK, "vehicle",
                      _pick(rng, _BIG_VEHICLES + _CARS), front_at_low_y=oncoming))
        for wy in (cargo[0] + 1.2, cargo[1] - 1.0, (cab[0] + cab[1]) / 2):
            self.add(_cylinder(0, (x, wy, 0.5), 0.5, x - width / 2 + 0.05, x + width / 2 - 0.05, TRUCK, "tyre", (0.06, 0.06, 0.06)))

    def bus(self, x: float, y: float) -> None:
        rng = self.rng
        width, length, height, clear = 2.55, rng.uniform(10.0, 12.5), rng.uniform(2.9, 3.3), 0.35
        y0 = y - length / 2
        self.add(_box((x - width / 2, y0, clear), (x + width / 2, y0 + length, height), BUS, "bus", _pick(rng, _BIG_VEHICLES)))
        for wy in (y0 + 2.0, y0 + length - 2.6):
            self.add(_cylinder(0, (x, wy, 0.5), 0.5, x - width / 2 + 0.05, x + width / 2 - 0.05, BUS, "tyre", (0.06, 0.06, 0.06)))

    def vehicle(self, x: float, y: float, oncoming: bool, kinds: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> float:
        """Place a random vehicle centred at (x, y); returns its length (for spacing)."""
        kind = self.rng.choice(3, p=np.asarray(kinds) / sum(kinds))
        if kind == 0:
            self.car(x, y, oncoming=oncoming)
            return 5.0
        if kind == 1:
            self.truck(x, y, oncoming=oncoming)
            return 11.0
        self.bus(x, y)
        return 12.5

    def tree(self, x: float, y: float, z0: float) -> None:
        rng = self.rng
        trunk_h = rng.uniform(1.8, 3.5)
        self.add(_cylinder(2, (x, y, 0), rng.uniform(0.12, 0.22), z0, z0 + trunk_h + 0.8, VEGETATION, "bark", (0.30, 0.25, 0.20)))
        rx = rng.uniform(1.4, 3.2)
        rz = rng.uniform(1.6, 3.6)
        self.add(_ellipsoid((x, y, z0 + trunk_h + rz * 0.8), (rx, rx * rng.uniform(0.8, 1.2), rz), VEGETATION, "foliage", _pick(rng, _GREENS)))

    def bush(self, x: float, y: float, z0: float) -> None:
        rng = self.rng
        r = rng.uniform(0.5, 1.4)
        self.add(_ellipsoid((x, y, z0 + r * 0.5), (r * rng.uniform(0.9, 1.8), r * rng.uniform(0.9, 1.8), r * rng.uniform(0.6, 1.0)),
                            VEGETATION, "foliage", _pick(rng, _GREENS)))

    def lamp(self, x: float, y: float, z0: float, towards_road: float) -> None:
        rng = self.rng
        h, r = rng.uniform(5.5, 9.0), rng.uniform(0.07, 0.12)
        color = _pick(rng, [(0.35, 0.36, 0.37), (0.20, 0.28, 0.22), (0.55, 0.55, 0.55)])
        self.add(_cylinder(2, (x, y, 0), r, z0, z0 + h, POLE, "metal", color))
        arm = rng.uniform(0.8, 2.0)
        x1 = x + towards_road * arm
        self.add(_box((min(x, x1) - 0.05, y - 0.05, z0 + h - 0.12), (max(x, x1) + 0.05, y + 0.05, z0 + h), POLE, "metal", color))
        self.add(_box((x1 - 0.3, y - 0.15, z0 + h - 0.25), (x1 + 0.3, y + 0.15, z0 + h - 0.05), POLE, "metal", color))

    def sign(self, x: float, y: float, z0: float) -> None:
        rng = self.rng
        h = rng.uniform(2.2, 3.2)
        self.add(_cylinder(2, (x, y, 0), 0.04, z0, z0 + h, POLE, "metal", (0.45, 0.45, 0.46)))
        color = np.asarray(_SIGN_COLORS[int(rng.integers(len(_SIGN_COLORS)))], np.float32)
        size = rng.uniform(0.55, 0.9)
        if rng.random() < 0.5:  # round plate facing the street direction (cylinder along y)
            self.add(_cylinder(1, (x, y - 0.06, z0 + h - size / 2), size / 2, y - 0.08, y - 0.04, TRAFFIC_SIGN, "sign", color))
        else:
            w = size * rng.uniform(0.8, 1.4)
            self.add(_box((x - w / 2, y - 0.08, z0 + h - size), (x + w / 2, y - 0.04, z0 + h), TRAFFIC_SIGN, "sign", color))

    def traffic_light(self, x: float, y: float, z0: float, overhang: float = 0.0) -> None:
        """A pole with a signal head facing the camera; ``overhang`` (signed metres) adds a mast arm."""
        rng = self.rng
        h = rng.uniform(3.0, 4.2) if overhang == 0 else rng.uniform(5.5, 6.5)
        color = _pick(rng, [(0.30, 0.30, 0.31), (0.45, 0.45, 0.46)])
        self.add(_cylinder(2, (x, y, 0), 0.09, z0, z0 + h, POLE, "metal", color))
        hx = x
        if overhang:
            hx = x + overhang
            self.add(_box((min(x, hx) - 0.06, y - 0.06, z0 + h - 0.15), (max(x, hx) + 0.06, y + 0.06, z0 + h), POLE, "metal", color))
        top = z0 + h - 0.15 if overhang else z0 + h
        body = (0.12, 0.12, 0.12) if rng.random() < 0.7 else (0.55, 0.45, 0.10)
        self.add(_box((hx - 0.17, y - 0.35, top - 0.95), (hx + 0.17, y - 0.09, top), TRAFFIC_LIGHT, "signal", body,
                      lit=int(rng.integers(3))))

    def building(self, side: int, front: float, y0: float, y1: float) -> None:
        rng = self.rng
        depth, height = rng.uniform(10, 22), rng.uniform(6.0, 30.0)
        x_near = side * front
        x_far = side * (front + depth)
        lo, hi = (min(x_near, x_far), y0, 0.0), (max(x_near, x_far), y1, height)
        self.add(_box(lo, hi, BUILDING, "facade", _pick(rng, _FACADES, 0.05),
                      floor=rng.uniform(2.9, 3.6), spacing=rng.uniform(1.8, 4.0), win_w=rng.uniform(0.35, 0.7),
                      win_h=rng.uniform(0.35, 0.6), brick=bool(rng.random() < 0.3), shop=bool(rng.random() < 0.5),
                      glass=_pick(rng, [(0.10, 0.12, 0.16), (0.20, 0.25, 0.30), (0.30, 0.33, 0.35)], 0.03)))

    def wall(self, side: int, x: float, y0: float, y1: float, z0: float) -> None:
        rng = self.rng
        h, thick = rng.uniform(1.0, 3.0), rng.uniform(0.2, 0.4)
        self.add(_box((x - thick / 2, y0, z0), (x + thick / 2, y1, z0 + h), WALL, "concrete", _pick(rng, _GREYS + _FACADES[4:7], 0.04),
                      panel=rng.uniform(1.5, 3.5), brick=bool(rng.random() < 0.35)))

    def fence(self, x: float, y0: float, y1: float, z0: float, across: bool = False) -> None:
        """A fence along y at lateral x (or, with ``across``, along x at y = y0 from x to y1)."""
        rng = self.rng
        h = rng.uniform(0.9, 2.2)
        color = _pick(rng, [(0.35, 0.36, 0.37), (0.45, 0.33, 0.22), (0.20, 0.30, 0.22), (0.60, 0.60, 0.58)])
        params = dict(period=rng.uniform(0.12, 0.4), duty=rng.uniform(0.25, 0.6), height=h, z0=z0)
        if across:
            lo, hi = (min(x, y1), y0 - 0.03, z0), (max(x, y1), y0 + 0.03, z0 + h)
        else:
            lo, hi = (x - 0.03, y0, z0), (x + 0.03, y1, z0 + h)
        prim = _box(lo, hi, FENCE, "fence", color, **params)
        prim.cutout = True
        self.add(prim)


def _near(interval: tuple[float, float] | None, y: float, margin: float) -> bool:
    """True when y lies inside ``interval`` widened by ``margin`` metres on both ends (False: no interval)."""
    return interval is not None and interval[0] - margin < y < interval[1] + margin


def _clear_of(cross: tuple[float, float] | None, y0: float, y1: float) -> list[tuple[float, float]]:
    """The parts of the interval [y0, y1] outside the cross street."""
    if cross is None or y1 <= cross[0] or y0 >= cross[1]:
        return [(y0, y1)]
    parts = []
    if y0 < cross[0]:
        parts.append((y0, cross[0]))
    if y1 > cross[1]:
        parts.append((cross[1], y1))
    return parts


def _lanes(rng: np.random.Generator) -> tuple[list[float], float, bool, float]:
    """Lane centres (x), the road's half width, whether traffic is two-way, and the camera's lane."""
    n_lanes = int(rng.choice([2, 2, 3, 4]))
    lane_w = rng.uniform(2.9, 3.6)
    road_half = n_lanes * lane_w / 2
    two_way = bool(rng.random() < 0.75)
    lanes = [-road_half + (k + 0.5) * lane_w for k in range(n_lanes)]
    # the camera drives on the right: in one of the lanes going its way (+y)
    own_lanes = [x for x in lanes if x > 0] if two_way else lanes
    cam_lane = own_lanes[-1] if rng.random() < 0.6 else own_lanes[int(rng.integers(len(own_lanes)))]
    return lanes, road_half, two_way, cam_lane


def _camera(rng: np.random.Generator, cam_lane: float) -> Camera:
    """The camera's pose in its lane; the intrinsics are set by ``_render`` from the image size."""
    return Camera(height=rng.uniform(1.2, 1.6), pitch=rng.uniform(-0.01, 0.07), yaw=rng.uniform(-0.06, 0.06),
                  x=cam_lane + rng.uniform(-0.4, 0.4), fx=1.0, fy=1.0, u0=0.0, v0=0.0)


def _sky_and_light(rng: np.random.Generator) -> dict:
    """Sun, sky colours, fog, exposure and noise seed: the lighting keyword arguments of ``_Scene``."""
    overcast = rng.random() < 0.35
    elevation = rng.uniform(0.25, 1.1)
    azimuth = rng.uniform(0, 2 * math.pi)
    sun = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
    if overcast:
        zenith = np.array([0.62, 0.64, 0.67]) + rng.normal(0, 0.03)
        horizon = np.array([0.80, 0.80, 0.80]) + rng.normal(0, 0.03)
        sun_strength, ambient = rng.uniform(0.15, 0.35), rng.uniform(0.7, 0.9)
    else:
        zenith = np.array([0.25, 0.45, 0.80]) + rng.normal(0, 0.04, 3)
        horizon = np.array([0.72, 0.80, 0.90]) + rng.normal(0, 0.03, 3)
        sun_strength, ambient = rng.uniform(0.6, 0.95), rng.uniform(0.35, 0.55)
    fog_color = np.clip(horizon * rng.uniform(0.9, 1.05), 0, 1)
    return dict(sun=sun, sun_strength=sun_strength, ambient=ambient,
                sky_zenith=np.clip(zenith, 0, 1).astype(np.float32), sky_horizon=np.clip(horizon, 0, 1).astype(np.float32),
                fog_color=fog_color.astype(np.float32), cloudiness=rng.uniform(0.0, 0.7),
                fog_distance=rng.uniform(90, 400), exposure=rng.uniform(0.85, 1.15), noise_seed=int(rng.integers(1 << 30)))


def _crossings(rng: np.random.Generator) -> tuple[tuple[float, float] | None, tuple[float, float] | None, float | None]:
    """y intervals of the cross street and of a zebra crossing (None: none), and where the street ends."""
    cross: tuple[float, float] | None = None
    crosswalk: tuple[float, float] | None = None
    if rng.random() < 0.45:
        c0 = rng.uniform(18, 60)
        cross = (c0, c0 + rng.uniform(9, 16))
        crosswalk = (c0 - rng.uniform(3.5, 5.0), c0 - 0.5)
    elif rng.random() < 0.3:
        c0 = rng.uniform(12, 45)
        crosswalk = (c0, c0 + rng.uniform(3.0, 4.5))
    far_end = rng.uniform(90, 170) if rng.random() < 0.6 else None
    return cross, crosswalk, far_end


@dataclass
class _Sidewalk:
    """One side's sidewalk: the slab spans |x| in [x_in, x_out]; a grass verge of width ``verge`` lies inside it."""

    side: int  # -1 left of the road, +1 right
    edge: float  # |x| where the verge (or, without one, the sidewalk) starts
    verge: float  # verge width [m]; 0 = none
    curb: float  # slab height [m]
    x_in: float
    x_out: float


def _parking_strip(b: _Builder, layout: _Layout, side: int) -> float:
    """Maybe a parking strip with parked cars beside the road; returns |x| of its outer edge."""
    rng = b.rng
    edge = layout.road_half  # distance of the current band's inner edge from the street axis
    if rng.random() < 0.25:
        w = rng.uniform(2.2, 2.8)
        layout.parking.append((edge, edge + w) if side > 0 else (-edge - w, -edge))
        y = rng.uniform(3, 12)
        while y < 80:
            if rng.random() < 0.6 and not _near(layout.cross, y, 3):
                b.car(side * (edge + w / 2), y, oncoming=bool(rng.random() < 0.5))
            y += rng.uniform(5.5, 8)
        edge += w
    return edge


def _sidewalk(b: _Builder, layout: _Layout, side: int, edge: float, y_end: float) -> _Sidewalk:
    """The raised sidewalk slabs (split around the cross street), with trees and bushes on a verge."""
    rng = b.rng
    verge = rng.uniform(1.0, 3.0) if rng.random() < 0.3 else 0.0
    curb = rng.uniform(0.1, 0.18) if rng.random() < 0.85 else 0.02
    walk = rng.uniform(1.8, 5.0)
    x_in, x_out = edge + verge, edge + verge + walk
    for y0, y1 in _clear_of(layout.cross, -15, y_end):
        lo, hi = (min(side * x_in, side * x_out), y0, 0.0), (max(side * x_in, side * x_out), y1, curb)
        b.add(_box(lo, hi, SIDEWALK, "paving", _pick(rng, _GREYS + [(0.60, 0.55, 0.50)], 0.03),
                   tile=rng.uniform(0.3, 1.0), seams=bool(rng.random() < 0.7)))
    if verge:
        y = rng.uniform(2, 10)
        while y < min(y_end, 120):
            if not _near(layout.cross, y, 2):
                if rng.random() < 0.6:
                    b.tree(side * (edge + verge / 2), y, 0.0)
                else:
                    b.bush(side * (edge + verge / 2), y, 0.0)
            y += rng.uniform(6, 14)
    return _Sidewalk(side, edge, verge, curb, x_in, x_out)


def _street_furniture(b: _Builder, layout: _Layout, walk: _Sidewalk, y_end: float) -> None:
    """Street lamps, traffic signs and (without a verge) trees on the sidewalk, near the curb."""
    rng, side, cross = b.rng, walk.side, layout.cross
    x_furn = side * (walk.x_in + 0.4)
    y = rng.uniform(4, 20)
    while y < min(y_end, 140):
        if not _near(cross, y, 1):
            b.lamp(x_furn, y, walk.curb, towards_road=-side)
        y += rng.uniform(18, 35)
    for _ in range(int(rng.integers(0, 3))):
        ys = rng.uniform(6, 60)
        if not _near(cross, ys, 1):
            b.sign(x_furn, ys, walk.curb)
    if walk.verge == 0 and rng.random() < 0.35:
        y = rng.uniform(3, 12)
        while y < min(y_end, 100):
            if not _near(cross, y, 3):
                b.tree(side * (walk.x_in + 1.0), y, walk.curb)
            y += rng.uniform(7, 15)


def _pedestrians(b: _Builder, layout: _Layout, walk: _Sidewalk) -> None:
    """People walking on the sidewalk and, sometimes, a parked bicycle."""
    rng = b.rng
    for _ in range(int(rng.poisson(2.5))):
        yp = rng.uniform(3, 50)
        if not _near(layout.cross, yp, 0):
            b.person(walk.side * rng.uniform(walk.x_in + 0.4, walk.x_out - 0.3), yp, walk.curb)
    if rng.random() < 0.2:
        b.bicycle(walk.side * (walk.x_out - 0.5), rng.uniform(5, 30), walk.curb)


def _frontage(b: _Builder, layout: _Layout, walk: _Sidewalk, y_end: float) -> None:
    """Beyond the sidewalk: a row of buildings, or a park / lot with walls, fences, plants and buildings behind."""
    rng, side = b.rng, walk.side
    front = walk.x_out + (rng.uniform(0, 3) if rng.random() < 0.3 else 0.0)
    style = rng.choice(["buildings", "park", "lot"], p=[0.65, 0.2, 0.15])
    for y0, y1 in _clear_of(layout.cross, -20, y_end):
        y = y0
        while y < y1:
            seg = min(rng.uniform(8, 30), y1 - y)
            gap = rng.random() < (0.25 if style == "buildings" else 0.8)
            if style == "buildings" and not gap:
                b.building(side, front + (rng.uniform(0, 2) if rng.random() < 0.3 else 0), y, y + seg)
            else:
                fill = rng.random()
                if fill < 0.35:
                    b.wall(side, side * (front + 0.2), y, y + seg, 0.0)
                elif fill < 0.7:
                    b.fence(side * (front + 0.1), y, y + seg, 0.0)
                for _ in range(int(rng.integers(0, 4))):
                    xt, yt = side * (front + rng.uniform(2, 20)), rng.uniform(y, y + seg)
                    if rng.random() < 0.6:
                        b.tree(xt, yt, 0.0)
                    else:
                        b.bush(xt, yt, 0.0)
                if style != "buildings" and rng.random() < 0.6:  # buildings further back
                    b.building(side, front + rng.uniform(15, 40), y, y + seg)
            y += seg


def _side_of_street(b: _Builder, layout: _Layout, side: int, y_end: float) -> None:
    """Everything on one side of the road, from the curb outwards."""
    edge = _parking_strip(b, layout, side)
    walk = _sidewalk(b, layout, side, edge, y_end)
    _street_furniture(b, layout, walk, y_end)
    _pedestrians(b, layout, walk)
    _frontage(b, layout, walk, y_end)


def _crossing_scenery(b: _Builder, layout: _Layout) -> None:
    """The cross street (traffic lights at the corners, buildings closing the view down it) or the
    zebra crossing's lights, and people on the crossing."""
    rng, road_half, cross, crosswalk = b.rng, layout.road_half, layout.cross, layout.crosswalk
    if cross is not None:
        for side in (-1, 1):
            if rng.random() < 0.8:
                b.traffic_light(side * (road_half + 0.6), cross[0] - 1.0, 0.12,
                                overhang=-side * rng.uniform(2, road_half) if rng.random() < 0.4 else 0.0)
            far = rng.uniform(25, 70)
            b.building(side, far, cross[0] - 10, cross[1] + 10)
            for _ in range(int(rng.integers(0, 3))):
                b.person(side * rng.uniform(road_half + 1, road_half + 8), rng.uniform(*cross), 0.0)
        if rng.random() < 0.5:
            b.traffic_light(-road_half - 0.6, cross[1] + 1.0, 0.12)
    elif crosswalk is not None and rng.random() < 0.7:
        for side in (-1, 1):
            b.traffic_light(side * (road_half + 0.6), crosswalk[0] - 0.5, 0.12)
    if crosswalk is not None:
        for _ in range(int(rng.integers(0, 4))):
            b.person(rng.uniform(-road_half + 0.5, road_half - 0.5), rng.uniform(*crosswalk), 0.0)


def _backdrop(b: _Builder, far_end: float) -> None:
    """A row of buildings (and the odd tree) across the street at ``far_end``, closing the view."""
    rng = b.rng
    x = -80.0
    while x < 80:
        w = rng.uniform(10, 30)
        if rng.random() < 0.8:
            b.add(_box((x, far_end, 0), (x + w, far_end + 15, rng.uniform(8, 35)), BUILDING, "facade", _pick(rng, _FACADES, 0.05),
                       floor=3.2, spacing=rng.uniform(2, 4), win_w=0.5, win_h=0.5, brick=False, shop=False,
                       glass=np.array([0.2, 0.22, 0.25], np.float32)))
        else:
            b.tree(x + w / 2, far_end + 3, 0.0)
        x += w


def _traffic(b: _Builder, layout: _Layout, lanes: list[float], cam_lane: float) -> None:
    """Vehicles in the lanes (the camera's lane is kept clear close to the camera) and cyclists at the road's edges."""
    rng, cross, crosswalk, road_half = b.rng, layout.cross, layout.crosswalk, layout.road_half
    for lane in lanes:
        same_dir = (lane > 0) or not layout.two_way
        y = rng.uniform(3, 20) if abs(lane - cam_lane) > 0.1 else rng.uniform(9, 30)
        while y < 130:
            blocked = _near(cross, y, 6) or _near(crosswalk, y, 7)
            if rng.random() < (0.55 if same_dir else 0.45) and not blocked:
                length = b.vehicle(lane + rng.uniform(-0.3, 0.3), y, oncoming=not same_dir)
                y += length
            y += rng.uniform(4, 25)
    if rng.random() < 0.4:  # a cyclist at the right edge of the road
        b.cyclist(road_half - 0.7, rng.uniform(8, 40), 0.0)
    if rng.random() < 0.15:
        b.cyclist(-road_half + 0.7, rng.uniform(8, 40), 0.0)


def _build_scene(rng: np.random.Generator, objects: bool = True) -> _Scene:
    """Lay out one random street scene (geometry, materials, lighting) from ``rng``.

    The steps draw from ``rng`` in a fixed order (lanes, camera, light, crossings, ground, then the
    objects), so a seed always gives the same street. With ``objects=False`` only the ground plane
    (road / parking / terrain bands) and the sky are rendered: the flat world used to check the
    pinhole geometry analytically.
    """
    b = _Builder(rng)
    lanes, road_half, two_way, cam_lane = _lanes(rng)
    # camera, light and atmosphere are drawn before the objects, so ``objects=False`` renders the
    # same camera and light over an empty street
    camera = _camera(rng, cam_lane)
    light = _sky_and_light(rng)
    cross, crosswalk, far_end = _crossings(rng)
    layout = _Layout(road_half, len(lanes), two_way, [], cross, crosswalk, road_tone=rng.uniform(0.26, 0.46),
                     road_seed=int(rng.integers(1 << 30)), terrain_color=_pick(rng, _GRASS, 0.03))
    if objects:
        y_end = far_end if far_end is not None else 230.0
        for side in (-1, 1):
            _side_of_street(b, layout, side, y_end)
        _crossing_scenery(b, layout)
        if far_end is not None:
            _backdrop(b, far_end)
        _traffic(b, layout, lanes, cam_lane)
    return _Scene(camera=camera, prims=b.prims, layout=layout, **light)


# ----------------------------------------------------------------------------------------------
# Materials: albedo (N, 3) from surface points p (N, 3), normals n (N, 3) and pixel footprints fw (N,).

_Material = Callable[[_Prim, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _mat_plain(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    s = prim.params["seed"]
    u, v = _surface_uv(p, n)
    shade = 0.9 + 0.2 * _fbm(u, v, s, 6.0, fw, 2)
    return prim.color[None, :] * shade[:, None]


def _mat_metal(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    s = prim.params["seed"]
    shade = 0.85 + 0.3 * _fbm(p[:, 2].astype(np.float32), (p[:, 0] + p[:, 1]).astype(np.float32), s, 1.5, fw, 3)
    return prim.color[None, :] * shade[:, None]


def _mat_tyre(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    # dark rubber; the hub (cap faces near the axis) is lighter
    k = prim.axis
    c = (prim.lo + prim.hi) / 2
    rad = (prim.hi[(k + 1) % 3] - prim.lo[(k + 1) % 3]) / 2
    r = np.linalg.norm(np.delete(p - c, k, axis=1), axis=1) / rad
    hub = (r < 0.55) & (np.abs(n[:, k]) > 0.5)
    out = np.repeat(prim.color[None, :], len(p), axis=0)
    out[hub] = (0.45, 0.45, 0.47)
    return out


def _mat_person(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    legs = np.asarray(prim.params["legs"], np.float32)
    out = np.where((p[:, 2] < prim.params["split"])[:, None], legs[None, :], prim.color[None, :])
    return out * (0.9 + 0.2 * _fbm(p[:, 2].astype(np.float32), p[:, 0].astype(np.float32), prim.params["seed"], 4.0, fw, 2))[:, None]


def _mat_vehicle(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    """Car body: paint with a darker lower sill; lights on the front/back faces."""
    out = np.repeat(prim.color[None, :], len(p), axis=0)
    z_rel = (p[:, 2] - prim.lo[2]) / max(prim.hi[2] - prim.lo[2], 1e-6)
    sill = z_rel < 0.18
    out[sill] *= 0.55
    end = np.abs(n[:, 1]) > 0.5
    if end.any():
        width = prim.hi[0] - prim.lo[0]
        xr = (p[:, 0] - prim.lo[0]) / width
        lamp = end & (z_rel > 0.55) & (z_rel < 0.8) & ((xr < 0.2) | (xr > 0.8))
        # white head lights at the front, red tail lights at the back
        front = (n[:, 1] < 0) == prim.params["front_at_low_y"]
        out[lamp & front] = (0.95, 0.93, 0.85)
        out[lamp & ~front] = (0.75, 0.08, 0.06)
        plate = end & (z_rel > 0.25) & (z_rel < 0.42) & (np.abs(xr - 0.5) < 0.13)
        out[plate] = (0.9, 0.9, 0.88)
    return out


def _mat_cabin(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    """Car cabin: dark glass on the sides and ends with the body colour on the pillars and roof."""
    glass = np.array([0.10, 0.12, 0.15], np.float32) + 0.08 * _fbm(p[:, 0].astype(np.float32), p[:, 2].astype(np.float32), prim.params["seed"], 1.0, fw, 2)[:, None]
    roof = n[:, 2] > 0.5
    ends = np.abs(n[:, 1]) > 0.5
    y_rel = (p[:, 1] - prim.lo[1]) / max(prim.hi[1] - prim.lo[1], 1e-6)
    z_rel = (p[:, 2] - prim.lo[2]) / max(prim.hi[2] - prim.lo[2], 1e-6)
    pillar = (~ends) & ((y_rel < 0.08) | (y_rel > 0.92) | (np.abs(y_rel - 0.5) < 0.04))
    frame = z_rel > 0.85
    body = roof | pillar | frame
    return np.where(body[:, None], prim.color[None, :], glass)


def _mat_panel(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    """Truck cargo box: painted panels with vertical ribs, sometimes a faded logo stripe."""
    u, v = _surface_uv(p, n)
    ribs = _pulse(u, 0.6, 0.1, fw)
    out = prim.color[None, :] * (1.0 - 0.18 * ribs)[:, None]
    z_rel = (p[:, 2] - prim.lo[2]) / max(prim.hi[2] - prim.lo[2], 1e-6)
    stripe = (z_rel > 0.45) & (z_rel < 0.6) & (np.abs(n[:, 2]) < 0.5)
    out[stripe] = out[stripe] * 0.6
    return out * (0.92 + 0.16 * _fbm(u, v, prim.params["seed"], 0.5, fw, 3))[:, None]


def _mat_bus(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    """Bus: a band of windows along the sides (and the windscreen), paint elsewhere."""
    out = np.repeat(prim.color[None, :], len(p), axis=0)
    z = p[:, 2]
    band = (z > prim.lo[2] + 1.2) & (z < prim.hi[2] - 0.35) & (np.abs(n[:, 2]) < 0.5)
    u, _ = _surface_uv(p, n)
    mullion = _pulse(u, 1.6, 0.12, fw)
    glass = np.array([0.12, 0.14, 0.18], np.float32)
    win = _mix(glass[None, :].repeat(len(p), 0), prim.color[None, :].repeat(len(p), 0), mullion)
    out[band] = win[band]
    out[z < prim.lo[2] + 0.3] *= 0.5
    return out


def _mat_facade(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    """Building: base colour (optionally bricks) with a grid of windows and a ground-floor band."""
    prm = prim.params
    s = prm["seed"]
    u, v = _surface_uv(p, n)
    base = prim.color[None, :] * (0.88 + 0.24 * _fbm(u, v, s, 0.35, fw, 4))[:, None]
    if prm["brick"]:
        course = 0.075
        row = np.floor(v / course)
        offset = np.where(np.mod(row, 2) == 0, 0.0, 0.11).astype(np.float32)
        mortar = np.maximum(_pulse(v, course, 0.18, fw), _pulse(u + offset, 0.22, 0.08, fw))
        base = _mix(base, np.array([0.72, 0.70, 0.66], np.float32), 0.7 * mortar)
    side = np.abs(n[:, 2]) < 0.5
    floor, spacing = prm["floor"], prm["spacing"]
    cover = _pulse(u + spacing * (1 - prm["win_w"]) / 2, spacing, prm["win_w"], fw) * _pulse(v - floor * 0.3, floor, prm["win_h"], fw)
    cell = _hash01(np.floor(u / spacing), np.floor(v / floor), s)
    glass = prm["glass"][None, :] * (0.7 + 0.7 * cell)[:, None]
    lit = cell > 0.93
    glass[lit] = (0.85, 0.78, 0.55)
    ground = v < floor * 0.95
    cover = np.where(ground & prm["shop"], _pulse(u, spacing * 2, 0.8, fw) * (v > 0.3) * (v < floor * 0.8), cover)
    cover = np.where(side, cover, 0.0)
    cornice = side & (p[:, 2] > prim.hi[2] - 0.5)
    out = _mix(base, glass, cover.astype(np.float32))
    out[cornice] *= 0.8
    return out


def _mat_concrete(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    prm = prim.params
    u, v = _surface_uv(p, n)
    base = prim.color[None, :] * (0.85 + 0.3 * _fbm(u, v, prm["seed"], 1.2, fw, 4))[:, None]
    if prm["brick"]:
        row = np.floor(v / 0.075)
        offset = np.where(np.mod(row, 2) == 0, 0.0, 0.11).astype(np.float32)
        mortar = np.maximum(_pulse(v, 0.075, 0.18, fw), _pulse(u + offset, 0.22, 0.08, fw))
    else:
        mortar = _pulse(u, prm["panel"], 0.02, fw)
    return base * (1.0 - 0.3 * mortar)[:, None]


def _fence_cutout(prim: _Prim, p: np.ndarray) -> np.ndarray:
    """True where the fence is solid: vertical bars plus a top and a bottom rail."""
    prm = prim.params
    along = p[:, 1] if prim.hi[1] - prim.lo[1] > prim.hi[0] - prim.lo[0] else p[:, 0]
    bars = np.mod(along, prm["period"]) < prm["duty"] * prm["period"]
    z_rel = p[:, 2] - prm["z0"]
    rails = (z_rel < 0.12) | (z_rel > prm["height"] - 0.08) | (np.abs(z_rel - prm["height"] * 0.55) < 0.04)
    return bars | rails


def _mat_fence(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    return prim.color[None, :] * (0.85 + 0.3 * _fbm(p[:, 0] + p[:, 1], p[:, 2], prim.params["seed"], 2.0, fw, 2))[:, None]


def _mat_paving(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    prm = prim.params
    u, v = _surface_uv(p, n)
    base = prim.color[None, :] * (0.85 + 0.3 * _fbm(u, v, prm["seed"], 2.0, fw, 4))[:, None]
    if prm["seams"]:
        seam = np.maximum(_pulse(u, prm["tile"], 0.06, fw), _pulse(v, prm["tile"], 0.06, fw))
        base = base * (1.0 - 0.35 * seam)[:, None]
    curb = n[:, 2] < 0.5  # the vertical curb face is lighter stone
    base[curb] = base[curb] * 1.15
    return base


def _mat_foliage(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    s = prim.params["seed"]
    x = (p[:, 0] + 0.7 * p[:, 1]).astype(np.float32)
    z = p[:, 2].astype(np.float32)
    leaves = _fbm(x, z, s, 3.0, fw, 4)
    clumps = _fbm(x, z, s + 7, 0.6, fw, 2)
    tone = 0.55 + 0.9 * leaves * clumps + 0.25 * np.clip(n[:, 2], -1, 1)
    tint = np.array([1.0, 1.05, 0.8], np.float32) * (0.9 + 0.2 * clumps[:, None])
    return prim.color[None, :] * tone[:, None] * tint


def _mat_bark(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    s = prim.params["seed"]
    stripes = _fbm((p[:, 0] + p[:, 1]).astype(np.float32) * 8, p[:, 2].astype(np.float32), s, 1.5, fw * 8, 3)
    return prim.color[None, :] * (0.7 + 0.6 * stripes)[:, None]


def _mat_sign(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    """Sign plate: coloured face with a white border seen from the front; grey metal from behind."""
    c = (prim.lo + prim.hi) / 2
    half = np.maximum(np.array([prim.hi[0] - prim.lo[0], 1, prim.hi[2] - prim.lo[2]]) / 2, 1e-6)
    q = np.abs((p - c) / half)
    if prim.kind == "cylinder":
        edge = np.sqrt(q[:, 0] ** 2 + q[:, 2] ** 2)
    else:
        edge = np.maximum(q[:, 0], q[:, 2])
    out = np.repeat(prim.color[None, :], len(p), axis=0)
    out[edge > 0.78] = (0.9, 0.9, 0.9)
    out[(edge < 0.35) & (prim.params["seed"] % 2 == 0)] = (0.1, 0.1, 0.1)
    out[n[:, 1] > 0.5] = (0.5, 0.5, 0.52)
    return out


def _mat_signal(prim: _Prim, p: np.ndarray, n: np.ndarray, fw: np.ndarray) -> np.ndarray:
    """Traffic-light head: three lamps on the face towards the camera, one of them lit."""
    out = np.repeat(prim.color[None, :], len(p), axis=0)
    face = n[:, 1] < -0.5
    height = prim.hi[2] - prim.lo[2]
    cx = (prim.lo[0] + prim.hi[0]) / 2
    colors = [(1.0, 0.15, 0.1), (1.0, 0.7, 0.1), (0.2, 1.0, 0.4)]
    for k in range(3):
        cz = prim.hi[2] - height * (k + 0.5) / 3
        disc = face & ((p[:, 0] - cx) ** 2 + (p[:, 2] - cz) ** 2 < (0.11) ** 2)
        lit = prim.params["lit"] == k
        out[disc] = colors[k] if lit else tuple(0.25 * np.array(colors[k]))
    return out


_MATERIALS: dict[str, _Material] = {
    "plain": _mat_plain, "metal": _mat_metal, "tyre": _mat_tyre, "person": _mat_person, "vehicle": _mat_vehicle,
    "cabin": _mat_cabin, "panel": _mat_panel, "bus": _mat_bus, "facade": _mat_facade, "concrete": _mat_concrete,
    "fence": _mat_fence, "paving": _mat_paving, "foliage": _mat_foliage, "bark": _mat_bark, "sign": _mat_sign,
    "signal": _mat_signal,
}

# Materials that are self-luminous in part (lamps) are not special-cased: they are simply bright albedo.


def _ground(layout: _Layout, p: np.ndarray, fw: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and albedo of ground hits: road (with markings), parking bays, or terrain (grass)."""
    x, y = p[:, 0].astype(np.float32), p[:, 1].astype(np.float32)
    label = np.full(len(p), TERRAIN, np.uint8)
    on_road = np.abs(x) <= layout.road_half
    in_cross = np.zeros(len(p), bool)
    if layout.cross is not None:
        in_cross = (y >= layout.cross[0]) & (y <= layout.cross[1])
        on_road |= in_cross
    label[on_road] = ROAD
    in_parking = np.zeros(len(p), bool)
    for x0, x1 in layout.parking:
        in_parking |= (x >= x0) & (x <= x1) & ~in_cross
    label[in_parking] = PARKING

    # terrain: grass / dirt
    grass = layout.terrain_color[None, :] * (0.7 + 0.6 * _fbm(x, y, seed + 1, 0.8, fw, 5))[:, None]
    dirt = np.array([0.42, 0.36, 0.28], np.float32)
    grass = _mix(grass, dirt[None, :].repeat(len(p), 0), np.clip(_fbm(x, y, seed + 2, 0.07, fw, 2) * 2.5 - 1.4, 0, 1))
    # asphalt with fine grain and large stains
    tone = layout.road_tone * (0.8 + 0.3 * _fbm(x, y, layout.road_seed, 3.0, fw, 4)) * (0.9 + 0.2 * _fbm(x, y, layout.road_seed + 3, 0.05, fw, 2))
    asphalt = np.stack([tone, tone, tone * 1.03], axis=1).astype(np.float32)
    # lane markings: dashed dividers, a centre line, solid edge lines
    white = np.zeros(len(p), np.float32)
    lane_w = 2 * layout.road_half / layout.n_lanes
    main = on_road & ~in_cross
    dash = _pulse(y, 9.0, 0.35, fw)
    for k in range(1, layout.n_lanes):
        xl = -layout.road_half + k * lane_w
        line = _pulse(x - xl + 0.075, 1e4, 0.15 / 1e4, fw)
        centre = layout.two_way and abs(xl) < 0.01
        white = np.maximum(white, line * (1.0 if centre else dash))
    for xl in (-layout.road_half + 0.3, layout.road_half - 0.3):
        white = np.maximum(white, _pulse(x - xl + 0.075, 1e4, 0.15 / 1e4, fw))
    white *= main
    if layout.crosswalk is not None:
        zebra = (y >= layout.crosswalk[0]) & (y <= layout.crosswalk[1]) & (np.abs(x) < layout.road_half)
        white = np.where(zebra, _pulse(x, 1.0, 0.5, fw), white)
    marking = np.array([0.82, 0.82, 0.78], np.float32)
    road = _mix(asphalt, marking[None, :].repeat(len(p), 0), white)
    bay = np.maximum(_pulse(y, 5.5, 0.03, fw), 0.0)
    parking = _mix(asphalt * 1.08, marking[None, :].repeat(len(p), 0), bay)
    albedo = np.where(label[:, None] == ROAD, road, np.where(label[:, None] == PARKING, parking, grass))
    return label, albedo.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Rendering.


def _screen_rect(prim: _Prim, cam: Camera, H: int, W: int) -> tuple[int, int, int, int] | None:
    """Pixel rectangle (r0, r1, c0, c1) containing the projection of the primitive; None if unseen."""
    corners = np.array([[x, y, z] for x in (prim.lo[0], prim.hi[0]) for y in (prim.lo[1], prim.hi[1]) for z in (prim.lo[2], prim.hi[2])])
    u, v, z = cam.project(corners)
    if np.all(z <= 0.05):
        return None
    if np.any(z <= 0.05):  # straddles the camera plane: test the whole image
        return 0, H, 0, W
    c0, c1 = int(max(math.floor(u.min()) - 1, 0)), int(min(math.ceil(u.max()) + 2, W))
    r0, r1 = int(max(math.floor(v.min()) - 1, 0)), int(min(math.ceil(v.max()) + 2, H))
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


@dataclass
class _Hits:
    """The nearest hit of every camera ray, flattened to N = H * W rays in row-major pixel order."""

    origin: np.ndarray  # (3,) float64 camera centre
    dirs: np.ndarray  # (N, 3) float32 ray directions (forward component 1)
    dnorm: np.ndarray  # (N,) float32 length of each direction
    t: np.ndarray  # (N,) float32 ray parameter of the hit = its depth; inf where nothing is hit
    idx: np.ndarray  # (N,) int32 what was hit: a primitive index, -2 the ground, -1 nothing (sky)

    @property
    def hit(self) -> np.ndarray:
        """(N,) bool: the ray hits the ground or a primitive."""
        return self.idx != -1

    @property
    def depth(self) -> np.ndarray:
        """(N,) float32 depth in metres, ``MAX_DEPTH`` where the ray sees the sky."""
        return np.where(self.hit, self.t, np.float32(MAX_DEPTH))


def _cast_rays(scene: _Scene, H: int, W: int) -> _Hits:
    """Nearest hit per pixel: the ground plane first, then every primitive inside its screen rectangle."""
    cam = scene.camera
    o = cam.origin
    d = cam.rays(H, W)
    inv = tuple(np.float32(1.0) / dk for dk in d)
    o3 = tuple(float(v) for v in o)
    t_best = np.where(d[2] < 0, np.float32(-o[2]) / d[2], np.float32(np.inf)).astype(np.float32)
    idx = np.where(np.isfinite(t_best), -2, -1).astype(np.int32)
    for k, prim in enumerate(scene.prims):
        rect = _screen_rect(prim, cam, H, W)
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        sl = (slice(r0, r1), slice(c0, c1))
        t = _hit(prim, o3, tuple(dk[sl] for dk in d), tuple(ik[sl] for ik in inv))
        tb = t_best[sl]
        better = t < tb
        tb[better] = t[better]
        idx[sl][better] = k
    dirs = np.stack([dk.ravel() for dk in d], axis=1)
    return _Hits(o, dirs, np.linalg.norm(dirs, axis=1), t_best.ravel(), idx.ravel())


def _surfaces(scene: _Scene, hits: _Hits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label ids (N,) uint8 (sky where nothing is hit), albedo (N, 3) and normals (N, 3), one primitive at a time."""
    n_rays = len(hits.t)
    label = np.full(n_rays, SKY, np.uint8)
    albedo = np.zeros((n_rays, 3), np.float32)
    normal = np.zeros((n_rays, 3), np.float32)
    # pixels grouped by what they hit: index -2 (ground), -1 (sky), 0, 1, ... (primitives)
    order = np.argsort(hits.idx, kind="stable")
    counts = np.bincount(hits.idx + 2, minlength=len(scene.prims) + 2)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for k in range(-2, len(scene.prims)):
        if k == -1 or counts[k + 2] == 0:
            continue
        pix = order[starts[k + 2]:starts[k + 3]]
        p = hits.origin[None, :] + hits.t[pix, None].astype(np.float64) * hits.dirs[pix]
        if k == -2:
            n = np.tile(np.array([[0.0, 0.0, 1.0]]), (len(pix), 1))
        else:
            n = _normals(scene.prims[k], p)
        cosang = np.abs(np.sum(n * hits.dirs[pix], axis=1)) / hits.dnorm[pix]
        fw = (hits.t[pix] / scene.camera.fx / np.maximum(cosang, 0.15)).astype(np.float32)  # pixel footprint [m]
        if k == -2:
            lab, alb = _ground(scene.layout, p, fw, scene.noise_seed)
        else:
            prim = scene.prims[k]
            lab = prim.label
            alb = _MATERIALS[prim.material](prim, p, n, fw)
        label[pix] = lab
        albedo[pix] = alb
        normal[pix] = n
    return label, albedo, normal


def _lighting(scene: _Scene, hits: _Hits, albedo: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Colour (N, 3) of every ray: Lambert sun with cast shadows + hemispherical ambient, then exponential fog."""
    sun_term = np.clip(normal @ scene.sun.astype(np.float32), 0, None)
    test = np.nonzero(hits.hit & (sun_term > 0) & (hits.t < SHADOW_RANGE))[0]
    # shadow rays start slightly off the surface (float32 rounding grows with distance)
    offset = (0.01 + 5e-4 * hits.t[test])[:, None] * normal[test]
    points = hits.origin[None, :] + hits.t[test, None].astype(np.float64) * hits.dirs[test] + offset
    sun_term[test[_shadowed(scene.prims, points, scene.sun)]] = 0.0
    sky_term = 0.8 + 0.2 * normal[:, 2]
    light = scene.ambient * sky_term + scene.sun_strength * sun_term
    color = albedo * light[:, None] * 1.1
    fog = np.exp(-np.minimum(hits.depth, MAX_DEPTH * 2) / scene.fog_distance)[:, None].astype(np.float32)
    return color * fog + scene.fog_color[None, :] * (1 - fog)


def _paint_sky(scene: _Scene, hits: _Hits, color: np.ndarray) -> None:
    """Fill the rays that hit nothing (in ``color``, (N, 3)) with a zenith-to-horizon gradient and clouds."""
    sky = ~hits.hit
    if not sky.any():
        return
    dn = hits.dirs[sky] / hits.dnorm[sky, None]
    elev = np.clip(dn[:, 2], 0.0, 1.0)
    grad = np.sqrt(elev)[:, None]
    sky_col = scene.sky_horizon[None, :] * (1 - grad) + scene.sky_zenith[None, :] * grad
    hz = np.maximum(dn[:, 2], 0.02)
    cu, cv = (dn[:, 0] / hz).astype(np.float32), (dn[:, 1] / hz).astype(np.float32)
    clouds = np.clip((_fbm(cu, cv, scene.noise_seed + 11, 0.8, np.full(len(cu), 0.001, np.float32), 5) - (1 - scene.cloudiness)) * 3, 0, 1)
    sky_col = _mix(sky_col, np.full_like(sky_col, 0.93), clouds.astype(np.float32))
    color[sky] = sky_col


def _sensor(scene: _Scene, color: np.ndarray, H: int, W: int, rng: np.random.Generator) -> np.ndarray:
    """The camera's response to ``color`` (N, 3): exposure, vignetting, gamma and sensor noise; (H, W, 3) uint8."""
    cam = scene.camera
    img = color.reshape(H, W, 3) * scene.exposure
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    r2 = ((xx - cam.u0) / W) ** 2 + ((yy - cam.v0) / H) ** 2
    img = img * (1.0 - 0.35 * r2)[:, :, None]
    img = np.clip(img, 0, 1) ** (1 / 1.15)
    img = img + rng.normal(0, 0.012, img.shape).astype(np.float32)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def _render(scene: _Scene, H: int, W: int, rng: np.random.Generator) -> dict:
    """Ray-cast ``scene`` at H x W: visibility, then materials per primitive, then light and camera.

    The intrinsics are set here from the image size (Cityscapes fx scaled to the width), so the
    layout drawn by ``_build_scene`` is independent of the resolution. ``rng`` only draws the
    sensor noise.
    """
    cam = scene.camera
    cam.fx = cam.fy = FX_AT_2048 * W / 2048.0
    cam.u0, cam.v0 = (W - 1) / 2.0, (H - 1) / 2.0
    hits = _cast_rays(scene, H, W)
    label, albedo, normal = _surfaces(scene, hits)
    color = _lighting(scene, hits, albedo, normal)
    _paint_sky(scene, hits, color)
    return {
        "img": _sensor(scene, color, H, W, rng),
        "label_ids": label.reshape(H, W),
        "depth": np.minimum(hits.depth.reshape(H, W), np.float32(MAX_DEPTH)).astype(np.float32),
        "camera": cam.to_json(),
    }


def _as_rng(seed_or_rng: int | np.random.Generator | np.random.SeedSequence) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    if isinstance(seed_or_rng, np.random.SeedSequence):
        return np.random.default_rng(seed_or_rng)
    if isinstance(seed_or_rng, (int, np.integer)) and not isinstance(seed_or_rng, bool):
        if seed_or_rng < 0:
            raise SyntheticWorldError(f"seed_or_rng must be a non-negative int, got {seed_or_rng}")
        return np.random.default_rng(int(seed_or_rng))
    raise SyntheticWorldError(
        f"seed_or_rng must be an int, numpy.random.Generator or SeedSequence, got {type(seed_or_rng).__name__}"
    )


def _check_size(size) -> tuple[int, int]:
    try:
        H, W = (int(s) for s in size)
        ok = H >= 8 and W >= 8 and tuple(size) == (H, W)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SyntheticWorldError(f"size must be (height, width) with integers >= 8, got {size!r}")
    return H, W


def render_scene(seed_or_rng: int | np.random.Generator | np.random.SeedSequence = 0,
                 size: tuple[int, int] = (128, 256), *, objects: bool = True) -> dict:
    """Render one random street scene.

    Args:
        seed_or_rng: an int seed, a ``numpy.random.Generator`` (advanced in place, which makes it
            convenient for streaming) or a ``SeedSequence``. The scene layout does not depend on
            ``size``: the same seed at two sizes gives the same street (only the sensor noise differs).
        size: (height, width) in pixels; the focal length scales with the width (Cityscapes fx).
        objects: False renders only the flat ground bands and the sky (for geometry checks).

    Returns:
        dict with ``img`` (H, W, 3) uint8 RGB, ``label_ids`` (H, W) uint8 real Cityscapes label ids
        (see ``WORLD_LABEL_IDS``), ``depth`` (H, W) float32 metres (z in camera coordinates; sky and
        anything farther is ``MAX_DEPTH``), ``camera`` the Cityscapes camera JSON dict.
    """
    rng = _as_rng(seed_or_rng)
    H, W = _check_size(size)
    scene = _build_scene(rng, objects=objects)
    return _render(scene, H, W, rng)


# ----------------------------------------------------------------------------------------------
# Encodings and the on-disk world.


def depth_to_disparity_png(depth: np.ndarray, label_ids: np.ndarray, camera: dict) -> np.ndarray:
    """Cityscapes disparity encoding: ``p = round(d * 256) + 1`` with ``d = baseline * fx / depth``.

    0 marks invalid pixels: sky, and pixels so close that p would not fit in uint16 (d >= 255.99).
    """
    bf = camera["extrinsic"]["baseline"] * camera["intrinsic"]["fx"]
    disp = bf / np.maximum(depth.astype(np.float64), 1e-6)
    p = np.round(disp * 256.0) + 1.0
    valid = (label_ids != SKY) & (p <= 65535)
    return np.where(valid, p, 0).astype(np.uint16)


def depth_to_gt_png(depth: np.ndarray) -> np.ndarray:
    """``depth_gt`` encoding: uint16 ``round(depth / DEPTH_SCALE)`` (metres, sky = ``MAX_DEPTH``)."""
    return np.round(np.minimum(depth, MAX_DEPTH) / DEPTH_SCALE).astype(np.uint16)


@functools.lru_cache(maxsize=1)
def _label_colors() -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    for lab in labels:
        if 0 <= lab.id < 256:
            lut[lab.id] = lab.color
    return lut


def _label_names(ids) -> list[str]:
    return [id2label[i].name for i in ids]


def world_stem(city: str, index: int) -> str:
    """Cityscapes file stem ``{city}_{seq:06d}_{frame:06d}`` of the index-th image of a city."""
    return f"{city}_{index:06d}_{FRAME:06d}"


def _cities(split: str, n_cities: int) -> list[str]:
    """City folder names; train and val use different cities, like Cityscapes."""
    offset = 0 if split == "train" else n_cities
    return [f"synth{offset + k}" for k in range(n_cities)]


_SPLIT_CODES = {"train": 0, "val": 1}


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write a PNG atomically with fixed settings (same array -> same bytes)."""
    image = Image.fromarray(np.ascontiguousarray(array))  # uint16 (H, W) -> mode "I;16"
    with atomic_write(path, "wb") as handle:
        image.save(handle, format="PNG", compress_level=3, optimize=False)


def _write_json(path: Path, obj: dict) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SyntheticWorldError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _image_paths(root: Path, split: str, index: int, n_cities: int) -> dict[str, Path]:
    """The files of image ``index`` of ``split``: image, labels, colours, disparity, camera and depth."""
    city = _cities(split, n_cities)[index % n_cities]
    stem = world_stem(city, index // n_cities)
    sub = Path(split) / city
    return {
        "img": root / "leftImg8bit" / sub / f"{stem}_leftImg8bit.png",
        "label": root / "gtFine" / sub / f"{stem}_gtFine_labelIds.png",
        "color": root / "gtFine" / sub / f"{stem}_gtFine_color.png",
        "disparity": root / "disparity" / sub / f"{stem}_disparity.png",
        "camera": root / "camera" / sub / f"{stem}_camera.json",
        "depth": root / "depth_gt" / sub / f"{stem}.png",
    }


def _write_image(job: tuple[Path, str, int, tuple[int, int], int, int]) -> None:
    """Render image ``index`` of ``split`` and write whichever of its files are missing."""
    root, split, index, size, seed, n_cities = job
    paths = _image_paths(root, split, index, n_cities)
    missing = [k for k, p in paths.items() if not p.exists()]
    if not missing:
        return
    out = render_scene(np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index])), size)
    encoders: dict[str, Callable[[], np.ndarray]] = {
        "img": lambda: out["img"],
        "label": lambda: out["label_ids"],
        "color": lambda: _label_colors()[out["label_ids"]],
        "disparity": lambda: depth_to_disparity_png(out["depth"], out["label_ids"], out["camera"]),
        "depth": lambda: depth_to_gt_png(out["depth"]),
    }
    for key in missing:
        if key == "camera":
            _write_json(paths[key], out["camera"])
        else:
            _save_png(paths[key], encoders[key]())


def _claim_root(root: Path, meta: dict) -> None:
    """Write ``world.json`` and ``depth_gt/depth_meta.json`` into ``root``, or check that an existing
    ``world.json`` describes the same world (``SyntheticWorldError`` if not)."""
    world_json = root / "world.json"
    if world_json.exists():
        try:
            old = json.loads(world_json.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SyntheticWorldError(f"{world_json} is not readable JSON ({err}); remove it or use another root") from None
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise SyntheticWorldError(
                f"{world_json} describes a different world (existing vs requested: {diff}); "
                "use another root or delete the folder"
            )
    else:
        _write_json(world_json, meta)
    depth_meta = root / "depth_gt" / "depth_meta.json"
    if not depth_meta.exists():
        _write_json(depth_meta, {"source": "synthetic_gt", "encoding": "uint16", "scale": DEPTH_SCALE,
                                 "offset": 0.0, "units": "m", "normalisation": "none"})


def world_complete(root: str | Path, n_train: int, n_val: int, size: tuple[int, int] = (256, 512), seed: int = 0,
                   n_cities: int = 2) -> bool:
    """Whether ``root`` holds the complete world of these arguments (its ``world.json`` and every file), read
    without writing anything: a finished world is used as it is, even from a read-only folder."""
    root = Path(root)
    try:
        meta = json.loads((root / "world.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = {"size": list(size), "seed": seed, "n_train": n_train, "n_val": n_val, "n_cities": n_cities,
              "generator_version": GENERATOR_VERSION}
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in wanted.items()):
        return False
    if not (root / "depth_gt" / "depth_meta.json").is_file():
        return False
    return all(p.exists() for split, n in (("train", n_train), ("val", n_val)) for i in range(n)
               for p in _image_paths(root, split, i, n_cities).values())


def make_world(root: str | Path, n_train: int, n_val: int, size: tuple[int, int] = (256, 512), seed: int = 0,
               n_cities: int = 2, progress: bool = True, *, num_workers: int = 0) -> Path:
    """Render a synthetic world into ``root`` in the Cityscapes layout (see the module docstring).

    Resumable: files that already exist are not rewritten, so an interrupted call can simply be
    repeated. Refuses (``SyntheticWorldError``) to add to a folder whose ``world.json`` was written
    with different arguments rather than mixing two worlds. ``num_workers`` > 0 renders in that
    many spawned processes (same bytes as serial rendering). Returns ``root``.
    """
    n_train = _check_count("n_train", n_train, 0)
    n_val = _check_count("n_val", n_val, 0)
    n_cities = _check_count("n_cities", n_cities, 1)
    seed = _check_count("seed", seed, 0)
    num_workers = _check_count("num_workers", num_workers, 0)
    H, W = _check_size(size)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SyntheticWorldError(f"world root {root} exists and is not a folder")
    owned_output(root, "synthetic world", "world.json")  # never among files of someone else
    root.mkdir(parents=True, exist_ok=True)
    _claim_root(root, {
        "label_ids": sorted(WORLD_LABEL_IDS), "names": _label_names(sorted(WORLD_LABEL_IDS)), "size": [H, W],
        "seed": seed, "n_train": n_train, "n_val": n_val, "n_cities": n_cities, "generator_version": GENERATOR_VERSION,
        "max_depth": MAX_DEPTH, "baseline": BASELINE, "fx": FX_AT_2048 * W / 2048.0,
    })

    jobs = [(split, i) for split, n in (("train", n_train), ("val", n_val)) for i in range(n)]
    work = [(root, split, i, (H, W), seed, n_cities) for split, i in jobs]
    bar = tqdm(total=len(work), desc=f"synthetic world -> {root}", disable=not progress)
    if num_workers and len(work) > 1:
        # Each image has its own RNG, so the bytes do not depend on the number of workers.
        ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold torch threads
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as pool:
            for _ in pool.map(_write_image, work, chunksize=4):
                bar.update()
    else:
        for job in work:
            _write_image(job)
            bar.update()
    bar.close()
    return root
