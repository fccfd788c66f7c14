"""BYOL (Grill et al. 2020, "Bootstrap your own latent"), the whole method in one file.

    online    z = g_θ(f_θ(view)),  p = q_θ(z)       the trained model (encoder + projection) + predictor
    target    z' = g_ξ(f_ξ(view)), no gradient       ξ: an EMA copy of θ (MomentumEncoder)
    loss      ‖p̄1 − z̄'2‖² + ‖p̄2 − z̄'1‖²  = 4 − 2·cos(p1, z'2) − 2·cos(p2, z'1)   (mean over the batch)
    after each optimizer step:  ξ ← m·ξ + (1 − m)·θ,  m = 1 − (1 − m0)·(cos(π t / T) + 1) / 2

No negatives: the predictor and the slowly moving target keep the online network from collapsing;
`online_std` (logged every step, `normalized_std`) watches for it. BYOL's projector is
`model.projection: mlp_bn` (Linear-BN-ReLU-Linear) and its representation is the encoder's output
before it (`eval.knn_features: tower`); its embeddings are trained only to be predictable.
The predictor is the objective's own module: trained with the model (`trainable_modules`) and saved
in checkpoints (`state_modules`). In a multi-process run its gradients are averaged over the ranks
by hooks (the model's are averaged by DDP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmcl import distributed
from mmcl.methods.base import Objective, require
from mmcl.methods.moco import MomentumEncoder, projection_dim


@dataclass
class BYOLConfig:
    """The `byol:` section of the training config (BYOL's published values as defaults)."""

    momentum: float = 0.996  # target EMA momentum at step 0 ...
    final_momentum: float = 1.0  # ... ramped (cosine) to this at train.max_steps
    predictor_hidden: int = 4096  # hidden width of the predictor MLP (Linear-BN-ReLU-Linear)

    def validate(self) -> None:
        require(0 <= self.momentum <= 1, f"byol.momentum must be in [0, 1], got {self.momentum}")
        require(0 <= self.final_momentum <= 1, f"byol.final_momentum must be in [0, 1], got {self.final_momentum}")
        h = self.predictor_hidden
        require(isinstance(h, int) and not isinstance(h, bool) and h >= 1,
                f"byol.predictor_hidden must be an int >= 1, got {h!r}")


def byol_predictor(dim: int, hidden: int) -> nn.Module:
    """BYOL's predictor q: (B, dim) -> (B, dim), Linear → BatchNorm1d → ReLU → Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetric loss: mean over the batch of ‖p̄1 − t̄2‖² + ‖p̄2 − t̄1‖² (bars: L2-normalised).

    Args:
        p1, p2: (B, D) online predictions of views 1 and 2.
        t1, t2: (B, D) target projections of views 1 and 2 (no gradient flows into them).

    Returns:
        Scalar in [0, 8]; 0 when each prediction points along the other view's target.
    """
    for name, x in (("p1", p1), ("p2", p2), ("t1", t1), ("t2", t2)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape != p1.shape:
            raise ValueError(f"{name} must be a (B, D) tensor shaped like p1 {tuple(p1.shape)}")

    def term(p, t):
        dtype = torch.promote_types(p.dtype, torch.float32)  # 16-bit inputs: the loss in fp32
        return 2.0 - 2.0 * (F.normalize(p.to(dtype), dim=1) * F.normalize(t.detach().to(dtype), dim=1)).sum(1)

    return (term(p1, t2) + term(p2, t1)).mean()


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> float:
    """Collapse monitor: the per-dimension std over the batch of the L2-normalised rows of z (B, D),
    averaged over the D dimensions. 0 for a collapsed output (every row the same); about 1/√D
    when the rows spread over the sphere; nan for a single row."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a (B, D) tensor, got {getattr(z, 'shape', type(z).__name__)}")
    if z.shape[0] < 2:
        return float("nan")
    return float(F.normalize(z.detach().float(), dim=1).std(0).mean())


def _average_over_ranks(param: torch.Tensor) -> None:
    # After each backward's accumulation: the sum over micro-batches of rank averages is the rank
    # average of the sums, so plain accumulation and GradCache stay correct.
    dist.all_reduce(param.grad)
    param.grad /= dist.get_world_size()


class BYOLObjective(Objective):
    """BYOL on the two views of every sample; image-only models (no text tower)."""

    name = "byol"
    batch_keys = ("view1", "view2")
    needs_views = True

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        b = cfg.byol
        self.target = MomentumEncoder(model, momentum=b.momentum, final_momentum=b.final_momentum,
                                      total_steps=cfg.train.max_steps)
        self.target.train()  # batch statistics, as the online network (see MoCoObjective)
        self.predictor = byol_predictor(projection_dim(model), b.predictor_hidden)
        self._step = 0  # the next optimizer step (for the logged momentum)
        if distributed.is_distributed():
            for p in self.predictor.parameters():
                p.register_post_accumulate_grad_hook(_average_over_ranks)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        m = cfg.model
        require(not (m.pretrained or m.text_tower or m.text_tower_config),
                "mode 'byol' trains an image-only model: unset model.text_tower / model.text_tower_config / "
                "model.pretrained (BYOL has no text tower)")
        require(not cfg.data.cutmix > 0,
                "data.cutmix mixes the views and needs i-Mix's mixed targets, which BYOL's regression loss does "
                "not have: set data.cutmix=0 (modes 'simclr', 'moco' and 'clip' take mixed images)")

    def embed(self, model, batch: dict) -> dict:
        n = batch["view1"].shape[0]
        z = model(pixel_values=torch.cat([batch["view1"], batch["view2"]])).image_embeds
        return {"z1": z[:n], "z2": z[n:]}

    @torch.no_grad()
    def key_embeds(self, batch: dict) -> dict:
        n = batch["view1"].shape[0]
        t = self.target(pixel_values=torch.cat([batch["view1"], batch["view2"]])).image_embeds.float()
        return {"t1": t[:n], "t2": t[n:]}

    def loss(self, emb: dict, keys: dict, scale):
        p = self.predictor(torch.cat([emb["z1"], emb["z2"]]).to(self.predictor[0].weight.dtype))
        n = emb["z1"].shape[0]
        loss = byol_loss(p[:n], p[n:], keys["t1"], keys["t2"])
        return loss, {"target_momentum": self.target.momentum_at(self._step), "online_std": normalized_std(emb["z1"])}

    @torch.no_grad()
    def after_step(self, model, keys: dict, step: int) -> None:
        self.target.update(model, step=step)
        self._step = step + 1

    def trainable_modules(self) -> dict:
        return {"predictor": self.predictor}

    def state_modules(self) -> dict:
        return {"target_encoder": self.target, "predictor": self.predictor}
