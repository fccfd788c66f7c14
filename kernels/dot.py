"""Row-wise dot products a_i . b_i with fp32 accumulation, in Triton: the positive logits.

Every contrastive loss needs the B positive logits s * q_i . k_i next to the logsumexps. In
plain torch, `(a.float() * b.float()).sum(-1)` on bf16 features makes fp32 copies of both inputs
and keeps them for backward: 2x the inputs' bytes that outlive the forward, enough to break the
memory budget of the fused losses on their own. This kernel reads a and b once, accumulates in
fp32 and stores only (B,); backward writes g_i * b_i and g_i * a_i straight into gradients of
the inputs' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from mmcl.kernels._common import check_features, on_device, promote

__all__ = ["row_dot"]

BLOCK_ROWS = 32  # rows per program; the D loop walks BLOCK_D features at a time
BLOCK_D = 128


@triton.jit
def _row_dot_fwd_kernel(a_ptr, b_ptr, out_ptr, M, D, stride_am, stride_ad, stride_bm, stride_bd,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (offs < D)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs[None, :] * stride_ad, mask=ok, other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bm + offs[None, :] * stride_bd, mask=ok, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


@triton.jit
def _row_dot_bwd_kernel(a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, M, D, stride_am, stride_ad, stride_bm, stride_bd,
                        WRITE_DA: tl.constexpr, WRITE_DB: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """da = g[:, None] * b and db = g[:, None] * a (contiguous outputs, the inputs' dtype)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (offs < D)[None, :]
        out_offs = rows[:, None] * D + offs[None, :]
        if WRITE_DA:
            b = tl.load(b_ptr + rows[:, None] * stride_bm + offs[None, :] * stride_bd, mask=ok, other=0.0)
            tl.store(da_ptr + out_offs, (g[:, None] * b.to(tl.float32)).to(da_ptr.dtype.element_ty), mask=ok)
        if WRITE_DB:
            a = tl.load(a_ptr + rows[:, None] * stride_am + offs[None, :] * stride_ad, mask=ok, other=0.0)
            tl.store(db_ptr + out_offs, (g[:, None] * a.to(tl.float32)).to(db_ptr.dtype.element_ty), mask=ok)


class _RowDotTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        M, D = a.shape
        out = torch.empty(M, dtype=torch.float32, device=a.device)
        with on_device(a):
            _row_dot_fwd_kernel[(triton.cdiv(M, BLOCK_ROWS),)](
                a, b, out, M, D, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                BLOCK_M=BLOCK_ROWS, BLOCK_D=BLOCK_D)
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        if not (need_a or need_b):
            return None, None
        M, D = a.shape
        g = grad.float().contiguous()
        da = torch.empty((M, D), dtype=a.dtype, device=a.device) if need_a else None
        db = torch.empty((M, D), dtype=b.dtype, device=b.device) if need_b else None
        with on_device(a):
            _row_dot_bwd_kernel[(triton.cdiv(M, BLOCK_ROWS),)](
                a, b, g, da if need_a else g, db if need_b else g, M, D,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                WRITE_DA=need_a, WRITE_DB=need_b, BLOCK_M=BLOCK_ROWS, BLOCK_D=BLOCK_D)
        return da, db


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 dot products of the rows of a (B, D) and b (B, D), differentiable in both.

    float32 / float16 / bfloat16 inputs of any strides (promoted to a common dtype if they
    differ); fp32 accumulation; nothing but the (B,) result is allocated in forward.
    """
    check_features(a, b, names=("a", "b"))
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = promote(a, b)
    return _RowDotTriton.apply(a, b)
