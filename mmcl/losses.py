"""Contrastive losses: CLIP's symmetric InfoNCE, InfoNCE with a MoCo queue, SimCLR's NT-Xent
and supervised contrastive (SupCon).

Every loss takes features as given (normalise them first for cosine similarities; the towers'
`encode_*` do by default) and returns a scalar tensor. Each has one plain-torch reference that
materialises the logits (`impl="naive"`); the large-negative paths (`"chunked"` in torch,
`"triton"` on GPUs) compute only row/column logsumexps of `scale * Q @ K.T` and the positive
logits, so nothing of size B×N is stored. `impl="auto"` picks Triton for CUDA tensors, the
chunked path when B·N is large, and the naive path otherwise.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcl import distributed
from mmcl.chunked import similarity_lse_chunked

IMPLS = ("auto", "naive", "chunked", "triton")
# Above this many logits "auto" stops materialising them on CPU (4096 x 4096 fp32 = 64 MiB).
AUTO_CHUNKED_MIN_LOGITS = 4096 * 4096

__all__ = ["clip_loss", "info_nce", "nt_xent", "supcon_loss", "LogitScale", "similarity_lse", "IMPLS"]


# --------------------------------------------------------------------------- validation


def _check_features(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    return x


def _check_pair(name_a: str, a, name_b: str, b, same_batch: bool = True) -> None:
    _check_features(name_a, a)
    _check_features(name_b, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same feature dim, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if same_batch and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size (row i of one is the positive of row i "
            f"of the other), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def _positive_scalar(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on `like`'s device; raises unless it is a finite number > 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point scalar, got dtype {value.dtype}")
        v = float(value.detach())
        tensor = value.reshape(()).to(like.device)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        tensor = torch.tensor(v, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    else:
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {v}")
    return tensor


# --------------------------------------------------------------------------- dispatch


def _triton_usable(device: torch.device) -> tuple[bool, str]:
    try:
        from mmcl import kernels
    except Exception as exc:  # triton missing or broken
        return False, f"mmcl.kernels could not be imported ({exc})"
    return kernels.is_available(device)


def resolve_impl(impl: str, device: torch.device, num_logits: int, dtype: torch.dtype | None = None) -> str:
    """The implementation a loss will use. Forcing an unusable one raises; "auto" falls back.

    The kernels compute in fp32 at most, so "auto" keeps float64 inputs on the torch paths.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        ok, why = _triton_usable(device)
        if not ok:
            raise ValueError(f'impl="triton" cannot run on {device} tensors: {why}')
        return impl
    if impl != "auto":
        return impl
    if device.type == "cuda" and dtype != torch.float64 and _triton_usable(device)[0]:
        return "triton"
    return "chunked" if num_logits >= AUTO_CHUNKED_MIN_LOGITS else "naive"


def similarity_lse(query, key, scale, *, mask_diagonal=False, columns=False, impl="chunked"):
    """Row (and, with `columns`, column) logsumexp of `scale * query @ key.T`.

    query (B, D), key (N, D), scale a 0-dim tensor → (B,) [and (N,)], fp32 or wider.
    `impl` is "chunked" or "triton"; both are differentiable in all three inputs.
    """
    if impl == "triton":
        from mmcl import kernels

        return kernels.similarity_lse(query, key, scale, mask_diagonal=mask_diagonal, columns=columns)
    if impl == "chunked":
        return similarity_lse_chunked(query, key, scale, mask_diagonal=mask_diagonal, columns=columns)
    raise ValueError(f'similarity_lse takes impl="chunked" or "triton", got {impl!r}')


def _row_dot(a: torch.Tensor, b: torch.Tensor, impl: str = "naive") -> torch.Tensor:
    if impl == "triton":  # fp32 accumulation without fp32 copies of the features (kernels/row_dot.py)
        from mmcl import kernels

        return kernels.row_dot(a, b)
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) * b.to(dtype)).sum(-1)


# --------------------------------------------------------------------------- CLIP


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    *,
    logit_bias=None,
    gather: bool = False,
    local_loss: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE.

    Mean of the image→text and text→image cross-entropies of
    `logits = logit_scale * image_features @ text_features.T (+ logit_bias)` with the pairs on
    the diagonal. `logit_scale` is the multiplier (1 / temperature), as in open_clip.

    Args:
        image_features: (B, D). text_features: (B, D); row i of each is a pair.
        logit_scale: float or 0-dim tensor > 0 (may require grad).
        logit_bias: optional scalar added to every logit. Softmax ignores a constant shift, so it
            changes neither the loss nor any gradient; accepted for SigLIP-style models.
        gather: in a torch.distributed run, gather the features of all ranks with gradients so
            every rank's rows are negatives for all; labels are offset by rank.
        local_loss: with `gather`, each rank computes only its own rows against all columns (in
            both directions) instead of the whole matrix; same gradients, less compute.
        impl: "auto" | "naive" | "chunked" | "triton".

    Returns:
        Scalar loss (fp32, or float64 for float64 inputs).
    """
    _check_pair("image_features", image_features, "text_features", text_features)
    scale = _positive_scalar("logit_scale", logit_scale, image_features)
    if logit_bias is not None and not isinstance(logit_bias, (numbers.Real, torch.Tensor)):
        raise TypeError(f"logit_bias must be a float or a 0-dim tensor, got {type(logit_bias).__name__}")
    images, texts = image_features, text_features
    offset = 0
    if gather and distributed.is_distributed():
        all_images, offset = distributed.gather_with_grad(images)
        all_texts, _ = distributed.gather_with_grad(texts)
        if not local_loss:
            images, texts, offset = all_images, all_texts, 0
    else:
        all_images, all_texts = images, texts
    B, N = images.shape[0], all_texts.shape[0]
    impl = resolve_impl(impl, images.device, B * N, images.dtype)
    labels = torch.arange(offset, offset + B, device=images.device)

    if impl == "naive":
        return _clip_loss_reference(images, texts, all_images, all_texts, scale, logit_bias, labels)

    positives = scale * _row_dot(images, texts, impl)
    if all_texts is texts:  # whole matrix: one pass gives both row and column logsumexps
        row_lse, col_lse = similarity_lse(images, texts, scale, columns=True, impl=impl)
        return 0.5 * ((row_lse - positives).mean() + (col_lse - positives).mean())
    row_lse = similarity_lse(images, all_texts, scale, impl=impl)
    col_lse = similarity_lse(texts, all_images, scale, impl=impl)
    return 0.5 * ((row_lse - positives).mean() + (col_lse - positives).mean())


def _clip_loss_reference(images, texts, all_images, all_texts, scale, logit_bias, labels):
    dtype = torch.promote_types(images.dtype, torch.float32)
    logits_per_image = scale * images.to(dtype) @ all_texts.to(dtype).T
    logits_per_text = scale * texts.to(dtype) @ all_images.to(dtype).T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


# --------------------------------------------------------------------------- InfoNCE / MoCo


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature, *, queue=None, impl: str = "auto"):
    """InfoNCE with in-batch negatives, or MoCo's queue of negatives.

    Without `queue`: logits `query @ key.T / temperature`, the positive of row i is key i.
    With `queue` (K, D) (MoCo v2): the positive logit of row i is `query_i · key_i / T`, the
    negatives are `query @ queue.T / T`, the label is 0. The queue gets no gradient.

    Args:
        query: (B, D). key: (B, D). temperature: float or 0-dim tensor > 0.
        queue: optional (K, D) tensor of past keys.
        impl: "auto" | "naive" | "chunked" | "triton".

    Returns:
        Scalar mean cross-entropy over the B rows.
    """
    _check_pair("query", query, "key", key)
    T = _positive_scalar("temperature", temperature, query)
    scale = 1.0 / T
    if queue is not None:
        _check_features("queue", queue)
        if queue.shape[1] != query.shape[1]:
            raise ValueError(
                f"queue must have the features' dim {query.shape[1]}, got queue of shape {tuple(queue.shape)}"
            )
        if queue.device != query.device:
            raise ValueError(f"queue is on {queue.device} but query is on {query.device}")
        queue = queue.detach()
    columns = queue if queue is not None else key
    impl = resolve_impl(impl, query.device, query.shape[0] * columns.shape[0], query.dtype)
    positives = scale * _row_dot(query, key, impl)

    if impl == "naive":
        dtype = positives.dtype
        if queue is None:
            logits = scale * query.to(dtype) @ key.to(dtype).T
            labels = torch.arange(query.shape[0], device=query.device)
        else:
            negatives = scale * query.to(dtype) @ queue.to(dtype).T
            logits = torch.cat([positives[:, None], negatives], dim=1)
            labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        return F.cross_entropy(logits, labels)

    lse = similarity_lse(query, columns, scale, impl=impl)
    if queue is not None:  # the positive is a column of its own, in front of the queue
        lse = torch.logaddexp(lse, positives)
    return (lse - positives).mean()


# --------------------------------------------------------------------------- SimCLR


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature, *, impl: str = "auto") -> torch.Tensor:
    """SimCLR's NT-Xent: 2N anchors, each view's partner is its positive and the other 2N−2
    views are negatives; mean over the 2N anchors.

    Args:
        z1, z2: (N, D) projections of the two views (normalise them for cosine similarity).
        temperature: float or 0-dim tensor > 0.
        impl: "auto" | "naive" | "chunked" | "triton".
    """
    _check_pair("z1", z1, "z2", z2)
    T = _positive_scalar("temperature", temperature, z1)
    scale = 1.0 / T
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    impl = resolve_impl(impl, z.device, n2 * n2, z.dtype)
    partner = torch.cat([z2, z1])
    positives = scale * _row_dot(z, partner, impl)
    if impl == "naive":
        logits = scale * z.to(positives.dtype) @ z.to(positives.dtype).T
        logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
        labels = torch.cat([torch.arange(n2 // 2, n2), torch.arange(0, n2 // 2)]).to(z.device)
        return F.cross_entropy(logits, labels)
    lse = similarity_lse(z, z, scale, mask_diagonal=True, impl=impl)
    return (lse - positives).mean()


# --------------------------------------------------------------------------- SupCon


def supcon_loss(features: torch.Tensor, labels=None, temperature=0.1, *, impl: str = "auto") -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out, all views as anchors).

    For anchor i with positives P(i) (other views of samples with the same label):
    `-1/|P(i)| Σ_p log(exp(z_i·z_p/T) / Σ_{a≠i} exp(z_i·z_a/T))`, averaged over anchors that have
    at least one positive. Without labels each sample is its own class (SimCLR's loss).

    Args:
        features: (B, V, D), V views per sample.
        labels: optional (B,) integer class labels.
        temperature: float or 0-dim tensor > 0.
        impl: "auto" | "naive" | "chunked" | "triton".
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError("features must be a floating-point torch.Tensor of shape (B, V, D)")
    if features.dim() != 3:
        raise ValueError(f"features must be 3-D (batch, views, dim), got shape {tuple(features.shape)}")
    B, V, D = features.shape
    if B == 0 or D == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")
    if labels is None:
        labels = torch.arange(B, device=features.device)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError("labels must be an integer torch.Tensor of shape (B,)")
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},) to match features {tuple(features.shape)}, got {tuple(labels.shape)}")
    T = _positive_scalar("temperature", temperature, features)
    scale = 1.0 / T
    z = features.transpose(0, 1).reshape(V * B, D)  # view-major, as the reference code
    anchor_labels = labels.to(features.device).repeat(V)
    same = anchor_labels[:, None] == anchor_labels[None, :]
    n_pos = same.sum(1) - 1  # minus the anchor itself
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        raise ValueError("supcon_loss needs at least one positive pair: use V >= 2 views or repeated labels")
    impl = resolve_impl(impl, z.device, (V * B) ** 2, z.dtype)
    dtype = torch.promote_types(z.dtype, torch.float32)
    if impl == "naive":
        logits = scale * z.to(dtype) @ z.to(dtype).T
        self_mask = torch.eye(V * B, dtype=torch.bool, device=z.device)
        log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
        pos_mask = same & ~self_mask
        mean_log_prob_pos = (log_prob * pos_mask).sum(1)[has_pos] / n_pos[has_pos]
        return -mean_log_prob_pos.mean()
    # Σ_p z_i·z_p = z_i · (sum of z over i's class − z_i): O(B·D), no pairwise matrix needed.
    _, inverse = torch.unique(anchor_labels, return_inverse=True)
    class_sums = torch.zeros(int(inverse.max()) + 1, D, dtype=dtype, device=z.device).index_add(0, inverse, z.to(dtype))
    pos_logit_sum = scale * _row_dot(z, class_sums[inverse] - z.to(dtype))
    lse = similarity_lse(z, z, scale, mask_diagonal=True, impl=impl)
    per_anchor = lse[has_pos] - pos_logit_sum[has_pos] / n_pos[has_pos]
    return per_anchor.mean()


# --------------------------------------------------------------------------- temperature


class LogitScale(nn.Module):
    """Learnable logit multiplier `exp(log_scale)`, CLIP-style.

    Starts at 1 / init_temperature (1 / 0.07 ≈ 14.3) and is clamped at `max_scale` (100, as
    CLIP does) in the forward pass. Log-parameterised so that it stays positive.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        if not max_scale > 0:
            raise ValueError(f"max_scale must be > 0, got {max_scale}")
        self.max_scale = float(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    @property
    def temperature(self) -> float:
        return 1.0 / float(self.forward().detach())

    def extra_repr(self) -> str:
        return f"scale={float(self.forward().detach()):.4f}, max_scale={self.max_scale}"
