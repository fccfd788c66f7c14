"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

MoCo's shuffling BN across ranks: every rank shuffles its key batch with mmcl.distributed's
shuffle_batch (each rank seeds its own generator differently, so only rank 0's broadcast
permutation can make them agree), runs a small BatchNorm key encoder in train mode on the
shuffled rows and unshuffles. Also checks that model.batchnorm.sync reaches MoCo's key encoder.
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
    """build_model with model.batchnorm.sync=true: both the trained model and MoCo's key encoder hold SyncBatchNorm."""
    from mmcl.train import load_config
    from mmcl.train.builders import build_model
    from mmcl.methods import build_objective

    cfg = load_config(None, [
        "mode=moco", "model.image_tower_config={model_type: resnet, num_channels: 3, embedding_size: 8, "
        "hidden_sizes: [8, 16], depths: [1, 1], layer_type: basic}", "data.image_size=16",
        "model.projection_dim=8", "model.batchnorm.sync=true", "data.augment=mocov2", "moco.queue_size=16"])
    model = build_model(cfg)
    objective = build_objective(cfg, model)

    def count(module, cls):
        return sum(type(m) is cls for m in module.modules())

    return {name: {"sync": count(m, torch.nn.SyncBatchNorm), "plain": count(m, torch.nn.BatchNorm2d)}
            for name, m in (("model", model), ("key_encoder", objective.key_encoder))}


def moco_uneven_batches(rank: int) -> dict:
    """MoCoObjective.key_embeds with shuffle_bn: equal batches are shuffled across ranks (keys differ
    from the unshuffled encoder's), unequal ones (one rank dropped an image) skip the shuffle on
    every rank (keys equal the unshuffled encoder's)."""
    from mmcl.methods import build_objective
    from mmcl.train import load_config
    from mmcl.train.builders import build_model

    cfg = load_config(None, [
        "mode=moco", "model.image_tower_config={model_type: resnet, num_channels: 3, embedding_size: 8, "
        "hidden_sizes: [8, 16], depths: [1, 1], layer_type: basic}", "data.image_size=16",
        "model.projection_dim=8", "data.augment=mocov2", "moco.queue_size=16"])
    torch.manual_seed(0)
    objective = build_objective(cfg, build_model(cfg))
    out = {}
    for name, n in (("even", 6), ("uneven", 6 + rank)):
        x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(10 * rank + n))
        keys = objective.key_embeds({"view2": x})["k"]
        plain = objective.key_encoder(pixel_values=x).image_embeds.float()
        out[name] = bool(torch.allclose(keys, plain, rtol=1e-5, atol=1e-6))
    return out


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
        "moco_unshuffled": moco_uneven_batches(rank),
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
