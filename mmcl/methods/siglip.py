"""SigLIP (Zhai et al. 2023): the pairwise sigmoid loss over (image, caption) pairs.

Every image-text pair of the (global) batch is its own binary problem: σ(t·x·y + b) should be 1
for an image and its caption and 0 for every other pair, so no softmax over the batch is needed.
The model learns the multiplier t = exp(t') and the bias b, initialised as in the paper
(t' = log 10, b = -10: the many negatives start with a small loss). The paper's t = exp(t') has
no upper clamp (big_vision and transformers' SiglipModel have none either), so a SigLIP model's
scale is unclamped; neither is the bias.
"""
from __future__ import annotations

from mmcl.losses import siglip_loss
from mmcl.methods.base import Objective, require


class SigLipObjective(Objective):
    """SigLIP's sigmoid loss over (image, caption) pairs; scale and bias are the model's
    learnable logit_scale and logit_bias."""

    name = "siglip"
    batch_keys = ("pixel_values", "input_ids", "attention_mask")
    learns_scale = True
    needs_text = True
    eval_kind = "zeroshot"
    init_temperature = 0.1  # t' = log 10
    max_scale = None  # unclamped, as in the paper
    init_logit_bias = -10.0

    def __init__(self, cfg, model=None):
        super().__init__(cfg, model)
        if model is None or getattr(model, "logit_bias", None) is None:
            raise ValueError("mode 'siglip' trains a model with a logit bias (mmcl.train.build_model gives one; "
                             "DualEncoder.add_logit_bias adds one to a softmax model)")
        # GradCache passes only the scale to `loss` (its graph-free pass drops "scale"): the
        # bias then comes from the model itself.
        self._model = model

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        require(not cfg.data.cutmix > 0,
                "data.cutmix mixes the images and needs i-Mix's soft targets, which the sigmoid loss of mode "
                "'siglip' does not have: set data.cutmix=0 (mode 'clip' takes mixed images)")

    def embed(self, model, batch: dict) -> dict:
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch.get("attention_mask"))
        # Scale and bias leave the model's forward together, so DDP sees both used there.
        return {"image": out.image_embeds, "text": out.text_embeds, "scale": (out.logit_scale, out.logit_bias)}

    def loss(self, emb: dict, keys: dict, scale):
        scale, bias = scale if isinstance(scale, tuple) else (scale, self._model.logit_bias)
        loss = siglip_loss(emb["image"], emb["text"], scale, bias, gather=True, impl=self.loss_cfg.impl)
        return loss, {"temperature": 1.0 / float(scale.detach()), "logit_bias": float(bias.detach())}
