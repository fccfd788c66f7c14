"""The Triton similarity-logsumexp kernels against a float64 reference that materialises the
logits: values and gradients (query, key, scale), awkward sizes, excluded columns, split column
ranges, backward row chunks, low precision, and the losses end to end with impl="triton".

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest before triton is imported);
on a CUDA machine the same comparisons run compiled, plus bf16 checks at larger sizes.
"""
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

import mmcl.kernels
from mmcl.kernels import is_available, row_dot, similarity_lse
from mmcl.kernels import lse as lse_module
from mmcl.losses import clip_loss, info_nce, nt_xent, supcon_loss

# log(0) = -inf is how fully masked rows/columns get lse = -inf; the interpreter's numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- references


def lse_reference(query, key, scale, exclude=None, columns=False):
    """(row lse, column lse or None) of the materialised logits, in the inputs' precision;
    row i leaves out column exclude[i] (-1: none)."""
    logits = scale * (query @ key.T)
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).flatten()
        masked = torch.zeros_like(logits, dtype=torch.bool)
        masked[rows, exclude[rows]] = True
        logits = logits.masked_fill(masked, float("-inf"))
    return torch.logsumexp(logits, dim=1), (torch.logsumexp(logits, dim=0) if columns else None)


def exclude_pattern(kind, B, N):
    """The excluded column of every row: None, "diagonal" (SimCLR on one device), "random"
    (some rows -1), or "simclr": a rank's rows [z1_local; z2_local] (B = 2b) against the
    gathered [z1_all; z2_all] (N = 2n), its shard starting at global row 5."""
    if kind is None:
        return None
    rows = torch.arange(B)
    if kind == "diagonal":
        out = torch.where(rows < N, rows, -1)
    elif kind == "random":
        out = torch.randint(-1, N, (B,))
    else:
        b, n, offset = B // 2, N // 2, 5
        assert B == 2 * b and N == 2 * n and offset + b <= n
        out = torch.cat([offset + rows[:b], n + offset + rows[:b]])
    return out.to(DEVICE)


def _features(n, d, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, dtype=F64), dim=-1).to(dtype).to(DEVICE)


def _report(actual, expected, what):
    diff = (actual.double() - expected.double()).abs()
    where = np.unravel_index(int(diff.argmax()), tuple(diff.shape)) if diff.dim() else ()
    return f"{what}: max |diff| {diff.max().item():.3e} at {where}"


def _assert_close(actual, expected, what, atol, rtol=0.0):
    assert actual is not None, f"{what}: no gradient"
    ok = torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol)
    assert ok, _report(actual, expected, what)


def _run(fn, query, key, scale, *, key_grad=True, query_grad=True, **kw):
    """Outputs of fn (Nones dropped) and gradients of a random weighting of them w.r.t.
    (query, key, scale)."""
    q = query.detach().clone().requires_grad_(query_grad)
    k = key.detach().clone().requires_grad_(key_grad)
    s = scale.detach().clone().requires_grad_()
    outs = tuple(o for o in fn(q, k, s, **kw) if o is not None)
    gen = torch.Generator().manual_seed(1)  # the same weights for kernel and reference
    weights = [torch.randn(o.shape, generator=gen, dtype=F64).to(o.device) for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    wrt = [t for t in (q, k, s) if t.requires_grad]
    grads = dict(zip([n for n, t in zip("qks", (q, k, s)) if t.requires_grad], torch.autograd.grad(loss, wrt)))
    return outs, grads


def _compare_fp32(B, N, D, *, exclude=None, columns=False, key_grad=True, query_grad=True,
                  block_sizes=None, transform=None, scale=14.3):
    query, key = _features(B, D), _features(N, D)
    if transform is not None:
        query, key = transform(query), transform(key)
    s = torch.tensor(scale, device=DEVICE)
    excl = exclude_pattern(exclude, B, N)
    outs, grads = _run(similarity_lse, query, key, s, key_grad=key_grad, query_grad=query_grad,
                       exclude=excl, columns=columns, block_sizes=block_sizes)
    ref_outs, ref_grads = _run(lse_reference, query.double(), key.double(), s.double(), key_grad=key_grad,
                               query_grad=query_grad, exclude=excl, columns=columns)
    assert len(outs) == len(ref_outs) == 1 + columns
    for name, o, r in zip(("row_lse", "col_lse"), outs, ref_outs):
        assert o.dtype == torch.float32 and o.shape == r.shape
        _assert_close(o, r, name, atol=2e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        _assert_close(grads[name], ref_grads[name], f"d{name}", atol=5e-5, rtol=1e-4)
    return grads


# --------------------------------------------------------------------------- the kernel, fp32


@pytest.mark.parametrize("B,N,D,exclude,columns", [
    (1, 1, 32, None, True),
    (1, 37, 48, None, True),
    (37, 37, 48, "diagonal", False),    # SimCLR on one device: self-similarities left out
    (131, 131, 32, "diagonal", True),   # above the tile size, diagonal across several tiles
    (37, 131, 48, "random", True),      # more columns than rows, arbitrary excluded columns
    (131, 37, 32, None, True),          # more rows than columns
    (38, 80, 48, "simclr", True),       # a rank's two views against the gathered two views
    (33, 70, 768, None, True),          # D=768: 12 D chunks
])
def test_kernel_matches_float64_reference(B, N, D, exclude, columns):
    _compare_fp32(B, N, D, exclude=exclude, columns=columns)


@pytest.mark.parametrize("B,N,exclude,columns", [(131, 131, "diagonal", True), (100, 37, None, True),
                                                  (37, 100, "random", False)])
def test_backward_over_several_row_chunks(B, N, exclude, columns):
    """G is built for 32 query rows at a time: the chunk boundaries, the last partial chunk, the
    excluded columns of every chunk, dK accumulated over chunks and d scale from every chunk."""
    _compare_fp32(B, N, 48, exclude=exclude, columns=columns, block_sizes=dict(BWD_CHUNK_ROWS=32))


@pytest.mark.parametrize("B,N,splits,exclude,columns", [
    (5, 200, 4, "random", True),    # 7 column tiles in splits of 2: 64, 64, 64 and 8 columns
    (16, 517, 3, None, False),      # MoCo-like: few rows against many keys
    (3, 40, 8, None, True),         # more splits asked than column tiles: one per tile
    (70, 70, 2, "diagonal", True),  # several row blocks and splits
])
def test_forward_split_across_columns(B, N, splits, exclude, columns):
    """Few row blocks: the columns are split across programs and the partial row lse's merged
    (flash-decoding); each column's lse still comes from one split, the gradients unchanged."""
    _compare_fp32(B, N, 32, exclude=exclude, columns=columns, block_sizes=dict(FWD_SPLITS=splits))


def test_split_and_chunk_rules_for_an_h200(monkeypatch):
    """The launch rules at the benchmark's shapes on a 132-SM GPU (no GPU needed to evaluate)."""
    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    cuda = torch.device("cuda")
    cfg = lse_module.default_block_sizes(128, torch.bfloat16, interpreted=False)
    # MoCo, 256 queries x 65,536 keys: 2 row blocks, 128 splits of 4 column tiles = 256 programs.
    assert lse_module._column_splits(2, 65536, cuda, cfg) == (128, 512)
    # B = N = 65,536: 512 row blocks already fill the GPU, no split.
    assert lse_module._column_splits(512, 65536, cuda, cfg)[0] == 1
    # A rank's local rows, 4,096 x 65,536: 32 row blocks, 9 splits of 57 tiles (288 programs).
    assert lse_module._column_splits(32, 65536, cuda, cfg) == (9, 57 * 128)
    assert lse_module._column_splits(2, 65536, torch.device("cpu"), cfg)[0] == 1  # interpreter
    for dim, rows in ((128, 1024), (768, 1536), (1024, 2048), (4096, 4096)):
        assert lse_module._grad_chunk_rows(65536, dim, cfg) == rows
    assert lse_module._grad_chunk_rows(200, 768, cfg) == 256  # never more than B, in whole tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_launch_configuration(dtype):
    """The tiles and loop flattening a GPU launch uses (128-row tiles, 64 or 128 columns), here
    through the interpreter: masking of partial tiles at those sizes, a forced column split and
    two backward chunks. (The interpreter runs a flattened loop as the plain nest.)"""
    cfg = lse_module.default_block_sizes(96, dtype, interpreted=False)
    overrides = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BWD_BLOCK_M", "BWD_BLOCK_N", "FLATTEN")}
    overrides.update(FWD_SPLITS=2, BWD_CHUNK_ROWS=128)
    if dtype == torch.float32:
        _compare_fp32(200, 300, 96, exclude="random", columns=True, block_sizes=overrides)
    else:
        _low_precision_check(200, 300, 96, dtype, "random", True, atol=1e-3, block_sizes=overrides)


def test_kernel_with_ragged_d_tiles():
    # D=48 over D chunks of 16 and 16-row tiles.
    _compare_fp32(45, 70, 48, exclude="diagonal", columns=True,
                  block_sizes=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=16, BWD_BLOCK_M=16, BWD_BLOCK_N=16,
                                   num_warps=4, bwd_num_warps=4))


@pytest.mark.parametrize("B,N,exclude", [(131, 131, "diagonal"), (37, 131, "random"), (100, 20, None)])
def test_column_lse_over_several_row_chunks(B, N, exclude):
    """The fused column lse's are reduced over row blocks and, for large B, over launches of
    FWD_COL_BLOCKS row blocks each; one block per launch makes every chunk boundary (and each
    chunk's slice of the excluded columns) count here."""
    _compare_fp32(B, N, 32, exclude=exclude, columns=True, block_sizes=dict(FWD_COL_BLOCKS=1))


def test_queue_without_gradient():
    """MoCo: 517 queue rows as keys, detached; the query and the scale still get gradients."""
    grads = _compare_fp32(16, 517, 32, key_grad=False, block_sizes=dict(FWD_SPLITS=4))
    assert "k" not in grads


def test_scale_gradient_without_query_gradient():
    grads = _compare_fp32(37, 40, 32, columns=True, query_grad=False, key_grad=False)
    assert set(grads) == {"s"}


def test_only_column_output_used():
    """grad_row arrives as None when only col_lse feeds the loss."""
    query, key = _features(37, 32), _features(50, 32)
    s = torch.tensor(10.0, device=DEVICE)
    got, ref = [], []
    for fn, dtype in ((similarity_lse, torch.float32), (lse_reference, F64)):
        q, k = query.to(dtype).requires_grad_(), key.to(dtype).requires_grad_()
        ss = s.to(dtype).requires_grad_()
        _, col = fn(q, k, ss, columns=True)
        (got if fn is similarity_lse else ref).extend(torch.autograd.grad(col.sum(), (q, k, ss)))
    for name, a, b in zip("qks", got, ref):
        _assert_close(a, b, f"d{name}", atol=5e-5, rtol=1e-4)


def test_non_contiguous_inputs():
    # Every other feature of a wider tensor (stride 2), and a transposed (column-major) view.
    def strided(x):
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]

    chunks = dict(BWD_CHUNK_ROWS=32)
    _compare_fp32(37, 45, 48, columns=True, exclude="random", transform=strided, block_sizes=chunks)
    _compare_fp32(37, 45, 48, columns=True, transform=lambda x: x.T.contiguous().T, block_sizes=chunks)


def test_large_scale_and_unnormalised_features():
    """Logits up to ~±400: the online softmax must rescale without overflowing exp, and fp32
    rounding of such logits is amplified by exp: the bound is torch's own fp32 error (flash
    rule). dK uses the same S tiles as the forward, so its error is torch's own size (6.7e-4
    here); the bound adds a quarter ulp of the largest logit amplified by s·|q| (7.6e-4), so it
    holds whichever BLAS rounds the interpreter's dots, and still fails a K side that recomputes
    S in the other orientation (6.4e-3 on an AMD EPYC's OpenBLAS)."""
    _low_precision_check(20, 70, 32, torch.float32, None, True, atol=1e-5, scale=100.0, magnitude=2.0,
                         ulp_bounds=True)


def test_fully_masked_row_is_minus_infinity_with_zero_gradient():
    x = _features(1, 32).requires_grad_()
    s = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    row, col = similarity_lse(x, x, s, mask_diagonal=True)
    assert col is None and row.item() == float("-inf")
    gx, gs = torch.autograd.grad(row.sum(), (x, s))
    assert torch.all(gx == 0) and gs.item() == 0


def test_column_every_row_excludes_is_minus_infinity_with_zero_gradient():
    """Column 2 is left out by all rows: its lse is -inf, and even a nonzero upstream gradient
    on it gives it no gradient; the other columns match the reference."""
    q, k = _features(3, 32).requires_grad_(), _features(4, 32).requires_grad_()
    s = torch.tensor(5.0, device=DEVICE)
    exclude = torch.tensor([2, 2, 2], device=DEVICE)
    row, col = similarity_lse(q, k, s, exclude=exclude, columns=True)
    ref_row, ref_col = lse_reference(q.double(), k.double(), s.double(), exclude, columns=True)
    assert col[2].item() == float("-inf")
    _assert_close(col[[0, 1, 3]], ref_col[[0, 1, 3]], "col_lse", atol=2e-5)
    _assert_close(row, ref_row, "row_lse", atol=2e-5)
    gq, gk = torch.autograd.grad((row, col), (q, k), grad_outputs=(torch.ones_like(row), torch.ones_like(col)))
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all()
    assert torch.all(gk[2] == 0)


def test_double_backward_is_refused():
    q, s = _features(8, 16).requires_grad_(), torch.tensor(3.0, device=DEVICE, requires_grad=True)
    (gq,) = torch.autograd.grad(similarity_lse(q, q, s)[0].sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="grad"):  # refused, never silently wrong
        gq.sum().backward()


def test_mixed_dtypes_promote():
    q, k = _features(20, 32), _features(30, 32, torch.bfloat16)
    s = torch.tensor(10.0, device=DEVICE)
    got, none = similarity_lse(q, k, s)
    assert none is None
    ref, _ = lse_reference(q.double(), k.double(), s.double())
    _assert_close(got, ref, "row_lse", atol=2e-5, rtol=1e-5)


def test_package_exports_functions_not_shadowing_modules():
    assert mmcl.kernels.similarity_lse is lse_module.similarity_lse
    assert inspect.ismodule(mmcl.kernels.lse) and inspect.ismodule(mmcl.kernels.dot)
    assert callable(mmcl.kernels.row_dot) and not inspect.ismodule(mmcl.kernels.row_dot)
    assert is_available("cpu" if DEVICE == "cpu" else "cuda") == (True, "")
    assert is_available("meta")[0] is False


# --------------------------------------------------------------------------- fp16 / bf16


def _logit_ulp_bounds(query, key, scale):
    """(lse bound, gradient bound) for a quarter ulp of fp32 rounding of the largest logit |S|:
    on the lse directly, on the gradients amplified by s·max(|q|, |k|) (d P = P d S). Rounding
    of that size is the BLAS's own, whatever CPU the interpreter's matmul runs on."""
    logits = scale.double() * (query.double() @ key.double().T)
    ulp = torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(logits.abs().max())).item()
    norms = max(query.double().norm(dim=1).max().item(), key.double().norm(dim=1).max().item())
    return 0.25 * ulp, 0.25 * ulp * scale.item() * norms


def _low_precision_check(B, N, D, dtype, exclude, columns, atol, scale=14.3, magnitude=1.0,
                         block_sizes=None, ulp_bounds=False):
    """flash-attention's rule: |kernel - ref64| <= 2 |torch at dtype - ref64| + atol, plus with
    `ulp_bounds` the BLAS-independent `_logit_ulp_bounds`."""
    query, key = (magnitude * _features(B, D, dtype)), (magnitude * _features(N, D, dtype))
    s = torch.tensor(scale, device=DEVICE)
    kw = dict(exclude=exclude_pattern(exclude, B, N), columns=columns)
    outs, grads = _run(similarity_lse, query, key, s, block_sizes=block_sizes, **kw)
    ref_outs, ref_grads = _run(lse_reference, query.double(), key.double(), s.double(), **kw)
    tq_outs, tq_grads = _run(lse_reference, query, key, s.to(dtype), **kw)  # torch, same precision
    assert all(o.dtype == torch.float32 for o in outs)
    assert grads["q"].dtype == dtype and grads["k"].dtype == dtype
    pairs = [(n, o, r, t) for n, o, r, t in zip(("row_lse", "col_lse"), outs, ref_outs, tq_outs)]
    pairs += [(f"d{n}", grads[n], ref_grads[n], tq_grads[n]) for n in "qks"]
    lse_ulp, grad_ulp = _logit_ulp_bounds(query, key, s) if ulp_bounds else (0.0, 0.0)
    for name, got, ref, torch_same in pairs:
        err = (got.double() - ref).abs().max().item()
        torch_err = (torch_same.double() - ref).abs().max().item()
        bound = 2 * torch_err + atol + (lse_ulp if name.endswith("lse") else grad_ulp)
        assert err <= bound, f"{name}: kernel error {err:.3e} vs torch {dtype} error {torch_err:.3e}, bound {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,D,exclude,columns", [(37, 131, 48, None, True), (70, 70, 32, "diagonal", False),
                                                    (38, 80, 768, "simclr", True)])
def test_low_precision_inputs(dtype, B, N, D, exclude, columns):
    _low_precision_check(B, N, D, dtype, exclude, columns, atol=1e-3,
                         block_sizes=dict(BWD_CHUNK_ROWS=32, FWD_SPLITS=2))


def test_fp16_small_upstream_gradients_keep_precision():
    """A mean over ~1e5 rows hands the kernel gradients ~1e-5; times P ~ 1/N that is below
    fp16's normal range, so G is rescaled before its cast to fp16. Without the rescaling this
    error is ~20x larger (1.4% here)."""
    q, k = _features(128, 32), _features(128, 32)
    s = torch.tensor(14.3, device=DEVICE)
    w = torch.randn(128, dtype=F64, device=DEVICE) * 1e-5
    q64 = q.double().requires_grad_()
    (ref,) = torch.autograd.grad((lse_reference(q64, k.double(), s.double())[0] * w).sum(), q64)
    qh = q.half().requires_grad_()
    got_lse, _ = similarity_lse(qh, k.half(), s)
    (got,) = torch.autograd.grad((got_lse.double() * w).sum(), qh)
    rel = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 3e-3, f"dq relative error {rel:.2e}"


# --------------------------------------------------------------------------- positive logits


@pytest.mark.parametrize("B,D,dtype", [(1, 32, torch.float32), (131, 300, torch.float32), (37, 48, torch.bfloat16),
                                       (37, 48, torch.float16)])
def test_row_dot_matches_float64(B, D, dtype):
    a, b = _features(B, D, dtype) * 3, _features(B, D, dtype)
    a = a.T.contiguous().T  # column-major: strides are honoured
    g = torch.randn(B, dtype=F64, device=DEVICE)
    got_a, got_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = row_dot(got_a, got_b)
    assert out.dtype == torch.float32 and out.shape == (B,)
    da, db = torch.autograd.grad((out.double() * g).sum(), (got_a, got_b))
    assert da.dtype == dtype and db.dtype == dtype
    ref = (a.double() * b.double()).sum(-1)
    # The inputs are exact in float64; fp32 accumulation over D terms, then the gradients
    # rounded once to the inputs' dtype.
    _assert_close(out, ref, "row_dot", atol=1e-5, rtol=1e-5)
    eps = torch.finfo(dtype).eps
    _assert_close(da, g[:, None] * b.double(), "da", atol=1e-6, rtol=eps)
    _assert_close(db, g[:, None] * a.double(), "db", atol=1e-6, rtol=eps)


def test_row_dot_one_input_without_gradient():
    a, b = _features(40, 64).requires_grad_(), _features(40, 64)
    (da,) = torch.autograd.grad(row_dot(a, b).sum(), (a,))
    _assert_close(da, b, "da", atol=1e-7)
    with pytest.raises(ValueError, match="same number of rows"):
        row_dot(a, _features(41, 64))


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    q, k, s = _features(4, 8), _features(5, 8), torch.tensor(2.0, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        similarity_lse(q.double(), k.double(), s)
    with pytest.raises(ValueError, match="same feature dim"):
        similarity_lse(q, _features(5, 9), s)
    with pytest.raises(ValueError, match="2-D"):
        similarity_lse(q[0], k, s)
    with pytest.raises(ValueError, match="non-empty"):
        similarity_lse(q[:0], k, s)
    with pytest.raises(TypeError, match="scale"):
        similarity_lse(q, k, 2.0)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        similarity_lse(q.tolist(), k, s)
    with pytest.raises(ValueError, match="unknown keys"):
        similarity_lse(q, k, s, block_sizes={"BWD_MODE": "gemm"})
    with pytest.raises(ValueError, match="powers of two"):
        similarity_lse(q, k, s, block_sizes={"BLOCK_D": 24})
    for name in ("FWD_COL_BLOCKS", "FWD_SPLITS", "BWD_CHUNK_ROWS"):
        with pytest.raises(ValueError, match=name):
            similarity_lse(q, k, s, block_sizes={name: 0})
    ok = torch.tensor([0, 1, -1, 4], device=DEVICE)
    with pytest.raises(ValueError, match="not both"):
        similarity_lse(q, k, s, exclude=ok, mask_diagonal=True)
    with pytest.raises(TypeError, match="exclude must be an int64"):
        similarity_lse(q, k, s, exclude=ok.int())
    with pytest.raises(ValueError, match=r"exclude must have shape \(4,\)"):
        similarity_lse(q, k, s, exclude=ok[:3])
    with pytest.raises(ValueError, match=r"exclude must hold -1 or column indices in \[0, 5\)"):
        similarity_lse(q, k, s, exclude=torch.tensor([0, 1, 2, 5], device=DEVICE))
    with pytest.raises(ValueError, match="exclude must hold"):
        similarity_lse(q, k, s, exclude=torch.tensor([0, -2, 2, 3], device=DEVICE))


# --------------------------------------------------------------------------- losses end to end


def _loss_pair(loss_fn, tensors, **kw):
    """(value, grads) with impl="triton" on fp32 copies and impl="naive" on float64 leaves."""
    results = []
    for impl, dtype in (("triton", torch.float32), ("naive", F64)):
        leaves = [t.detach().to(dtype).requires_grad_(t.is_floating_point() and t.requires_grad) for t in tensors]
        loss = loss_fn(*leaves, impl=impl, **kw)
        wrt = [t for t in leaves if t.requires_grad]
        results.append((loss, torch.autograd.grad(loss, wrt)))
    (loss, grads), (ref, ref_grads) = results
    _assert_close(loss, ref, "loss", atol=2e-6, rtol=1e-5)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        _assert_close(g, r, f"gradient of input {i}", atol=2e-6, rtol=1e-4)


def _leaf(*shape):
    return F.normalize(torch.randn(*shape, dtype=F64), dim=-1).to(DEVICE).requires_grad_()


def _temperature(value):
    return torch.tensor(value, dtype=F64, device=DEVICE, requires_grad=True)


@pytest.mark.parametrize("B", [1, 37])
def test_clip_loss_triton(B):
    _loss_pair(clip_loss, [_leaf(B, 48), _leaf(B, 48), _temperature(1 / 0.07)])


@pytest.mark.parametrize("queue_size", [None, 517])
def test_info_nce_triton(queue_size):
    tensors = [_leaf(37, 32), _leaf(37, 32), _temperature(0.2)]
    kw = {}
    if queue_size:
        kw["queue"] = F.normalize(torch.randn(queue_size, 32, dtype=torch.float32), dim=-1).to(DEVICE)
    _loss_pair(info_nce, tensors, **kw)


def test_nt_xent_triton():
    _loss_pair(nt_xent, [_leaf(37, 48), _leaf(37, 48), _temperature(0.5)])


def test_supcon_loss_triton():
    labels = torch.randint(0, 5, (19,), device=DEVICE)
    _loss_pair(lambda f, t, impl: supcon_loss(f, labels, t, impl=impl), [_leaf(19, 2, 32), _temperature(0.1)])




# --------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("B,N,D,exclude,columns", [
    (1000, 1000, 768, None, True), (4099, 517, 512, None, False), (2047, 2047, 1024, "diagonal", False),
    (257, 8191, 48, "random", True), (256, 65536, 128, None, False),  # the MoCo queue shape: split columns
])
def test_cuda_bf16_flash_rule(B, N, D, exclude, columns):
    _low_precision_check(B, N, D, torch.bfloat16, exclude, columns, atol=2e-3)


@requires_cuda
def test_cuda_fp16_flash_rule_large_batch():
    # g ~ 1/B: the backward's gradient normalisation keeps G out of fp16's subnormals.
    _low_precision_check(8192, 8192, 256, torch.float16, None, True, atol=1e-3)


@requires_cuda
def test_cuda_fp32_over_several_chunks_and_splits():
    _compare_fp32(3000, 2500, 128, exclude="random", columns=True, block_sizes=dict(BWD_CHUNK_ROWS=1024))


@requires_cuda
@pytest.mark.parametrize("through_loss", [True, False])
def test_cuda_memory_is_linear_in_the_batch(through_loss):
    """fwd+bwd of the symmetric loss holds no (B, N) buffer: peak stays within 2x (inputs + grads).
    clip_loss(impl="triton") itself, and the same loss composed from the kernels."""
    B, D = 16384, 512
    img = _features(B, D, torch.bfloat16).requires_grad_()
    txt = _features(B, D, torch.bfloat16).requires_grad_()
    scale = torch.tensor(14.3, device=DEVICE)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if through_loss:
        loss = clip_loss(img, txt, scale, impl="triton")
    else:
        rows, cols = similarity_lse(img, txt, scale, columns=True)
        positives = scale * row_dot(img, txt)
        loss = 0.5 * ((rows - positives).mean() + (cols - positives).mean())
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    io_bytes = 4 * img.numel() * img.element_size()  # the two inputs and their two gradients
    assert extra <= 2 * io_bytes, f"peak {extra / 2**20:.1f} MiB above the inputs"
