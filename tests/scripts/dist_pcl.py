"""PCL's epoch-start clustering in each of 2 processes (gloo): a few steps of mmcl.train.fit in mode
pcl; every call of Prototypes.fit writes what it clustered and what it stored afterwards.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/dist_pcl.py OUTPUT_DIR [overrides...]

OUTPUT_DIR/rank{r}_call{c}.safetensors: `features` (N, D), the features this rank clustered, and
every buffer of the prototypes after the call (centroids_i, concentration_i, assignments_i,
ready). OUTPUT_DIR/rank{r}_index.safetensors: the rows (`index`) of this rank's batches, in order.
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_helpers import tiny_overrides  # noqa: E402

from mmcl.methods import pcl  # noqa: E402
from mmcl.train import fit, load_config  # noqa: E402


def main():
    out, *extra = sys.argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    calls, seen = [], []
    fit_prototypes = pcl.Prototypes.fit

    def recording_fit(self, features, **kwargs):
        fit_prototypes(self, features, **kwargs)
        tensors = {"features": features.detach().cpu().contiguous()}
        tensors.update({name: buf.detach().cpu().contiguous() for name, buf in self.named_buffers()})
        save_file(tensors, os.path.join(out, f"rank{rank}_call{len(calls)}.safetensors"))
        calls.append(kwargs)

    def on_batch(step, batch):
        seen.append(batch["index"].clone())

    pcl.Prototypes.fit = recording_fit
    cfg = load_config(None, tiny_overrides("pcl", os.path.join(out, "run"), None) + extra)
    fit(cfg, on_batch=on_batch)
    save_file({"index": torch.cat(seen)}, os.path.join(out, f"rank{rank}_index.safetensors"))


if __name__ == "__main__":
    main()
