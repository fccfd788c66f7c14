"""Optimizers and the learning-rate schedule.

Weight decay never touches norms, biases or the temperature: decaying a LayerNorm gain or the
log logit-scale towards zero is a change of the model, not a regulariser (CLIP and SimCLR both
exclude them). The rule "ndim < 2 or a name that says so" covers norms and biases of every tower.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "lars", "sgd")
SCHEDULES = ("cosine", "constant")
_NO_DECAY_WORDS = ("bias", "norm", "logit_scale", "log_scale", "temperature", "position_embedding", "cls_token")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class OptimConfig:
    """The `optim:` section: optimizer, learning-rate schedule and gradient clipping."""

    name: str = "adamw"  # one of OPTIMIZERS
    lr: float = 5e-4
    weight_decay: float = 0.1  # never applied to norms, biases, the temperature (or 1-D params)
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    momentum: float = 0.9  # lars / sgd
    trust_coefficient: float = 0.001  # lars
    schedule: str = "cosine"  # one of SCHEDULES
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    max_grad_norm: float | None = 3.0  # None or 0: no clipping

    def validate(self) -> None:
        _check(self.name in OPTIMIZERS, f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        _check(self.schedule in SCHEDULES,
               f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(len(self.betas) == 2, f"optim.betas must hold two floats, got {self.betas!r}")
        _check(self.max_grad_norm is None or self.max_grad_norm >= 0,
               f"optim.max_grad_norm must be >= 0 or null, got {self.max_grad_norm}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into [with decay, without decay] groups (empty groups dropped)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if p.ndim < 2 or any(w in lowered for w in _NO_DECAY_WORDS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (are both towers locked?)")
    return groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as SimCLR trains.

    For each parameter with weight decay: g ← g + wd·w, then g ← g · η‖w‖/‖g‖ (when both norms are
    > 0), then heavy-ball momentum. Groups with weight_decay 0 (norms, biases) skip the trust
    ratio, as SimCLR's reference optimizer excludes them from adaptation.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, mom = group["weight_decay"], group["trust_coefficient"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd > 0:
                    g = g.add(p, alpha=wd)
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(mom).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """An optimizer from an OptimConfig over the model's trainable parameters."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {cfg.name!r}")


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup from 1/warmup,
    then cosine from 1 down to `min_ratio` at `total_steps` (or constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    """LambdaLR stepping once per optimizer step (its state_dict is plain numbers: JSON-safe)."""
    fn = functools.partial(lr_factor, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                           schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
