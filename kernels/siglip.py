"""SigLIP's pairwise sigmoid loss in Triton, without the (B, N) logits in forward or backward.

For query Q (B, D), key K (N, D), scale t, bias b and the column positive[i] of row i's pair:

    loss = Σ_ij −log σ(z_ij S_ij),   S = t Q Kᵀ + b,   z_ij = +1 if j == positive[i] else −1

Forward (one matmul pass): a program owns a block of rows and a range of column tiles (the
tiles and the column split of the similarity-logsumexp forward, kernels/lse.py), builds each
logit tile with the same `tl.dot` and adds its softplus terms to per-row fp32 sums; torch adds
the (splits, B) partials. No running max is needed: every term is bounded on its own.

Backward: the gradient of a logit is elementwise, G_ij = −z_ij σ(−z_ij S_ij) ∈ (−1, 1), so as
for the softmax losses one kernel per chunk of rows recomputes S, writes G once in the inputs'
dtype and reduces d t = Σ G ⊙ (Q Kᵀ) and d b = Σ G from the same tile; cuBLAS then forms
dQ_chunk = G K and dK += Gᵀ Q_chunk with fp32 accumulation, scaled by t in fp32. Matmul passes:
4 (forward, S→G, dQ, dK). Memory: inputs and gradients O((B + N) D), the G chunk (rows, N) of
`_grad_chunk_rows` rows, and for 16-bit keys that need a gradient an fp32 (N, D) accumulator.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from mmcl.kernels._common import check_column_index, check_features, on_device, promote
from mmcl.kernels.lse import (LOG2E, _block_sizes, _column_splits, _dot_fp32, _grad_chunk_rows, _mm_fp32,
                              _precision, _tile_dots)

__all__ = ["sigmoid_pair_loss"]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _signed_logits(dots, scale_ptr, bias_ptr, rows, cols, pos):
    """(x = z·S, is_pos) for a tile: S = t·dots + b, z = +1 at each row's positive column."""
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    logits = dots * scale + bias
    is_pos = pos[:, None] == cols[None, :]
    return tl.where(is_pos, logits, -logits), is_pos


@triton.jit
def _sigmoid_fwd_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, pos_ptr, part_ptr, M, N, D, cols_per_split,
                        stride_am, stride_ad, stride_bn, stride_bd,
                        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FLATTEN: tl.constexpr):
    """Program (pid_m, pid_n): part[pid_n, i] = Σ_j −log σ(z_ij S_ij) over the columns of split
    pid_n for the BLOCK_M rows i of row block pid_m."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    col_start = pid_n * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in tl.range(col_start, col_end, BLOCK_N, flatten=FLATTEN):
        cols = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < N
        dots = _tile_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_am, stride_ad,
                          stride_bn, stride_bd, PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
        x, is_pos = _signed_logits(dots, scale_ptr, bias_ptr, rows, cols, pos)
        # −log σ(x) = max(−x, 0) + log1p(e^−|x|). log1p(u) as log(w)·u/(w − 1), w = 1 + u, keeps
        # the small terms exact (bias −10: every negative contributes ~e^−10, below 1's ulp).
        u = tl.exp2(-tl.abs(x) * LOG2E)
        w = 1.0 + u
        log1p = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
        terms = tl.maximum(-x, 0.0) + log1p
        acc += tl.sum(tl.where(row_ok[:, None] & col_ok[None, :], terms, 0.0), axis=1)
    tl.store(part_ptr + pid_n.to(tl.int64) * M + rows, acc, mask=row_ok)


@triton.jit
def _sigmoid_grad_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, pos_ptr, g_out_ptr, ds_ptr, db_ptr, M, N, D,
                         stride_am, stride_ad, stride_bn, stride_bd, stride_gm,
                         WRITE_G: tl.constexpr, WRITE_DSCALE: tl.constexpr, WRITE_DBIAS: tl.constexpr,
                         PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of G_ij = −z_ij σ(−z_ij S_ij) for a chunk of M query rows.

    The grid runs the row tiles fastest (programs in flight share a column tile of B). WRITE_G
    stores the tile in G's dtype; WRITE_DSCALE puts Σ_ij G_ij (a_i·b_j) in ds[pid], WRITE_DBIAS
    Σ_ij G_ij in db[pid]."""
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(M, BLOCK_M)
    rows = ((pid % n_row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = ((pid // n_row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    dots = _tile_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_am, stride_ad,
                      stride_bn, stride_bd, PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
    x, is_pos = _signed_logits(dots, scale_ptr, bias_ptr, rows, cols, pos)
    # σ(−x) = 1 / (1 + e^x): e^x overflows to inf for x ≫ 0 and the quotient is then 0, exactly.
    sig = 1.0 / (1.0 + tl.exp2(x * LOG2E))
    keep = row_ok[:, None] & col_ok[None, :]
    g = tl.where(keep, tl.where(is_pos, -sig, sig), 0.0)
    if WRITE_DSCALE:
        tl.store(ds_ptr + pid, tl.sum(tl.sum(g * dots, axis=1), axis=0))
    if WRITE_DBIAS:
        tl.store(db_ptr + pid, tl.sum(tl.sum(g, axis=1), axis=0))
    if WRITE_G:
        tl.store(g_out_ptr + rows[:, None] * stride_gm + cols[None, :], g.to(g_out_ptr.dtype.element_ty),
                 mask=keep)


# --------------------------------------------------------------------------- launchers


def _forward(query, key, scale32, bias32, positive, cfg):
    """The summed loss (0-dim fp32) from one pass over the logits."""
    (B, D), N = query.shape, key.shape[0]
    n_blocks = triton.cdiv(B, cfg["BLOCK_M"])
    splits, span = _column_splits(n_blocks, N, query.device, cfg)
    parts = torch.empty((splits, B), dtype=torch.float32, device=query.device)
    with on_device(query):
        _sigmoid_fwd_kernel[(n_blocks, splits)](
            query, key, scale32, bias32, positive, parts, B, N, D, span,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            PRECISION=_precision(query.dtype), DOT_FP32=_dot_fp32(query.dtype), BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], FLATTEN=cfg["FLATTEN"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return parts.sum()


def _backward(query, key, scale32, bias32, positive, up, needs, cfg):
    """(dQ, dK, d t, d b) of `up` (the upstream gradient, fp32 (1,)) times the summed loss;
    None where not needed, d t and d b fp32 (1,)."""
    need_q, need_k, need_s, need_b = needs
    (B, D), N = query.shape, key.shape[0]
    bm, bn = cfg["BWD_BLOCK_M"], cfg["BWD_BLOCK_N"]
    chunk = _grad_chunk_rows(B, D, cfg)
    factor = scale32 * up
    write_g = need_q or need_k
    dummy = scale32  # unused pointer slots still need a tensor
    g_buf = torch.empty((chunk, N), dtype=query.dtype, device=query.device) if write_g else dummy
    grad_q = torch.empty((B, D), dtype=query.dtype, device=query.device) if need_q else None
    dk_acc = torch.zeros((N, D), dtype=torch.float32, device=key.device) if need_k else None
    ds_parts, db_parts = [], []
    with on_device(query):
        for r0 in range(0, B, chunk):
            rows = min(chunk, B - r0)
            n_tiles = triton.cdiv(rows, bm) * triton.cdiv(N, bn)
            ds = torch.empty(n_tiles, dtype=torch.float32, device=query.device) if need_s else dummy
            db = torch.empty(n_tiles, dtype=torch.float32, device=query.device) if need_b else dummy
            q_chunk = query[r0:r0 + rows]
            _sigmoid_grad_kernel[(n_tiles,)](
                q_chunk, key, scale32, bias32, positive[r0:], g_buf, ds, db, rows, N, D,
                q_chunk.stride(0), q_chunk.stride(1), key.stride(0), key.stride(1),
                g_buf.stride(0) if write_g else 0,
                WRITE_G=write_g, WRITE_DSCALE=need_s, WRITE_DBIAS=need_b, PRECISION=_precision(query.dtype),
                DOT_FP32=_dot_fp32(query.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["bwd_num_warps"], num_stages=cfg["bwd_num_stages"],
            )
            if need_s:
                ds_parts.append(ds)
            if need_b:
                db_parts.append(db)
            g = g_buf[:rows]
            if need_q:  # scaled in fp32, rounded once to the output dtype
                grad_q[r0:r0 + rows] = _mm_fp32(g, key).mul_(factor)
            if need_k:
                _mm_fp32(g.T, q_chunk, acc=dk_acc)
    del g_buf
    grad_k = dk_acc.mul_(factor).to(key.dtype) if need_k else None
    grad_s = torch.cat(ds_parts).sum().reshape(1) * up if need_s else None
    grad_b = torch.cat(db_parts).sum().reshape(1) * up if need_b else None
    return grad_q, grad_k, grad_s, grad_b


class _SigmoidPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, scale, bias, positive, cfg):
        # Device scalars in fp32: no host sync.
        scale32 = scale.detach().reshape(1).to(torch.float32)
        bias32 = bias.detach().reshape(1).to(torch.float32)
        ctx.save_for_backward(query, key, scale32, bias32, positive)
        ctx.config = (cfg, scale.shape, scale.dtype, bias.shape, bias.dtype)
        return _forward(query, key, scale32, bias32, positive, cfg)

    @staticmethod
    @once_differentiable  # the kernels' gradients are not themselves differentiable
    def backward(ctx, grad_total):
        query, key, scale32, bias32, positive = ctx.saved_tensors
        cfg, scale_shape, scale_dtype, bias_shape, bias_dtype = ctx.config
        needs = ctx.needs_input_grad[:4]
        if not any(needs):
            return None, None, None, None, None, None
        up = grad_total.detach().float().reshape(1)  # applied in fp32, before any rounding
        grad_q, grad_k, grad_s, grad_b = _backward(query, key, scale32, bias32, positive, up, needs, cfg)
        if grad_s is not None:
            grad_s = grad_s.reshape(scale_shape).to(scale_dtype)
        if grad_b is not None:
            grad_b = grad_b.reshape(bias_shape).to(bias_dtype)
        return grad_q, grad_k, grad_s, grad_b, None, None


# --------------------------------------------------------------------------- public entry


def _check_scalar(name, value, device):
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        raise TypeError(f"{name} must be a 0-dim floating-point tensor, got {type(value).__name__}"
                        f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but query is on {device}")


def sigmoid_pair_loss(query: torch.Tensor, key: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                      positive: torch.Tensor, *, block_sizes: dict | None = None) -> torch.Tensor:
    """Σ_ij −log σ(z_ij·(scale·q_i·k_j + bias)), z_ij = +1 if j == positive[i] else −1, with
    fused Triton kernels (SigLIP's loss summed; divide by the number of images).

    Args:
        query: (B, D) float32 / float16 / bfloat16, any strides. key: (N, D), same dim; if the
            dtypes differ both are promoted to the wider one.
        scale: 0-dim floating tensor t on the same device; bias: 0-dim floating tensor b; both
            may require grad.
        positive: (B,) int64: the column of row i's positive pair (-1: none).
        block_sizes: optional overrides of `mmcl.kernels.lse.default_block_sizes`.

    Returns:
        0-dim float32 tensor, differentiable in query, key, scale and bias. No (B, N) buffer in
        forward or backward.
    """
    check_features(query, key)
    _check_scalar("scale", scale, query.device)
    _check_scalar("bias", bias, query.device)
    positive = check_column_index("positive", positive, query, key.shape[0])
    query, key = promote(query, key)
    cfg = _block_sizes(query.shape[1], query.dtype, block_sizes)
    return _SigmoidPairLoss.apply(query, key, scale, bias, positive, cfg)
