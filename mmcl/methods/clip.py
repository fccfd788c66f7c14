"""CLIP (Radford et al. 2021): symmetric InfoNCE over (image, caption) pairs."""
from __future__ import annotations

from mmcl.losses import clip_loss
from mmcl.methods.base import Objective, mix_keys, mix_targets


class ClipObjective(Objective):
    """CLIP's symmetric InfoNCE over (image, caption) pairs; the temperature is the model's
    learnable logit_scale. loss.hard_negative_beta / loss.debias_tau_plus: HCL / DCL negatives. A
    batch whose images were mixed (`mix_partner` / `mix_lambda` entries) gets i-Mix's mixed text
    targets."""

    name = "clip"
    batch_keys = ("pixel_values", "input_ids", "attention_mask")
    learns_scale = True
    needs_text = True
    eval_kind = "zeroshot"

    def embed(self, model, batch: dict) -> dict:
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch.get("attention_mask"))
        return {"image": out.image_embeds, "text": out.text_embeds, "scale": out.logit_scale}

    def key_embeds(self, batch: dict) -> dict:
        return mix_keys(batch)  # data.cutmix > 0: the loader CutMix-ed pixel_values

    def loss(self, emb: dict, keys: dict, scale):
        lc = self.loss_cfg
        loss = clip_loss(emb["image"], emb["text"], scale, gather=True, local_loss=lc.local_loss, impl=lc.impl,
                         **lc.negative_options(), **mix_targets(keys, emb["image"]))
        return loss, {"temperature": 1.0 / float(scale.detach())}
