"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo), TRITON_INTERPRET=1.

Each rank holds its shard of a global batch as fp32 leaves and computes clip_loss(gather=True,
impl="triton"), with and without local_loss. Every rank then checks, against one float64
process that materialises the whole logits matrix, its loss and the gradients of its own rows
(which arrive through the gather from every rank's loss) and of its scale. Rank 0 writes the
errors to the JSON path in argv[1].
"""
import json
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from mmcl.kernels.similarity_lse import backward_mode
from mmcl.losses import clip_loss


def reference_rank_losses(images, texts, scale, bounds, local_loss):
    """Per-rank losses in float64 from the full (B, B) logits, as each rank would compute them."""
    logits = scale * images @ texts.T
    labels = torch.arange(images.shape[0])
    full = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    if not local_loss:
        return [full for _ in bounds[:-1]]
    losses = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = slice(lo, hi)
        losses.append(0.5 * (F.cross_entropy(logits[rows], labels[rows]) + F.cross_entropy(logits.T[rows], labels[rows])))
    return losses


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    global_img = F.normalize(torch.randn(2 * 37, 48, dtype=torch.float64), dim=-1)
    global_txt = F.normalize(torch.randn(2 * 37, 48, dtype=torch.float64), dim=-1)
    bounds = [0, 37, 74]
    lo, hi = bounds[rank], bounds[rank + 1]
    cases = []
    for local_loss in (True, False):
        img = global_img[lo:hi].float().requires_grad_()
        txt = global_txt[lo:hi].float().requires_grad_()
        scale = torch.tensor(1 / 0.07, requires_grad=True)
        loss = clip_loss(img, txt, scale, gather=True, local_loss=local_loss, impl="triton")
        g_img, g_txt, g_scale = torch.autograd.grad(loss, (img, txt, scale))

        ref_img, ref_txt = global_img.clone().requires_grad_(), global_txt.clone().requires_grad_()
        ref_scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
        losses = reference_rank_losses(ref_img, ref_txt, ref_scale, bounds, local_loss)
        # A rank's rows feed every rank's loss (through the gather): their gradient is the sum.
        r_img, r_txt = torch.autograd.grad(sum(losses), (ref_img, ref_txt), retain_graph=True)
        (r_scale,) = torch.autograd.grad(losses[rank], ref_scale)  # the scale is per rank
        cases.append({
            "local_loss": local_loss,
            "loss_err": abs(loss.item() - losses[rank].item()),
            "grad_err": max((g_img.double() - r_img[lo:hi]).abs().max().item(),
                            (g_txt.double() - r_txt[lo:hi]).abs().max().item()),
            "scale_grad_err": abs(g_scale.item() - r_scale.item()),
        })
    all_results = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(all_results, {"rank": rank, "cases": cases, "bwd_mode": backward_mode()})
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(all_results, f)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
