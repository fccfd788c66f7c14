"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Each rank enqueues its own keys (uneven batch sizes, rank-specific values) into a FeatureQueue
several times, wrapping around the ring; each rank writes its queue buffers to argv[1].rank<r>.
"""
import json
import sys

import torch
from accelerate import Accelerator

from mmcl.models import FeatureQueue

DIM, SIZE = 3, 7


def rank_keys(step: int, rank: int) -> torch.Tensor:
    rows = 3 if rank == 0 else 2  # uneven shards exercise the padded gather
    base = 1000 * step + 100 * rank
    return torch.arange(base, base + rows * DIM, dtype=torch.float32).reshape(rows, DIM)


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    queue = FeatureQueue(DIM, SIZE)
    for step in range(4):
        queue.enqueue(rank_keys(step, rank))
    state = {k: v.tolist() for k, v in queue.state_dict().items()}
    state["world_size"] = accelerator.num_processes
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(state, f)
    # Leaving with the process group alive lets gloo's threads abort the interpreter at exit.
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
