"""The run's precision policy: one :class:`Precision` for the feature cache, the per-step recomputation,
the head and the evaluation, chosen once from the config by :func:`amp_context`.

Autocast is used on CUDA only (the released code trains in fp32, so released mode turns it off);
``"auto"`` means bf16 where the GPU supports it, else full precision; fp16 gets a ``GradScaler``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the policy reads only cfg.amp; no import of the config at run time
    from depthg.config import Config

__all__ = ["Precision", "FULL_PRECISION", "amp_context"]


@dataclass(frozen=True)
class Precision:
    """Autocast to ``dtype`` on ``device_type`` (None = full precision); ``with precision(): y = model(x)``."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None

    def __call__(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        """"fp32", "bf16" or "fp16" (what the cache manifest records)."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))


FULL_PRECISION = Precision()


def amp_context(cfg: Config, device: torch.device) -> tuple[Precision, torch.amp.GradScaler | None]:
    """The run's precision and, under fp16, its ``GradScaler``: autocast on CUDA only (bf16 when supported
    under ``amp="auto"``), full precision everywhere else and under ``amp="off"``."""
    if device.type != "cuda" or cfg.amp == "off":
        return FULL_PRECISION, None
    if cfg.amp == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        if dtype is None:
            return FULL_PRECISION, None
    else:
        dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return Precision("cuda", dtype), scaler
