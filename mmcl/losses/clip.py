"""CLIP's symmetric InfoNCE, with HCL / DCL negatives and i-Mix targets, local or gathered."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from mmcl import distributed
from mmcl.losses import options
from mmcl.losses._common import (_check_pair, _lse_function, _logits, _mean_over_ranks, _positive_scalar, _row_dot,
                                 resolve_impl)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    *,
    logit_bias=None,
    gather: bool = False,
    local_loss: bool = False,
    hard_negative_beta: float = 0.0,
    debias_tau_plus: float = 0.0,
    mix_partner: torch.Tensor | None = None,
    mix_lambda: torch.Tensor | None = None,
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
        gather: in a torch.distributed run, every rank's pairs are negatives for all (the loss
            of the global batch, ranks may hold different B). Each rank computes only its B
            image rows against all ranks' texts (only the text features are gathered); the
            text→image logsumexps are merged across ranks from per-rank partials (O(B_global)
            floats), and the texts' gradients are reduce-scattered to their owners.
        local_loss: with `gather`, return this rank's share of the loss (world_size / B_global
            times the sum over its pairs; with equal shards the mean over its pairs) instead of
            the global loss. The work and the DDP-averaged gradients are the same either way:
            those of the global loss.
        hard_negative_beta: β ≥ 0, HCL's reweighting of each direction's negatives (the other
            pairs' texts for an image, the other images for a text) by e^{β·logit}, normalised to
            mean 1 (see `mmcl.losses.options`). 0: none.
        debias_tau_plus: τ⁺ in [0, 1), DCL's positive-class prior; the negatives' term becomes
            max((R − τ⁺·n·e^{pos}) / (1 − τ⁺), n·e^{−logit_scale}), n = B_global − 1. With both
            options 0 (the default) the loss is the plain one, computed as without them.
        mix_partner, mix_lambda: (B,) int64 and (B,) float, for images mixed within this rank's
            batch (image i keeps the fraction λ_i of its own and takes the rest from image
            mix_partner[i], a local index): i-Mix's soft labels Y (λ_i on text i, 1 − λ_i on
            text mix_partner[i]). Image→text is the soft-label cross-entropy of each image row;
            text→image applies the same Y transposed, Σ_ij Y_ij (col_lse_j − logit_ij). λ = 1 is
            the plain loss. Not together with the hard-negative options.
        impl: "auto" | "naive" | "chunked" | "triton" (see `resolve_impl`).

    Returns:
        Scalar loss (fp32, or float64 for float64 inputs).
    """
    _check_pair("image_features", image_features, "text_features", text_features)
    scale = _positive_scalar("logit_scale", logit_scale, image_features)
    if logit_bias is not None and not isinstance(logit_bias, (numbers.Real, torch.Tensor)):
        raise TypeError(f"logit_bias must be a float or a 0-dim tensor, got {type(logit_bias).__name__}")
    hard = options.check_hard_negatives(hard_negative_beta, debias_tau_plus)
    mix = options.check_mix(mix_partner, mix_lambda, image_features.shape[0], image_features, hard,
                            "image_features")
    images, texts = image_features, text_features
    gathered = gather and distributed.is_distributed()
    all_texts, offset = distributed.gather_with_grad(texts) if gathered else (texts, 0)
    B, N = images.shape[0], all_texts.shape[0]
    impl = resolve_impl(impl, images.device, B * N, images.dtype)
    if hard is None and mix is None and impl == "naive" and not gathered:
        return _clip_loss_reference(images, texts, scale, logit_bias)
    if hard is not None:
        sums = _clip_hard_sums(images, texts, all_texts, offset, scale, hard, impl, gathered)
    elif mix is not None:
        sums = _clip_mixed_sums(images, texts, all_texts, offset, scale, mix, impl, gathered)
    else:
        sums = _clip_plain_sums(images, texts, all_texts, offset, scale, impl, gathered)
    return _mean_over_ranks(0.5 * sums, N, gathered, local_loss)


def _clip_plain_sums(images, texts, all_texts, offset, scale, impl, gathered):
    """Σ over this rank's pairs of both directions' cross-entropies, from row/column logsumexps."""
    B = images.shape[0]
    positives = scale * _row_dot(images, texts, impl)
    row_lse, col_lse = _lse_function(impl)(images, all_texts, scale, columns=True)
    if gathered:  # this rank's column partials (over its rows) → every image's, then our texts'
        col_lse = distributed.all_reduce_logsumexp(col_lse)[offset : offset + B]
    return (row_lse - positives).sum() + (col_lse - positives).sum()


def _clip_loss_reference(images, texts, scale, logit_bias):
    logits_per_image = _logits(images, texts, scale)
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
    labels = torch.arange(images.shape[0], device=images.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels))


def _clip_hard_sums(images, texts, all_texts, offset, scale, hard, impl, gathered):
    """Σ over this rank's pairs of both directions' losses with the hard-negative estimator; a
    pair's negatives are the other texts (for its image) and the other images (for its text)."""
    B, N = images.shape[0], all_texts.shape[0]
    options.check_negatives(N - 1, f"the global batch has {N} pair(s)")
    positives = scale * _row_dot(images, texts, impl)
    if impl == "naive" and not gathered:
        logits = _logits(images, texts, scale)
        negatives = ~torch.eye(B, dtype=torch.bool, device=images.device)
        log_r = [options.log_reweighted_from_logits(x, negatives, hard.beta) for x in (logits, logits.T)]
    else:
        exclude = torch.arange(offset, offset + B, device=images.device)
        stats = options.negative_logsumexps(_lse_function(impl), images, [(all_texts, exclude)], scale,
                                            hard.beta, columns=True)
        if gathered:  # this rank's column partials → every image's, then our texts'
            stats = [(r, distributed.all_reduce_logsumexp(c)[offset : offset + B]) for r, c in stats]
        row_stats, col_stats = zip(*stats)  # each: the logsumexps at (1+β)/τ [and β/τ]
        log_r = [options.log_reweighted(s[0], s[1] if len(s) > 1 else None, N - 1)
                 for s in (row_stats, col_stats)]
    return sum(options.hard_negative_rows(positives, r, N - 1, hard.tau_plus, scale).sum() for r in log_r)


def _clip_mixed_sums(images, texts, all_texts, offset, scale, mix, impl, gathered):
    """Σ_ij Y_ij (row_lse_i + col_lse_j − 2·logit_ij) over this rank's images i, Y the i-Mix labels."""
    B = images.shape[0]
    if impl == "naive" and not gathered:
        logits = _logits(images, texts, scale)
        y = options.mix_target_matrix(torch.arange(B, device=images.device), mix.partner, mix.lam, B)
        return options.soft_cross_entropy(logits, y).sum() + options.soft_cross_entropy(logits.T, y.T).sum()
    row_lse, col_lse = _lse_function(impl)(images, all_texts, scale, columns=True)
    if gathered:
        col_lse = distributed.all_reduce_logsumexp(col_lse)[offset : offset + B]
    targets = options.mixed_target_logits(scale * _row_dot(images, texts, impl),
                                          scale * _row_dot(images, texts[mix.partner], impl), mix.lam)
    # Text j's weight Σ_i Y_ij: λ_j from its own image, 1 − λ_i from each image i mixed with it.
    text_weights = mix.lam.index_add(0, mix.partner, 1.0 - mix.lam)
    return row_lse.sum() + (text_weights * col_lse).sum() - 2.0 * targets.sum()
