"""One BYOL step in each of 2 processes (gloo): the predictor's gradients, which DDP does not see,
must be the mean over the ranks of each rank's own gradient, and equal on every rank.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/dist_byol.py OUTPUT_JSON
"""
import json
import os
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_helpers import tiny_overrides  # noqa: E402

from mmcl import distributed  # noqa: E402
from mmcl.methods import build_objective  # noqa: E402
from mmcl.methods.byol import byol_loss, byol_predictor  # noqa: E402
from mmcl.train import load_config  # noqa: E402
from mmcl.train.builders import build_model  # noqa: E402
from mmcl.train.gradcache import plain_step  # noqa: E402


def main():
    out = sys.argv[1]
    acc = Accelerator(cpu=True)
    cfg = load_config(None, tiny_overrides("byol", os.path.dirname(out), None))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    objective = build_objective(cfg, model)
    rank = acc.process_index
    g = torch.Generator().manual_seed(100 + rank)
    batch = {"view1": torch.randn(6, 3, 16, 16, generator=g), "view2": torch.randn(6, 3, 16, 16, generator=g)}

    # This rank's own predictor gradient, from a hook-free copy on the same embeddings.
    local = byol_predictor(16, cfg.byol.predictor_hidden)
    local.load_state_dict(objective.predictor.state_dict())
    with torch.no_grad():
        emb = objective.embed(model, batch)
    keys = objective.key_embeds(batch)
    z = torch.cat([emb["z1"], emb["z2"]])
    pred = local(z)
    byol_loss(pred[:6], pred[6:], keys["t1"], keys["t2"]).backward()
    own = torch.cat([p.grad.flatten() for p in local.parameters()])
    mean = distributed.gather_no_grad(own[None]).mean(0)

    ddp = acc.prepare(model)
    plain_step(ddp, objective, [batch], acc.backward, lambda: acc.no_sync(ddp))
    hooked = torch.cat([p.grad.flatten() for p in objective.predictor.parameters()])
    every = distributed.gather_no_grad(hooked[None])
    result = {"max_err_vs_mean": float((hooked - mean).abs().max()), "mean_norm": float(mean.norm()),
              "ranks_differ": float((every[0] - every[1]).abs().max()), "own_vs_mean": float((own - mean).abs().max())}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
