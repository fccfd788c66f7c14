"""SigLIP's pairwise sigmoid loss: naive, chunked and Triton paths, local or gathered."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl import distributed, kernels
from mmcl.chunked import sigmoid_pair_loss_chunked
from mmcl.losses._common import _check_pair, _finite_scalar, _logits, _mean_over_ranks, _positive_scalar, resolve_impl


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    gather: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023).

    `L = −(1/B) Σ_i Σ_j log σ(z_ij · (t · x_i·y_j + b))` with t = `logit_scale`, b = `logit_bias`,
    z_ij = +1 when text j is image i's pair and −1 otherwise, B the number of images (of the
    global batch under `gather`), as in the paper, open_clip and transformers' SiglipModel.

    Args:
        image_features: (B, D). text_features: (B, D); row i of each is a pair.
        logit_scale: the multiplier t, a float or 0-dim tensor > 0 (may require grad; SigLIP
            learns log t). logit_bias: b, a finite float or 0-dim tensor (may require grad).
        gather: in a torch.distributed run, the loss of the global batch (ranks may hold
            different B): each rank computes its B images against all ranks' texts, the
            positive of its image i at the text's global index; the texts' gradients are
            reduce-scattered to their owners. The value is the global loss on every rank; the
            DDP-averaged gradients are its gradients.
        impl: "auto" | "naive" | "chunked" | "triton" (see `resolve_impl`). "chunked" and
            "triton" never hold the (B, N) logits, in forward or backward.

    Returns:
        Scalar loss (fp32, or float64 for float64 inputs).
    """
    _check_pair("image_features", image_features, "text_features", text_features)
    scale = _positive_scalar("logit_scale", logit_scale, image_features)
    bias = _finite_scalar("logit_bias", logit_bias, image_features)
    gathered = gather and distributed.is_distributed()
    all_texts, offset = distributed.gather_with_grad(text_features) if gathered else (text_features, 0)
    B, N = image_features.shape[0], all_texts.shape[0]
    impl = resolve_impl(impl, image_features.device, B * N, image_features.dtype)
    positive = torch.arange(offset, offset + B, device=image_features.device)
    if impl == "naive":
        rank_sum = _siglip_sum_reference(image_features, all_texts, scale, bias, positive)
    elif impl == "chunked":
        rank_sum = sigmoid_pair_loss_chunked(image_features, all_texts, scale, bias, positive)
    else:
        rank_sum = kernels.sigmoid_pair_loss(image_features, all_texts, scale, bias, positive)
    return _mean_over_ranks(rank_sum, N, gathered, local_loss=False)


def _siglip_sum_reference(images, texts, scale, bias, positive):
    """Σ_ij −log σ(z_ij·S_ij) from the materialised (B, N) logits S (fp32 or wider)."""
    logits = _logits(images, texts, scale) + bias
    signs = torch.full_like(logits, -1.0)
    signs[torch.arange(images.shape[0], device=images.device), positive] = 1.0
    return -F.logsigmoid(signs * logits).sum()
