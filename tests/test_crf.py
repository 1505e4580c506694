"""Dense CRF: it cleans noisy scores on a two-region image, outputs distributions, and says how to install
the optional dependency when it is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import depthg.crf as crf


def two_region_problem(size: int = 64, n_classes: int = 6, seed: int = 0):
    """Left half dark, right half bright; noisy logits whose argmax is right for only some pixels."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.zeros(3, size, size)
    image[:, :, size // 2 :] = 1.0
    label = torch.zeros(size, size, dtype=torch.long)
    label[:, size // 2 :] = 3
    logits = 2.0 * torch.randn(n_classes, size, size, generator=gen)
    logits.scatter_add_(0, label[None], torch.full((1, size, size), 1.5))
    return image, label, logits


def test_crf_raises_accuracy_and_outputs_distributions():
    pytest.importorskip("pydensecrf")
    image, label, logits = two_region_problem()
    before = (logits.argmax(0) == label).float().mean().item()
    probs = crf.dense_crf(image, logits)
    assert isinstance(probs, torch.Tensor) and probs.shape == logits.shape
    torch.testing.assert_close(probs.sum(0), torch.ones(64, 64), rtol=0, atol=1e-4)
    assert probs.min() >= 0
    after = (probs.argmax(0) == label).float().mean().item()
    assert before < 0.7 and after > before + 0.2, (before, after)


def test_crf_uint8_image_and_resized_logits():
    pytest.importorskip("pydensecrf")
    image, label, logits = two_region_problem(size=32)
    as_uint8 = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    a = crf.dense_crf(image, logits)
    b = crf.dense_crf(as_uint8, logits.numpy())
    assert isinstance(b, np.ndarray)
    np.testing.assert_allclose(a.numpy(), b, atol=1e-6)
    small = crf.dense_crf(image, logits[:, ::2, ::2].contiguous())  # upsampled to the image size
    assert small.shape == (6, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        crf.dense_crf(image * 3 - 1, logits)


def test_missing_pydensecrf_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.utils", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[crf\]'"):
        crf.dense_crf(torch.zeros(3, 4, 4), torch.zeros(2, 4, 4))


def test_crf_on_worker_processes_gives_the_serial_labels():
    """The pool (2 processes, one image per task) returns, in order, the labels computed in this process,
    which are the argmax of the CRF's log-probabilities as the evaluation takes them."""
    pytest.importorskip("pydensecrf")
    problems = [two_region_problem(size=24, seed=s) for s in range(5)]
    tasks = [(image, [logits, torch.log_softmax(-logits, 0)]) for image, _, logits in problems]
    serial = list(crf.crf_predictions(tasks, workers=0))
    pooled = list(crf.crf_predictions(iter(tasks), workers=2))
    assert len(pooled) == 5
    for (image, maps), a, b in zip(tasks, serial, pooled):
        for lp, x, y in zip(maps, a, b):
            expected = crf.dense_crf(image, lp).clamp_min(1e-12).log().argmax(0)
            assert torch.equal(x, expected) and torch.equal(y, expected)
