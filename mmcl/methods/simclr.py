"""SimCLR (Chen et al. 2020): NT-Xent over two augmented views of every image."""
from __future__ import annotations

import torch

from mmcl.losses import nt_xent
from mmcl.methods.base import Objective, mix_keys, mix_targets


class SimCLRObjective(Objective):
    """NT-Xent over the two views of every rank's batch (2N-2 negatives from all ranks), at the
    fixed temperature `loss.temperature`; with loss.hard_negative_beta / loss.debias_tau_plus HCL's
    reweighted / DCL's debiased negatives; with data.cutmix > 0 i-Mix's mixed targets."""

    name = "simclr"
    batch_keys = ("view1", "view2")
    needs_views = True

    def embed(self, model, batch: dict) -> dict:
        n = batch["view1"].shape[0]
        # One forward over both views: BatchNorm sees 2N images, as in SimCLR's reference code.
        z = model(pixel_values=torch.cat([batch["view1"], batch["view2"]])).image_embeds
        return {"z1": z[:n], "z2": z[n:]}

    def key_embeds(self, batch: dict) -> dict:
        return mix_keys(batch)

    def loss(self, emb: dict, keys: dict, scale):
        lc = self.loss_cfg
        loss = nt_xent(emb["z1"], emb["z2"], lc.temperature, gather=True, impl=lc.impl, **lc.negative_options(),
                       **mix_targets(keys, emb["z1"]))
        return loss, {"temperature": lc.temperature}
