"""Dense-CRF refinement of per-pixel class scores with the released evaluation's parameters.

Unary = -log softmax of the bilinearly resized logits; Gaussian (sxy 1, compat 3) and bilateral (sxy 67,
srgb 3, compat 4) pairwise terms on the 8-bit RGB image; 10 mean-field iterations (docs/method.md §9).
The released code feeds BGR, which gives the same result since ``srgb`` is shared by all channels.
pydensecrf is optional (the ``crf`` extra). :func:`crf_predictions` runs it on worker processes (one image per
task, :func:`depthg.utils.pool_map`: no deadlock, serial fallback) with the same labels as in this process.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from depthg.utils import DepthGError, pool_map

__all__ = ["CRF_PARAMS", "CRFInputError", "dense_crf", "crf_predictions", "CRF_TIMEOUT_S"]

#: The longest one image's CRF task may take on a worker before the pool counts as hung (a 1024 x 2048
#: image with 27 classes takes seconds).
CRF_TIMEOUT_S = 600.0

#: The released evaluation's settings.
CRF_PARAMS = {
    "iterations": 10,
    "gaussian_sxy": 1,
    "gaussian_compat": 3,
    "bilateral_sxy": 67,
    "bilateral_srgb": 3,
    "bilateral_compat": 4,
}

_INSTALL_HINT = (
    "dense CRF refinement needs the optional 'pydensecrf' module: install it with "
    "`pip install -e '.[crf]'` (or `pip install .[crf]`, i.e. pydensecrf2==1.1, a source build that "
    "needs gcc/g++), or evaluate with CRF turned off"
)


class CRFInputError(DepthGError, ValueError):
    """An image or logits array that dense_crf cannot use."""


def _import_pydensecrf() -> tuple[Any, Any]:
    """Import pydensecrf lazily, with an install hint instead of a bare ModuleNotFoundError."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return dcrf, unary_from_softmax


def _image_to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) or float (3, H, W) in [0, 1] → C-contiguous uint8 (H, W, 3)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        if image.ndim != 3 or image.shape[2] != 3:
            raise CRFInputError(f"image: a uint8 image must be (H, W, 3), got {image.shape}")
        return np.ascontiguousarray(image)
    if not np.issubdtype(image.dtype, np.floating) or image.ndim != 3 or image.shape[0] != 3:
        raise CRFInputError(
            f"image: expected uint8 (H, W, 3) or float (3, H, W) in [0, 1], got {image.dtype} {image.shape}"
        )
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise CRFInputError(
            f"image: float values must lie in [0, 1] (not ImageNet-normalised), got range "
            f"[{np.nanmin(image):.3f}, {np.nanmax(image):.3f}]"
        )
    return np.ascontiguousarray((image.transpose(1, 2, 0) * 255).astype(np.uint8))


def dense_crf(
    image: torch.Tensor | np.ndarray, logits: torch.Tensor | np.ndarray
) -> torch.Tensor | np.ndarray:
    """Refine ``logits`` (C, h, w), resized bilinearly to the image, with a dense CRF on ``image`` (uint8
    (H, W, 3) RGB, or float (3, H, W) in [0, 1] truncated to 8 bits as released) -> float32 probabilities
    (C, H, W), a tensor on the logits' device for tensor logits, else a NumPy array.
    """
    dcrf, unary_from_softmax = _import_pydensecrf()
    rgb = _image_to_uint8(image)
    height, width = rgb.shape[:2]
    as_tensor = isinstance(logits, torch.Tensor)
    scores = logits.detach() if as_tensor else torch.as_tensor(np.asarray(logits))
    device = scores.device
    if scores.ndim != 3 or not scores.is_floating_point():
        raise CRFInputError(
            f"logits: expected a float (C, H, W) array, got {scores.dtype} {tuple(scores.shape)}"
        )
    n_classes = scores.shape[0]
    scores = scores.float().cpu()
    if tuple(scores.shape[1:]) != (height, width):
        scores = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(scores, dim=0).numpy()

    crf = dcrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=CRF_PARAMS["gaussian_sxy"], compat=CRF_PARAMS["gaussian_compat"])
    crf.addPairwiseBilateral(
        sxy=CRF_PARAMS["bilateral_sxy"],
        srgb=CRF_PARAMS["bilateral_srgb"],
        rgbim=rgb,
        compat=CRF_PARAMS["bilateral_compat"],
    )
    q = np.array(crf.inference(CRF_PARAMS["iterations"]), dtype=np.float32).reshape(n_classes, height, width)
    return torch.from_numpy(q).to(device) if as_tensor else q


def crf_prediction(image: torch.Tensor | np.ndarray, logp: Sequence[torch.Tensor | np.ndarray]) -> list[torch.Tensor]:
    """The CRF-refined class of every pixel (H, W) int64, for each of the score maps ``logp`` (C, H, W) of one
    image: argmax of the log of :func:`dense_crf`'s probabilities (clamped at 1e-12), what the evaluation
    computes in this process (``depthg.evaluate.predict_batch`` with ``crf``)."""
    return [torch.as_tensor(dense_crf(image, lp)).clamp_min(1e-12).log().argmax(0) for lp in logp]


def _crf_task(_shared: None, task: tuple[np.ndarray, list[np.ndarray]]) -> list[torch.Tensor]:
    return crf_prediction(*task)


def crf_predictions(tasks: Iterable[tuple[torch.Tensor | np.ndarray, Sequence[torch.Tensor | np.ndarray]]],
                    workers: int = 0, timeout_s: float = CRF_TIMEOUT_S) -> Iterator[list[torch.Tensor]]:
    """:func:`crf_prediction` of each ``(image, [logp, ...])`` of ``tasks``, in order, on ``workers`` processes
    (``workers`` <= 1: in this process; the labels are the same either way).

    Images go to the workers as 8-bit RGB and the maps as float32 arrays, one image per task, at most
    ``2 * workers`` in flight. A worker that dies or an image not done within ``timeout_s`` ends the pool
    (its processes are killed) and the rest is computed here (:func:`depthg.utils.pool_map`).
    """
    if workers > 1:
        _import_pydensecrf()  # fail here, with the install hint, rather than in a worker
    packed = ((_image_to_uint8(image), [np.ascontiguousarray(_as_numpy(lp), dtype=np.float32) for lp in logp])
              for image, logp in tasks)
    return pool_map(_crf_task, packed, workers, timeout_s=timeout_s, what="dense CRF")


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
