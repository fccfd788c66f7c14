"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Each rank encodes half of a global batch with a DDP-wrapped encoder and computes clip_loss with
gather=True; rank 0 compares the loss and the DDP-averaged parameter gradients with one process
computing the same loss on the whole batch, and writes what it found to the JSON path in argv[1].
"""
import copy
import json
import sys

import torch
from accelerate import Accelerator

from mmcl.losses import clip_loss


class TwoTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(12, 8)
        self.text = torch.nn.Linear(10, 8)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t):
        normalize = torch.nn.functional.normalize
        return normalize(self.image(x), dim=-1), normalize(self.text(t), dim=-1), self.log_scale.exp()


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    reference = TwoTowers().double()
    global_x, global_t = torch.randn(2 * 7, 12, dtype=torch.float64), torch.randn(2 * 7, 10, dtype=torch.float64)
    results = {"world_size": world, "cases": []}
    # Uneven shards (8 + 6 rows) exercise the padded gather. They only make sense for the whole-matrix
    # loss: with local_loss each rank averages its own rows, so unequal shards weigh rows unequally.
    for bounds, local_loss in (([0, 7, 14], False), ([0, 7, 14], True), ([0, 8, 14], False)):
        local_x, local_t = global_x[bounds[rank] : bounds[rank + 1]], global_t[bounds[rank] : bounds[rank + 1]]
        for impl in ("naive", "chunked"):
            model = accelerator.prepare(copy.deepcopy(reference))
            img, txt, scale = model(local_x, local_t)
            loss = clip_loss(img, txt, scale, gather=True, local_loss=local_loss, impl=impl)
            loss.backward()  # DDP averages parameter gradients over the ranks
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
            grads = [p.grad for p in model.parameters()]

            single = copy.deepcopy(reference)
            ref_loss = clip_loss(*single(global_x, global_t), impl="naive")
            ref_loss.backward()
            grad_err = max((g - p.grad).abs().max().item() for g, p in zip(grads, single.parameters()))
            results["cases"].append({
                "local_loss": local_loss, "impl": impl, "rows": bounds[rank + 1] - bounds[rank],
                "loss_err": abs(mean_loss.item() - ref_loss.item()),
                "rank_loss_err": abs(loss.item() - ref_loss.item()),
                "grad_err": grad_err,
            })
    print("cases done", rank, flush=True)
    all_results = [None] * world
    torch.distributed.all_gather_object(all_results, results)
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(all_results, f)
    # Leaving with the process group alive lets gloo's threads abort the interpreter at exit.
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    print("end", rank, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
