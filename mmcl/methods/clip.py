"""CLIP (Radford et al. 2021) and SLIP-style CLIP + SimCLR (Mu et al. 2021) objectives."""
from __future__ import annotations

import torch

from mmcl.losses import clip_loss, nt_xent
from mmcl.methods.base import Objective, gather


class ClipObjective(Objective):
    """CLIP's symmetric InfoNCE over (image, caption) pairs; the temperature is the model's
    learnable logit_scale."""

    name = "clip"
    batch_keys = ("pixel_values", "input_ids", "attention_mask")
    learns_scale = True
    needs_text = True
    eval_kind = "zeroshot"

    def embed(self, model, batch: dict) -> dict:
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch.get("attention_mask"))
        return {"image": out.image_embeds, "text": out.text_embeds, "scale": out.logit_scale}

    def loss(self, emb: dict, keys: dict, scale):
        loss = clip_loss(emb["image"], emb["text"], scale, gather=True, local_loss=self.loss_cfg.local_loss,
                         impl=self.loss_cfg.impl)
        return loss, {"temperature": 1.0 / float(scale.detach())}


class ClipSimCLRObjective(ClipObjective):
    """SLIP-style: CLIP's loss on (image, caption) + `loss.simclr_weight` x NT-Xent on two views."""

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
        clip, logs = super().loss(emb, keys, scale)
        lc = self.loss_cfg
        ssl = nt_xent(gather(emb["z1"]), gather(emb["z2"]), lc.simclr_temperature, impl=lc.impl)
        logs.update(clip_loss=float(clip.detach()), simclr_loss=float(ssl.detach()))
        return clip + lc.simclr_weight * ssl, logs
