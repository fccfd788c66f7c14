"""Prototypical contrastive learning (PCL, Li et al. 2021, ProtoNCE): MoCo + k-means prototypes.

    every epoch (pcl.every_steps):   v_i = f_k(x_i) for every training image (momentum encoder, no
                                     augmentation); for each granularity m: k-means into k_m clusters,
                                     prototypes c = normalised centroids, concentrations φ
    loss  InfoNCE(q, k, queue) + 1/M Σ_m ProtoNCE_m(q),
          ProtoNCE_m(q_i) = −log exp(q_i·c_s/φ_s) / Σ_j exp(q_i·c_j/φ_j),   s: the cluster of sample i

Concentration of a cluster with rows Z (paper, eq. 12): φ = Σ_z ‖v_z − c‖ / (|Z| log(|Z| + α)); a
cluster of one row takes the largest φ; φ is clamped to its 10th-90th percentiles and scaled to mean
loss.temperature. Every prototype of a granularity is a candidate (the paper samples r negatives
out of up to 100,000 clusters). Before the first clustering (pcl.warmup_steps) the loss is
MoCo's InfoNCE alone, as the paper's warm-up epochs. Every rank embeds and clusters the whole
training set at the same step (so no rank idles in a collective meanwhile); with a BatchNorm tower
the ranks' key encoders hold running statistics of their own batches, so their features differ.
Rank 0's clustering is then broadcast: every rank holds the prototypes, concentrations and
assignments of a 1-process k-means of rank 0's features (tests/test_methods_pcl.py, 2 processes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmcl import distributed
from mmcl.cluster import BACKENDS, kmeans
from mmcl.methods.base import require
from mmcl.methods.moco import MoCoObjective, projection_dim


@dataclass
class PCLConfig:
    """The `pcl:` section (the queue and momentum come from `moco:`)."""

    num_clusters: list = field(default_factory=lambda: [25000, 50000, 100000])  # granularities (ImageNet's)
    every_steps: int | None = None  # re-cluster every this many steps; null: once per epoch
    warmup_steps: int = 0  # InfoNCE alone before the first clustering (the paper: 20 of 200 epochs)
    kmeans_iters: int = 20
    concentration_alpha: float = 10.0  # α in φ's denominator
    backend: str = "auto"  # mmcl.cluster backend: auto (faiss when installed) | torch | faiss

    def validate(self) -> None:
        ks = self.num_clusters
        require(isinstance(ks, (list, tuple)) and len(ks) >= 1
                and all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in ks),
                f"pcl.num_clusters must be a non-empty list of ints >= 2, got {ks!r}")
        e = self.every_steps
        require(e is None or (isinstance(e, int) and not isinstance(e, bool) and e >= 1),
                f"pcl.every_steps must be null or an int >= 1, got {e!r}")
        for name in ("warmup_steps", "kmeans_iters"):
            v = getattr(self, name)
            low = 0 if name == "warmup_steps" else 1
            require(isinstance(v, int) and not isinstance(v, bool) and v >= low,
                    f"pcl.{name} must be an int >= {low}, got {v!r}")
        require(self.concentration_alpha > 0, f"pcl.concentration_alpha must be > 0, got {self.concentration_alpha}")
        require(self.backend in BACKENDS, f"pcl.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


def proto_nce(query: torch.Tensor, prototypes: torch.Tensor, concentration: torch.Tensor,
              targets: torch.Tensor) -> torch.Tensor:
    """ProtoNCE of one granularity: mean over rows of −log softmax_j(q_i·c_j / φ_j)[targets_i].

    Args:
        query: (B, D) normalised query embeddings.
        prototypes: (k, D) normalised cluster centroids (no gradient).
        concentration: (k,) φ > 0 of each cluster.
        targets: (B,) long, the cluster of each row.
    """
    if query.dim() != 2 or prototypes.dim() != 2 or prototypes.shape[1] != query.shape[1]:
        raise ValueError(f"query (B, D) and prototypes (k, D) must share D, got {tuple(query.shape)} and "
                         f"{tuple(prototypes.shape)}")
    if concentration.shape != prototypes.shape[:1] or targets.shape != query.shape[:1]:
        raise ValueError("concentration must be (k,) and targets (B,)")
    logits = query.float() @ prototypes.detach().float().T / concentration.detach().float()
    return F.cross_entropy(logits, targets)


def concentration(distances: torch.Tensor, assignments: torch.Tensor, k: int, alpha: float,
                  temperature: float) -> torch.Tensor:
    """φ (k,) from each row's Euclidean distance (N,) to its centroid and its cluster (N,)."""
    counts = torch.bincount(assignments, minlength=k).to(distances.dtype)
    total = torch.zeros(k, dtype=distances.dtype, device=distances.device).index_add_(0, assignments, distances)
    phi = total / (counts * torch.log(counts + alpha)).clamp_min(1e-12)
    single = counts <= 1
    if bool((~single).any()):
        phi[single] = phi[~single].max()
    else:  # every cluster has one row: no spread to measure
        phi = torch.ones_like(phi)
    lo, hi = torch.quantile(phi, 0.1), torch.quantile(phi, 0.9)
    phi = phi.clamp(lo, hi)
    return temperature * phi / phi.mean()


class Prototypes(nn.Module):
    """Buffers of every granularity i: centroids_i (k_i, D), concentration_i (k_i,), assignments_i (N,);
    `ready` (0 until the first clustering). Saved in checkpoints, so a resumed run keeps them."""

    def __init__(self, num_clusters, num_samples: int, dim: int):
        super().__init__()
        self.num_clusters = [int(k) for k in num_clusters]
        for i, k in enumerate(self.num_clusters):
            self.register_buffer(f"centroids_{i}", torch.zeros(k, dim))
            self.register_buffer(f"concentration_{i}", torch.ones(k))
            self.register_buffer(f"assignments_{i}", torch.zeros(num_samples, dtype=torch.long))
        self.register_buffer("ready", torch.zeros((), dtype=torch.long))

    def level(self, i: int):
        return (getattr(self, f"centroids_{i}"), getattr(self, f"concentration_{i}"),
                getattr(self, f"assignments_{i}"))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, *, iters: int, seed: int, alpha: float, temperature: float,
            backend: str) -> None:
        """Cluster `features` (N, D) (normalised) at every granularity and store the results."""
        for i, k in enumerate(self.num_clusters):
            res = kmeans(features, k, iters=iters, seed=seed + i, backend=backend)
            centroids, phi, assign = self.level(i)
            centroids.copy_(F.normalize(res.centroids, dim=1))
            phi.copy_(concentration(res.distances.sqrt(), res.assignments, k, alpha, temperature))
            assign.copy_(res.assignments)
        self.ready.fill_(1)
        if distributed.is_distributed():
            for buf in self.buffers():
                dist.broadcast(buf, src=0)


class PCLObjective(MoCoObjective):
    """MoCo v2 + ProtoNCE over k-means prototypes of the momentum encoder's training-set features."""

    name = "pcl"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.pcl_cfg = cfg.pcl
        self._rows = None  # the training images, loaded at the first clustering
        self._num_samples = _training_rows_count(cfg)
        self.prototypes = Prototypes(cfg.pcl.num_clusters, self._num_samples, projection_dim(model))
        world = distributed.world_size() if distributed.is_distributed() else 1
        self.every = cfg.pcl.every_steps or max(1, self._num_samples // (cfg.train.batch_size * world))

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        n = _training_rows_count(cfg)
        too_many = [k for k in cfg.pcl.num_clusters if k > n]
        require(not too_many, f"pcl.num_clusters {too_many} exceed the {n} training samples of data.source "
                              f"{cfg.data.source!r}: every cluster count must be <= the dataset size")

    @torch.no_grad()
    def key_embeds(self, batch: dict) -> dict:
        return {**super().key_embeds(batch), "index": batch["index"]}

    def loss(self, emb: dict, keys: dict, scale):
        loss, logs = super().loss(emb, keys, scale)
        if not int(self.prototypes.ready):
            return loss, logs
        q = F.normalize(emb["q"], dim=1)
        terms = []
        for i in range(len(self.prototypes.num_clusters)):
            centroids, phi, assign = self.prototypes.level(i)
            terms.append(proto_nce(q, centroids, phi, assign[keys["index"].to(assign.device)]))
        proto = torch.stack(terms).mean()
        return loss + proto, {**logs, "proto_nce": float(proto.detach())}

    @torch.no_grad()
    def after_step(self, model, keys: dict, step: int) -> None:
        super().after_step(model, keys, step)
        done = step + 1  # optimizer steps completed
        if done >= self.pcl_cfg.warmup_steps and (done - self.pcl_cfg.warmup_steps) % self.every == 0:
            self.recluster()

    @torch.no_grad()
    def recluster(self) -> None:
        """Embed the training set with the momentum encoder and cluster it at every granularity."""
        from mmcl.eval.embed import embed_images

        encoder = self.key_encoder.module
        if self._rows is None:
            self._rows = _training_rows(self.cfg)
        features = embed_images(encoder, self._rows, image_column=self.cfg.data.image_column,
                                batch_size=self.cfg.eval.batch_size)
        device = self.prototypes.ready.device
        p = self.pcl_cfg
        self.prototypes.fit(features.to(device), iters=p.kmeans_iters, seed=self.cfg.seed,
                            alpha=p.concentration_alpha, temperature=self.loss_cfg.temperature, backend=p.backend)

    def state_modules(self) -> dict:
        return {**super().state_modules(), "prototypes": self.prototypes}


def _training_rows(cfg):
    """The training rows in the order of the batches' `index` (as mmcl.data.build_dataset reads them)."""
    from mmcl.data import load_source

    d = cfg.data
    ds = load_source(d.source, d.split, seed=cfg.seed, image_column=d.image_column)
    if d.max_samples is not None and d.max_samples < len(ds):
        ds = ds.select(range(d.max_samples))
    return ds.select_columns([d.image_column])


def _training_rows_count(cfg) -> int:
    return len(_training_rows(cfg))
