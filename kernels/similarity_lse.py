"""Fused similarity-logsumexp in Triton: the GPU path of every contrastive loss in mmcl.

For query Q (B, D), key K (N, D) and a scale s this computes

    row_lse_i = logsumexp_j (s * q_i . k_j)     and, for CLIP's symmetric loss,
    col_lse_j = logsumexp_i (s * q_i . k_j)

without ever holding the (B, N) logits: a program owns a block of rows, walks over the column
blocks, builds each logit tile with `tl.dot` (looping over D in chunks, fp32 accumulation) and
folds it into a running max / sum (online softmax). The column logsumexps come from the same
pass: each finished tile also yields, per column, the logsumexp over the program's rows; these
(row blocks, N) partials are reduced with torch, in launches over row chunks sized so that the
partials never outgrow the key tensor.

Backward follows flash-attention: with the upstream gradients g_row (B,) and g_col (N,),

    G_ij = g_row_i * exp(S_ij - row_lse_i) + g_col_j * exp(S_ij - col_lse_j),   S = s Q K^T
    dQ = s G K,   dK = s G^T Q,   d s = sum_ij G_ij (q_i . k_j)

and every tile of S (hence of G) is recomputed from Q, K and the saved logsumexps. dQ and dK
are computed with swapped roles, in one of two backward modes (BWD_MODES):

- "fused" (the default): dQ accumulates inside the kernel. A (BLOCK_M, D) fp32 accumulator does
  not fit in registers for D up to 1024, so the output columns are split across the grid
  (BLOCK_DOUT = 512 per program for 16-bit inputs): each program recomputes its S tiles and
  accumulates one D slice of dQ. Matmul passes of 2·B·N·D for CLIP: 1 forward, 2 * (slices + 1)
  backward (6 at D = 768), all in Triton.
- "gemm": the kernel recomputes S once per tile and writes s·G, in the inputs' dtype, for a chunk
  of rows at a time (a (rows, N) buffer of max(512, D) rows: as big as the other operand for
  D >= 512); cuBLAS multiplies the chunk by K. Passes for CLIP: 1 forward, 4 backward (2 in
  Triton, 2 in cuBLAS), whatever D.

Choose with block_sizes={"BWD_MODE": ...} per call or $MMCL_TRITON_BWD for every call.

Memory: O((B + N) * D) for inputs and gradients plus O(B + N) for the logsumexps ("gemm": plus
the G chunk, at most max(512, D) * N elements).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

__all__ = ["similarity_lse_triton", "backward_mode", "SUPPORTED_DTYPES", "BWD_MODES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# "fused": dQ and dK accumulate inside the kernel (no buffer beyond O((B + N) D)).
# "gemm": the kernel writes row chunks of G, cuBLAS multiplies them (a bounded (rows, N) buffer).
BWD_MODES = ("fused", "gemm")
# The backward mode of every call that does not set BWD_MODE in block_sizes (e.g. clip_loss).
BWD_MODE_ENV = "MMCL_TRITON_BWD"


def backward_mode() -> str:
    """The default backward mode: $MMCL_TRITON_BWD if set, else "fused"."""
    mode = os.environ.get(BWD_MODE_ENV, "").strip() or "fused"
    if mode not in BWD_MODES:
        raise ValueError(f"{BWD_MODE_ENV} must be one of {BWD_MODES}, got {mode!r}")
    return mode


# exp(x) = exp2(x * log2 e): exp2 is the fast hardware instruction. A constexpr, since compiled
# kernels may only read globals of that kind.
LOG2E = tl.constexpr(1.4426950408889634)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tile_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_am, stride_ad, stride_bn, stride_bd,
               PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of A[rows] . B[cols]^T, looping over D; masked rows/cols give 0."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_d[None, :] * stride_ad,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # B is loaded already transposed, (BLOCK_D, BLOCK_N), so no register shuffle is needed.
        bt = tl.load(b_ptr + cols[None, :] * stride_bn + offs_d[:, None] * stride_bd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_FP32:  # exact upcast: same products and fp32 sums as the tensor cores
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _load_lse(lse_ptr, g_ptr, idx, ok):
    """Saved logsumexps and upstream gradients at idx. A fully masked row/column has lse -inf
    and all probabilities 0: +inf makes exp2(S - lse) = 0 there (and in the masked tail)."""
    lse = tl.load(lse_ptr + idx, mask=ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse, tl.load(g_ptr + idx, mask=ok, other=0.0)


@triton.jit
def _softmax_grad_tile(logits, lse_a, g_a, lse_b_ptr, g_b_ptr, cols, col_ok, HAS_A_TERM: tl.constexpr,
                       HAS_B_TERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """G = g_a_i exp(S_ij - lse_a_i) + g_b_j exp(S_ij - lse_b_j) for one tile of logits S."""
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_A_TERM:
        g += tl.exp2((logits - lse_a[:, None]) * LOG2E) * g_a[:, None]
    if HAS_B_TERM:
        lse_b, g_b = _load_lse(lse_b_ptr, g_b_ptr, cols, col_ok)
        g += tl.exp2((logits - lse_b[None, :]) * LOG2E) * g_b[None, :]
    return g


@triton.jit
def _lse_fwd_kernel(a_ptr, b_ptr, scale_ptr, lse_ptr, col_part_ptr, M, N, D, row_offset,
                    stride_am, stride_ad, stride_bn, stride_bd,
                    MASK_DIAGONAL: tl.constexpr, COLUMNS: tl.constexpr, PRECISION: tl.constexpr,
                    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """lse_i = logsumexp_j scale * A_i . B_j for the BLOCK_M rows of this program; with COLUMNS
    also, for every column j, the logsumexp over this program's rows only (col_part[pid, j]),
    which the launcher reduces over row blocks. `row_offset` is the global index of A's row 0
    (A may be a chunk of the query), for the diagonal."""
    pid = tl.program_id(0)
    # int64 offsets: rows * stride overflows int32 for big or strided inputs.
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    scale = tl.load(scale_ptr).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < N
        dots = _tile_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_am, stride_ad,
                          stride_bn, stride_bd, PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
        keep = col_ok[None, :]
        if COLUMNS:  # padding rows must not enter the column sums
            keep = keep & row_ok[:, None]
        if MASK_DIAGONAL:
            keep = keep & ((rows + row_offset)[:, None] != cols[None, :])
        logits = tl.where(keep, dots * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        # A row whose logits so far are all masked has max -inf; shift by 0 there so that
        # exp2(-inf - -inf) = nan never appears.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Subtract in natural units, then go to base 2: the max and the lse stay exact natural
        # logits, so no log2(e) * ln(2) round trip shifts them (at logits ~ 400 it would).
        p = tl.exp2((logits - m_use[:, None]) * LOG2E)
        l_i = l_i * tl.exp2((m_i - m_use) * LOG2E) + tl.sum(p, axis=1)
        m_i = m_new
        if COLUMNS:
            # This tile is complete for its columns within this row block: its column lse costs
            # one more exp per logit instead of a second pass of dot products over K Q^T.
            c_max = tl.max(logits, axis=0)
            c_use = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp2((logits - c_use[None, :]) * LOG2E), axis=0)
            tl.store(col_part_ptr + pid.to(tl.int64) * N + cols, c_max + tl.log(c_sum), mask=col_ok)
    # A fully masked row (B = N = 1 with the diagonal masked) ends at -inf + log(0) = -inf.
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _lse_bwd_kernel(a_ptr, b_ptr, scale_ptr, gmax_ptr, lse_a_ptr, g_a_ptr, lse_b_ptr, g_b_ptr,
                    da_ptr, dscale_ptr, M, N, D,
                    stride_am, stride_ad, stride_bn, stride_bd, stride_dm, stride_dd,
                    MASK_DIAGONAL: tl.constexpr, HAS_A_TERM: tl.constexpr, HAS_B_TERM: tl.constexpr,
                    WRITE_DA: tl.constexpr, WRITE_DSCALE: tl.constexpr, PRECISION: tl.constexpr,
                    DOT_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DOUT: tl.constexpr, FLATTEN: tl.constexpr):
    """dA[rows, D slice] = scale * gmax * sum_j G_ij B_j[D slice], and the partial d scale.

    G_ij = g_a_i exp(S_ij - lse_a_i) + g_b_j exp(S_ij - lse_b_j), with the g's divided by gmax
    beforehand so that G stays O(1) when cast to fp16/bf16 for the tensor-core dot.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    scale = tl.load(scale_ptr).to(tl.float32)
    lse_a, g_a = None, None
    if HAS_A_TERM:
        lse_a, g_a = _load_lse(lse_a_ptr, g_a_ptr, rows, row_ok)
    offs_out = (pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)).to(tl.int64)
    out_ok = offs_out < D
    acc = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=tl.float32)
    ds_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Flattening the (column, D) loop nest lets the compiler pipeline the loads of this loop
    # level too: the (BLOCK_N, BLOCK_DOUT) tile of B is prefetched during the S computation
    # instead of being waited for after it.
    for c0 in tl.range(0, N, BLOCK_N, flatten=FLATTEN):
        cols = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < N
        dots = _tile_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_am, stride_ad,
                          stride_bn, stride_bd, PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
        keep = row_ok[:, None] & col_ok[None, :]
        if MASK_DIAGONAL:
            keep = keep & (rows[:, None] != cols[None, :])
        logits = tl.where(keep, dots * scale, float("-inf"))
        g = _softmax_grad_tile(logits, lse_a, g_a, lse_b_ptr, g_b_ptr, cols, col_ok, HAS_A_TERM, HAS_B_TERM,
                               BLOCK_M, BLOCK_N)
        if WRITE_DSCALE:
            ds_acc += tl.sum(g * dots, axis=1)
        if WRITE_DA:
            b_out = tl.load(b_ptr + cols[:, None] * stride_bn + offs_out[None, :] * stride_bd,
                            mask=col_ok[:, None] & out_ok[None, :], other=0.0)
            g_dot = g.to(b_out.dtype)  # G rounded to the input precision, as tensor cores take it
            if DOT_FP32:
                g_dot = g_dot.to(tl.float32)
                b_out = b_out.to(tl.float32)
            acc = tl.dot(g_dot, b_out, acc, input_precision=PRECISION)
    gmax = tl.load(gmax_ptr)
    if WRITE_DA:
        da = acc * (scale * gmax)
        tl.store(da_ptr + rows[:, None] * stride_dm + offs_out[None, :] * stride_dd,
                 da.to(da_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])
    if WRITE_DSCALE:
        # Every D slice computes the same partial sum; the first one writes it.
        tl.store(dscale_ptr + pid_m, tl.sum(ds_acc, axis=0) * gmax, mask=pid_d == 0)


@triton.jit
def _grad_tile_kernel(a_ptr, b_ptr, scale_ptr, lse_a_ptr, g_a_ptr, lse_b_ptr, g_b_ptr, g_out_ptr, ds_ptr,
                      M, N, D, row_offset, stride_am, stride_ad, stride_bn, stride_bd, stride_gm,
                      MASK_DIAGONAL: tl.constexpr, HAS_A_TERM: tl.constexpr, HAS_B_TERM: tl.constexpr,
                      WRITE_G: tl.constexpr, WRITE_DSCALE: tl.constexpr, PRECISION: tl.constexpr,
                      DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of scale * G for the "gemm" backward, stored in G's dtype.

    G_ij = g_a_i exp(S_ij - lse_a_i) + g_b_j exp(S_ij - lse_b_j) as in `_lse_bwd_kernel` (the g's
    divided by a power of two beforehand); the caller multiplies G by B with cuBLAS. The grid
    runs the row tiles fastest, so the programs in flight share one column tile of B (read once
    per row chunk) while the chunk's rows of A stay in L2. `row_offset` is the global index of
    A's row 0, for the diagonal. WRITE_G stores the tile; with WRITE_DSCALE the tile's sum of
    G_ij * (a_i . b_j) goes to ds[pid].
    """
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = pid % n_row_tiles
    pid_n = pid // n_row_tiles
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    scale = tl.load(scale_ptr).to(tl.float32)
    dots = _tile_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_am, stride_ad,
                      stride_bn, stride_bd, PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
    keep = row_ok[:, None] & col_ok[None, :]
    if MASK_DIAGONAL:
        keep = keep & ((rows + row_offset)[:, None] != cols[None, :])
    logits = tl.where(keep, dots * scale, float("-inf"))
    lse_a, g_a = None, None
    if HAS_A_TERM:
        lse_a, g_a = _load_lse(lse_a_ptr, g_a_ptr, rows, row_ok)
    g = _softmax_grad_tile(logits, lse_a, g_a, lse_b_ptr, g_b_ptr, cols, col_ok, HAS_A_TERM, HAS_B_TERM,
                           BLOCK_M, BLOCK_N)
    if WRITE_DSCALE:
        tl.store(ds_ptr + pid, tl.sum(tl.sum(g * dots, axis=1), axis=0))
    if WRITE_G:
        tl.store(g_out_ptr + rows[:, None] * stride_gm + cols[None, :],
                 (g * scale).to(g_out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------- launchers


def _interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older triton
        return False
    return isinstance(_lse_fwd_kernel, InterpretedFunction)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_block_sizes(dim: int, dtype: torch.dtype, interpreted: bool) -> dict:
    """Tile sizes for feature dim `dim`: tensor-core sized tiles on GPUs, small ones in the interpreter.

    BLOCK_DOUT is the D slice of dQ/dK one "fused" backward program owns (its fp32 accumulator
    lives in registers); larger D is split across the grid and costs one recomputation of S per
    slice. The "gemm" backward uses the forward's tiles and BWD_GEMM_ROWS rows of G per launch
    (None: max(512, dim)). BWD_MODE is not a tile size: see `backward_mode`.
    """
    if interpreted:
        # The interpreter's cost is per operation, not per element: fewer, larger D chunks.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=64, BLOCK_DOUT=min(512, max(16, _next_pow2(dim))),
                    BWD_BLOCK_M=32, BWD_BLOCK_N=32, BWD_FLATTEN=False, FWD_COL_BLOCKS=None,
                    BWD_GEMM_ROWS=None, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # fp32 tiles take twice the bytes and, without TF32, the dot runs on FMAs: smaller
        # tiles keep it free of register spills (checked with kernels/aot.py for sm_90).
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=32, BLOCK_DOUT=min(256, max(16, _next_pow2(dim))),
                    BWD_BLOCK_M=64, BWD_BLOCK_N=32, BWD_FLATTEN=True, FWD_COL_BLOCKS=None,
                    BWD_GEMM_ROWS=None, num_warps=8, num_stages=2)
    # A D slice of 512 recomputes S less often than 256 (D = 512: once instead of twice;
    # D = 768: twice instead of 3 times, the second slice a third empty); with 32-column tiles
    # its (64, 512) fp32 accumulator fits the registers without spills.
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, BLOCK_DOUT=min(512, max(16, _next_pow2(dim))),
                BWD_BLOCK_M=64, BWD_BLOCK_N=32, BWD_FLATTEN=True, FWD_COL_BLOCKS=None,
                BWD_GEMM_ROWS=None, num_warps=8, num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting: TF32 only when the user allowed it.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _dot_fp32(dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bfloat16 blocks as their raw uint16 bit patterns (numpy has
    # no bfloat16), so there the dot operands are upcast first; exact, and fp32-accumulated
    # like the tensor cores. Compiled kernels keep the native bf16 dot.
    return dtype == torch.bfloat16 and _interpreted()


def _on_device(t: torch.Tensor):
    """Launch on t's GPU: Triton uses the current CUDA device, which may be another one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _column_chunk_rows(n_cols: int, dim: int, itemsize: int, cfg: dict) -> int:
    """Query rows per forward launch when column lse's are fused in: the launch's (row blocks, N)
    fp32 partials stay within the bytes of the key itself, so memory stays O((B + N) * D)."""
    blocks = cfg.get("FWD_COL_BLOCKS") or max(1, (dim * itemsize) // 4)
    return blocks * cfg["BLOCK_M"]


def _forward(query, key, scale32, mask_diagonal, columns, cfg):
    """row_lse (B,) and, with `columns`, col_lse (N,) from one pass over the logits."""
    (B, D), N = query.shape, key.shape[0]
    row_lse = torch.empty(B, dtype=torch.float32, device=query.device)
    col_lse = None
    chunk = _column_chunk_rows(N, D, key.element_size(), cfg) if columns else B
    with _on_device(query):
        for r0 in range(0, B, chunk):
            a = query[r0:r0 + chunk]
            n_blocks = triton.cdiv(a.shape[0], cfg["BLOCK_M"])
            part = torch.empty((n_blocks, N), dtype=torch.float32, device=query.device) if columns else row_lse
            _lse_fwd_kernel[(n_blocks,)](
                a, key, scale32, row_lse[r0:], part, a.shape[0], N, D, r0,
                a.stride(0), a.stride(1), key.stride(0), key.stride(1),
                MASK_DIAGONAL=mask_diagonal, COLUMNS=columns, PRECISION=_precision(a.dtype),
                DOT_FP32=_dot_fp32(a.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
            if columns:  # torch's logsumexp / logaddexp keep all -inf columns at -inf
                chunk_lse = torch.logsumexp(part, dim=0)
                col_lse = chunk_lse if col_lse is None else torch.logaddexp(col_lse, chunk_lse)
    return row_lse, col_lse


def _backward_side(a, b, scale32, gmax, lse_a, g_a, lse_b, g_b, mask_diagonal, write_da, write_ds, cfg):
    """One side of the backward: (dA or None, per-row-block partial d scale or None)."""
    M, D = a.shape
    bm = cfg["BWD_BLOCK_M"]
    n_row_blocks = triton.cdiv(M, bm)
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device) if write_da else None
    ds = torch.empty(n_row_blocks, dtype=torch.float32, device=a.device) if write_ds else None
    dummy = lse_a if lse_a is not None else lse_b  # unused pointer slots still need a tensor
    n_slices = triton.cdiv(D, cfg["BLOCK_DOUT"]) if write_da else 1
    with _on_device(a):
        _lse_bwd_kernel[(n_row_blocks, n_slices)](
            a, b, scale32, gmax,
            lse_a if lse_a is not None else dummy, g_a if g_a is not None else dummy,
            lse_b if lse_b is not None else dummy, g_b if g_b is not None else dummy,
            da if write_da else dummy, ds if write_ds else dummy,
            M, b.shape[0], D, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            da.stride(0) if write_da else 0, da.stride(1) if write_da else 0,
            MASK_DIAGONAL=mask_diagonal, HAS_A_TERM=lse_a is not None, HAS_B_TERM=lse_b is not None,
            WRITE_DA=write_da, WRITE_DSCALE=write_ds, PRECISION=_precision(a.dtype), DOT_FP32=_dot_fp32(a.dtype),
            BLOCK_M=bm, BLOCK_N=cfg["BWD_BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_DOUT=cfg["BLOCK_DOUT"],
            FLATTEN=cfg["BWD_FLATTEN"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return da, ds


def _gemm_chunk_rows(M: int, dim: int, cfg: dict) -> int:
    """Rows of G per launch of the "gemm" backward: D rows make the (rows, N) buffer as big as the
    other operand (N, D); at least 512 rows, so that the cuBLAS products stay efficient."""
    rows = cfg.get("BWD_GEMM_ROWS") or max(512, dim)
    bm = cfg["BLOCK_M"]
    return min(triton.cdiv(rows, bm) * bm, triton.cdiv(M, bm) * bm)


def _backward_side_gemm(a, b, scale32, gnorm, lse_a, g_a, lse_b, g_b, mask_diagonal, write_da, write_ds, cfg):
    """The same as `_backward_side`, with dA = (scale G) B done by cuBLAS on row chunks of G.

    G is recomputed chunk by chunk into one (rows, N) buffer of A's dtype, so the kernel does
    one pass of S per side and the product with B runs at the library matmul's rate. `gnorm`
    is a power of two, so dA * gnorm rescales exactly.
    """
    (M, D), N = a.shape, b.shape[0]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    chunk = _gemm_chunk_rows(M, D, cfg)
    dummy = lse_a if lse_a is not None else lse_b
    g_buf = torch.empty((chunk, N), dtype=a.dtype, device=a.device) if write_da else dummy
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device) if write_da else None
    ds_parts = []
    with _on_device(a):
        for r0 in range(0, M, chunk):
            rows = min(chunk, M - r0)
            n_tiles = triton.cdiv(rows, bm) * triton.cdiv(N, bn)
            ds = torch.empty(n_tiles, dtype=torch.float32, device=a.device) if write_ds else dummy
            a_chunk = a[r0:r0 + rows]
            _grad_tile_kernel[(n_tiles,)](
                a_chunk, b, scale32,
                lse_a[r0:] if lse_a is not None else dummy, g_a[r0:] if g_a is not None else dummy,
                lse_b if lse_b is not None else dummy, g_b if g_b is not None else dummy,
                g_buf, ds, rows, N, D, r0, a_chunk.stride(0), a_chunk.stride(1), b.stride(0), b.stride(1),
                g_buf.stride(0) if write_da else 0,
                MASK_DIAGONAL=mask_diagonal, HAS_A_TERM=lse_a is not None, HAS_B_TERM=lse_b is not None,
                WRITE_G=write_da, WRITE_DSCALE=write_ds, PRECISION=_precision(a.dtype), DOT_FP32=_dot_fp32(a.dtype),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )
            if write_ds:
                ds_parts.append(ds)
            if write_da:
                torch.mm(g_buf[:rows], b, out=da[r0:r0 + rows])
    if write_da:
        da.mul_(gnorm)  # gnorm has shape (1,), so the product is formed in fp32, then rounded once
    ds_total = torch.cat(ds_parts) * gnorm if write_ds else None
    return da, ds_total


class _SimilarityLSETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, scale, mask_diagonal, columns, cfg):
        scale32 = scale.detach().reshape(1).to(torch.float32)  # stays on the device: no host sync
        row_lse, col_lse = _forward(query, key, scale32, mask_diagonal, columns, cfg)
        ctx.save_for_backward(query, key, scale32, row_lse, col_lse if columns else row_lse)
        ctx.config = (mask_diagonal, columns, cfg, scale.shape, scale.dtype)
        return (row_lse, col_lse) if columns else row_lse

    @staticmethod
    @once_differentiable  # the kernels' gradients are not themselves differentiable
    def backward(ctx, grad_row, grad_col=None):
        query, key, scale32, row_lse, col_lse = ctx.saved_tensors
        mask_diagonal, columns, cfg, scale_shape, scale_dtype = ctx.config
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        if not columns:
            col_lse, grad_col = None, None
        grads = [g for g in (grad_row, grad_col) if g is not None]
        if not grads or not (need_q or need_k or need_s):
            return None, None, None, None, None, None
        # Divide the upstream gradients by their largest magnitude (a device scalar, no sync) so
        # that G = g * P stays O(1): mean-reduced losses give g ~ 1/B, which would fall into
        # fp16's subnormal range at large B before the cast for the tensor-core dot.
        gmax = torch.stack([g.detach().abs().max().float() for g in grads]).max()
        gmax = gmax.clamp_min(torch.finfo(torch.float32).tiny)
        # A power of two at or above the largest |g|: rescaling by it is exact in every dtype.
        gmax = torch.exp2(torch.ceil(torch.log2(gmax))).reshape(1)
        g_row = (grad_row.float() / gmax).contiguous() if grad_row is not None else None
        g_col = (grad_col.float() / gmax).contiguous() if grad_col is not None else None
        lse_row = row_lse if g_row is not None else None
        lse_col = col_lse if g_col is not None else None

        side = _backward_side_gemm if cfg["BWD_MODE"] == "gemm" else _backward_side
        grad_q = grad_k = grad_s = None
        if need_q or need_s:
            grad_q, ds = side(query, key, scale32, gmax, lse_row, g_row, lse_col, g_col,
                              mask_diagonal, need_q, need_s, cfg)
            if need_s:
                grad_s = ds.sum().reshape(scale_shape).to(scale_dtype)
        if need_k:
            grad_k, _ = side(key, query, scale32, gmax, lse_col, g_col, lse_row, g_row,
                             mask_diagonal, True, False, cfg)
        return grad_q, grad_k, grad_s, None, None, None


# --------------------------------------------------------------------------- public entry


def _check_inputs(query, key, scale=None, names=("query", "key")):
    """Raise TypeError/ValueError naming the argument unless the kernels can take these inputs."""
    for name, x in zip(names, (query, key)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            hint = ' (use impl="chunked" or "naive" for float64)' if x.dtype == torch.float64 else ""
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, "
                            f"got {x.dtype}{hint}")
    (qname, kname) = names
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"{qname} and {kname} must have the same feature dim, got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    if query.device != key.device:
        raise ValueError(f"{qname} is on {query.device} but {kname} is on {key.device}")
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or not scale.is_floating_point():
            raise TypeError("scale must be a one-element floating-point tensor (the logit multiplier)")
        if scale.device != query.device:
            raise ValueError(f"scale is on {scale.device} but {qname} is on {query.device}")
    device = query.device
    if device.type == "cpu" and not _interpreted():
        raise ValueError("the Triton kernels need CUDA tensors; CPU tensors run only under "
                         "TRITON_INTERPRET=1 (set before triton is imported)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton kernels need CUDA tensors, got tensors on {device}")


def similarity_lse_triton(query: torch.Tensor, key: torch.Tensor, scale: torch.Tensor, *,
                          mask_diagonal: bool = False, columns: bool = False,
                          block_sizes: dict | None = None):
    """Row (and column) logsumexp of `scale * query @ key.T` with fused Triton kernels.

    Args:
        query: (B, D) float32 / float16 / bfloat16, any strides.
        key: (N, D), same dim; it gets no gradient when it does not require one (MoCo queue).
            If its dtype differs from query's, both are promoted to the wider one.
        scale: 0-dim (or one-element) floating tensor on the same device, may require grad.
        mask_diagonal: leave out logits with row index == column index (self-similarities).
        columns: also return the column logsumexps (for CLIP's text->image half).
        block_sizes: optional overrides of `default_block_sizes` (tests, tuning), and
            BWD_MODE ("fused" | "gemm"; default `backward_mode()`, i.e. $MMCL_TRITON_BWD or "fused").

    Returns:
        row_lse (B,) float32, and col_lse (N,) float32 if `columns`; differentiable in query,
        key and scale. Memory O((B + N) * D): no (B, N) buffer in forward or backward.
    """
    _check_inputs(query, key, scale)
    if query.dtype != key.dtype:
        common = torch.promote_types(query.dtype, key.dtype)
        query, key = query.to(common), key.to(common)
    cfg = default_block_sizes(query.shape[1], query.dtype, _interpreted())
    cfg["BWD_MODE"] = backward_mode()
    if block_sizes:
        unknown = set(block_sizes) - set(cfg)
        if unknown:
            raise ValueError(f"block_sizes has unknown keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg.update(block_sizes)
        tiles = {k: v for k, v in cfg.items() if k.startswith(("BLOCK", "BWD_BLOCK"))}
        bad = {k: v for k, v in tiles.items() if not (isinstance(v, int) and v >= 16 and v & (v - 1) == 0)}
        if bad:
            raise ValueError(f"block sizes must be powers of two >= 16 (tl.arange, tl.dot), got {bad}")
        for name in ("FWD_COL_BLOCKS", "BWD_GEMM_ROWS"):
            if cfg[name] is not None and not (isinstance(cfg[name], int) and cfg[name] > 0):
                raise ValueError(f"{name} must be a positive int or None, got {cfg[name]!r}")
        if cfg["BWD_MODE"] not in BWD_MODES:
            raise ValueError(f"BWD_MODE must be one of {BWD_MODES}, got {cfg['BWD_MODE']!r}")
    return _SimilarityLSETriton.apply(query, key, scale, bool(mask_diagonal), bool(columns), cfg)
