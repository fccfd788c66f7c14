"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

MoCo's shuffling BN across ranks: every rank shuffles its key batch with mmcl.distributed's
shuffle_batch (each rank seeds its own generator differently, so only rank 0's broadcast
permutation can make them agree), runs a small BatchNorm key encoder in train mode on the
shuffled rows and unshuffles. Also checks that model.sync_bn reaches MoCo's key encoder.
Each rank writes a JSON file argv[1].rank<r>.
"""
import json
import sys

import torch
from accelerate import Accelerator

from mmcl import distributed

B, D = 5, 3  # 5 rows per rank: an odd size, so the permutation really mixes ranks


def rank_batch(rank: int) -> torch.Tensor:
    """Rows whose values say which rank and row they came from."""
    return (100 * rank + torch.arange(B * D, dtype=torch.float64).reshape(B, D)) / 10


def key_encoder() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on both ranks
    return torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).double()


def sync_bn_conversion() -> dict:
    """build_model with model.sync_bn=true: both the trained model and MoCo's key encoder hold SyncBatchNorm."""
    from mmcl.train import load_config
    from mmcl.train.builders import build_model
    from mmcl.train.objectives import build_objective

    cfg = load_config(None, [
        "mode=moco", "model.image_tower_config={model_type: resnet, num_channels: 3, embedding_size: 8, "
        "hidden_sizes: [8, 16], depths: [1, 1], layer_type: basic}", "model.image_size=16",
        "model.projection_dim=8", "model.sync_bn=true", "data.augment=mocov2", "loss.queue_size=16"])
    model = build_model(cfg)
    objective = build_objective("moco", cfg.loss, model, 10)

    def count(module, cls):
        return sum(type(m) is cls for m in module.modules())

    return {name: {"sync": count(m, torch.nn.SyncBatchNorm), "plain": count(m, torch.nn.BatchNorm2d)}
            for name, m in (("model", model), ("key_encoder", objective.key_encoder))}


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    x = rank_batch(rank)
    generator = torch.Generator().manual_seed(1000 + rank)  # rank-specific on purpose
    shuffled, unshuffle_index = distributed.shuffle_batch(x, generator=generator)
    restored = distributed.unshuffle_batch(shuffled, unshuffle_index)

    encoder = key_encoder().train()
    keys = distributed.unshuffle_batch(encoder(shuffled), unshuffle_index)
    unshuffled_keys = encoder(x)  # without the shuffle: BatchNorm over this rank's own rows

    result = {
        "rank": rank, "world_size": accelerator.num_processes,
        "shuffled": shuffled.tolist(), "unshuffle_index": unshuffle_index.tolist(),
        "restored": restored.tolist(), "keys": keys.detach().tolist(),
        "keys_without_shuffle": unshuffled_keys.detach().tolist(),
        "sync_bn": sync_bn_conversion(),
    }
    try:
        distributed.shuffle_batch(torch.zeros(B + rank, D, dtype=torch.float64))
        result["uneven_error"] = None
    except ValueError as exc:
        result["uneven_error"] = str(exc)
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(result, f)
    # Leaving with the process group alive lets gloo's threads abort the interpreter at exit.
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
