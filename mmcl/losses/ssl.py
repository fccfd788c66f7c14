"""The self-supervised losses: InfoNCE (in-batch negatives or a MoCo queue) and SimCLR's NT-Xent,
both with HCL / DCL negatives and i-Mix targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl import distributed
from mmcl.losses import options
from mmcl.losses._common import (_check_features, _check_pair, _lse_function, _logits, _mean_over_ranks,
                                 _positive_scalar, _row_dot, resolve_impl)


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
            the queue) by e^{β·logit}, normalised to mean 1 (see `mmcl.losses.options`). 0: none.
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
    queue = _check_queue(queue, query)
    hard = options.check_hard_negatives(hard_negative_beta, debias_tau_plus)
    mix = options.check_mix(mix_partner, mix_lambda, query.shape[0], query, hard, "query")
    columns = queue if queue is not None else key
    if mix is not None and queue is not None:
        columns = torch.cat([key, queue])
    impl = resolve_impl(impl, query.device, query.shape[0] * columns.shape[0], query.dtype)
    positives = scale * _row_dot(query, key, impl)
    if hard is not None:
        return _info_nce_hard_rows(query, key, queue, positives, scale, hard, impl).mean()
    if mix is not None:
        return _info_nce_mixed_rows(query, key, columns, positives, scale, mix, impl).mean()
    return _info_nce_plain(query, key, queue, columns, positives, scale, impl)


def _check_queue(queue, query):
    """None, or the (K, D) queue detached and in the queries' dtype; raises unless it fits `query`."""
    if queue is None:
        return None
    _check_features("queue", queue)
    if queue.shape[1] != query.shape[1]:
        raise ValueError(
            f"queue must have the features' dim {query.shape[1]}, got queue of shape {tuple(queue.shape)}"
        )
    if queue.device != query.device:
        raise ValueError(f"queue is on {queue.device} but query is on {query.device}")
    return queue.detach().to(query.dtype)


def _info_nce_plain(query, key, queue, columns, positives, scale, impl):
    """The mean cross-entropy over the B rows, without the options."""
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
    options.check_negatives(n, "the batch has a single row and no queue")
    if impl == "naive":
        mask = torch.ones(query.shape[0], negatives.shape[0], dtype=torch.bool, device=query.device)
        if queue is None:
            mask.fill_diagonal_(False)
        log_r = options.log_reweighted_from_logits(_logits(query, negatives, scale), mask, hard.beta)
    else:
        exclude = None if queue is not None else torch.arange(query.shape[0], device=query.device)
        stats = options.negative_logsumexps(_lse_function(impl), query, [(negatives, exclude)], scale, hard.beta)
        log_r = options.log_reweighted(stats[0][0], stats[1][0] if len(stats) > 1 else None, n)
    return options.hard_negative_rows(positives, log_r, n, hard.tau_plus, scale)


def _info_nce_mixed_rows(query, key, columns, positives, scale, mix, impl):
    """(B,) per-row soft-label cross-entropies; the batch's keys are columns 0..B-1 of `columns`."""
    B = query.shape[0]
    if impl == "naive":
        y = options.mix_target_matrix(torch.arange(B, device=query.device), mix.partner, mix.lam,
                                      columns.shape[0])
        return options.soft_cross_entropy(_logits(query, columns, scale), y)
    lse, _ = _lse_function(impl)(query, columns, scale)
    partner_positives = scale * _row_dot(query, key[mix.partner], impl)
    return lse - options.mixed_target_logits(positives, partner_positives, mix.lam)


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
            `mmcl.losses.options`). 0: none.
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
    hard = options.check_hard_negatives(hard_negative_beta, debias_tau_plus)
    mix = options.check_mix(mix_partner, mix_lambda, z1.shape[0], z1, hard, "z1 and z2")
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
        positives = options.mixed_target_logits(positives, partner_positives, mix.lam.repeat(2))
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
    options.check_negatives(n_neg, f"the global batch has {n_global} sample(s)")
    impl = resolve_impl(impl, z.device, 2 * n * 2 * n_global, z.dtype)
    positives = scale * _row_dot(z, torch.cat([z2, z1]), impl)
    if impl == "naive" and not gathered:
        own = torch.arange(2 * n, device=z.device)
        negatives = torch.ones(2 * n, 2 * n, dtype=torch.bool, device=z.device)
        negatives[own, own] = False
        negatives[own, (own + n) % (2 * n)] = False
        log_r = options.log_reweighted_from_logits(_logits(z, z, scale), negatives, hard.beta)
    else:  # row i of view v: column i of its own view is itself, of the other view its positive
        exclude = (offset + torch.arange(n, device=z.device)).repeat(2)
        stats = options.negative_logsumexps(_lse_function(impl), z, [(all_z1, exclude), (all_z2, exclude)],
                                            scale, hard.beta)
        log_r = options.log_reweighted(stats[0][0], stats[1][0] if len(stats) > 1 else None, n_neg)
    rows = options.hard_negative_rows(positives, log_r, n_neg, hard.tau_plus, scale)
    return _mean_over_ranks(rows.sum(), 2 * n_global, gathered, local_loss)


def _nt_xent_reference(z, scale, mix=None):
    n2 = z.shape[0]
    logits = _logits(z, z, scale)
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    labels = torch.cat([torch.arange(n2 // 2, n2), torch.arange(0, n2 // 2)]).to(z.device)
    if mix is None:
        return F.cross_entropy(logits, labels)
    partner = torch.cat([mix.partner + n2 // 2, mix.partner])  # the other view of the partner
    y = options.mix_target_matrix(labels, partner, mix.lam.repeat(2), n2)
    return options.soft_cross_entropy(logits, y).mean()
