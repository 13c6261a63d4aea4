"""Numeric precision of training: fp32, fp16 mixed precision with dynamic loss scaling,
bf16 autocast, or pure bf16.

Mixed precision keeps the parameters in fp32 - the master weights the optimizer updates - and
runs the forward pass under autocast. fp16 also scales the loss so small gradients survive;
a step whose scaled gradients overflow is skipped and the scale halved (GradScaler).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from dtune.config import PrecisionConfig

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    name: str
    device_type: str
    scaler: Optional[torch.amp.GradScaler] = None

    def autocast(self):
        dtype = AUTOCAST.get(self.name)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer, params, max_norm: float, loss_finite: bool) -> tuple[float, str]:
        """Clip, then step unless something was not finite. Returns (grad norm, status):
        "applied"; "overflow" (fp16: the scaler skipped the step and lowered the scale);
        "nonfinite" (NaN/inf loss or gradient without a scaler: nothing was applied)."""
        if self.scaler is None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not (loss_finite and math.isfinite(norm)):
                return norm, "nonfinite"
            optimizer.step()
            return norm, "applied"
        self.scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # does nothing when an inf/nan was found
        self.scaler.update()
        overflow = self.scaler.get_scale() < scale_before or not math.isfinite(norm)
        return norm, "overflow" if overflow else "applied"

    @property
    def loss_scale(self) -> Optional[float]:
        return self.scaler.get_scale() if self.scaler else None


def setup_precision(cfg: PrecisionConfig, model, device_type: str = "cpu") -> Precision:
    """Prepare the model for `cfg` (pure bf16 casts the weights) and return the step helper."""
    if cfg.name == "bf16_pure":
        model.to(torch.bfloat16)
    scaler = None
    if cfg.name == "fp16":
        scaler = torch.amp.GradScaler(device_type, init_scale=cfg.init_loss_scale,
                                      growth_interval=cfg.growth_interval)
    return Precision(cfg.name, device_type, scaler)
