"""SLIP-style CLIP + SimCLR (Mu et al. 2021): CLIP's loss on (image, caption) pairs plus NT-Xent
on two augmented views of the same images."""
from __future__ import annotations

import torch

from mmcl.losses import nt_xent
from mmcl.methods.base import mix_targets
from mmcl.methods.clip import ClipObjective


class ClipSimCLRObjective(ClipObjective):
    """SLIP-style: CLIP's loss on (image, caption) + `loss.simclr_weight` x NT-Xent on two views.
    data.cutmix mixes the views (not pixel_values): i-Mix's targets go to the NT-Xent term."""

    name = "clip+simclr"
    batch_keys = ("pixel_values", "input_ids", "attention_mask", "view1", "view2")
    needs_views = True

    def embed(self, model, batch: dict) -> dict:
        n, m = batch["pixel_values"].shape[0], batch["view1"].shape[0]
        images = torch.cat([batch["pixel_values"], batch["view1"], batch["view2"]])
        out = model(pixel_values=images, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        img = out.image_embeds
        return {"image": img[:n], "text": out.text_embeds, "z1": img[n:n + m], "z2": img[n + m:],
                "scale": out.logit_scale}

    def loss(self, emb: dict, keys: dict, scale):
        clip, logs = super().loss(emb, {}, scale)  # the captions' images are not mixed
        lc = self.loss_cfg
        ssl = nt_xent(emb["z1"], emb["z2"], lc.simclr_temperature, gather=True, impl=lc.impl,
                      **lc.negative_options(), **mix_targets(keys, emb["z1"]))
        logs.update(clip_loss=float(clip.detach()), simclr_loss=float(ssl.detach()))
        return clip + lc.simclr_weight * ssl, logs
