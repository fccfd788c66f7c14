"""SimCLR (Chen et al. 2020): NT-Xent over two augmented views of every image."""
from __future__ import annotations

import torch

from mmcl.losses import nt_xent
from mmcl.methods.base import Objective


class SimCLRObjective(Objective):
    """NT-Xent over the two views of every rank's batch (2N-2 negatives from all ranks), at the
    fixed temperature `loss.temperature`."""

    name = "simclr"
    batch_keys = ("view1", "view2")
    needs_views = True

    def embed(self, model, batch: dict) -> dict:
        n = batch["view1"].shape[0]
        # One forward over both views: BatchNorm sees 2N images, as in SimCLR's reference code.
        z = model(pixel_values=torch.cat([batch["view1"], batch["view2"]])).image_embeds
        return {"z1": z[:n], "z2": z[n:]}

    def loss(self, emb: dict, keys: dict, scale):
        T = self.loss_cfg.temperature
        return nt_xent(emb["z1"], emb["z2"], T, gather=True, impl=self.loss_cfg.impl), {"temperature": T}
