"""The Triton similarity-logsumexp kernels against a float64 reference that materialises the
logits: values and gradients (query, key, scale), awkward sizes, masked tails, low precision,
and the losses end to end with impl="triton".

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest before triton is imported);
on a CUDA machine the same comparisons run compiled, plus bf16 checks at larger sizes.
"""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from mmcl.kernels.row_dot import row_dot_triton
from mmcl.kernels.similarity_lse import similarity_lse_triton
from mmcl.losses import clip_loss, info_nce, nt_xent, supcon_loss

# log(0) = -inf is how fully masked rows/columns get lse = -inf; the interpreter's numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- references


def lse_reference(query, key, scale, mask_diagonal=False, columns=False):
    """Row (and column) logsumexp of the materialised logits, in the inputs' precision."""
    logits = scale * (query @ key.T)
    if mask_diagonal:
        n = min(logits.shape)
        diag = torch.zeros_like(logits, dtype=torch.bool)
        diag[torch.arange(n), torch.arange(n)] = True
        logits = logits.masked_fill(diag, float("-inf"))
    rows = torch.logsumexp(logits, dim=1)
    return (rows, torch.logsumexp(logits, dim=0)) if columns else rows


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
    """Outputs of fn and gradients of a random weighting of them w.r.t. (query, key, scale)."""
    q = query.detach().clone().requires_grad_(query_grad)
    k = key.detach().clone().requires_grad_(key_grad)
    s = scale.detach().clone().requires_grad_()
    outs = fn(q, k, s, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(1)  # the same weights for kernel and reference
    weights = [torch.randn(o.shape, generator=gen, dtype=F64).to(o.device) for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    wrt = [t for t in (q, k, s) if t.requires_grad]
    grads = dict(zip([n for n, t in zip("qks", (q, k, s)) if t.requires_grad], torch.autograd.grad(loss, wrt)))
    return outs, grads


def _compare_fp32(B, N, D, *, mask_diagonal=False, columns=False, key_grad=True, query_grad=True,
                  block_sizes=None, transform=None, scale=14.3):
    query, key = _features(B, D), _features(N, D)
    if transform is not None:
        query, key = transform(query), transform(key)
    s = torch.tensor(scale, device=DEVICE)
    outs, grads = _run(similarity_lse_triton, query, key, s, key_grad=key_grad, query_grad=query_grad,
                       mask_diagonal=mask_diagonal, columns=columns, block_sizes=block_sizes)
    ref_outs, ref_grads = _run(lse_reference, query.double(), key.double(), s.double(), key_grad=key_grad,
                               query_grad=query_grad, mask_diagonal=mask_diagonal, columns=columns)
    assert len(outs) == len(ref_outs)
    for name, o, r in zip(("row_lse", "col_lse"), outs, ref_outs):
        assert o.dtype == torch.float32 and o.shape == r.shape
        _assert_close(o, r, name, atol=2e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        _assert_close(grads[name], ref_grads[name], f"d{name}", atol=5e-5, rtol=1e-4)
    return grads


# --------------------------------------------------------------------------- the kernel, fp32


@pytest.mark.parametrize("B,N,D,mask_diagonal,columns", [
    (1, 1, 32, False, True),
    (1, 37, 48, False, True),
    (37, 37, 48, True, False),       # SimCLR-like: self-similarities left out
    (131, 131, 32, True, True),      # above the tile size, diagonal across several tiles
    (37, 131, 48, False, True),      # more columns than rows
    (131, 37, 32, False, True),      # more rows than columns
    (33, 70, 768, False, True),      # D=768: 12 D chunks; dQ/dK in 2 D slices of 512, the second 1/2 masked
])
@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
def test_kernel_matches_float64_reference(B, N, D, mask_diagonal, columns, bwd_mode):
    _compare_fp32(B, N, D, mask_diagonal=mask_diagonal, columns=columns, block_sizes=dict(BWD_MODE=bwd_mode))


@pytest.mark.parametrize("B,N,mask_diagonal,columns", [(131, 131, True, True), (100, 37, False, True),
                                                        (37, 100, True, False)])
def test_gemm_backward_over_several_row_chunks(B, N, mask_diagonal, columns):
    """BWD_MODE="gemm" computes G in row chunks (of 32 rows here): chunk boundaries, the last
    partial chunk, the diagonal's global offset and the d scale partials of every chunk count."""
    _compare_fp32(B, N, 48, mask_diagonal=mask_diagonal, columns=columns,
                  block_sizes=dict(BWD_MODE="gemm", BWD_GEMM_ROWS=32))


def test_kernel_with_ragged_d_tiles():
    # D=48 over D chunks of 16 and output slices of 32: the second slice is half masked.
    _compare_fp32(45, 70, 48, mask_diagonal=True, columns=True,
                  block_sizes=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=16, BLOCK_DOUT=32, BWD_BLOCK_M=16,
                                   BWD_BLOCK_N=16, num_warps=4))


@pytest.mark.parametrize("B,N,mask_diagonal", [(131, 131, True), (37, 131, False), (100, 20, False)])
def test_column_lse_over_several_row_chunks(B, N, mask_diagonal):
    """The fused column lse's are reduced over row blocks and, for large B, over launches of
    FWD_COL_BLOCKS row blocks each; one block per launch makes every chunk boundary (and the
    diagonal's global row offset) count here."""
    _compare_fp32(B, N, 32, mask_diagonal=mask_diagonal, columns=True, block_sizes=dict(FWD_COL_BLOCKS=1))


@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
def test_queue_without_gradient(bwd_mode):
    """MoCo: 517 queue rows as keys, detached; the query and the scale still get gradients."""
    grads = _compare_fp32(16, 517, 32, key_grad=False, block_sizes=dict(BWD_MODE=bwd_mode))
    assert "k" not in grads


@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
def test_scale_gradient_without_query_gradient(bwd_mode):
    grads = _compare_fp32(37, 40, 32, columns=True, query_grad=False, key_grad=False,
                          block_sizes=dict(BWD_MODE=bwd_mode))
    assert set(grads) == {"s"}


def test_only_column_output_used():
    """grad_row arrives as None when only col_lse feeds the loss."""
    query, key = _features(37, 32), _features(50, 32)
    s = torch.tensor(10.0, device=DEVICE)
    got, ref = [], []
    for fn, dtype in ((similarity_lse_triton, torch.float32), (lse_reference, F64)):
        q, k = query.to(dtype).requires_grad_(), key.to(dtype).requires_grad_()
        ss = s.to(dtype).requires_grad_()
        _, col = fn(q, k, ss, columns=True)
        (got if fn is similarity_lse_triton else ref).extend(torch.autograd.grad(col.sum(), (q, k, ss)))
    for name, a, b in zip("qks", got, ref):
        _assert_close(a, b, f"d{name}", atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
def test_non_contiguous_inputs(bwd_mode):
    # Every other feature of a wider tensor (stride 2), and a transposed (column-major) view.
    def strided(x):
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]

    modes = dict(BWD_MODE=bwd_mode, BWD_GEMM_ROWS=32)
    _compare_fp32(37, 45, 48, columns=True, transform=strided, block_sizes=modes)
    _compare_fp32(37, 45, 48, columns=True, transform=lambda x: x.T.contiguous().T, block_sizes=modes)


def test_large_scale_and_unnormalised_features():
    # Logits up to ~±400: the online softmax must rescale without overflowing exp. fp32 rounding
    # of such logits is amplified by exp, so the bound is torch's own fp32 error (flash rule).
    _low_precision_check(20, 70, 32, torch.float32, False, True, atol=1e-5, scale=100.0, magnitude=2.0)


@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
def test_fully_masked_row_is_minus_infinity_with_zero_gradient(bwd_mode):
    x = _features(1, 32).requires_grad_()
    s = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    row = similarity_lse_triton(x, x, s, mask_diagonal=True, block_sizes=dict(BWD_MODE=bwd_mode))
    assert row.item() == float("-inf")
    gx, gs = torch.autograd.grad(row.sum(), (x, s))
    assert torch.all(gx == 0) and gs.item() == 0


def test_double_backward_is_refused():
    q, s = _features(8, 16).requires_grad_(), torch.tensor(3.0, device=DEVICE, requires_grad=True)
    (gq,) = torch.autograd.grad(similarity_lse_triton(q, q, s).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="grad"):  # refused, never silently wrong
        gq.sum().backward()


def test_mixed_dtypes_promote():
    q, k = _features(20, 32), _features(30, 32, torch.bfloat16)
    s = torch.tensor(10.0, device=DEVICE)
    got = similarity_lse_triton(q, k, s)
    _assert_close(got, lse_reference(q.double(), k.double(), s.double()), "row_lse", atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- fp16 / bf16


def _low_precision_check(B, N, D, dtype, mask_diagonal, columns, atol, scale=14.3, magnitude=1.0,
                         block_sizes=None):
    """flash-attention's rule: |kernel - ref64| <= 2 |torch at dtype - ref64| + atol."""
    query, key = (magnitude * _features(B, D, dtype)), (magnitude * _features(N, D, dtype))
    s = torch.tensor(scale, device=DEVICE)
    kw = dict(mask_diagonal=mask_diagonal, columns=columns)
    outs, grads = _run(similarity_lse_triton, query, key, s, block_sizes=block_sizes, **kw)
    ref_outs, ref_grads = _run(lse_reference, query.double(), key.double(), s.double(), **kw)
    tq_outs, tq_grads = _run(lse_reference, query, key, s.to(dtype), **kw)  # torch, same precision
    assert all(o.dtype == torch.float32 for o in outs)
    assert grads["q"].dtype == dtype and grads["k"].dtype == dtype
    pairs = [(n, o, r, t) for n, o, r, t in zip(("row_lse", "col_lse"), outs, ref_outs, tq_outs)]
    pairs += [(f"d{n}", grads[n], ref_grads[n], tq_grads[n]) for n in "qks"]
    for name, got, ref, torch_same in pairs:
        err = (got.double() - ref).abs().max().item()
        torch_err = (torch_same.double() - ref).abs().max().item()
        assert err <= 2 * torch_err + atol, f"{name}: kernel error {err:.3e} vs torch {dtype} error {torch_err:.3e}"


@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,D,mask_diagonal,columns", [(37, 131, 48, False, True), (70, 70, 32, True, False)])
def test_low_precision_inputs(dtype, B, N, D, mask_diagonal, columns, bwd_mode):
    _low_precision_check(B, N, D, dtype, mask_diagonal, columns, atol=1e-3,
                         block_sizes=dict(BWD_MODE=bwd_mode, BWD_GEMM_ROWS=32))


@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
def test_fp16_small_upstream_gradients_keep_precision(bwd_mode):
    """A mean over ~1e5 rows hands the kernel gradients ~1e-5; times P ~ 1/N that is below
    fp16's normal range, so G is rescaled before its cast for the tensor-core dot. Without the
    rescaling this error is ~20x larger (1.4% here)."""
    q, k = _features(128, 32), _features(128, 32)
    s = torch.tensor(14.3, device=DEVICE)
    w = torch.randn(128, dtype=F64, device=DEVICE) * 1e-5
    q64 = q.double().requires_grad_()
    (ref,) = torch.autograd.grad((lse_reference(q64, k.double(), s.double()) * w).sum(), q64)
    qh = q.half().requires_grad_()
    got_lse = similarity_lse_triton(qh, k.half(), s, block_sizes=dict(BWD_MODE=bwd_mode))
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
    out = row_dot_triton(got_a, got_b)
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
    (da,) = torch.autograd.grad(row_dot_triton(a, b).sum(), (a,))
    _assert_close(da, b, "da", atol=1e-7)
    with pytest.raises(ValueError, match="same number of rows"):
        row_dot_triton(a, _features(41, 64))


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    q, k, s = _features(4, 8), _features(5, 8), torch.tensor(2.0, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        similarity_lse_triton(q.double(), k.double(), s)
    with pytest.raises(ValueError, match="same feature dim"):
        similarity_lse_triton(q, _features(5, 9), s)
    with pytest.raises(ValueError, match="2-D"):
        similarity_lse_triton(q[0], k, s)
    with pytest.raises(ValueError, match="non-empty"):
        similarity_lse_triton(q[:0], k, s)
    with pytest.raises(TypeError, match="scale"):
        similarity_lse_triton(q, k, 2.0)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        similarity_lse_triton(q.tolist(), k, s)
    with pytest.raises(ValueError, match="unknown keys"):
        similarity_lse_triton(q, k, s, block_sizes={"BLOCK_Q": 16})
    with pytest.raises(ValueError, match="powers of two"):
        similarity_lse_triton(q, k, s, block_sizes={"BLOCK_D": 24})
    with pytest.raises(ValueError, match="FWD_COL_BLOCKS"):
        similarity_lse_triton(q, k, s, block_sizes={"FWD_COL_BLOCKS": 0})
    with pytest.raises(ValueError, match="BWD_GEMM_ROWS"):
        similarity_lse_triton(q, k, s, block_sizes={"BWD_GEMM_ROWS": -4})
    with pytest.raises(ValueError, match="BWD_MODE"):
        similarity_lse_triton(q, k, s, block_sizes={"BWD_MODE": "atomic"})


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


def test_backward_mode_from_environment(monkeypatch):
    """$MMCL_TRITON_BWD picks the backward of calls that do not name one (the losses' calls)."""
    sl = importlib.import_module("mmcl.kernels.similarity_lse")  # the package attribute is a function
    calls = []
    real = sl._backward_side_gemm
    monkeypatch.setattr(sl, "_backward_side_gemm", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setenv("MMCL_TRITON_BWD", "gemm")
    _loss_pair(clip_loss, [_leaf(37, 48), _leaf(37, 48), _temperature(1 / 0.07)])
    assert calls == [(37, 48), (37, 48)]  # the image side and the text side
    monkeypatch.setenv("MMCL_TRITON_BWD", "fast")
    with pytest.raises(ValueError, match="MMCL_TRITON_BWD must be one of"):
        clip_loss(_features(4, 8), _features(4, 8), 10.0, impl="triton")


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
@pytest.mark.parametrize("B,N,D,mask_diagonal,columns", [
    (1000, 1000, 768, False, True), (4099, 517, 512, False, False), (2047, 2047, 1024, True, False),
    (257, 8191, 48, False, True),
])
@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
def test_cuda_bf16_flash_rule(B, N, D, mask_diagonal, columns, bwd_mode):
    _low_precision_check(B, N, D, torch.bfloat16, mask_diagonal, columns, atol=2e-3,
                         block_sizes=dict(BWD_MODE=bwd_mode))


@requires_cuda
@pytest.mark.parametrize("bwd_mode", ["fused", "gemm"])
def test_cuda_fp16_flash_rule_large_batch(bwd_mode):
    # g ~ 1/B: the backward's gradient normalisation keeps G out of fp16's subnormals.
    _low_precision_check(8192, 8192, 256, torch.float16, False, True, atol=1e-3, block_sizes=dict(BWD_MODE=bwd_mode))


@requires_cuda
@pytest.mark.parametrize("bwd_mode", [None, "fused", "gemm"])
def test_cuda_memory_is_linear_in_the_batch(bwd_mode):
    """fwd+bwd of the symmetric loss holds no (B, N) buffer: peak stays within 2x (inputs + grads).
    None is clip_loss(impl="triton") itself; the modes compose the same loss from the kernels."""
    B, D = 16384, 512
    img = _features(B, D, torch.bfloat16).requires_grad_()
    txt = _features(B, D, torch.bfloat16).requires_grad_()
    scale = torch.tensor(14.3, device=DEVICE)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if bwd_mode is None:
        loss = clip_loss(img, txt, scale, impl="triton")
    else:
        rows, cols = similarity_lse_triton(img, txt, scale, columns=True, block_sizes=dict(BWD_MODE=bwd_mode))
        positives = scale * row_dot_triton(img, txt)
        loss = 0.5 * ((rows - positives).mean() + (cols - positives).mean())
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    io_bytes = 2 * img.numel() * img.element_size()  # the two gradients, as big as the inputs
    assert extra <= 2 * (2 * io_bytes), f"peak {extra / 2**20:.1f} MiB above the inputs"
