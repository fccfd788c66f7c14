"""Per-row terms of the contrastive losses' options, shared by their naive, chunked and Triton paths.

Hard negatives and debiasing (Robinson et al., "Contrastive Learning with Hard Negative Samples",
ICLR 2021; Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020). For an anchor with
positive logit p = s⁺/τ and n negative logits l_j = s_j/τ, the negatives' term of the softmax
denominator Σ_j e^{l_j} becomes

    w_j = e^{β l_j} / mean_k e^{β l_k}                      (importance weights, mean 1)
    R   = Σ_j w_j e^{l_j}                                   (= Σ_j e^{l_j} at β = 0)
    Ng  = max((R − τ⁺ · n · e^p) / (1 − τ⁺),  n · e^{−1/τ})
    loss = −log(e^p / (e^p + Ng))

which is the estimator of the authors' released code (the lower clamp included). In logsumexps
of the negatives' logits at the scales (1+β)/τ and β/τ,
log R = lse_{(1+β)/τ} − lse_{β/τ} + log n: the chunked and Triton paths need only those row (and
column) statistics, so memory stays O((B + N)·D). Everything here runs in log space.

Mixed targets (Lee et al., "i-Mix", ICLR 2021): anchor i mixes sample i (fraction λ_i) with
sample π(i); its soft label puts λ_i on its own positive and 1 − λ_i on π(i)'s. The soft-label
cross-entropy is row_lse_i − (λ_i · p_{i,i} + (1 − λ_i) · p_{i,π(i)}), two row dots per row.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch


class HardNegatives(NamedTuple):
    """The validated HCL / DCL options: beta ≥ 0, 0 ≤ tau_plus < 1 (not both 0)."""
    beta: float
    tau_plus: float


class MixTargets(NamedTuple):
    """The validated i-Mix targets: partner (B,) int64 local indices, lam (B,) float in [0, 1]."""
    partner: torch.Tensor
    lam: torch.Tensor


# --------------------------------------------------------------------------- validation


def _real(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_hard_negatives(hard_negative_beta, debias_tau_plus) -> HardNegatives | None:
    """The options as a HardNegatives, or None when both are 0 (the plain loss).

    Raises TypeError for non-numbers, ValueError unless hard_negative_beta ≥ 0 and
    0 ≤ debias_tau_plus < 1.
    """
    beta = _real("hard_negative_beta", hard_negative_beta)
    tau_plus = _real("debias_tau_plus", debias_tau_plus)
    if beta < 0:
        raise ValueError(f"hard_negative_beta must be >= 0 (0: no reweighting), got {beta}")
    if not 0 <= tau_plus < 1:
        raise ValueError(f"debias_tau_plus must lie in [0, 1) (the positive class prior; 0: no debiasing), "
                         f"got {tau_plus}")
    if beta == 0 and tau_plus == 0:
        return None
    return HardNegatives(beta, tau_plus)


def check_mix(mix_partner, mix_lambda, batch: int, like: torch.Tensor, hard: HardNegatives | None,
              rows: str) -> MixTargets | None:
    """Validate the i-Mix arguments of a batch of `batch` samples (the rows of `rows`).

    Returns None when both are None, else MixTargets on `like`'s device (lam in its compute dtype).
    Raises TypeError / ValueError naming the argument: both or neither, mix_partner an integer (B,)
    tensor with values in [0, B), mix_lambda a floating (B,) tensor with values in [0, 1], and no
    hard-negative option at the same time.
    """
    if mix_partner is None and mix_lambda is None:
        return None
    if mix_partner is None or mix_lambda is None:
        missing = "mix_partner" if mix_partner is None else "mix_lambda"
        raise ValueError(f"mix_partner and mix_lambda go together (the mixing of each sample), {missing} is missing")
    if hard is not None:
        raise ValueError("mixed targets (mix_partner, mix_lambda) cannot be combined with hard_negative_beta / "
                         "debias_tau_plus")
    if not isinstance(mix_partner, torch.Tensor) or mix_partner.is_floating_point() or mix_partner.is_complex() \
            or mix_partner.dtype == torch.bool:
        got = mix_partner.dtype if isinstance(mix_partner, torch.Tensor) else type(mix_partner).__name__
        raise TypeError(f"mix_partner must be an integer torch.Tensor of shape ({batch},), got {got}")
    if not isinstance(mix_lambda, torch.Tensor) or not mix_lambda.is_floating_point():
        got = mix_lambda.dtype if isinstance(mix_lambda, torch.Tensor) else type(mix_lambda).__name__
        raise TypeError(f"mix_lambda must be a floating-point torch.Tensor of shape ({batch},), got {got}")
    for name, x in (("mix_partner", mix_partner), ("mix_lambda", mix_lambda)):
        if x.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), one entry per row of {rows}, got {tuple(x.shape)}")
    partner = mix_partner.detach().to(like.device, torch.long)
    lam = mix_lambda.detach().to(like.device, torch.promote_types(like.dtype, torch.float32))
    bad_partner, bad_lam = torch.stack([((partner < 0) | (partner >= batch)).any(),
                                        ~((lam >= 0) & (lam <= 1)).all()]).tolist()  # one host sync
    if bad_partner:
        raise ValueError(f"mix_partner must hold indices in [0, {batch}) of this batch's rows, got values in "
                         f"[{partner.min().item()}, {partner.max().item()}]")
    if bad_lam:  # NaN fails both comparisons
        raise ValueError(f"mix_lambda must hold fractions in [0, 1], got values in "
                         f"[{lam.min().item()}, {lam.max().item()}]")
    return MixTargets(partner, lam)


def check_negatives(n: int, what: str) -> None:
    """Raise ValueError (naming the options and `what`) unless each anchor has n ≥ 1 negatives."""
    if n < 1:
        raise ValueError(f"hard_negative_beta / debias_tau_plus need at least one negative per anchor, but {what}")


# --------------------------------------------------------------------------- hard negatives


def log_reweighted_from_logits(logits: torch.Tensor, negatives: torch.Tensor, beta: float) -> torch.Tensor:
    """log R_i = log Σ_j w_ij e^{l_ij} over row i's negatives, from materialised logits.

    Args:
        logits: (B, M) logits l = s / τ. negatives: (B, M) bool, True where column j is a negative
            of row i; every row has the same count n. beta: β ≥ 0.
    Returns:
        (B,) log R, where w_ij = e^{β l_ij} / mean_{k negative} e^{β l_ik} = n · softmax(β l)_ij.
    """
    neg = logits.masked_fill(~negatives, float("-inf"))
    if beta == 0:
        return neg.logsumexp(1)
    n = int(negatives[0].sum())
    log_w = torch.log_softmax((beta * logits).masked_fill(~negatives, float("-inf")), 1) + math.log(n)
    return (neg + log_w).logsumexp(1)


def negative_logsumexps(lse_fn: Callable, query: torch.Tensor, blocks, scale: torch.Tensor, beta: float, *,
                        columns: bool = False):
    """Row (and column) logsumexps of the negatives' logits at scale·(1+β) and, for β > 0, scale·β.

    Args:
        lse_fn: a function with the contract of `mmcl.kernels.similarity_lse`.
        query: (B, D). blocks: [(key (N_k, D), exclude (B,) int64 or None)], the negatives of row i
            being every column of every block but exclude[i]; `columns` needs a single block.
        scale: 0-dim logit multiplier 1/τ (may require grad). beta: β ≥ 0.
    Returns:
        [(row_lse (B,), col_lse (N,) | None)] for each scale: one entry for β = 0, else two.
    """
    if columns and len(blocks) != 1:
        raise ValueError("column statistics need a single block of keys")
    scales = [scale * (1.0 + beta)] + ([scale * beta] if beta > 0 else [])
    stats = []
    for s in scales:
        rows, cols = None, None
        for key, exclude in blocks:
            r, cols = lse_fn(query, key, s, exclude=exclude, columns=columns)
            rows = r if rows is None else torch.logaddexp(rows, r)
        stats.append((rows, cols))
    return stats


def log_reweighted(lse_high: torch.Tensor, lse_beta: torch.Tensor | None, n: int) -> torch.Tensor:
    """log R from the negatives' logsumexps at (1+β)/τ and β/τ (None for β = 0): (B,) -> (B,)."""
    if lse_beta is None:
        return lse_high
    return lse_high - lse_beta + math.log(n)


def hard_negative_rows(positives: torch.Tensor, log_r: torch.Tensor, n: int, tau_plus: float,
                       scale: torch.Tensor) -> torch.Tensor:
    """Per-anchor loss −log(e^p / (e^p + Ng)) with Ng the debiased, clamped estimator.

    Args:
        positives: (B,) positive logits p. log_r: (B,) log R. n: negatives per anchor.
        tau_plus: τ⁺ in [0, 1). scale: 0-dim 1/τ (the clamp n·e^{−1/τ} follows its gradient).
    Returns:
        (B,) losses.
    """
    floor = (math.log(n) - scale).to(log_r.dtype)
    log_ng = log_r
    if tau_plus > 0:
        # log((e^R − τ⁺ n e^p)/(1 − τ⁺)) = R + log1p(−τ⁺ n e^{p−R}) − log(1 − τ⁺), where that is > 0;
        # elsewhere the clamp decides. Masked rows get exp(−inf) = 0, so no inf reaches backward.
        x = positives - log_r
        ok = x < -math.log(tau_plus * n)
        t = torch.exp(x.masked_fill(~ok, float("-inf"))) * (tau_plus * n)
        log_ng = torch.where(ok, log_r + torch.log1p(-t) - math.log1p(-tau_plus), floor)
    log_ng = torch.maximum(log_ng, floor)
    return torch.logaddexp(positives, log_ng) - positives


# --------------------------------------------------------------------------- mixed targets


def mixed_target_logits(positives: torch.Tensor, partner_positives: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Σ_j y_ij l_ij = λ_i p_{i,i} + (1 − λ_i) p_{i,π(i)}: (B,), (B,), (B,) -> (B,)."""
    return lam * positives + (1.0 - lam) * partner_positives


def mix_target_matrix(own_column: torch.Tensor, partner_column: torch.Tensor, lam: torch.Tensor,
                      n_columns: int) -> torch.Tensor:
    """Dense soft labels (B, n_columns): λ_i at own_column[i], 1 − λ_i added at partner_column[i]."""
    rows = torch.arange(lam.shape[0], device=lam.device)
    y = torch.zeros(lam.shape[0], n_columns, dtype=lam.dtype, device=lam.device)
    y.index_put_((rows, own_column), lam, accumulate=True)
    y.index_put_((rows, partner_column), 1.0 - lam, accumulate=True)
    return y


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row Σ_j y_ij (lse_i − l_ij) = (Σ_j y_ij) lse_i − Σ_j y_ij l_ij: (B, M), (B, M) -> (B,).

    Targets need not sum to 1 (the transposed labels of CLIP's text→image half); columns with
    y = 0 may hold −inf logits (excluded columns)."""
    kept = torch.where(targets > 0, logits, torch.zeros_like(logits))
    return targets.sum(1) * logits.logsumexp(1) - (targets * kept).sum(1)
