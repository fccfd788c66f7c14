"""Small helpers for torch.distributed runs (as Accelerate starts them).

Contrastive losses need every rank's features as negatives. `gather_with_grad` concatenates
the features of all ranks and reduce-scatters their gradients back to the rank that owns each
row, so a loss computed on the gathered features trains every rank's encoder. The gathered
losses (mmcl.losses, gather=True) merge per-rank column logsumexps with `all_reduce_logsumexp`
and sum per-rank loss shares with `all_reduce_sum_with_grad`, both differentiable.
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
    the sum over ranks of the gradients computed there: a reduce-scatter, each rank receiving
    only the sum for its own rows (half the traffic of all-reducing the whole gradient).
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
        sizes, biggest = ctx.sizes, max(ctx.sizes)
        # Lay the gradient out as equal (biggest, ...) slots, one per rank, the padding zero.
        slots = grad.new_zeros(len(sizes) * biggest, *grad.shape[1:])
        start = 0
        for r, n in enumerate(sizes):
            slots[r * biggest : r * biggest + n] = grad[start : start + n]
            start += n
        mine = grad.new_empty(biggest, *grad.shape[1:])
        dist.reduce_scatter_tensor(mine, slots, op=dist.ReduceOp.SUM)
        return mine[: sizes[ctx.rank]], None


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


# --------------------------------------------------------------------------- reductions with gradients


class _AllReduceLogSumExp(torch.autograd.Function):
    """log Σ_ranks exp(x_r), elementwise; backward: the summed gradient times each rank's share."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        top = x.detach().clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        top = top.masked_fill(torch.isinf(top), 0.0)  # all -inf (nothing to sum) or +inf: no shift
        sums = torch.exp(x.detach() - top)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        total = sums.log_().add_(top)
        ctx.save_for_backward(x, total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, total = ctx.saved_tensors
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss may use every element
        share = torch.exp(x - total).nan_to_num_(0.0)  # -inf - -inf: an element no rank saw
        return grad * share


def all_reduce_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Elementwise log Σ_r exp(x_r) over the ranks' tensors x_r (same shape on every rank),
    differentiable: merges per-rank partial logsumexps, e.g. (N,) column statistics computed
    over each rank's rows. Every rank gets the whole result. Outside a distributed run: `x`."""
    if not is_distributed():
        return x
    return _AllReduceLogSumExp.apply(x)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor):
        total = x.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # each rank's sum depends on every rank's x
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Σ_r x_r over the ranks (same shape everywhere), differentiable: the gradient of rank r's
    x is the sum of every rank's gradient of the total. Outside a distributed run: `x`."""
    if not is_distributed():
        return x
    return _AllReduceSum.apply(x)


@torch.no_grad()
def shuffle_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's batch shuffle across ranks (its guard against BatchNorm leaking the positive key).

    All ranks' (B, ...) batches are gathered into (W*B, ...); one random permutation `perm` of
    W*B rows is drawn on rank 0 and broadcast; rank r keeps rows perm[r*B:(r+1)*B]. Every rank
    must hold the same B. Outside a distributed run it shuffles the local batch (W = 1), which
    matters with split BatchNorm (mmcl.models.batchnorm.SplitBatchNorm2d).

    Returns:
        (shuffled (B, ...), unshuffle index (W*B,) long: argsort(perm), for `unshuffle_batch`).
    """
    n = x.shape[0]
    all_x = gather_no_grad(x)
    if all_x.shape[0] != n * world_size():
        raise ValueError(f"shuffle_batch needs the same batch size on every rank; this rank has {n}, "
                         f"all ranks together {all_x.shape[0]}")
    device = generator.device if generator is not None else x.device
    perm = torch.randperm(all_x.shape[0], generator=generator, device=device).to(x.device)
    if is_distributed():
        dist.broadcast(perm, src=0)  # one permutation for all ranks: each row lands on exactly one rank
    r = rank()
    return all_x[perm[r * n:(r + 1) * n]], torch.argsort(perm)


@torch.no_grad()
def unshuffle_batch(y: torch.Tensor, unshuffle_index: torch.Tensor) -> torch.Tensor:
    """Undo `shuffle_batch`: gather every rank's (B, ...) outputs of the shuffled rows, put them
    back in the original order with `unshuffle_index` (W*B,), return this rank's (B, ...) rows,
    i.e. the outputs of this rank's own original rows."""
    n = y.shape[0]
    all_y = gather_no_grad(y)
    if all_y.shape[0] != unshuffle_index.shape[0]:
        raise ValueError(f"unshuffle_batch: got {all_y.shape[0]} rows from all ranks, but the index "
                         f"from shuffle_batch covers {unshuffle_index.shape[0]}")
    r = rank()
    return all_y[unshuffle_index[r * n:(r + 1) * n]]


# --------------------------------------------------------------------------- rank reductions of small ints


def _reduce_ints(values: list[int], device, op) -> list[int]:
    t = torch.tensor(values, device=device, dtype=torch.long)
    dist.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


def all_min(value: int, device=None) -> int:
    """The smallest `value` over all ranks (one process: `value`)."""
    return _reduce_ints([value], device, dist.ReduceOp.MIN)[0] if is_distributed() else int(value)


def all_sum(value: int, device=None) -> int:
    """The sum of `value` over all ranks (one process: `value`)."""
    return _reduce_ints([value], device, dist.ReduceOp.SUM)[0] if is_distributed() else int(value)


def same_on_all_ranks(value: int, device=None) -> bool:
    """Whether every rank holds the same `value` (one all-reduce of (value, -value) with MIN)."""
    if not is_distributed():
        return True
    low, neg_high = _reduce_ints([value, -value], device, dist.ReduceOp.MIN)
    return low == -neg_high


def any_rank(flag: bool, device=None) -> bool:
    """Whether `flag` is true on any rank (a collective: every rank must call it; one process: `flag`)."""
    return bool(_reduce_ints([int(flag)], device, dist.ReduceOp.MAX)[0]) if is_distributed() else bool(flag)


def broadcast_flag(flag: bool, device=None) -> bool:
    """Rank 0's `flag` on every rank (one process: `flag`)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


@torch.no_grad()
def parameters_agree(module: torch.nn.Module, device=None) -> bool:
    """Whether every rank holds the same parameters: compares a float64 checksum (sum and sum of
    squares of all parameters) across ranks; raises RuntimeError if they differ."""
    if not is_distributed():
        return True
    sums = torch.stack([sum(p.double().sum() for p in module.parameters()),
                        sum(p.double().square().sum() for p in module.parameters())]).to(device)
    gathered = gather_no_grad(sums[None]).cpu()
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"the {world_size()} processes ended with different weights: {gathered.tolist()}")
    return True
