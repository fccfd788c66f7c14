"""MoCo's two extra pieces: a momentum (EMA) copy of the encoder, and a FIFO queue of keys.

Both hold no trainable state: the key encoder's parameters have requires_grad=False and are
updated under no_grad; the queue lives in registered buffers, so both travel with .to(device)
and land in state_dict() / checkpoints.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from mmcl import distributed


def _unwrap(module: nn.Module) -> nn.Module:
    # Accelerate/DDP wrap the query encoder; the EMA follows the bare module.
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


class MomentumEncoder(nn.Module):
    """EMA copy of `module`: after each step p_k ← m·p_k + (1 − m)·p_q.

    With `final_momentum` and `total_steps`, m follows BYOL's cosine ramp from `momentum` at
    step 0 to `final_momentum` at `total_steps`: m(t) = final − (final − m0)·(cos(π t / T) + 1) / 2.
    Buffers (e.g. batch-norm statistics) are the key encoder's own, as in MoCo. The copy keeps
    the train/eval mode `module` had; MoCo computes keys in train mode (batch statistics), so call
    `.train()` on it as `mmcl.train` does — a key encoder left in eval mode normalises with frozen
    statistics and its keys stop matching the queries.
    """

    def __init__(self, module: nn.Module, momentum: float = 0.999, final_momentum: float | None = None,
                 total_steps: int | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        for name, m in (("momentum", momentum), ("final_momentum", final_momentum)):
            if m is not None and not 0.0 <= float(m) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {m}")
        if final_momentum is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"final_momentum needs total_steps, a positive int; got {total_steps!r}")
        self.module = copy.deepcopy(_unwrap(module))
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.momentum = float(momentum)
        self.final_momentum = None if final_momentum is None else float(final_momentum)
        self.total_steps = total_steps

    def momentum_at(self, step: int | None) -> float:
        """The momentum m used at `step` (constant without a ramp)."""
        if self.final_momentum is None or step is None:
            return self.momentum
        t = min(max(int(step), 0), self.total_steps) / self.total_steps
        return self.final_momentum - (self.final_momentum - self.momentum) * (math.cos(math.pi * t) + 1) / 2

    @torch.no_grad()
    def update(self, module: nn.Module, step: int | None = None) -> float:
        """Move the EMA towards `module`'s parameters; returns the momentum used."""
        module = _unwrap(module)
        ours, theirs = list(self.module.parameters()), list(module.parameters())
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs)):
            raise ValueError("module does not have the parameters of the encoder this MomentumEncoder copies")
        m = self.momentum_at(step)
        torch._foreach_mul_(ours, m)
        torch._foreach_add_(ours, [p.detach().to(q.dtype) for p, q in zip(theirs, ours)], alpha=1.0 - m)
        return m

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class FeatureQueue(nn.Module):
    """FIFO ring buffer of `size` keys of width `dim` (MoCo's negatives).

    Buffers: `features` (size, dim), `ptr` (next row to write), `filled` (rows written so far,
    capped at size). enqueue gathers the keys of all ranks (rank order) so every rank's queue
    is identical.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        for name, v in (("dim", dim), ("size", size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.dim, self.size = dim, size
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """keys (B, dim) of this rank; all ranks' keys are written, oldest rows overwritten."""
        if not isinstance(keys, torch.Tensor) or not keys.is_floating_point():
            raise TypeError(f"keys must be a float tensor, got {type(keys).__name__}")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (B, {self.dim}), got shape {tuple(keys.shape)}")
        keys = distributed.gather_no_grad(keys.detach()).to(self.features.dtype)
        n = keys.shape[0]
        start = int(self.ptr)
        if n > self.size:  # only the newest `size` keys survive a write longer than the queue
            start = (start + n - self.size) % self.size
            keys = keys[-self.size:]
        rows = (start + torch.arange(keys.shape[0], device=self.features.device)) % self.size
        self.features[rows] = keys.to(self.features.device)
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    def valid_features(self) -> torch.Tensor:
        """The rows written so far: (min(filled, size), dim)."""
        return self.features[: int(self.filled)]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, filled={int(self.filled)}"
