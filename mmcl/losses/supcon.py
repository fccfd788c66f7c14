"""Supervised contrastive loss (SupCon), local or gathered."""
from __future__ import annotations

import torch

from mmcl import distributed
from mmcl.losses._common import _logits, _lse_function, _mean_over_ranks, _positive_scalar, _row_dot, resolve_impl


def _check_supcon_inputs(features, labels):
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError("features must be a floating-point torch.Tensor of shape (B, V, D)")
    if features.dim() != 3:
        raise ValueError(f"features must be 3-D (batch, views, dim), got shape {tuple(features.shape)}")
    B, V, D = features.shape
    if B == 0 or D == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError("labels must be an integer torch.Tensor of shape (B,)")
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},) to match features {tuple(features.shape)}, got {tuple(labels.shape)}")
    return labels.to(features.device)


def supcon_loss(features: torch.Tensor, labels=None, temperature=0.1, *, gather: bool = False,
                local_loss: bool = False, impl: str = "auto") -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out, all views as anchors).

    For anchor i with positives P(i) (other views of samples with the same label):
    `-1/|P(i)| Σ_p log(exp(z_i·z_p/T) / Σ_{a≠i} exp(z_i·z_a/T))`, averaged over anchors that have
    at least one positive. Without labels each sample is its own class (SimCLR's loss).

    Args:
        features: (B, V, D), V views per sample.
        labels: optional (B,) integer class labels.
        temperature: float or 0-dim tensor > 0.
        gather: in a torch.distributed run, the loss of the global batch (every rank's samples
            are negatives and, with equal labels, positives for all), as in `clip_loss`: each rank
            computes only its V·B anchors against all ranks' views. Without labels each rank's
            samples are their own classes.
        local_loss: with `gather`, return this rank's share instead of the global loss (as in
            `clip_loss`; the DDP-averaged gradients are the same).
        impl: "auto" | "naive" | "chunked" | "triton" (see `resolve_impl`).
    """
    labels = _check_supcon_inputs(features, labels)
    B, V, D = features.shape
    T = _positive_scalar("temperature", temperature, features)
    scale = 1.0 / T
    gathered = gather and distributed.is_distributed()
    z = features.transpose(0, 1).reshape(V * B, D)  # view-major, as the reference code
    all_z, offset = distributed.gather_with_grad(z) if gathered else (z, 0)
    if labels is None:  # one class per sample, numbered globally
        labels = torch.arange(B, device=z.device) + offset // V
    anchor_labels = labels.repeat(V)
    all_labels = distributed.gather_no_grad(anchor_labels) if gathered else anchor_labels
    _, inverse = torch.unique(all_labels, return_inverse=True)
    n_pos_all = torch.bincount(inverse)[inverse] - 1  # minus the anchor itself
    if not bool((n_pos_all > 0).any()):  # the same answer on every rank: all ranks see all labels
        raise ValueError("supcon_loss needs at least one positive pair: use V >= 2 views or repeated labels")
    own = slice(offset, offset + V * B)
    n_pos = n_pos_all[own]
    has_pos = n_pos > 0
    impl = resolve_impl(impl, z.device, V * B * all_z.shape[0], z.dtype)
    dtype = torch.promote_types(z.dtype, torch.float32)
    if impl == "naive" and not gathered:
        return _supcon_reference(z, anchor_labels, scale, n_pos, has_pos)
    # Σ_p z_i·z_p = z_i · (sum of z over i's class − z_i): O(B·D), no pairwise matrix needed.
    class_sums = torch.zeros(int(inverse.max()) + 1, D, dtype=dtype, device=z.device).index_add(0, inverse, all_z.to(dtype))
    pos_logit_sum = scale * _row_dot(z, class_sums[inverse[own]] - z.to(dtype))
    exclude = torch.arange(offset, offset + V * B, device=z.device) if gathered else None
    lse, _ = _lse_function(impl)(z, all_z, scale, exclude=exclude, mask_diagonal=not gathered)
    per_anchor = lse[has_pos] - pos_logit_sum[has_pos] / n_pos[has_pos]
    return _mean_over_ranks(per_anchor.sum(), int((n_pos_all > 0).sum()), gathered, local_loss)


def _supcon_reference(z, anchor_labels, scale, n_pos, has_pos):
    logits = _logits(z, z, scale)
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
    pos_mask = (anchor_labels[:, None] == anchor_labels[None, :]) & ~self_mask
    mean_log_prob_pos = (log_prob * pos_mask).sum(1)[has_pos] / n_pos[has_pos]
    return -mean_log_prob_pos.mean()
