"""Split BatchNorm: one GPU behaving like several with per-GPU BatchNorm.

SplitBatchNorm2d normalises each of `num_splits` equal chunks of the batch with its own
statistics: one GPU then behaves like `num_splits` GPUs with per-GPU BatchNorm, which is what
MoCo's shuffled keys need to stop BatchNorm from leaking the positive (MoCo's demo does the same
with 8 splits on one GPU). `convert_split_batchnorm` swaps it into a built model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics come from `num_splits` equal batch chunks.

    Chunk s of a (B, C, H, W) batch (rows s*B/k .. (s+1)*B/k) is normalised with its own mean and
    biased variance; the running statistics move towards the average over chunks of each chunk's
    mean and unbiased variance. In eval mode it is exactly BatchNorm2d. Same parameters and
    buffers as BatchNorm2d, so checkpoints load into either class.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or not self.track_running_stats) or self.num_splits == 1:
            return super().forward(x)
        k, (b, c, h, w) = self.num_splits, x.shape
        if b % k:
            raise ValueError(f"SplitBatchNorm2d: batch size {b} is not divisible by num_splits={k}")
        # Chunks side by side as channels: one batch_norm call normalises each chunk separately.
        stacked = x.reshape(k, b // k, c, h, w).transpose(0, 1).reshape(b // k, k * c, h, w)
        mean = self.running_mean.repeat(k) if self.track_running_stats else None
        var = self.running_var.repeat(k) if self.track_running_stats else None
        weight = self.weight.repeat(k) if self.affine else None
        bias = self.bias.repeat(k) if self.affine else None
        momentum = self.momentum if self.momentum is not None else 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm2d does
                momentum = 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(stacked, mean, var, weight, bias, True, momentum, self.eps)
        if self.training and self.track_running_stats:
            self.running_mean.copy_(mean.view(k, c).mean(0))
            self.running_var.copy_(var.view(k, c).mean(0))
        return y.reshape(b // k, k, c, h, w).transpose(0, 1).reshape(b, c, h, w)


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every nn.BatchNorm2d in `module` (in place, recursively) by a SplitBatchNorm2d with
    the same parameters and running statistics; returns `module` (or the replacement if `module`
    itself is a BatchNorm2d). num_splits=1 leaves the module unchanged."""
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    if num_splits == 1:
        return module
    if type(module) is nn.BatchNorm2d:
        new = SplitBatchNorm2d(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                               affine=module.affine, track_running_stats=module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new.to(next(module.parameters(), torch.empty(0)).device)
    for name, child in module.named_children():
        setattr(module, name, convert_split_batchnorm(child, num_splits))
    return module
