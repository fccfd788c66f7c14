"""k-means for prototype methods (ProtoNCE): seeded Lloyd iterations in torch, or faiss when installed.

    result = kmeans(features, num_clusters=10, seed=0)        # (N, D) -> KMeansResult
    result.centroids (k, D), result.assignments (N,), result.distances (N,), result.inertia

Lloyd's algorithm from `init` (default: k distinct rows drawn with `seed`): assign each row to its
nearest centroid (squared Euclidean distance), move each centroid to the mean of its rows, until the
assignments stop changing or `iters` is reached. A cluster left empty is re-seeded with the row
farthest from its centroid, so every cluster keeps at least one row. The torch path runs on the
features' device in float32 (float64 stays float64), in row blocks so memory stays O(block · k).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

__all__ = ["KMeansResult", "kmeans", "faiss_available", "BACKENDS"]

BACKENDS = ("auto", "torch", "faiss")
_BLOCK = 8192  # rows per distance block


@dataclass
class KMeansResult:
    """centroids (k, D); assignments (N,) long; distances (N,) squared distance of each row to its
    centroid; inertia = distances.sum(); iterations run."""

    centroids: torch.Tensor
    assignments: torch.Tensor
    distances: torch.Tensor
    inertia: float
    iterations: int


def faiss_available() -> bool:
    """Whether faiss (faiss-cpu or faiss-gpu) is importable."""
    return importlib.util.find_spec("faiss") is not None


def _check_args(x, num_clusters, iters, init) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"features must be a float tensor (N, D), got {shape}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be an int >= 1, got {num_clusters!r}")
    if num_clusters > x.shape[0]:
        raise ValueError(f"num_clusters ({num_clusters}) must be <= the number of rows ({x.shape[0]})")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not torch.isfinite(x).all():
        raise ValueError("features hold NaN or inf")
    if init is not None:
        if not isinstance(init, torch.Tensor) or tuple(init.shape) != (num_clusters, x.shape[1]):
            got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
            raise ValueError(f"init must be a tensor ({num_clusters}, {x.shape[1]}), got {got}")
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid of each row and the squared distance to it."""
    c_sq = (centroids * centroids).sum(1)
    idx, dist = [], []
    for start in range(0, x.shape[0], _BLOCK):
        xb = x[start:start + _BLOCK]
        d = (xb * xb).sum(1, keepdim=True) - 2.0 * xb @ centroids.T + c_sq
        best, arg = d.min(1)
        idx.append(arg)
        dist.append(best.clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def _update(x: torch.Tensor, assign: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster means; an empty cluster takes the row farthest from its own centroid."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=k)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        order = torch.argsort(dist, descending=True)
        donors = order[: empty.numel()]
        sums[empty] = x[donors]
        counts = counts.clone()
        counts[empty] = 1
    return sums / counts[:, None].to(x.dtype)


def _kmeans_torch(x, k, iters, init) -> KMeansResult:
    centroids = init.to(x.device, x.dtype).clone()
    assign, dist = _nearest(x, centroids)
    done = 0
    for done in range(1, iters + 1):
        centroids = _update(x, assign, dist, k)
        new_assign, dist = _nearest(x, centroids)
        changed = bool((new_assign != assign).any())
        assign = new_assign
        if not changed:
            break
    return KMeansResult(centroids, assign, dist, float(dist.sum()), done)


def _kmeans_faiss(x, k, iters, init, seed) -> KMeansResult:
    import faiss
    import numpy as np

    data = np.ascontiguousarray(x.detach().cpu().float().numpy())
    km = faiss.Kmeans(data.shape[1], k, niter=iters, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max(256, data.shape[0] // k + 1))
    km.train(data, init_centroids=np.ascontiguousarray(init.cpu().float().numpy()))
    dist, idx = km.index.search(data, 1)
    centroids = torch.from_numpy(km.centroids).to(x.device, x.dtype)
    assign = torch.from_numpy(idx[:, 0]).long().to(x.device)
    dist = torch.from_numpy(dist[:, 0]).to(x.device, x.dtype).clamp_min(0)
    return KMeansResult(centroids, assign, dist, float(dist.sum()), iters)


def kmeans(features: torch.Tensor, num_clusters: int, *, iters: int = 20, seed: int = 0,
           init: torch.Tensor | None = None, backend: str = "auto") -> KMeansResult:
    """k-means of the rows of `features` (N, D) into `num_clusters` clusters.

    Args:
        features: (N, D) float tensor, no gradient needed (the result is detached).
        num_clusters: k, 1 <= k <= N.
        iters: at most this many Lloyd iterations (torch stops early once assignments are stable).
        seed: draws the initial centroids (k distinct rows) when `init` is None.
        init: optional (k, D) initial centroids.
        backend: "torch", "faiss" (raises when faiss is not installed) or "auto" (faiss when
            installed, else torch).

    Returns:
        KMeansResult with centroids (k, D), assignments (N,), distances (N,), inertia.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    x = _check_args(features, num_clusters, iters, init).detach()
    if init is None:
        gen = torch.Generator().manual_seed(int(seed))
        rows = torch.randperm(x.shape[0], generator=gen)[:num_clusters].to(x.device)
        init = x[rows]
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    if use_faiss:
        if not faiss_available():
            raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu)")
        return _kmeans_faiss(x, num_clusters, iters, init, int(seed))
    return _kmeans_torch(x, num_clusters, iters, init)
