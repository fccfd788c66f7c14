"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Each rank encodes its shard of a global batch with a DDP-wrapped model and computes a loss with
gather=True: clip_loss (local_loss True and False), nt_xent and supcon_loss (with and without
labels), on even and uneven shards, for each impl and dtype named on the command line. Every
case is compared with one float64 process computing the naive loss on the whole batch: the
loss (the rank's value with local_loss=False, the mean over ranks with local_loss=True) and the
DDP-averaged parameter gradients, as errors relative to the reference's magnitude (the loss's,
each parameter's largest gradient entry). They go to the JSON path in argv[1].

    dist_losses.py OUT.json [--impls naive,chunked] [--dtypes float64,float32] [--batch 14] [--dim 8]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from _dist_results import write_all_ranks
from accelerate import Accelerator

from mmcl import distributed
from mmcl.losses import clip_loss, nt_xent, supcon_loss



class TwoTowers(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.image = torch.nn.Linear(12, dim)
        self.text = torch.nn.Linear(10, dim)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(t), dim=-1), self.log_scale.exp()


def loss_of(name, model, x, t, labels, dtype=torch.float64, **kw):
    """The loss `name` of the model's features of rows x, t (B, ...) and labels (B,), computed in
    `dtype` (the float64 model's features and scale cast to it, so only the loss rounds)."""
    a, b, scale = (y.to(dtype) for y in model(x, t))
    if name.startswith("clip"):
        return clip_loss(a, b, scale, local_loss=name == "clip_local", **kw)
    if name.startswith("nt_xent"):
        return nt_xent(a, b, 1.0 / scale, local_loss=name == "nt_xent_local", **kw)
    return supcon_loss(torch.stack([a, b], 1), labels if name == "supcon" else None, 1.0 / scale, **kw)


def reduction_errors(rank: int) -> dict:
    """The differentiable collectives against their one-process definitions, on uneven rows and
    with -inf entries (a column that none of a rank's rows sees, one that no rank sees)."""
    torch.manual_seed(1)
    parts = torch.randn(2, 5, dtype=torch.float64)
    parts[0, 1] = parts[1, 1] = parts[1, 3] = float("-inf")
    weights = torch.randn(2, 5, dtype=torch.float64)  # rank r's loss: weights[r] · lse
    mine = parts[rank].clone().requires_grad_()
    lse = distributed.all_reduce_logsumexp(mine)
    (grad,) = torch.autograd.grad((lse.masked_fill(torch.isinf(lse), 0.0) * weights[rank]).sum(), mine)
    ref_parts = parts.clone().requires_grad_()
    ref = ref_parts.logsumexp(0)
    (ref_grad,) = torch.autograd.grad(sum((ref.masked_fill(torch.isinf(ref), 0.0) * w).sum() for w in weights), ref_parts)
    finite = torch.isfinite(ref)
    rows = torch.randn(7, 3, dtype=torch.float64)  # gather 4 + 3 rows, then sum the ranks' totals
    bounds = [0, 4, 7]
    local = rows[bounds[rank]:bounds[rank + 1]].clone().requires_grad_()
    gathered, offset = distributed.gather_with_grad(local)
    total = distributed.all_reduce_sum_with_grad((gathered * weights[rank, :3]).sum() * (rank + 1))
    (g_local,) = torch.autograd.grad(total * (rank + 2), local)
    # d/d rows of Σ_r (r + 2) · Σ_r' (r' + 1) · rows · w_r' = 5 · Σ_r' (r' + 1) w_r'
    expected = 5 * (weights[0, :3] + 2 * weights[1, :3]).expand(7, 3)[bounds[rank]:bounds[rank + 1]]
    return {
        "lse_err": (lse[finite] - ref[finite]).abs().max().item(),
        "lse_inf_agrees": bool(torch.equal(torch.isinf(lse), ~finite)),
        "lse_grad_err": (grad - ref_grad[rank]).abs().max().item(),
        "lse_grad_finite": bool(torch.isfinite(grad).all()),
        "gather_err": (gathered - rows).abs().max().item() + abs(offset - bounds[rank]),
        "gather_grad_err": (g_local - expected).abs().max().item(),
    }


LOSSES = ("clip_local", "clip_global", "nt_xent_global", "nt_xent_local", "supcon", "supcon_no_labels")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--impls", default="naive,chunked")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--batch", type=int, default=14, help="global batch (uneven shards: 64%% + 36%%)")
    parser.add_argument("--dim", type=int, default=8)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    reference = TwoTowers(args.dim).double()
    n = args.batch
    global_x, global_t = torch.randn(n, 12, dtype=torch.float64), torch.randn(n, 10, dtype=torch.float64)
    labels = torch.randint(0, 5, (n,))  # classes repeat across the shard boundary
    shard_bounds = {"even": [0, n // 2, n], "uneven": [0, (16 * n + 24) // 25, n]}
    cases = []
    for name in LOSSES:
        single = copy.deepcopy(reference)
        ref_loss = loss_of(name, single, global_x, global_t, labels, impl="naive")
        ref_loss.backward()
        ref_grads = [p.grad for p in single.parameters()]
        for shards, bounds in shard_bounds.items():
            rows = slice(bounds[rank], bounds[rank + 1])
            for impl in args.impls.split(","):
                for dtype_name in args.dtypes.split(","):
                    dtype = getattr(torch, dtype_name)
                    model = accelerator.prepare(copy.deepcopy(reference))
                    loss = loss_of(name, model, global_x[rows], global_t[rows], labels[rows], dtype,
                                   gather=True, impl=impl)
                    loss.backward()  # DDP averages the parameter gradients over the ranks
                    mean_loss = accelerator.reduce(loss.detach().double(), reduction="mean")
                    shown = mean_loss if name.endswith("_local") else loss
                    cases.append({
                        "loss": name, "shards": shards, "impl": impl, "dtype": dtype_name,
                        "rows": bounds[rank + 1] - bounds[rank],
                        "loss_err": abs(shown.item() - ref_loss.item()) / abs(ref_loss.item()),
                        "grad_err": max((p.grad - g).abs().max().item() / g.abs().max().item()
                                        for p, g in zip(model.parameters(), ref_grads)),
                    })
    print("cases done", rank, flush=True)
    write_all_ranks(accelerator, args.out, {"rank": rank, "world_size": world, "cases": cases, "reductions": reduction_errors(rank)})


if __name__ == "__main__":
    main()
