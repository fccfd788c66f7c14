"""The learnable CLIP-style logit multiplier."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class LogitScale(nn.Module):
    """Learnable logit multiplier `exp(log_scale)`, CLIP-style.

    Starts at 1 / init_temperature (1 / 0.07 ≈ 14.3) and is clamped at `max_scale` (100, as
    CLIP does) in the forward pass. Log-parameterised so that it stays positive.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        if not max_scale > 0:
            raise ValueError(f"max_scale must be > 0, got {max_scale}")
        self.max_scale = float(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    @property
    def temperature(self) -> float:
        return 1.0 / float(self.forward().detach())

    def extra_repr(self) -> str:
        return f"scale={float(self.forward().detach()):.4f}, max_scale={self.max_scale}"
