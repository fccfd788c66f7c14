"""Chunked similarity-logsumexp in plain torch: the CPU path for large negative sets.

Every contrastive loss in mmcl reduces to row (and column) logsumexps of `scale * Q @ K.T`
plus positive logits that cost O(B·D). This module computes those logsumexps tile by tile,
never holding the (B, N) logits in forward or backward: backward recomputes each tile from the
saved logsumexps, as flash-attention does. Memory is O((B + N)·D + tile).

The Triton kernels in `mmcl.kernels` implement the same contract on GPUs.
"""
from __future__ import annotations

import math

import torch

# Tile edge lengths. A tile of fp32 logits is 1024 x 2048 x 4 B = 8 MiB; backward keeps three alive.
BLOCK_ROWS = 1024
BLOCK_COLS = 2048


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Accumulate in fp32 at least; float64 stays float64 (the tests' reference precision).
    return torch.promote_types(x.dtype, torch.float32)


def _mask_excluded(tile: torch.Tensor, exclude: torch.Tensor | None, r0: int, c0: int) -> None:
    """Set the logits of (row i, column exclude[i]) that fall in this tile to -inf, in place."""
    if exclude is None:
        return
    rows, cols = tile.shape
    ex = exclude[r0 : r0 + rows]
    hit = ((ex >= c0) & (ex < c0 + cols)).nonzero().squeeze(1)
    if hit.numel():
        tile[hit, ex[hit] - c0] = float("-inf")


def _backward_lse(lse: torch.Tensor) -> torch.Tensor:
    # A row (column) with every logit masked has lse = -inf: +inf makes exp(-inf - lse) = 0, not NaN.
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _check_exclude(exclude, rows: int, cols: int, device: torch.device, name: str = "exclude") -> torch.Tensor | None:
    """Validate an `exclude` argument (or another per-row column index, called `name`): None or
    an integer (rows,) tensor with values in [-1, cols)."""
    if exclude is None:
        return None
    integer = isinstance(exclude, torch.Tensor) and not (exclude.is_floating_point() or exclude.is_complex()
                                                         or exclude.dtype == torch.bool)
    if not integer:
        got = exclude.dtype if isinstance(exclude, torch.Tensor) else type(exclude).__name__
        raise TypeError(f"{name} must be None or an integer torch.Tensor of shape ({rows},), got {got}")
    if exclude.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},) (one column per query row), got {tuple(exclude.shape)}")
    if exclude.device != device:
        raise ValueError(f"{name} is on {exclude.device} but query is on {device}")
    if rows and (int(exclude.min()) < -1 or int(exclude.max()) >= cols):
        raise ValueError(f"{name} values must lie in [-1, {cols}) (-1: none), got "
                         f"[{int(exclude.min())}, {int(exclude.max())}]")
    return exclude.long()


def _tile_logsumexps(logits: torch.Tensor, columns: bool):
    """Row (and column) logsumexps of one tile from a single exp pass.

    exp(logits − tile max) serves rows and columns alike. A row (column) whose values all lie far
    below the tile max would lose precision to underflow; those few are recomputed exactly.
    """
    top = logits.max()
    if not torch.isfinite(top):  # an all-masked tile (or non-finite input): take the exact route
        return logits.logsumexp(1), (logits.logsumexp(0) if columns else None)
    exps = torch.sub(logits, top).exp_()
    # Kept terms are ≥ e^-floor relative to the tile max; a sum above e^-(floor/2) makes the dropped
    # (underflowed) ones negligible at this precision.
    floor = -math.log(torch.finfo(logits.dtype).tiny) / 2

    def reduce(dim: int) -> torch.Tensor:
        sums = exps.sum(dim)
        out = sums.log_().add_(top)
        weak = sums < math.exp(-floor / 2)
        if bool(weak.any()):
            exact = logits[weak].logsumexp(1) if dim == 1 else logits[:, weak].logsumexp(0)
            out[weak] = exact
        return out

    return reduce(1), (reduce(0) if columns else None)


class _SimilarityLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, scale, exclude, columns, block_rows, block_cols):
        dtype = _compute_dtype(query)
        B, N = query.shape[0], key.shape[0]
        s = scale.to(dtype)
        row_lse = torch.full((B,), float("-inf"), dtype=dtype, device=query.device)
        col_lse = torch.full((N,), float("-inf"), dtype=dtype, device=query.device) if columns else None
        for r0 in range(0, B, block_rows):
            q = query[r0 : r0 + block_rows].to(dtype)
            for c0 in range(0, N, block_cols):
                logits = (q @ key[c0 : c0 + block_cols].to(dtype).T) * s
                _mask_excluded(logits, exclude, r0, c0)
                tile_rows, tile_cols = _tile_logsumexps(logits, columns)
                rows = row_lse[r0 : r0 + q.shape[0]]
                torch.logaddexp(rows, tile_rows, out=rows)
                if columns:
                    cols = col_lse[c0 : c0 + logits.shape[1]]
                    torch.logaddexp(cols, tile_cols, out=cols)
        ctx.save_for_backward(query, key, scale, row_lse, col_lse if columns else row_lse, exclude)
        ctx.config = (columns, block_rows, block_cols)
        if columns:
            return row_lse, col_lse
        return row_lse

    @staticmethod
    def backward(ctx, grad_row, grad_col=None):
        query, key, scale, row_lse, col_lse, exclude = ctx.saved_tensors
        columns, block_rows, block_cols = ctx.config
        row_lse, col_lse = _backward_lse(row_lse), _backward_lse(col_lse)
        dtype = row_lse.dtype
        s = scale.to(dtype)
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        B, N = query.shape[0], key.shape[0]
        grad_q = torch.zeros(query.shape, dtype=dtype, device=query.device) if need_q else None
        grad_k = torch.zeros(key.shape, dtype=dtype, device=key.device) if need_k else None
        grad_s = torch.zeros((), dtype=dtype, device=query.device)
        if grad_row is None:
            grad_row = torch.zeros(B, dtype=dtype, device=query.device)
        if columns and grad_col is None:
            grad_col = torch.zeros(N, dtype=dtype, device=query.device)
        for r0 in range(0, B, block_rows):
            q = query[r0 : r0 + block_rows].to(dtype)
            r1 = r0 + q.shape[0]
            for c0 in range(0, N, block_cols):
                k = key[c0 : c0 + block_cols].to(dtype)
                c1 = c0 + k.shape[0]
                dots = q @ k.T
                logits = dots * s
                _mask_excluded(logits, exclude, r0, c0)
                # d lse_i / d logit_ij is the softmax of row i (and of column j for col_lse):
                # g = grad_row_i * P_row + grad_col_j * P_col, built in place to keep few tiles alive.
                g = torch.sub(logits, row_lse[r0:r1, None]).exp_().mul_(grad_row[r0:r1, None].to(dtype))
                if columns:
                    g.add_(torch.sub(logits, col_lse[None, c0:c1]).exp_().mul_(grad_col[None, c0:c1].to(dtype)))
                del logits
                if need_s:  # d logit / d scale = dots (finite even where the diagonal is masked)
                    grad_s += torch.dot(g.view(-1), dots.view(-1))
                del dots
                if need_q:
                    grad_q[r0:r1].addmm_(g, k)  # times scale once, at the end
                if need_k:
                    grad_k[c0:c1].addmm_(g.T, q)
        return (
            grad_q.mul_(s).to(query.dtype) if need_q else None,
            grad_k.mul_(s).to(key.dtype) if need_k else None,
            grad_s.to(scale.dtype) if need_s else None,
            None, None, None, None,
        )


def similarity_lse_chunked(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: torch.Tensor,
    *,
    exclude: torch.Tensor | None = None,
    mask_diagonal: bool = False,
    columns: bool = False,
    block_rows: int = BLOCK_ROWS,
    block_cols: int = BLOCK_COLS,
):
    """Row (and column) logsumexp of `scale * query @ key.T`, computed in tiles.

    Args:
        query: (B, D) floating tensor.
        key: (N, D) floating tensor; detach it (e.g. a MoCo queue) and it gets no gradient.
        scale: 0-dim tensor, the logit multiplier (1 / temperature); may require grad.
        exclude: optional integer (B,) tensor: row i leaves out the logit of column exclude[i]
            (-1: none). A rank's rows against all ranks' columns exclude their own global index.
        mask_diagonal: shorthand for exclude = arange(B): leave out row index == column index
            (SimCLR's self similarities). Cannot be combined with `exclude`.
        columns: also return the column logsumexps (the text→image half of CLIP's loss).

    Returns:
        (row_lse (B,), col_lse (N,) if `columns` else None), fp32 (float64 for float64 inputs).
        Differentiable in `query`, `key` and `scale`. A row or column whose logits are all
        excluded has lse -inf and gets zero gradient.
    """
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block sizes must be positive, got {block_rows} x {block_cols}")
    exclude = _check_exclude(exclude, query.shape[0], key.shape[0], query.device)
    if mask_diagonal:
        if exclude is not None:
            raise ValueError("pass either exclude or mask_diagonal=True, not both")
        exclude = torch.arange(query.shape[0], device=query.device)
    out = _SimilarityLSE.apply(query, key, scale, exclude, bool(columns), block_rows, block_cols)
    return out if columns else (out, None)


# --------------------------------------------------------------------------- SigLIP's sigmoid loss


# Above this softplus returns x itself, off by at most e^-40 (below float64's resolution there).
_SOFTPLUS_THRESHOLD = 40.0


def _augmented(query, key, t: float, b: float, dtype):
    """(Q' (B, D+1), K' (N, D+1)) = ([t·Q, b], [K, 1]): Q' K'ᵀ = t·Q Kᵀ + b, so the logits come
    out of one matmul, and G K' carries G's row sums (d bias) in its last column."""
    q = torch.cat([query.to(dtype) * t, query.new_full((query.shape[0], 1), b, dtype=dtype)], 1)
    k = torch.cat([key.to(dtype), key.new_ones((key.shape[0], 1), dtype=dtype)], 1)
    return q, k


def _positives_in_tile(positive, r0, rows, c0, cols):
    """(rows, columns) within the tile at (r0, c0) of the positive pairs that fall in it."""
    pos = positive[r0 : r0 + rows]
    hit = ((pos >= c0) & (pos < c0 + cols)).nonzero().squeeze(1)
    return hit, pos[hit] - c0


class _SigmoidPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, scale, bias, positive, block_rows, block_cols):
        dtype = _compute_dtype(query)
        # Python numbers are enough here: the gradients are computed by hand in backward.
        qa, ka = _augmented(query, key, float(scale), float(bias), dtype)
        total = torch.zeros((), dtype=dtype, device=query.device)
        for r0 in range(0, query.shape[0], block_rows):
            for c0 in range(0, key.shape[0], block_cols):
                logits = qa[r0 : r0 + block_rows] @ ka[c0 : c0 + block_cols].T  # S = t·q·k + b
                hit = _positives_in_tile(positive, r0, logits.shape[0], c0, logits.shape[1])
                # −log σ(z·S) = softplus(−z·S): softplus(S) for negatives, softplus(−S) for positives.
                logits[hit] = logits[hit].neg()
                total += torch.nn.functional.softplus(logits, threshold=_SOFTPLUS_THRESHOLD).sum()
        ctx.save_for_backward(query, key, scale, bias, positive)
        ctx.blocks = (block_rows, block_cols)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        query, key, scale, bias, positive = ctx.saved_tensors
        block_rows, block_cols = ctx.blocks
        dtype = _compute_dtype(query)
        t = float(scale)
        qa, ka = _augmented(query, key, t, float(bias), dtype)
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        # G K' = [G K, G·1]: dQ / t, and with it d t = Σ_ij G_ij q_i·k_j = Σ_i q_i·(G K)_i and
        # d b = Σ_ij G_ij, without a further pass over any tile.
        acc_q = need_q or need_s or need_b
        gk_acc = torch.zeros(qa.shape, dtype=dtype, device=query.device) if acc_q else None
        grad_k = torch.zeros(key.shape, dtype=dtype, device=key.device) if need_k else None
        for r0 in range(0, query.shape[0], block_rows):
            q = query[r0 : r0 + block_rows].to(dtype)
            for c0 in range(0, key.shape[0], block_cols):
                k = ka[c0 : c0 + block_cols]
                g = qa[r0 : r0 + block_rows] @ k.T  # S, recomputed
                hit = _positives_in_tile(positive, r0, g.shape[0], c0, g.shape[1])
                # d(−log σ(z·S))/dS = −z·σ(−z·S): σ(S) for negatives, −σ(−S) for positives.
                positives = g[hit]
                g.sigmoid_()
                g[hit] = -torch.sigmoid(-positives)
                if acc_q:
                    gk_acc[r0 : r0 + q.shape[0]].addmm_(g, k)
                if need_k:
                    grad_k[c0 : c0 + k.shape[0]].addmm_(g.T, q)  # times t once, at the end
        up = grad_total.to(dtype)
        D = query.shape[1]
        return (
            (gk_acc[:, :D] * (t * up)).to(query.dtype) if need_q else None,
            grad_k.mul_(t * up).to(key.dtype) if need_k else None,
            (torch.dot(query.to(dtype).reshape(-1), gk_acc[:, :D].reshape(-1)) * up).to(scale.dtype) if need_s else None,
            (gk_acc[:, D].sum() * up).to(bias.dtype) if need_b else None,
            None, None, None,
        )


def sigmoid_pair_loss_chunked(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    positive: torch.Tensor,
    *,
    block_rows: int = BLOCK_ROWS,
    block_cols: int = BLOCK_COLS,
) -> torch.Tensor:
    """Σ_ij −log σ(z_ij·(scale·q_i·k_j + bias)), SigLIP's pairwise sigmoid loss summed (not
    averaged), computed in tiles: z_ij = +1 if j == positive[i], else −1.

    Each tile of S = scale·Q Kᵀ + bias is one matmul of the bias-augmented features. Backward
    recomputes each tile and forms its gradient G_ij = −z_ij·σ(−z_ij·S_ij) once, for
    dQ = scale·G·K, dK = scale·Gᵀ·Q, d scale = Σ G ⊙ (Q Kᵀ) = Σ Q ⊙ (G K) and d bias = Σ G
    (the last two from the dQ accumulator). Memory O((B + N)·D + tile) in forward and backward.

    Args:
        query: (B, D) floating tensor. key: (N, D), same dim.
        scale: 0-dim tensor, the logit multiplier t > 0; bias: 0-dim tensor b; both may require grad.
        positive: integer (B,) tensor: the column of row i's positive pair (-1: none).
        block_rows, block_cols: tile edge lengths.

    Returns:
        0-dim tensor, fp32 (float64 for float64 inputs), differentiable in query, key, scale, bias.
    """
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block sizes must be positive, got {block_rows} x {block_cols}")
    if positive is None:
        raise TypeError("positive must be an integer (B,) tensor of column indices, got None")
    positive = _check_exclude(positive, query.shape[0], key.shape[0], query.device, name="positive")
    return _SigmoidPairLoss.apply(query, key, scale.reshape(()), bias.reshape(()), positive, block_rows, block_cols)
