"""Small helpers for torch.distributed runs (as Accelerate starts them).

Contrastive losses need every rank's features as negatives. `gather_with_grad` concatenates
the features of all ranks and lets gradients flow back to the rank that owns each row, so a
loss computed on the gathered features trains every rank's encoder.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _all_sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate rows from all ranks; backward returns each rank the gradient of its rows.

    The loss on every rank depends on every rank's rows, so the gradient of a rank's rows is
    the sum over ranks of the gradients computed there: an all-reduce, then our own slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]):
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        biggest = max(sizes)
        padded = x
        if x.shape[0] < biggest:  # all_gather needs equal shapes: pad, then cut the padding off
            padded = torch.cat([x, x.new_zeros(biggest - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Gather `x` (B_r, D) from all ranks → ((sum_r B_r, D), offset of this rank's rows).

    Differentiable; ranks may hold different numbers of rows. Outside a distributed run it
    returns `x` itself and offset 0.
    """
    if not is_distributed():
        return x, 0
    sizes = _all_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes), sum(sizes[: dist.get_rank()])


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather `x` (B_r, ...) from all ranks without gradient (e.g. MoCo keys for the queue)."""
    if not is_distributed():
        return x
    sizes = _all_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes)
