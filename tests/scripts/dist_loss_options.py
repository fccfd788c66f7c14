"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

The losses' options with gather=True: clip_loss and nt_xent (local_loss True and False) with the
hard-negative estimator (hard_negative_beta, debias_tau_plus) and with mixed targets (mix_partner
holding indices local to each rank's shard), on even and uneven shards, for each impl and dtype
named on the command line. Every case is compared with one float64 process computing the naive
loss on the whole batch (partners mapped to global rows): the loss (the rank's value with
local_loss=False, the mean over ranks with local_loss=True) and the DDP-averaged parameter
gradients, as errors relative to the reference's magnitude. Results go to the JSON path in argv[1].

    dist_loss_options.py OUT.json [--impls naive,chunked] [--dtypes float64,float32] [--batch 14]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from _dist_results import write_all_ranks
from accelerate import Accelerator

from mmcl.losses import clip_loss, nt_xent

LOSSES = ("clip_global", "clip_local", "nt_xent_global", "nt_xent_local")
OPTIONS = ("hard", "mix")


class TwoTowers(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.image = torch.nn.Linear(12, dim)
        self.text = torch.nn.Linear(10, dim)
        self.log_scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x, t):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(t), dim=-1), self.log_scale.exp()


def loss_of(name, option, model, x, t, partner, lam, dtype=torch.float64, **kw):
    a, b, scale = (y.to(dtype) for y in model(x, t))
    if option == "hard":
        kw.update(hard_negative_beta=1.0, debias_tau_plus=0.2)
    else:
        kw.update(mix_partner=partner, mix_lambda=lam.to(dtype))
    if name.startswith("clip"):
        return clip_loss(a, b, scale, local_loss=name.endswith("_local"), **kw)
    return nt_xent(a, b, 1.0 / scale, local_loss=name.endswith("_local"), **kw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--impls", default="naive,chunked")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--batch", type=int, default=14, help="global batch (uneven shards: 64%% + 36%%)")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    reference = TwoTowers(8).double()
    n = args.batch
    global_x, global_t = torch.randn(n, 12, dtype=torch.float64), torch.randn(n, 10, dtype=torch.float64)
    lam = torch.rand(n, dtype=torch.float64)
    cases = []
    for shards, bounds in {"even": [0, n // 2, n], "uneven": [0, (16 * n + 24) // 25, n]}.items():
        # Each rank mixes within its own shard: local partner indices; the reference sees them globally.
        local_partners = [torch.randint(0, bounds[r + 1] - bounds[r], (bounds[r + 1] - bounds[r],)) for r in range(world)]
        global_partner = torch.cat([p + bounds[r] for r, p in enumerate(local_partners)])
        rows = slice(bounds[rank], bounds[rank + 1])
        for name in LOSSES:
            for option in OPTIONS:
                single = copy.deepcopy(reference)
                ref_loss = loss_of(name, option, single, global_x, global_t, global_partner, lam, impl="naive")
                ref_loss.backward()
                ref_grads = [p.grad for p in single.parameters()]
                for impl in args.impls.split(","):
                    for dtype_name in args.dtypes.split(","):
                        model = accelerator.prepare(copy.deepcopy(reference))
                        loss = loss_of(name, option, model, global_x[rows], global_t[rows], local_partners[rank],
                                       lam[rows], getattr(torch, dtype_name), gather=True, impl=impl)
                        loss.backward()  # DDP averages the parameter gradients over the ranks
                        mean_loss = accelerator.reduce(loss.detach().double(), reduction="mean")
                        shown = mean_loss if name.endswith("_local") else loss
                        cases.append({
                            "loss": name, "option": option, "shards": shards, "impl": impl, "dtype": dtype_name,
                            "loss_err": abs(shown.item() - ref_loss.item()) / abs(ref_loss.item()),
                            "grad_err": max((p.grad - g).abs().max().item() / g.abs().max().item()
                                            for p, g in zip(model.parameters(), ref_grads)),
                        })
    write_all_ranks(accelerator, args.out, {"rank": rank, "world_size": world, "cases": cases})


if __name__ == "__main__":
    main()
