"""The objective protocol: what a training method computes from a batch, and what it needs.

The loop, the model builder, the data loader and the evaluator ask an objective (or its class)
instead of comparing mode strings:

    batch_keys           batch entries the method reads (the first one counts the samples)
    learns_scale         the loss uses the model's learnable logit_scale (CLIP)
    needs_text           the model needs a text tower and the batches captions
    needs_views          the batches hold two augmented views (view1, view2)
    eval_kind            "zeroshot" (image-text: zero-shot, or retrieval without labels) | "knn"
    init_temperature     1 / the logit scale a new model starts from (model.init_temperature: null)
    max_scale            the logit scale's clamp (None: unclamped)
    init_logit_bias      the logit bias a new model starts from (None: no bias; SigLIP: -10)

    embed(model, batch)             -> dict of (B, P) tensors with gradient (+ "scale" for CLIP)
    key_embeds(batch)               -> dict of (B, P) tensors without gradient (MoCo's keys), or {}
    loss(emb, keys, scale)          -> (scalar loss, dict of floats to log)
    after_step(model, keys, step)   after each optimizer step (MoCo: EMA update, enqueue)
    state_modules()                 name -> module saved in checkpoints (MoCo: key encoder, queue)
    trainable_modules()             name -> module of the method's own whose parameters the optimizer
                                    trains with the model's (BYOL: the predictor), or {}

`embed` and `loss` are split for GradCache (mmcl.train.gradcache): the towers run per micro-batch,
the loss once over all micro-batches' embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmcl.losses import IMPLS

EVAL_KINDS = ("zeroshot", "knn")


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class LossConfig:
    """Loss settings. CLIP learns its temperature (model.logit_scale); image-only losses use a fixed one."""

    impl: str = "auto"  # one of mmcl.losses.IMPLS
    local_loss: bool = True  # multi-process: report this rank's share of the loss (false: the global loss); same gradients
    temperature: float = 0.2  # simclr / moco
    simclr_weight: float = 1.0  # clip+simclr: weight of the image-image term (SLIP uses 1.0)
    simclr_temperature: float = 0.1  # clip+simclr: temperature of the image-image term
    hard_negative_beta: float = 0.0  # HCL (Robinson et al. 2021): negatives reweighted by e^{β·s/τ}; 0: off
    debias_tau_plus: float = 0.0  # DCL (Chuang et al. 2020): positive-class prior τ⁺ in [0, 1); 0: off

    def validate(self) -> None:
        require(self.impl in IMPLS, f"loss.impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        require(self.temperature > 0, f"loss.temperature must be > 0, got {self.temperature}")
        require(self.simclr_temperature > 0, f"loss.simclr_temperature must be > 0, got {self.simclr_temperature}")
        require(self.simclr_weight >= 0, f"loss.simclr_weight must be >= 0, got {self.simclr_weight}")
        b, t = self.hard_negative_beta, self.debias_tau_plus
        require(isinstance(b, (int, float)) and not isinstance(b, bool) and b >= 0,
                f"loss.hard_negative_beta must be a number >= 0, got {b!r}")
        require(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1,
                f"loss.debias_tau_plus must be a number in [0, 1), got {t!r}")

    def negative_options(self) -> dict:
        """The HCL / DCL keyword arguments of mmcl.losses' info_nce / nt_xent / clip_loss."""
        return {"hard_negative_beta": float(self.hard_negative_beta), "debias_tau_plus": float(self.debias_tau_plus)}


def mix_keys(batch: dict) -> dict:
    """i-Mix: a CutMix-ed batch's mixing as key entries that survive concatenation across
    micro-batches: mix_shift (B,) = mix_partner − arange(B) (partner offsets) and mix_lambda (B,)."""
    if "mix_partner" not in batch:
        return {}
    partner = batch["mix_partner"]
    rows = torch.arange(partner.shape[0], device=partner.device)
    return {"mix_shift": partner.long() - rows, "mix_lambda": batch["mix_lambda"]}


def mix_targets(keys: dict, like: torch.Tensor) -> dict:
    """The mix_partner / mix_lambda keyword arguments of a loss over the rows of `keys` (from
    mix_keys, possibly concatenated), on `like`'s device; {} for an unmixed batch."""
    if "mix_shift" not in keys:
        return {}
    shift = keys["mix_shift"].to(like.device)
    rows = torch.arange(shift.shape[0], device=like.device)
    lam = keys["mix_lambda"].to(like.device, torch.promote_types(like.dtype, torch.float32))
    return {"mix_partner": rows + shift, "mix_lambda": lam}


class Objective:
    """Base of the training methods; the defaults are the no-ops of a method without extra state."""

    name: ClassVar[str] = ""
    batch_keys: ClassVar[tuple] = ()
    learns_scale: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False
    needs_views: ClassVar[bool] = False
    eval_kind: ClassVar[str] = "knn"
    init_temperature: ClassVar[float] = 0.07
    max_scale: ClassVar[float | None] = 100.0
    init_logit_bias: ClassVar[float | None] = None

    def __init__(self, cfg, model=None):
        """cfg: the whole mmcl.train.Config (loss section, method section, train.max_steps)."""
        self.cfg = cfg
        self.loss_cfg = cfg.loss

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise a ValueError naming the key when `cfg` does not suit this method."""
        m = cfg.model
        if cls.needs_text:
            require(bool(m.pretrained or m.text_tower or m.text_tower_config),
                   f"mode {cls.name!r} needs a text tower: set model.text_tower or model.text_tower_config")
        loss = cfg.loss
        require(not (cfg.data.cutmix > 0 and (loss.hard_negative_beta > 0 or loss.debias_tau_plus > 0)),
                "data.cutmix mixes the targets (i-Mix), which cannot be combined with loss.hard_negative_beta / "
                "loss.debias_tau_plus: set those to 0 or data.cutmix=0")
        if cfg.data.augment_on_device is not None:
            require(cls.needs_views and not cls.needs_text,
                   f"data.augment_on_device needs an image-only mode with two views (simclr, moco), got {cls.name!r}")

    def embed(self, model, batch: dict) -> dict:
        raise NotImplementedError

    def key_embeds(self, batch: dict) -> dict:
        return {}

    def loss(self, emb: dict, keys: dict, scale):
        raise NotImplementedError

    def after_step(self, model, keys: dict, step: int) -> None:
        pass

    def state_modules(self) -> dict:
        return {}

    def trainable_modules(self) -> dict:
        return {}

    def to(self, device) -> "Objective":
        for module in self.state_modules().values():
            module.to(device)
        return self

    def batch_size(self, batch: dict) -> int:
        """Samples in `batch` (the rows of its first batch key)."""
        return int(batch[self.batch_keys[0]].shape[0])
