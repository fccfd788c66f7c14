"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Each rank encodes its shard of a global batch with a DDP-wrapped two-tower model whose logit
scale and bias are parameters, and computes siglip_loss(gather=True) on even and uneven shards,
for each impl named on the command line (float64 and float32; Triton, interpreted, in float32
only). Every case is compared with one float64 process computing the naive loss on the whole
batch: the loss and the DDP-averaged gradients of the towers, the scale and the bias, as errors
relative to the reference's magnitude. They go to the JSON path in argv[1].

    dist_siglip.py OUT.json [--impls naive,chunked,triton] [--batch 14] [--dim 8]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from _dist_results import relative_error, write_all_ranks
from accelerate import Accelerator

from mmcl.losses import siglip_loss


class SigmoidTowers(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.image = torch.nn.Linear(12, dim)
        self.text = torch.nn.Linear(10, dim)
        self.log_scale = torch.nn.Parameter(torch.tensor(1.5))
        self.bias = torch.nn.Parameter(torch.tensor(-3.0))

    def forward(self, x, t):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(t), dim=-1), self.log_scale.exp(), self.bias


def loss_of(model, x, t, dtype=torch.float64, **kw):
    """siglip_loss of the model's features of rows x, t, cast to `dtype` (only the loss rounds)."""
    a, b, scale, bias = (y.to(dtype) for y in model(x, t))
    return siglip_loss(a, b, scale, bias, **kw)



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--impls", default="naive,chunked,triton")
    parser.add_argument("--batch", type=int, default=14, help="global batch (uneven shards: 64%% + 36%%)")
    parser.add_argument("--dim", type=int, default=8)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    reference = SigmoidTowers(args.dim).double()
    n = args.batch
    global_x, global_t = torch.randn(n, 12, dtype=torch.float64), torch.randn(n, 10, dtype=torch.float64)
    single = copy.deepcopy(reference)
    ref_loss = loss_of(single, global_x, global_t, impl="naive")
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in single.named_parameters()}
    shard_bounds = {"even": [0, n // 2, n], "uneven": [0, (16 * n + 24) // 25, n]}
    cases = []
    for shards, bounds in shard_bounds.items():
        rows = slice(bounds[rank], bounds[rank + 1])
        for impl in args.impls.split(","):
            for dtype_name in ("float64", "float32"):
                if impl == "triton" and dtype_name == "float64":
                    continue  # the kernels compute in fp32
                model = accelerator.prepare(copy.deepcopy(reference))
                loss = loss_of(model, global_x[rows], global_t[rows], getattr(torch, dtype_name), gather=True,
                               impl=impl)
                loss.backward()  # DDP averages the parameter gradients over the ranks
                grads = {name.removeprefix("module."): p.grad for name, p in model.named_parameters()}
                tower = [relative_error(grads[k], ref_grads[k]) for k in ref_grads if k.startswith(("image", "text"))]
                cases.append({
                    "shards": shards, "impl": impl, "dtype": dtype_name, "rows": bounds[rank + 1] - bounds[rank],
                    "loss_err": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                    "grad_err": max(tower),
                    "scale_grad_err": relative_error(grads["log_scale"], ref_grads["log_scale"]),
                    "bias_grad_err": relative_error(grads["bias"], ref_grads["bias"]),
                })
    write_all_ranks(accelerator, args.out, {"rank": rank, "world_size": world, "cases": cases})


if __name__ == "__main__":
    main()
