"""CLIP (Radford et al. 2021): symmetric InfoNCE over (image, caption) pairs."""
from __future__ import annotations

from mmcl.losses import clip_loss
from mmcl.methods.base import Objective


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
