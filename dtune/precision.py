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

from dtune.config import Config, PrecisionConfig
from dtune.methods import METHODS

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

    def step(self, optimizer, params, max_norm: float, loss: torch.Tensor
             ) -> tuple[float, float, str]:
        """Clip, then step unless something was not finite. Returns (grad norm, loss, status):
        "applied"; "overflow" (fp16: the scaler skipped the step and lowered the scale);
        "nonfinite" (NaN/inf loss or gradient without a scaler: nothing was applied). The
        norm and the loss are read from the device together, once."""
        if self.scaler is None:
            norm, value = read_together(torch.nn.utils.clip_grad_norm_(params, max_norm), loss)
            if not (math.isfinite(value) and math.isfinite(norm)):
                return norm, value, "nonfinite"
            optimizer.step()
            return norm, value, "applied"
        self.scaler.unscale_(optimizer)
        norm, value = read_together(torch.nn.utils.clip_grad_norm_(params, max_norm), loss)
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # does nothing when an inf/nan was found
        self.scaler.update()
        overflow = self.scaler.get_scale() < scale_before or not math.isfinite(norm)
        return norm, value, "overflow" if overflow else "applied"

    @property
    def loss_scale(self) -> Optional[float]:
        return self.scaler.get_scale() if self.scaler else None


def read_together(norm: torch.Tensor, loss: torch.Tensor) -> tuple[float, float]:
    """One device-to-host read for the step's two numbers."""
    norm_value, loss_value = torch.stack([norm.double(), loss.double().to(norm.device)]).tolist()
    return norm_value, loss_value


def setup_precision(cfg: PrecisionConfig, model, device_type: str = "cpu") -> Precision:
    """Prepare the model for `cfg` (pure bf16 casts the weights) and return the step helper."""
    if cfg.name == "bf16_pure":
        model.to(torch.bfloat16)
    scaler = None
    if cfg.name == "fp16":
        scaler = torch.amp.GradScaler(device_type, init_scale=cfg.init_loss_scale,
                                      growth_interval=cfg.growth_interval)
    return Precision(cfg.name, device_type, scaler)


def base_dtype(cfg: Config) -> torch.dtype:
    """The dtype the base model loads in. Frozen weights of adapter methods take the compute
    dtype under bf16/fp16 (2 bytes each, and autocast keeps no second copy of them); what
    trains keeps fp32 master weights (`keep_trainable_fp32`). bf16_pure is bf16 throughout.
    A quantized base's other weights load in fp32, which peft's k-bit preparation wants."""
    spec = METHODS[cfg.method.name]
    if cfg.precision.name == "bf16_pure":
        return torch.bfloat16
    if spec.adapter and spec.quantized_bits is None and cfg.precision.name in AUTOCAST:
        return AUTOCAST[cfg.precision.name]
    return torch.float32


def keep_trainable_fp32(model, cfg: Config) -> None:
    """Master weights in fp32: an adapter made next to a bf16 base (or a trained copy of one of
    its modules) trains in fp32, and autocast runs its matmuls in the compute dtype."""
    if cfg.precision.name == "bf16_pure":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
