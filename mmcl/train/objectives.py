"""What each training mode computes: embeddings from a batch, then a loss from embeddings.

The split matters for GradCache (mmcl.train.gradcache): `embed` runs the towers (the expensive,
memory-hungry part) per micro-batch, `loss` runs once over all micro-batches' embeddings, so the
contrastive batch is the whole accumulated batch.

    embed(model, batch)  -> dict of (B, P) tensors from the trained model (+ "scale" for CLIP)
    keys(batch)          -> dict of (B, P) tensors without gradient (MoCo's momentum keys), or {}
    loss(emb, keys, scale) -> (scalar loss, dict of floats to log)
    after_step(model, keys, step)  MoCo: EMA update of the key encoder, enqueue the keys
"""
from __future__ import annotations

import torch

from mmcl import distributed
from mmcl.losses import clip_loss, info_nce, nt_xent


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows with gradients (one process: x itself)."""
    return distributed.gather_with_grad(x)[0]


class ClipObjective:
    """CLIP's symmetric InfoNCE; the temperature is the model's learnable logit_scale."""

    batch_keys = ("pixel_values", "input_ids", "attention_mask")
    learns_scale = True

    def __init__(self, loss_cfg):
        self.cfg = loss_cfg

    def embed(self, model, batch) -> dict:
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch.get("attention_mask"))
        return {"image": out.image_embeds, "text": out.text_embeds, "scale": out.logit_scale}

    def keys(self, batch) -> dict:
        return {}

    def loss(self, emb: dict, keys: dict, scale):
        loss = clip_loss(emb["image"], emb["text"], scale, gather=True, local_loss=self.cfg.local_loss,
                         impl=self.cfg.impl)
        return loss, {"temperature": 1.0 / float(scale.detach())}

    def after_step(self, model, keys: dict, step: int) -> None:
        pass

    def modules(self) -> dict:
        return {}


class SimCLRObjective:
    """NT-Xent over the two views of every rank's batch (2N-2 negatives from all ranks)."""

    batch_keys = ("view1", "view2")
    learns_scale = False

    def __init__(self, loss_cfg):
        self.cfg = loss_cfg

    def embed(self, model, batch) -> dict:
        n = batch["view1"].shape[0]
        # One forward over both views: BatchNorm sees 2N images, as in SimCLR's reference code.
        z = model(pixel_values=torch.cat([batch["view1"], batch["view2"]])).image_embeds
        return {"z1": z[:n], "z2": z[n:]}

    def keys(self, batch) -> dict:
        return {}

    def loss(self, emb: dict, keys: dict, scale):
        T = self.cfg.temperature
        return nt_xent(_gather(emb["z1"]), _gather(emb["z2"]), T, impl=self.cfg.impl), {"temperature": T}

    def after_step(self, model, keys: dict, step: int) -> None:
        pass

    def modules(self) -> dict:
        return {}


class ClipSimCLRObjective(ClipObjective):
    """SLIP-style: CLIP's loss on (image, caption) + `simclr_weight` x NT-Xent on two augmented views."""

    batch_keys = ("pixel_values", "input_ids", "attention_mask", "view1", "view2")

    def embed(self, model, batch) -> dict:
        n, m = batch["pixel_values"].shape[0], batch["view1"].shape[0]
        images = torch.cat([batch["pixel_values"], batch["view1"], batch["view2"]])
        out = model(pixel_values=images, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        img = out.image_embeds
        return {"image": img[:n], "text": out.text_embeds, "z1": img[n:n + m], "z2": img[n + m:],
                "scale": out.logit_scale}

    def loss(self, emb: dict, keys: dict, scale):
        clip, logs = super().loss(emb, keys, scale)
        ssl = nt_xent(_gather(emb["z1"]), _gather(emb["z2"]), self.cfg.simclr_temperature, impl=self.cfg.impl)
        logs.update(clip_loss=float(clip.detach()), simclr_loss=float(ssl.detach()))
        return clip + self.cfg.simclr_weight * ssl, logs


class MoCoObjective:
    """MoCo v2: query = trained encoder(view1), key = momentum encoder(view2), negatives = queue.

    The key encoder is an EMA copy of the whole image encoder + MLP head; keys are computed
    without gradient and enqueued after the optimizer step. With several processes the key batch
    is shuffled across ranks before the key encoder and unshuffled after (MoCo's shuffling BN),
    so BatchNorm statistics cannot leak which key is the positive.
    """

    batch_keys = ("view1", "view2")
    learns_scale = False

    def __init__(self, loss_cfg, model, total_steps: int):
        from mmcl.models import FeatureQueue, MomentumEncoder

        self.cfg = loss_cfg
        self.key_encoder = MomentumEncoder(model, momentum=loss_cfg.momentum,
                                           final_momentum=loss_cfg.final_momentum, total_steps=total_steps)
        # The copy inherits the model's mode, and built models come back in eval mode. MoCo's key
        # encoder runs in train mode: BatchNorm on the (shuffled) key batch's own statistics. In
        # eval mode it would use running statistics that never move (the EMA touches parameters
        # only), and the keys would not match the queries: the loss stays at chance.
        self.key_encoder.train()
        dim = projection_dim(model)
        self.queue = FeatureQueue(dim, loss_cfg.queue_size)

    def to(self, device):
        self.key_encoder.to(device)
        self.queue.to(device)
        return self

    def embed(self, model, batch) -> dict:
        return {"q": model(pixel_values=batch["view1"]).image_embeds}

    @torch.no_grad()
    def keys(self, batch) -> dict:
        x = batch["view2"]
        if not self.cfg.shuffle_bn:
            return {"k": self.key_encoder(pixel_values=x).image_embeds.float()}
        # One process: a local shuffle, which matters with split BatchNorm (model.bn_splits).
        try:
            x, unshuffle_index = distributed.shuffle_batch(x)
        except ValueError:
            # Ranks hold different batch sizes (a corrupt image was dropped on one of them): every
            # rank sees the same gathered size, so all skip the shuffle for this batch together.
            return {"k": self.key_encoder(pixel_values=x).image_embeds.float()}
        k = self.key_encoder(pixel_values=x).image_embeds
        return {"k": distributed.unshuffle_batch(k, unshuffle_index).float()}

    def loss(self, emb: dict, keys: dict, scale):
        queue = self.queue.valid_features()
        # Before the first enqueue the queue is empty: fall back to in-batch negatives.
        queue = queue if queue.shape[0] > 0 else None
        T = self.cfg.temperature
        k = keys["k"].to(emb["q"].dtype)
        return info_nce(emb["q"], k, T, queue=queue, impl=self.cfg.impl), {"temperature": T}

    @torch.no_grad()
    def after_step(self, model, keys: dict, step: int) -> None:
        self.key_encoder.update(model, step=step)
        self.queue.enqueue(keys["k"])

    def modules(self) -> dict:
        return {"key_encoder": self.key_encoder, "queue": self.queue}


def projection_dim(model) -> int:
    """P, the width of the model's image embeddings (the last Linear of its image projection)."""
    linears = [m for m in model.image_projection.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("cannot tell the embedding width: model.image_projection has no nn.Linear")
    return linears[-1].out_features


def build_objective(mode: str, loss_cfg, model, total_steps: int):
    if mode == "clip":
        return ClipObjective(loss_cfg)
    if mode == "simclr":
        return SimCLRObjective(loss_cfg)
    if mode == "clip+simclr":
        return ClipSimCLRObjective(loss_cfg)
    if mode == "moco":
        return MoCoObjective(loss_cfg, model, total_steps)
    raise ValueError(f"mode must be clip, simclr, moco or clip+simclr, got {mode!r}")
