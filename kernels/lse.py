"""Fused similarity-logsumexp in Triton: the GPU path of every contrastive loss in mmcl.

For query Q (B, D), key K (N, D) and a scale s this computes

    row_lse_i = logsumexp_j (s * q_i . k_j)     and, for CLIP's symmetric loss,
    col_lse_j = logsumexp_i (s * q_i . k_j)

without ever holding the (B, N) logits. Row i may leave out one column, exclude[i] (its own
view in SimCLR / SupCon, under gather its global index); -1 keeps every column.

Forward (one matmul pass of 2·B·N·D): a program owns a block of rows and a range of column
tiles; it builds each logit tile with `tl.dot` (fp32 accumulation over D chunks) and folds it
into a running max / sum (online softmax). With few row blocks (small B, MoCo's 256 queries
against a 65,536-key queue, a rank's local rows) the columns are split across programs too
and the partial row logsumexps are merged with torch (flash-decoding), so every shape fills
the GPU. The column logsumexps come from the same tiles: each finished tile yields, per column,
the logsumexp over the program's rows; these (row blocks, N) partials are reduced with torch,
in launches over row chunks sized so that they never outgrow the key tensor.

Backward: with the upstream gradients g_row (B,) and g_col (N,),

    G_ij = g_row_i exp(S_ij - row_lse_i) + g_col_j exp(S_ij - col_lse_j),   S = s Q K^T
    dQ = s G K,   dK = s G^T Q,   d s = sum_ij G_ij (q_i . k_j)

For a chunk of rows at a time one kernel recomputes S with exactly the forward's dot (same
orientation, same order over D, so both sides see the logits the logsumexps came from), writes
G once in the inputs' dtype and reduces d s from the same tile; cuBLAS then forms
dQ_chunk = G K and dK += G^T Q_chunk with fp32 accumulation and fp32 output, scaled by s in
fp32. Matmul passes: CLIP 4 (forward, S→G, dQ, dK), row-only losses 4, a detached queue 3.

Memory: inputs and gradients O((B + N) D), the logsumexps O(B + N), the G chunk
(rows, N) in the inputs' dtype with rows = `_grad_chunk_rows` (2·D rows within [1024, 4096],
so at most 2x the key's bytes for D >= 512), and for 16-bit keys that need a gradient an
fp32 (N, D) accumulator.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from mmcl.kernels._common import check_column_index, check_features, interpreted, on_device, promote

__all__ = ["similarity_lse", "default_block_sizes"]

# exp(x) = exp2(x * log2 e): exp2 is the fast hardware instruction. A constexpr, since compiled
# kernels may only read globals of that kind.
LOG2E = tl.constexpr(1.4426950408889634)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tile_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_am, stride_ad, stride_bn, stride_bd,
               PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of A[rows] . B[cols]^T, looping over D; masked rows/cols give 0.

    The forward and the backward both call this with A = query, B = key, so S is bit-identical
    in both (the same products summed in the same order)."""
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
def _masked_logits(dots, scale, rows, cols, row_ok, col_ok, excl, HAS_EXCLUDE: tl.constexpr):
    """s * dots where kept, -inf for padding rows/columns and each row's excluded column."""
    keep = row_ok[:, None] & col_ok[None, :]
    if HAS_EXCLUDE:
        keep = keep & (excl[:, None] != cols[None, :])
    return tl.where(keep, dots * scale, float("-inf"))


@triton.jit
def _load_lse(lse_ptr, g_ptr, idx, ok):
    """Saved logsumexps and upstream gradients at idx. A fully masked row/column has lse -inf
    and all probabilities 0: +inf makes exp2(S - lse) = 0 there (and in the masked tail)."""
    lse = tl.load(lse_ptr + idx, mask=ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse, tl.load(g_ptr + idx, mask=ok, other=0.0)


@triton.jit
def _lse_fwd_kernel(a_ptr, b_ptr, scale_ptr, excl_ptr, row_part_ptr, col_part_ptr, M, N, D, cols_per_split,
                    stride_am, stride_ad, stride_bn, stride_bd,
                    HAS_EXCLUDE: tl.constexpr, COLUMNS: tl.constexpr, PRECISION: tl.constexpr,
                    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, FLATTEN: tl.constexpr):
    """Program (pid_m, pid_n): the BLOCK_M rows of row block pid_m against the columns of split
    pid_n ([pid_n * cols_per_split, +cols_per_split), a multiple of BLOCK_N).

    row_part[pid_n, i] = logsumexp over the split's columns of scale * A_i . B_j; with COLUMNS
    also col_part[pid_m, j] = logsumexp over this block's rows (each column lies in one split).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # int64 offsets: rows * stride overflows int32 for big or strided inputs.
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    scale = tl.load(scale_ptr).to(tl.float32)
    excl = None
    if HAS_EXCLUDE:
        excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
    col_start = pid_n * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Flattening the (column tile, D chunk) loop nest lets the compiler pipeline across column
    # tiles: the next tile's first loads are in flight during this tile's softmax epilogue.
    for c0 in tl.range(col_start, col_end, BLOCK_N, flatten=FLATTEN):
        cols = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < N
        dots = _tile_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_am, stride_ad,
                          stride_bn, stride_bd, PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
        # Padding rows stay out of the column sums (they only matter with COLUMNS).
        logits = _masked_logits(dots, scale, rows, cols, row_ok, col_ok, excl, HAS_EXCLUDE)
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
            tl.store(col_part_ptr + pid_m.to(tl.int64) * N + cols, c_max + tl.log(c_sum), mask=col_ok)
    # A fully masked row (B = N = 1 with the diagonal masked) ends at -inf + log(0) = -inf.
    tl.store(row_part_ptr + pid_n.to(tl.int64) * M + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _softmax_grad_kernel(a_ptr, b_ptr, scale_ptr, excl_ptr, row_lse_ptr, g_row_ptr, col_lse_ptr, g_col_ptr,
                         g_out_ptr, ds_ptr, M, N, D, stride_am, stride_ad, stride_bn, stride_bd, stride_gm,
                         HAS_EXCLUDE: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
                         WRITE_G: tl.constexpr, WRITE_DSCALE: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of G for a chunk of M query rows, in G's dtype.

    G_ij = g_row_i exp(S_ij - row_lse_i) + g_col_j exp(S_ij - col_lse_j) (the g's divided by a
    power of two beforehand so G stays O(1) in 16 bits). The grid runs the row tiles fastest,
    so the programs in flight share one column tile of B while the chunk's rows of A stay in
    L2. WRITE_G stores the tile; WRITE_DSCALE puts sum_ij G_ij (a_i . b_j) in ds[pid].
    """
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(M, BLOCK_M)
    rows = ((pid % n_row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = ((pid // n_row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    scale = tl.load(scale_ptr).to(tl.float32)
    dots = _tile_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_am, stride_ad,
                      stride_bn, stride_bd, PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
    excl = None
    if HAS_EXCLUDE:
        excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
    logits = _masked_logits(dots, scale, rows, cols, row_ok, col_ok, excl, HAS_EXCLUDE)
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ROW_TERM:
        lse, g_up = _load_lse(row_lse_ptr, g_row_ptr, rows, row_ok)
        g += tl.exp2((logits - lse[:, None]) * LOG2E) * g_up[:, None]
    if COL_TERM:
        lse, g_up = _load_lse(col_lse_ptr, g_col_ptr, cols, col_ok)
        g += tl.exp2((logits - lse[None, :]) * LOG2E) * g_up[None, :]
    if WRITE_DSCALE:
        tl.store(ds_ptr + pid, tl.sum(tl.sum(g * dots, axis=1), axis=0))
    if WRITE_G:
        tl.store(g_out_ptr + rows[:, None] * stride_gm + cols[None, :],
                 g.to(g_out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------- launch configuration


def default_block_sizes(dim: int, dtype: torch.dtype, interpreted: bool) -> dict:
    """Tile sizes and launch options for feature dim `dim` (checked for sm_90 with kernels/aot.py).

    BLOCK_*: the forward's tiles; BWD_BLOCK_*: the S→G kernel's. FWD_SPLITS: column splits of
    the forward grid (None: enough programs for every SM, see `_column_splits`). FWD_COL_BLOCKS:
    row blocks per forward launch when column lse's are fused (None: the partials stay within
    the key's bytes). BWD_CHUNK_ROWS: rows of G per backward step (None: `_grad_chunk_rows`).
    """
    common = dict(FWD_SPLITS=None, FWD_COL_BLOCKS=None, BWD_CHUNK_ROWS=None)
    if interpreted:
        common["fwd_rows_maxnreg"] = None
        # The interpreter's cost is per operation, not per element: fewer, larger D chunks.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=64, BWD_BLOCK_M=32, BWD_BLOCK_N=32, FLATTEN=False,
                    num_warps=4, num_stages=1, bwd_num_warps=4, bwd_num_stages=1, **common)
    if dtype == torch.float32:
        # fp32 tiles take twice the bytes and, without TF32, the dot runs on FMAs.
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=32, BWD_BLOCK_M=128, BWD_BLOCK_N=64, FLATTEN=True,
                    num_warps=8, num_stages=2, bwd_num_warps=8, bwd_num_stages=2, fwd_rows_maxnreg=None,
                    **common)
    # 16-bit, sm_90: the forward's 128x128 tile (two m64n128k16 warpgroups, 64 FLOP per byte of
    # L2 traffic) takes ~195 registers, one CTA per SM; its flattened loop overlaps the next
    # tile's loads with the softmax. The S→G kernel owns one tile and ends in a store: 128x64
    # (m64n64k16) at <= 128 registers runs two CTAs per SM, so one's epilogue hides under the
    # other's dots (at 128x128 it needs 247 registers, one CTA).
    # The row-only forward (no column partials) fits 128 registers without spills when ptxas is
    # told so (fwd_rows_maxnreg): two CTAs per SM at the same 128x128 tile.
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, BWD_BLOCK_M=128, BWD_BLOCK_N=64, FLATTEN=True,
                num_warps=8, num_stages=3, bwd_num_warps=8, bwd_num_stages=3, fwd_rows_maxnreg=128, **common)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting: TF32 only when the user allowed it.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _dot_fp32(dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bfloat16 blocks as their raw uint16 bit patterns (numpy has
    # no bfloat16), so there the dot operands are upcast first; exact, and fp32-accumulated
    # like the tensor cores. Compiled kernels keep the native bf16 dot.
    return dtype == torch.bfloat16 and interpreted()


def _column_splits(n_row_blocks: int, n_cols: int, device: torch.device, cfg: dict) -> tuple[int, int]:
    """(splits, columns per split) of the forward grid. Unless FWD_SPLITS says, the columns are
    split until there are about two programs per SM, each keeping at least 4 column tiles so
    its loop still pipelines; the interpreter (one program at a time) never splits."""
    n_tiles = triton.cdiv(n_cols, cfg["BLOCK_N"])
    splits = cfg["FWD_SPLITS"]
    if splits is None:
        splits = 1
        if device.type == "cuda":
            target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, min(triton.cdiv(target, n_row_blocks), n_tiles // 4))
    tiles_per_split = triton.cdiv(n_tiles, min(splits, n_tiles))
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split * cfg["BLOCK_N"]


def _column_chunk_rows(dim: int, itemsize: int, cfg: dict) -> int:
    """Query rows per forward launch when column lse's are fused in: the launch's (row blocks, N)
    fp32 partials stay within the bytes of the key itself, so memory stays O((B + N) * D)."""
    return (cfg["FWD_COL_BLOCKS"] or max(1, (dim * itemsize) // 4)) * cfg["BLOCK_M"]


def _grad_chunk_rows(n_rows: int, dim: int, cfg: dict) -> int:
    """Rows of G per backward step: 2·D, within [1024, 4096]. The (rows, N) G buffer is then at
    most 2x the key's bytes for D >= 512 (loss memory within 2x inputs plus gradients), and the
    fp32 dK accumulator, read and written once per step (8·N·D bytes), costs about 660/rows of
    a matmul pass on an H100/H200: 43% of one pass at D = 768, 11% of the loss's four."""
    rows = cfg["BWD_CHUNK_ROWS"] or min(4096, max(1024, 2 * dim))
    bm = cfg["BWD_BLOCK_M"]
    return min(triton.cdiv(rows, bm) * bm, triton.cdiv(n_rows, bm) * bm)


# --------------------------------------------------------------------------- launchers


def _forward(query, key, scale32, exclude, columns, cfg):
    """row_lse (B,) and, with `columns`, col_lse (N,) from one pass over the logits."""
    (B, D), N = query.shape, key.shape[0]
    row_lse = torch.empty(B, dtype=torch.float32, device=query.device)
    col_lse = None
    chunk = _column_chunk_rows(D, key.element_size(), cfg) if columns else B
    maxnreg = None if columns else cfg["fwd_rows_maxnreg"]
    launch = {"maxnreg": maxnreg} if maxnreg else {}
    with on_device(query):
        for r0 in range(0, B, chunk):
            a = query[r0:r0 + chunk]
            rows = a.shape[0]
            n_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
            splits, span = _column_splits(n_blocks, N, query.device, cfg)
            row_part = row_lse[r0:r0 + rows] if splits == 1 else \
                torch.empty((splits, rows), dtype=torch.float32, device=query.device)
            col_part = torch.empty((n_blocks, N), dtype=torch.float32, device=query.device) if columns else row_lse
            _lse_fwd_kernel[(n_blocks, splits)](
                a, key, scale32, exclude[r0:r0 + rows] if exclude is not None else row_lse,
                row_part, col_part, rows, N, D, span,
                a.stride(0), a.stride(1), key.stride(0), key.stride(1),
                HAS_EXCLUDE=exclude is not None, COLUMNS=columns, PRECISION=_precision(a.dtype),
                DOT_FP32=_dot_fp32(a.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_D=cfg["BLOCK_D"], FLATTEN=cfg["FLATTEN"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], **launch,
            )
            if splits > 1:  # torch's logsumexp keeps an all -inf row at -inf
                torch.logsumexp(row_part, dim=0, out=row_lse[r0:r0 + rows])
            if columns:
                chunk_lse = torch.logsumexp(col_part, dim=0)
                col_lse = chunk_lse if col_lse is None else torch.logaddexp(col_lse, chunk_lse)
    return row_lse, col_lse


_CUBLAS_OUT_DTYPE = [True]  # False once this torch refuses mm/addmm(..., out_dtype=float32)


def _mm_fp32(a, b, acc=None):
    """a @ b (plus acc, in place) with fp32 accumulation and fp32 output. On CUDA, 16-bit
    operands go to cuBLAS with out_dtype=float32, so neither the split-K partials over N nor the
    result are rounded to 16 bits. Elsewhere (the interpreter's CPU tensors, or a torch without
    that overload) the operands are upcast: the same products and fp32 sums, one fp32 copy."""
    if a.dtype != torch.float32 and a.is_cuda and _CUBLAS_OUT_DTYPE[0]:
        try:
            if acc is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (TypeError, RuntimeError) as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            _CUBLAS_OUT_DTYPE[0] = False
    a, b = a.float(), b.float()
    return torch.mm(a, b) if acc is None else acc.addmm_(a, b)


def _backward(query, key, scale32, exclude, lse_row, g_row, lse_col, g_col, gnorm, needs, cfg):
    """(dQ or None, dK or None, d scale or None) from one S→G kernel per chunk of rows and the
    two products of each chunk of G; `gnorm` (a power of two) undoes the g's normalisation. G is
    stored without s (its entries stay within [-2, 2] whatever the scale: no fp16 overflow at
    large s, no subnormals at small s); s * gnorm multiplies the fp32 products."""
    need_q, need_k, need_s = needs
    (B, D), N = query.shape, key.shape[0]
    bm, bn = cfg["BWD_BLOCK_M"], cfg["BWD_BLOCK_N"]
    chunk = _grad_chunk_rows(B, D, cfg)
    factor = scale32 * gnorm
    write_g = need_q or need_k
    dummy = lse_row if lse_row is not None else lse_col  # unused pointer slots still need a tensor
    g_buf = torch.empty((chunk, N), dtype=query.dtype, device=query.device) if write_g else dummy
    grad_q = torch.empty((B, D), dtype=query.dtype, device=query.device) if need_q else None
    dk_acc = torch.zeros((N, D), dtype=torch.float32, device=key.device) if need_k else None
    ds_parts = []
    with on_device(query):
        for r0 in range(0, B, chunk):
            rows = min(chunk, B - r0)
            n_tiles = triton.cdiv(rows, bm) * triton.cdiv(N, bn)
            ds = torch.empty(n_tiles, dtype=torch.float32, device=query.device) if need_s else dummy
            q_chunk = query[r0:r0 + rows]
            _softmax_grad_kernel[(n_tiles,)](
                q_chunk, key, scale32, exclude[r0:] if exclude is not None else dummy,
                lse_row[r0:] if lse_row is not None else dummy, g_row[r0:] if g_row is not None else dummy,
                lse_col if lse_col is not None else dummy, g_col if g_col is not None else dummy,
                g_buf, ds, rows, N, D, q_chunk.stride(0), q_chunk.stride(1), key.stride(0), key.stride(1),
                g_buf.stride(0) if write_g else 0,
                HAS_EXCLUDE=exclude is not None, ROW_TERM=lse_row is not None, COL_TERM=lse_col is not None,
                WRITE_G=write_g, WRITE_DSCALE=need_s, PRECISION=_precision(query.dtype),
                DOT_FP32=_dot_fp32(query.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["bwd_num_warps"], num_stages=cfg["bwd_num_stages"],
            )
            if need_s:
                ds_parts.append(ds)
            g = g_buf[:rows]
            if need_q:  # scaled in fp32, rounded once to the output dtype
                grad_q[r0:r0 + rows] = _mm_fp32(g, key).mul_(factor)
            if need_k:
                _mm_fp32(g.T, q_chunk, acc=dk_acc)
    del g_buf, g  # before the (N, D) cast of dK below
    grad_k = dk_acc.mul_(factor).to(key.dtype) if need_k else None
    grad_s = (torch.cat(ds_parts).sum() * gnorm).reshape(()) if need_s else None
    return grad_q, grad_k, grad_s


class _SimilarityLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, scale, exclude, columns, cfg):
        scale32 = scale.detach().reshape(1).to(torch.float32)  # stays on the device: no host sync
        row_lse, col_lse = _forward(query, key, scale32, exclude, columns, cfg)
        ctx.save_for_backward(query, key, scale32, row_lse, col_lse if columns else row_lse)
        ctx.exclude, ctx.config = exclude, (columns, cfg, scale.shape, scale.dtype)
        return row_lse, col_lse

    @staticmethod
    @once_differentiable  # the kernels' gradients are not themselves differentiable
    def backward(ctx, grad_row, grad_col=None):
        query, key, scale32, row_lse, col_lse = ctx.saved_tensors
        columns, cfg, scale_shape, scale_dtype = ctx.config
        needs = ctx.needs_input_grad[:3]
        if not columns:
            grad_col = None
        grads = [g for g in (grad_row, grad_col) if g is not None]
        if not grads or not any(needs):
            return None, None, None, None, None, None
        # Divide the upstream gradients by a power of two at or above their largest magnitude
        # (a device scalar, no sync) so that G = g * P stays O(1): mean-reduced losses give
        # g ~ 1/B, which would fall into fp16's subnormals at large B. Exact in every dtype.
        gnorm = torch.stack([g.detach().abs().max().float() for g in grads]).max()
        gnorm = torch.exp2(torch.ceil(torch.log2(gnorm.clamp_min(torch.finfo(torch.float32).tiny)))).reshape(1)
        g_row = (grad_row.float() / gnorm).contiguous() if grad_row is not None else None
        g_col = (grad_col.float() / gnorm).contiguous() if grad_col is not None else None
        grad_q, grad_k, grad_s = _backward(
            query, key, scale32, ctx.exclude, row_lse if g_row is not None else None, g_row,
            col_lse if g_col is not None else None, g_col, gnorm, needs, cfg)
        if grad_s is not None:
            grad_s = grad_s.reshape(scale_shape).to(scale_dtype)
        return grad_q, grad_k, grad_s, None, None, None


# --------------------------------------------------------------------------- public entry


def _check_scale(scale, device):
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or not scale.is_floating_point():
        raise TypeError("scale must be a 0-dim floating-point tensor (the logit multiplier), got "
                        f"{type(scale).__name__}{tuple(scale.shape) if isinstance(scale, torch.Tensor) else ''}")
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device} but query is on {device}")


def _check_exclude(exclude, mask_diagonal, query, key):
    """exclude as a contiguous int64 (B,) tensor, or None: -1 or a column index in [0, N)."""
    B, N = query.shape[0], key.shape[0]
    if mask_diagonal:
        if exclude is not None:
            raise ValueError("give either exclude or mask_diagonal=True (which means exclude=arange(B)), not both")
        return torch.arange(B, device=query.device)
    if exclude is None:
        return None
    return check_column_index("exclude", exclude, query, N)


def _block_sizes(dim, dtype, overrides):
    cfg = default_block_sizes(dim, dtype, interpreted())
    if not overrides:
        return cfg
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"block_sizes has unknown keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(overrides)
    tiles = {k: v for k, v in cfg.items() if k.startswith(("BLOCK", "BWD_BLOCK"))}
    bad = {k: v for k, v in tiles.items() if not (isinstance(v, int) and v >= 16 and v & (v - 1) == 0)}
    if bad:
        raise ValueError(f"block sizes must be powers of two >= 16 (tl.arange, tl.dot), got {bad}")
    for name in ("FWD_SPLITS", "FWD_COL_BLOCKS", "BWD_CHUNK_ROWS"):
        if cfg[name] is not None and not (isinstance(cfg[name], int) and cfg[name] > 0):
            raise ValueError(f"block_sizes[{name!r}] must be a positive int or None, got {cfg[name]!r}")
    return cfg


def similarity_lse(query: torch.Tensor, key: torch.Tensor, scale: torch.Tensor, *,
                   exclude: torch.Tensor | None = None, mask_diagonal: bool = False, columns: bool = False,
                   block_sizes: dict | None = None):
    """Row (and column) logsumexp of `scale * query @ key.T` with fused Triton kernels.

    Args:
        query: (B, D) float32 / float16 / bfloat16, any strides.
        key: (N, D), same dim; it gets no gradient when it does not require one (MoCo queue).
            If its dtype differs from query's, both are promoted to the wider one.
        scale: 0-dim floating tensor on the same device, may require grad.
        exclude: optional (B,) int64: the column row i leaves out (-1: none), e.g. its own
            view in SimCLR. The column lse of a column every row leaves out is -inf, gradient 0.
        mask_diagonal: shorthand for exclude = arange(B) (self-similarities); not with exclude.
        columns: also return the column logsumexps (for CLIP's text->image half).
        block_sizes: optional overrides of `default_block_sizes` (tests, tuning).

    Returns:
        (row_lse (B,) float32, col_lse (N,) float32 or None when not `columns`), differentiable
        in query, key and scale. No (B, N) buffer in forward or backward.
    """
    check_features(query, key)
    _check_scale(scale, query.device)
    exclude = _check_exclude(exclude, mask_diagonal, query, key)
    query, key = promote(query, key)
    cfg = _block_sizes(query.shape[1], query.dtype, block_sizes)
    return _SimilarityLSE.apply(query, key, scale, exclude, bool(columns), cfg)
