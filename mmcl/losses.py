"""Contrastive losses: CLIP's symmetric InfoNCE, SigLIP's pairwise sigmoid loss, InfoNCE with a
MoCo queue, SimCLR's NT-Xent and supervised contrastive (SupCon).

Every loss takes features as given (normalise them first for cosine similarities; the towers'
`encode_*` do by default) and returns a scalar tensor. Each has one plain-torch reference that
materialises the logits (`impl="naive"`); the large-negative paths (`"chunked"` in torch,
`"triton"` on GPUs) compute only row/column logsumexps of `scale * Q @ K.T` and the positive
logits, so nothing of size B×N is stored. `impl="auto"` follows `resolve_impl`.

With `gather=True` (clip_loss, siglip_loss, nt_xent, supcon_loss) a loss is that of the global batch, but each
rank computes only its own rows against all ranks' columns: B_local × B_global logits per rank
(4 passes over them, with or without local_loss). Besides the gathered column features, only
O(B_global) column statistics and those features' gradients (reduce-scattered to their owners)
cross ranks.

info_nce, nt_xent and clip_loss also take `hard_negative_beta` / `debias_tau_plus` (HCL's
reweighted, DCL's debiased negatives) and `mix_partner` / `mix_lambda` (i-Mix's soft targets);
their per-row terms live in `mmcl.loss_options`, on every path and under gather.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcl import distributed, kernels, loss_options
from mmcl.chunked import sigmoid_pair_loss_chunked, similarity_lse_chunked

IMPLS = ("auto", "naive", "chunked", "triton")
# Above this many logits "auto" stops materialising them on CPU (4096 x 4096 fp32 = 64 MiB).
AUTO_CHUNKED_MIN_LOGITS = 4096 * 4096
# On CUDA "auto" materialises fp32 logits up to this size (16,384 x 16,384), Triton above it.
AUTO_NAIVE_MAX_LOGIT_BYTES = 1 << 30

__all__ = ["clip_loss", "siglip_loss", "info_nce", "nt_xent", "supcon_loss", "LogitScale", "resolve_impl", "IMPLS"]


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


def _finite_scalar(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on `like`'s device; raises unless it is one finite number."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point scalar, got dtype {value.dtype}")
        v, tensor = float(value.detach()), value.reshape(()).to(like.device)
    else:
        v = float(value)
        tensor = torch.tensor(v, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return tensor


# --------------------------------------------------------------------------- dispatch


def resolve_impl(impl: str, device: torch.device, num_logits: int, dtype: torch.dtype | None = None) -> str:
    """The implementation a loss will use for `num_logits` = B·N logits on `device`.

    "auto" on CUDA: "naive" while the fp32 logits fit the budget (B·N·4 bytes ≤
    AUTO_NAIVE_MAX_LOGIT_BYTES = 1 GiB, e.g. B = N = 16,384, or the MoCo queue shape 256 × 65,536):
    one cuBLAS product (in the inputs' dtype for 16-bit inputs) plus torch's fp32 softmax is
    fastest there and the memory is affordable. Above it, "triton" (memory O((B + N)·D)).
    Float64 stays on the torch paths (the kernels compute in fp32). On CPU, and on CUDA when
    `mmcl.kernels.is_available` says no (with a warning above the budget): "chunked" from
    AUTO_CHUNKED_MIN_LOGITS = 4096² logits on, "naive" below. Forcing an implementation that
    cannot run raises ValueError; nothing else falls back.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        ok, why = kernels.is_available(device)
        if not ok:
            raise ValueError(f'impl="triton" cannot run on {device} tensors: {why}')
        return impl
    if impl != "auto":
        return impl
    if device.type == "cuda" and dtype != torch.float64:
        if num_logits * 4 <= AUTO_NAIVE_MAX_LOGIT_BYTES:
            return "naive"
        ok, why = kernels.is_available(device)
        if ok:
            return "triton"
        warnings.warn(f'impl="auto": the Triton kernels cannot run ({why}); using "chunked"', stacklevel=3)
    return "chunked" if num_logits >= AUTO_CHUNKED_MIN_LOGITS else "naive"


def _similarity_lse_naive(query, key, scale, *, exclude=None, mask_diagonal=False, columns=False):
    """The contract of `mmcl.kernels.similarity_lse` from materialised (B, N) logits."""
    logits = _logits(query, key, scale)
    if mask_diagonal:
        exclude = torch.arange(query.shape[0], device=query.device)
    if exclude is not None:
        columns_idx = torch.arange(key.shape[0], device=query.device)
        logits = logits.masked_fill(exclude[:, None] == columns_idx[None, :], float("-inf"))
    return logits.logsumexp(1), (logits.logsumexp(0) if columns else None)


def _lse_function(impl: str):
    """The per-device row/column logsumexp of `impl`, all with the contract of
    `mmcl.kernels.similarity_lse`: (query (B, D), key (N, D), scale, *, exclude=None,
    mask_diagonal=False, columns=False) -> (row_lse (B,), col_lse (N,) | None)."""
    if impl == "triton":
        return kernels.similarity_lse
    if impl == "chunked":
        return similarity_lse_chunked
    if impl == "naive":
        return _similarity_lse_naive
    raise ValueError(f'impl must be "naive", "chunked" or "triton" here, got {impl!r}')


def _row_dot(a: torch.Tensor, b: torch.Tensor, impl: str = "naive") -> torch.Tensor:
    if impl == "triton":  # fp32 accumulation without fp32 copies of the features
        return kernels.row_dot(a, b)
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) * b.to(dtype)).sum(-1)


def _logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Materialised `scale * a @ b.T`, fp32 or wider. 16-bit inputs multiply in their own dtype
    (tensor cores, as under torch autocast) and only the products are widened for the softmax."""
    if a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16):
        return (a @ b.T).float() * scale
    dtype = torch.promote_types(a.dtype, torch.float32)
    return scale * a.to(dtype) @ b.to(dtype).T


def _mean_over_ranks(rank_sum: torch.Tensor, count: int, gathered: bool, local_loss: bool) -> torch.Tensor:
    """A loss from this rank's share `rank_sum` of a sum over `count` terms of all ranks.

    Either way backward seeds rank_sum with world_size / count, so the DDP-averaged gradients
    are those of the global mean. `local_loss` only changes the value returned: this rank's
    share scaled to a mean (world_size · rank_sum / count; the ranks' values average to the
    global mean) instead of the global mean itself (one all-reduce of a scalar).
    """
    if not gathered:
        return rank_sum / count
    if local_loss:
        return rank_sum * (distributed.world_size() / count)
    return distributed.all_reduce_sum_with_grad(rank_sum) / count


# --------------------------------------------------------------------------- CLIP


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
            mean 1 (see `mmcl.loss_options`). 0: none.
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
    hard = loss_options.check_hard_negatives(hard_negative_beta, debias_tau_plus)
    mix = loss_options.check_mix(mix_partner, mix_lambda, image_features.shape[0], image_features, hard,
                                 "image_features")
    images, texts = image_features, text_features
    gathered = gather and distributed.is_distributed()
    all_texts, offset = distributed.gather_with_grad(texts) if gathered else (texts, 0)
    B, N = images.shape[0], all_texts.shape[0]
    impl = resolve_impl(impl, images.device, B * N, images.dtype)
    if hard is not None:
        sums = _clip_hard_sums(images, texts, all_texts, offset, scale, hard, impl, gathered)
        return _mean_over_ranks(0.5 * sums, N, gathered, local_loss)
    if mix is not None:
        sums = _clip_mixed_sums(images, texts, all_texts, offset, scale, mix, impl, gathered)
        return _mean_over_ranks(0.5 * sums, N, gathered, local_loss)
    if impl == "naive" and not gathered:
        return _clip_loss_reference(images, texts, scale, logit_bias)

    positives = scale * _row_dot(images, texts, impl)
    row_lse, col_lse = _lse_function(impl)(images, all_texts, scale, columns=True)
    if gathered:  # this rank's column partials (over its rows) → every image's, then our texts'
        col_lse = distributed.all_reduce_logsumexp(col_lse)[offset : offset + B]
    return _mean_over_ranks(0.5 * ((row_lse - positives).sum() + (col_lse - positives).sum()), N, gathered, local_loss)


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
    loss_options.check_negatives(N - 1, f"the global batch has {N} pair(s)")
    positives = scale * _row_dot(images, texts, impl)
    if impl == "naive" and not gathered:
        logits = _logits(images, texts, scale)
        negatives = ~torch.eye(B, dtype=torch.bool, device=images.device)
        log_r = [loss_options.log_reweighted_from_logits(x, negatives, hard.beta) for x in (logits, logits.T)]
    else:
        exclude = torch.arange(offset, offset + B, device=images.device)
        stats = loss_options.negative_logsumexps(_lse_function(impl), images, [(all_texts, exclude)], scale,
                                                 hard.beta, columns=True)
        if gathered:  # this rank's column partials → every image's, then our texts'
            stats = [(r, distributed.all_reduce_logsumexp(c)[offset : offset + B]) for r, c in stats]
        row_stats, col_stats = zip(*stats)  # each: the logsumexps at (1+β)/τ [and β/τ]
        log_r = [loss_options.log_reweighted(s[0], s[1] if len(s) > 1 else None, N - 1)
                 for s in (row_stats, col_stats)]
    return sum(loss_options.hard_negative_rows(positives, r, N - 1, hard.tau_plus, scale).sum() for r in log_r)


def _clip_mixed_sums(images, texts, all_texts, offset, scale, mix, impl, gathered):
    """Σ_ij Y_ij (row_lse_i + col_lse_j − 2·logit_ij) over this rank's images i, Y the i-Mix labels."""
    B = images.shape[0]
    if impl == "naive" and not gathered:
        logits = _logits(images, texts, scale)
        y = loss_options.mix_target_matrix(torch.arange(B, device=images.device), mix.partner, mix.lam, B)
        return loss_options.soft_cross_entropy(logits, y).sum() + loss_options.soft_cross_entropy(logits.T, y.T).sum()
    row_lse, col_lse = _lse_function(impl)(images, all_texts, scale, columns=True)
    if gathered:
        col_lse = distributed.all_reduce_logsumexp(col_lse)[offset : offset + B]
    targets = loss_options.mixed_target_logits(scale * _row_dot(images, texts, impl),
                                               scale * _row_dot(images, texts[mix.partner], impl), mix.lam)
    # Text j's weight Σ_i Y_ij: λ_j from its own image, 1 − λ_i from each image i mixed with it.
    text_weights = mix.lam.index_add(0, mix.partner, 1.0 - mix.lam)
    return row_lse.sum() + (text_weights * col_lse).sum() - 2.0 * targets.sum()


# --------------------------------------------------------------------------- SigLIP


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


# --------------------------------------------------------------------------- InfoNCE / MoCo


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature, *, queue=None, hard_negative_beta: float = 0.0,
             debias_tau_plus: float = 0.0, mix_partner=None, mix_lambda=None, impl: str = "auto"):
    """InfoNCE with in-batch negatives, or MoCo's queue of negatives.

    Without `queue`: logits `query @ key.T / temperature`, the positive of row i is key i.
    With `queue` (K, D) (MoCo v2): the positive logit of row i is `query_i · key_i / T`, the
    negatives are `query @ queue.T / T`, the label is 0. The queue gets no gradient and is used
    in the queries' dtype (a 16-bit query casts an fp32 queue, so the kernels run on tensor cores).

    Args:
        query: (B, D). key: (B, D). temperature: float or 0-dim tensor > 0.
        queue: optional (K, D) tensor of past keys.
        hard_negative_beta: β ≥ 0, HCL's reweighting of each row's negatives (the other keys, or
            the queue) by e^{β·logit}, normalised to mean 1 (see `mmcl.loss_options`). 0: none.
        debias_tau_plus: τ⁺ in [0, 1), DCL's positive-class prior: the negatives' term becomes
            max((R − τ⁺·n·e^{pos}) / (1 − τ⁺), n·e^{−1/T}), n = B − 1 (or K). With both options 0
            (the default) the loss is the plain one, computed as without them.
        mix_partner, mix_lambda: (B,) int64 and (B,) float: query i mixes sample i (fraction λ_i)
            with sample mix_partner[i]; i-Mix's soft label puts λ_i on key i and 1 − λ_i on key
            mix_partner[i]. With a queue the columns are the batch's keys followed by the queue
            (i-Mix's MoCo form: the partner's key must be a column), so λ = 1 is the
            cross-entropy of `query @ cat([key, queue]).T / T` with label i; without a queue
            λ = 1 is the plain loss. Not together with the hard-negative options.
        impl: "auto" | "naive" | "chunked" | "triton" (see `resolve_impl`).

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
        queue = queue.detach().to(query.dtype)
    hard = loss_options.check_hard_negatives(hard_negative_beta, debias_tau_plus)
    mix = loss_options.check_mix(mix_partner, mix_lambda, query.shape[0], query, hard, "query")
    columns = queue if queue is not None else key
    if mix is not None and queue is not None:
        columns = torch.cat([key, queue])
    impl = resolve_impl(impl, query.device, query.shape[0] * columns.shape[0], query.dtype)
    positives = scale * _row_dot(query, key, impl)
    if hard is not None:
        return _info_nce_hard_rows(query, key, queue, positives, scale, hard, impl).mean()
    if mix is not None:
        return _info_nce_mixed_rows(query, key, columns, positives, scale, mix, impl).mean()

    if impl == "naive":
        if queue is None:
            logits = _logits(query, key, scale)
            labels = torch.arange(query.shape[0], device=query.device)
        else:
            negatives = _logits(query, queue, scale)
            logits = torch.cat([positives[:, None].to(negatives.dtype), negatives], dim=1)
            labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        return F.cross_entropy(logits, labels)

    lse, _ = _lse_function(impl)(query, columns, scale)
    if queue is not None:  # the positive is a column of its own, in front of the queue
        lse = torch.logaddexp(lse, positives)
    return (lse - positives).mean()


def _info_nce_hard_rows(query, key, queue, positives, scale, hard, impl):
    """(B,) per-row losses with the hard-negative estimator over the other keys or the queue."""
    negatives = queue if queue is not None else key
    n = negatives.shape[0] - (queue is None)
    loss_options.check_negatives(n, "the batch has a single row and no queue")
    if impl == "naive":
        mask = torch.ones(query.shape[0], negatives.shape[0], dtype=torch.bool, device=query.device)
        if queue is None:
            mask.fill_diagonal_(False)
        log_r = loss_options.log_reweighted_from_logits(_logits(query, negatives, scale), mask, hard.beta)
    else:
        exclude = None if queue is not None else torch.arange(query.shape[0], device=query.device)
        stats = loss_options.negative_logsumexps(_lse_function(impl), query, [(negatives, exclude)], scale, hard.beta)
        log_r = loss_options.log_reweighted(stats[0][0], stats[1][0] if len(stats) > 1 else None, n)
    return loss_options.hard_negative_rows(positives, log_r, n, hard.tau_plus, scale)


def _info_nce_mixed_rows(query, key, columns, positives, scale, mix, impl):
    """(B,) per-row soft-label cross-entropies; the batch's keys are columns 0..B-1 of `columns`."""
    B = query.shape[0]
    if impl == "naive":
        y = loss_options.mix_target_matrix(torch.arange(B, device=query.device), mix.partner, mix.lam,
                                           columns.shape[0])
        return loss_options.soft_cross_entropy(_logits(query, columns, scale), y)
    lse, _ = _lse_function(impl)(query, columns, scale)
    partner_positives = scale * _row_dot(query, key[mix.partner], impl)
    return lse - loss_options.mixed_target_logits(positives, partner_positives, mix.lam)


# --------------------------------------------------------------------------- SimCLR


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature, *, gather: bool = False, local_loss: bool = False,
            hard_negative_beta: float = 0.0, debias_tau_plus: float = 0.0, mix_partner=None, mix_lambda=None,
            impl: str = "auto") -> torch.Tensor:
    """SimCLR's NT-Xent: 2N anchors, each view's partner is its positive and the other 2N−2
    views are negatives; mean over the 2N anchors.

    Args:
        z1, z2: (N, D) projections of the two views (normalise them for cosine similarity).
        temperature: float or 0-dim tensor > 0.
        gather: in a torch.distributed run, the loss of the global batch (both views of every
            rank's samples, 2·N_global anchors, ranks may hold different N), as in `clip_loss`:
            each rank computes only its 2N anchors against all ranks' views, leaving out each
            anchor's own column; the views' gradients are reduce-scattered to their owners.
        local_loss: with `gather`, return this rank's share instead of the global loss (as in
            `clip_loss`; the DDP-averaged gradients are the same).
        hard_negative_beta: β ≥ 0, HCL's reweighting of each anchor's 2N−2 negatives (neither
            itself nor its positive) by e^{β·logit}, normalised to mean 1 (see
            `mmcl.loss_options`). 0: none.
        debias_tau_plus: τ⁺ in [0, 1), DCL's positive-class prior: the negatives' term becomes
            max((R − τ⁺·n·e^{pos}) / (1 − τ⁺), n·e^{−1/T}), n = 2·N_global − 2. With both options 0
            (the default) the loss is the plain one, computed as without them.
        mix_partner, mix_lambda: (N,) int64 and (N,) float, local indices: both views of sample i
            are anchors mixing sample i (fraction λ_i) with sample mix_partner[i]; i-Mix's soft
            label puts λ_i on the anchor's positive (the other view of i) and 1 − λ_i on the other
            view of mix_partner[i]. λ = 1 is the plain loss. Not with the hard-negative options.
        impl: "auto" | "naive" | "chunked" | "triton" (see `resolve_impl`).
    """
    _check_pair("z1", z1, "z2", z2)
    T = _positive_scalar("temperature", temperature, z1)
    scale = 1.0 / T
    hard = loss_options.check_hard_negatives(hard_negative_beta, debias_tau_plus)
    mix = loss_options.check_mix(mix_partner, mix_lambda, z1.shape[0], z1, hard, "z1 and z2")
    gathered = gather and distributed.is_distributed()
    if hard is not None:
        return _nt_xent_hard(z1, z2, scale, hard, impl, gathered, local_loss)
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    # Gathered columns are rank-major ([z1_0; z2_0; z1_1; ...]): the logsumexp ignores their order.
    all_z, offset = distributed.gather_with_grad(z) if gathered else (z, 0)
    impl = resolve_impl(impl, z.device, n2 * all_z.shape[0], z.dtype)
    if impl == "naive" and not gathered:
        return _nt_xent_reference(z, scale, mix)
    positives = scale * _row_dot(z, torch.cat([z2, z1]), impl)
    if mix is not None:  # the other view of each anchor's partner
        partner_positives = scale * _row_dot(z, torch.cat([z2[mix.partner], z1[mix.partner]]), impl)
        positives = loss_options.mixed_target_logits(positives, partner_positives, mix.lam.repeat(2))
    exclude = torch.arange(offset, offset + n2, device=z.device) if gathered else None
    lse, _ = _lse_function(impl)(z, all_z, scale, exclude=exclude, mask_diagonal=not gathered)
    return _mean_over_ranks((lse - positives).sum(), all_z.shape[0], gathered, local_loss)


def _nt_xent_hard(z1, z2, scale, hard, impl, gathered, local_loss):
    """NT-Xent with the hard-negative estimator. An anchor's negatives are every view but itself and
    its positive: one excluded column in each of the view-1 and view-2 blocks of columns."""
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    all_z1, offset = distributed.gather_with_grad(z1) if gathered else (z1, 0)
    all_z2, _ = distributed.gather_with_grad(z2) if gathered else (z2, 0)
    n_global = all_z1.shape[0]
    n_neg = 2 * n_global - 2
    loss_options.check_negatives(n_neg, f"the global batch has {n_global} sample(s)")
    impl = resolve_impl(impl, z.device, 2 * n * 2 * n_global, z.dtype)
    positives = scale * _row_dot(z, torch.cat([z2, z1]), impl)
    if impl == "naive" and not gathered:
        own = torch.arange(2 * n, device=z.device)
        negatives = torch.ones(2 * n, 2 * n, dtype=torch.bool, device=z.device)
        negatives[own, own] = False
        negatives[own, (own + n) % (2 * n)] = False
        log_r = loss_options.log_reweighted_from_logits(_logits(z, z, scale), negatives, hard.beta)
    else:  # row i of view v: column i of its own view is itself, of the other view its positive
        exclude = (offset + torch.arange(n, device=z.device)).repeat(2)
        stats = loss_options.negative_logsumexps(_lse_function(impl), z, [(all_z1, exclude), (all_z2, exclude)],
                                                 scale, hard.beta)
        log_r = loss_options.log_reweighted(stats[0][0], stats[1][0] if len(stats) > 1 else None, n_neg)
    rows = loss_options.hard_negative_rows(positives, log_r, n_neg, hard.tau_plus, scale)
    return _mean_over_ranks(rows.sum(), 2 * n_global, gathered, local_loss)


def _nt_xent_reference(z, scale, mix=None):
    n2 = z.shape[0]
    logits = _logits(z, z, scale)
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    labels = torch.cat([torch.arange(n2 // 2, n2), torch.arange(0, n2 // 2)]).to(z.device)
    if mix is None:
        return F.cross_entropy(logits, labels)
    partner = torch.cat([mix.partner + n2 // 2, mix.partner])  # the other view of the partner
    y = loss_options.mix_target_matrix(labels, partner, mix.lam.repeat(2), n2)
    return loss_options.soft_cross_entropy(logits, y).mean()


# --------------------------------------------------------------------------- SupCon


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
