"""MoCo v2 (He et al. 2020; Chen et al. 2020), the whole method in one file.

    query  q = f_q(view1)                        the trained model (encoder + MLP head)
    key    k = f_k(shuffle(view2)), unshuffled   f_k: an EMA copy of f_q, no gradient
    loss   InfoNCE(q, k, negatives = queue)      mmcl.losses.info_nce at a fixed temperature
           (+ loss.hard_negative_beta / debias_tau_plus: HCL / DCL; data.cutmix > 0: i-Mix targets)
    after each optimizer step:  f_k ← m·f_k + (1 − m)·f_q;  enqueue every rank's k

Shuffling BN: the key batch is permuted across all ranks before f_k and put back after it, so a
BatchNorm's statistics cannot tell a query which key is its positive. With one process the batch is
shuffled locally, which matters with split BatchNorm (model.batchnorm.splits).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mmcl import distributed
from mmcl.losses import info_nce
from mmcl.methods.base import Objective, mix_keys, mix_targets, require


@dataclass
class MoCoConfig:
    """The `moco:` section of the training config."""

    queue_size: int = 65536  # negatives kept in the queue
    key_momentum: float = 0.999  # EMA momentum m of the key encoder
    final_momentum: float | None = None  # cosine ramp of m to this value at train.max_steps (BYOL)
    shuffle_bn: bool = True  # shuffle the key batch across ranks around the key encoder

    def validate(self) -> None:
        q = self.queue_size
        require(isinstance(q, int) and not isinstance(q, bool) and q >= 1,
               f"moco.queue_size must be an int >= 1, got {q!r}")
        require(0 <= self.key_momentum < 1, f"moco.key_momentum must be in [0, 1), got {self.key_momentum}")
        f = self.final_momentum
        require(f is None or 0 <= f <= 1, f"moco.final_momentum must be null or in [0, 1], got {f}")
        require(isinstance(self.shuffle_bn, bool), f"moco.shuffle_bn must be true or false, got {self.shuffle_bn!r}")


def _unwrap(module: nn.Module) -> nn.Module:
    # Accelerate/DDP wrap the query encoder; the EMA follows the bare module.
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


class MomentumEncoder(nn.Module):
    """EMA copy of `module`: after each step p_k ← m·p_k + (1 − m)·p_q.

    With `final_momentum` and `total_steps`, m follows BYOL's cosine ramp from `momentum` at
    step 0 to `final_momentum` at `total_steps`: m(t) = final − (final − m0)·(cos(π t / T) + 1) / 2.
    Parameters have requires_grad=False; buffers (BatchNorm statistics) are the copy's own, as in
    MoCo. The copy keeps the train/eval mode `module` had; MoCo computes keys in train mode (batch
    statistics), so call `.train()` on it, as MoCoObjective does — in eval mode it would normalise
    with frozen statistics and its keys would stop matching the queries.
    """

    def __init__(self, module: nn.Module, momentum: float = 0.999, final_momentum: float | None = None,
                 total_steps: int | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        for name, m in (("momentum", momentum), ("final_momentum", final_momentum)):
            if m is not None and not 0.0 <= float(m) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {m}")
        if final_momentum is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"final_momentum needs total_steps, a positive int; got {total_steps!r}")
        self.module = copy.deepcopy(_unwrap(module))
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.momentum = float(momentum)
        self.final_momentum = None if final_momentum is None else float(final_momentum)
        self.total_steps = total_steps

    def momentum_at(self, step: int | None) -> float:
        """The momentum m used at `step` (constant without a ramp)."""
        if self.final_momentum is None or step is None:
            return self.momentum
        t = min(max(int(step), 0), self.total_steps) / self.total_steps
        return self.final_momentum - (self.final_momentum - self.momentum) * (math.cos(math.pi * t) + 1) / 2

    @torch.no_grad()
    def update(self, module: nn.Module, step: int | None = None) -> float:
        """Move the EMA towards `module`'s parameters; returns the momentum used."""
        module = _unwrap(module)
        ours, theirs = list(self.module.parameters()), list(module.parameters())
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs)):
            raise ValueError("module does not have the parameters of the encoder this MomentumEncoder copies")
        m = self.momentum_at(step)
        torch._foreach_mul_(ours, m)
        torch._foreach_add_(ours, [p.detach().to(q.dtype) for p, q in zip(theirs, ours)], alpha=1.0 - m)
        return m

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class FeatureQueue(nn.Module):
    """FIFO ring buffer of `size` keys of width `dim` (MoCo's negatives).

    Buffers: `features` (size, dim), `ptr` (next row to write), `filled` (rows written so far,
    capped at size). enqueue gathers the keys of all ranks (rank order), so every rank's queue
    is identical.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        for name, v in (("dim", dim), ("size", size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.dim, self.size = dim, size
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """keys (B, dim) of this rank; all ranks' keys are written, oldest rows overwritten."""
        if not isinstance(keys, torch.Tensor) or not keys.is_floating_point():
            raise TypeError(f"keys must be a float tensor, got {type(keys).__name__}")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (B, {self.dim}), got shape {tuple(keys.shape)}")
        keys = distributed.gather_no_grad(keys.detach()).to(self.features.dtype)
        n = keys.shape[0]
        start = int(self.ptr)
        if n > self.size:  # only the newest `size` keys survive a write longer than the queue
            start = (start + n - self.size) % self.size
            keys = keys[-self.size:]
        rows = (start + torch.arange(keys.shape[0], device=self.features.device)) % self.size
        self.features[rows] = keys.to(self.features.device)
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    def valid_features(self) -> torch.Tensor:
        """The rows written so far: (min(filled, size), dim)."""
        return self.features[: int(self.filled)]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, filled={int(self.filled)}"


def projection_dim(model) -> int:
    """P, the width of the model's image embeddings (the last Linear of its image projection)."""
    linears = [m for m in model.image_projection.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("cannot tell the embedding width: model.image_projection has no nn.Linear")
    return linears[-1].out_features


class MoCoObjective(Objective):
    """MoCo v2: query = model(view1), key = key encoder(view2), negatives = the queue.

    The key encoder is an EMA copy of the whole image encoder + MLP head, made when the objective
    is built (after any BatchNorm conversion of the model, so the copy has it too).
    """

    name = "moco"
    batch_keys = ("view1", "view2")
    needs_views = True

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        m = cfg.moco
        self.moco_cfg = m
        self.key_encoder = MomentumEncoder(model, momentum=m.key_momentum, final_momentum=m.final_momentum,
                                           total_steps=cfg.train.max_steps)
        # The copy inherits the model's mode, and built models come back in eval mode. The key
        # encoder runs in train mode: BatchNorm on the (shuffled) key batch's own statistics. In
        # eval mode it would use running statistics that never move (the EMA touches parameters
        # only), and the keys would not match the queries: the loss stays at chance.
        self.key_encoder.train()
        self.queue = FeatureQueue(projection_dim(model), m.queue_size)

    def embed(self, model, batch: dict) -> dict:
        return {"q": model(pixel_values=batch["view1"]).image_embeds}

    @torch.no_grad()
    def key_embeds(self, batch: dict) -> dict:
        return {"k": self._keys(batch["view2"]), **mix_keys(batch)}

    def _keys(self, x):
        if not self.moco_cfg.shuffle_bn:
            return self.key_encoder(pixel_values=x).image_embeds.float()
        if distributed.is_distributed() and not distributed.same_on_all_ranks(x.shape[0], x.device):
            # A rank dropped an unreadable image: a permutation of unequal batches cannot give every
            # rank B rows back, so all ranks skip the shuffle for this batch together.
            return self.key_encoder(pixel_values=x).image_embeds.float()
        x, unshuffle_index = distributed.shuffle_batch(x)
        k = self.key_encoder(pixel_values=x).image_embeds
        return distributed.unshuffle_batch(k, unshuffle_index).float()

    def loss(self, emb: dict, keys: dict, scale):
        queue = self.queue.valid_features()
        queue = queue if queue.shape[0] > 0 else None  # before the first enqueue: in-batch negatives
        lc = self.loss_cfg
        k = keys["k"].to(emb["q"].dtype)
        loss = info_nce(emb["q"], k, lc.temperature, queue=queue, impl=lc.impl, **lc.negative_options(),
                        **mix_targets(keys, emb["q"]))
        return loss, {"temperature": lc.temperature}

    @torch.no_grad()
    def after_step(self, model, keys: dict, step: int) -> None:
        self.key_encoder.update(model, step=step)
        self.queue.enqueue(keys["k"])

    def state_modules(self) -> dict:
        return {"key_encoder": self.key_encoder, "queue": self.queue}
