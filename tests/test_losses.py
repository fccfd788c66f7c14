"""The reference losses against peers' implementations and explicit float64 formulas, and the
chunked path against the reference (values and gradients, uneven tiles)."""
import math

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from mmcl.chunked import similarity_lse_chunked
import mmcl.kernels
from mmcl.losses import AUTO_NAIVE_MAX_LOGIT_BYTES, LogitScale, clip_loss, info_nce, nt_xent, resolve_impl, supcon_loss
from mmcl.losses._common import _similarity_lse_naive

F64 = torch.float64


def _leaf(*shape, normalize=True):
    x = torch.randn(*shape, dtype=F64)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    return x.requires_grad_()


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _assert_close(actual, expected, what, atol=1e-10, rtol=1e-9):
    actual, expected = torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64)
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        diff = (actual - expected).abs()
        where = np.unravel_index(int(diff.argmax()), tuple(diff.shape)) if diff.dim() else ()
        raise AssertionError(f"{what}: max |diff| {diff.max().item():.3e} at {where}")


def _np_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy by the textbook formula, in numpy float64."""
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - logits[np.arange(len(labels)), labels]))


# ----------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("batch", [1, 37, 128])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_clip_loss_matches_open_clip_values_and_gradients(batch, impl):
    img, txt = _leaf(batch, 48), _leaf(batch, 48)
    scale = torch.tensor(1 / 0.07, dtype=F64, requires_grad=True)
    ours = clip_loss(img, txt, scale, impl=impl)
    theirs = ClipLoss()(img, txt, scale)
    _assert_close(ours, theirs, "loss")
    for name, g_ours, g_theirs in zip(
        ["image", "text", "scale"], _grads(ours, [img, txt, scale]), _grads(theirs, [img, txt, scale])
    ):
        _assert_close(g_ours, g_theirs, f"d loss / d {name}")


@pytest.mark.parametrize("batch", [1, 37, 128])
def test_clip_loss_matches_transformers(batch):
    img, txt = _leaf(batch, 32), _leaf(batch, 32)
    scale = torch.tensor(20.0, dtype=F64, requires_grad=True)
    ours = clip_loss(img, txt, scale, impl="chunked")
    theirs = image_text_contrastive_loss(scale * txt @ img.T)  # transformers takes logits_per_text
    _assert_close(ours, theirs, "loss")
    for g_ours, g_theirs in zip(_grads(ours, [img, txt, scale]), _grads(theirs, [img, txt, scale])):
        _assert_close(g_ours, g_theirs, "gradient")


def test_clip_loss_logit_bias_changes_nothing():
    img, txt = _leaf(9, 16), _leaf(9, 16)
    _assert_close(clip_loss(img, txt, 10.0, logit_bias=-3.5, impl="naive"), clip_loss(img, txt, 10.0), "loss")


# ----------------------------------------------------------------------------- InfoNCE / MoCo


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("batch", [1, 13])
def test_info_nce_in_batch_matches_formula(impl, batch):
    q, k = _leaf(batch, 24), _leaf(batch, 24)
    T = 0.2
    loss = info_nce(q, k, T, impl=impl)
    qn, kn = q.detach().numpy(), k.detach().numpy()
    _assert_close(loss, _np_ce(qn @ kn.T / T, np.arange(batch)), "loss")
    # Gradient against autograd through an independent torch formula.
    ref = -torch.log_softmax(q @ k.T / T, dim=1).diagonal().mean()
    for g, r in zip(_grads(loss, [q, k]), _grads(ref, [q, k])):
        _assert_close(g, r, "gradient")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("batch,queue_size", [(1, 5), (13, 517), (40, 7)])
def test_info_nce_with_queue_matches_moco_v2(impl, batch, queue_size):
    q, k = _leaf(batch, 24), _leaf(batch, 24)
    queue = _leaf(queue_size, 24)
    T = 0.07
    loss = info_nce(q, k, T, queue=queue, impl=impl)
    # MoCo v2: l_pos (N, 1), l_neg (N, K), logits = cat / T, label 0.
    qn, kn, Qn = (t.detach().numpy() for t in (q, k, queue))
    l_pos = np.einsum("nc,nc->n", qn, kn)[:, None]
    l_neg = np.einsum("nc,kc->nk", qn, Qn)
    _assert_close(loss, _np_ce(np.concatenate([l_pos, l_neg], 1) / T, np.zeros(batch, dtype=int)), "loss")
    ref_logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.detach().T], 1) / T
    ref = -torch.log_softmax(ref_logits, 1)[:, 0].mean()
    for g, r in zip(_grads(loss, [q, k]), _grads(ref, [q, k])):
        _assert_close(g, r, "gradient")
    assert torch.autograd.grad(info_nce(q, k, T, queue=queue, impl=impl), queue, allow_unused=True)[0] is None


# ----------------------------------------------------------------------------- SimCLR / SupCon


def _nt_xent_formula(z1: np.ndarray, z2: np.ndarray, T: float) -> float:
    z = np.concatenate([z1, z2])
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = np.array([z[i] @ z[a] / T for a in range(2 * n) if a != i])
        total += -(z[i] @ z[j] / T) + math.log(np.exp(sims).sum())
    return total / (2 * n)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("n", [1, 2, 11])
def test_nt_xent_matches_simclr_formula(impl, n):
    z1, z2 = _leaf(n, 20), _leaf(n, 20)
    loss = nt_xent(z1, z2, 0.5, impl=impl)
    _assert_close(loss, _nt_xent_formula(z1.detach().numpy(), z2.detach().numpy(), 0.5), "loss")
    z = torch.cat([z1, z2])
    logits = (z @ z.T / 0.5).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    ref = torch.nn.functional.cross_entropy(logits, torch.arange(2 * n).roll(n))
    for g, r in zip(_grads(loss, [z1, z2]), _grads(ref, [z1, z2])):
        _assert_close(g, r, "gradient")


def _supcon_formula(features: np.ndarray, labels: np.ndarray, T: float) -> float:
    B, V, _ = features.shape
    z = features.transpose(1, 0, 2).reshape(B * V, -1)
    y = np.tile(labels, V)
    losses = []
    for i in range(B * V):
        others = [a for a in range(B * V) if a != i]
        log_denominator = math.log(sum(math.exp(z[i] @ z[a] / T) for a in others))
        positives = [p for p in others if y[p] == y[i]]
        if positives:
            losses.append(-np.mean([z[i] @ z[p] / T - log_denominator for p in positives]))
    return float(np.mean(losses))


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("batch,views,classes", [(7, 2, 3), (10, 3, 10), (5, 1, 2)])
def test_supcon_matches_paper_formula(impl, batch, views, classes):
    features = _leaf(batch, views, 16)
    labels = torch.randint(0, classes, (batch,))
    if views == 1:
        labels[:2] = 0  # at least one anchor with a positive
    loss = supcon_loss(features, labels, 0.1, impl=impl)
    _assert_close(loss, _supcon_formula(features.detach().numpy(), labels.numpy(), 0.1), "loss", atol=1e-9)
    other = supcon_loss(features, labels, 0.1, impl="naive" if impl == "chunked" else "chunked")
    _assert_close(_grads(loss, [features])[0], _grads(other, [features])[0], "gradient")


def test_supcon_without_labels_is_nt_xent():
    z1, z2 = _leaf(6, 8), _leaf(6, 8)
    _assert_close(supcon_loss(torch.stack([z1, z2], 1), None, 0.3), nt_xent(z1, z2, 0.3), "loss")


# ----------------------------------------------------------------------------- chunked path


CHUNK_CASES = [
    (rows, cols, blocks, mask_diagonal, columns)
    for rows, cols, blocks in [(1, 1, (1, 1)), (37, 53, (7, 5)), (64, 29, (64, 4)), (23, 23, (6, 9)), (2, 3, (1, 2))]
    for mask_diagonal in (False, True)
    for columns in (False, True)
    if not (mask_diagonal and rows == cols == 1)  # a 1x1 matrix without its diagonal has no logits
]


def _check_lse_against_logits(out, logits, columns, inputs, what):
    """out = (row, col | None) against logsumexps of explicit float64 logits, values and gradients
    under random upstream weights; entries that are -inf on both sides get zero gradient."""
    ref = (logits.logsumexp(1), logits.logsumexp(0)) if columns else (logits.logsumexp(1),)
    got = out if columns else out[:1]
    assert columns or out[1] is None
    for o, r, name in zip(got, ref, ["row", "column"]):
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(o), finite), f"{what}: {name} lse finite where the reference is not"
        _assert_close(o[finite], r[finite], f"{what}: {name} logsumexp")
    weights = [torch.randn(o.shape, dtype=F64).masked_fill(~torch.isfinite(r), 0.0) for o, r in zip(got, ref)]
    mine = _grads(sum((o.masked_fill(w == 0, 0.0) * w).sum() for o, w in zip(got, weights)), inputs)
    theirs = _grads(sum((r.masked_fill(w == 0, 0.0) * w).sum() for r, w in zip(ref, weights)), inputs)
    for name, a, b in zip(["query", "key", "scale"], mine, theirs):
        assert torch.isfinite(a).all(), f"{what}: d/d {name} is not finite"
        _assert_close(a, b, f"{what}: d/d {name}")


@pytest.mark.parametrize("rows,cols,blocks,mask_diagonal,columns", CHUNK_CASES)
def test_chunked_lse_matches_materialised_logits(rows, cols, blocks, mask_diagonal, columns):
    q, k = _leaf(rows, 48, normalize=False), _leaf(cols, 48, normalize=False)
    scale = torch.tensor(2.5, dtype=F64, requires_grad=True)
    out = similarity_lse_chunked(q, k, scale, mask_diagonal=mask_diagonal, columns=columns,
                                 block_rows=blocks[0], block_cols=blocks[1])
    logits = scale * q @ k.T
    if mask_diagonal:
        n = min(rows, cols)
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        mask[torch.arange(n), torch.arange(n)] = True
        logits = logits.masked_fill(mask, float("-inf"))
    _check_lse_against_logits(out, logits, columns, [q, k, scale], "chunked")


@pytest.mark.parametrize("impl", ["chunked", "naive"])
@pytest.mark.parametrize("rows,cols,blocks", [(29, 53, (7, 5)), (6, 40, (4, 16)), (1, 3, (1, 2))])
def test_lse_with_a_per_row_excluded_column(impl, rows, cols, blocks):
    """A rank's rows against all ranks' columns: row i leaves out column exclude[i] (its own global
    index), -1 leaves out nothing; a column excluded from a row that is alone in its block gives
    an all -inf column partial, which must have zero (not NaN) gradient."""
    q, k = _leaf(rows, 24, normalize=False), _leaf(cols, 24, normalize=False)
    scale = torch.tensor(1.7, dtype=F64, requires_grad=True)
    exclude = torch.randint(-1, cols, (rows,))
    exclude[0] = cols - 1  # the block edge
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    keep = exclude >= 0
    mask[torch.arange(rows)[keep], exclude[keep]] = True
    kw = dict(block_rows=blocks[0], block_cols=blocks[1]) if impl == "chunked" else {}
    fn = similarity_lse_chunked if impl == "chunked" else _similarity_lse_naive
    for columns in (False, True):
        out = fn(q, k, scale, exclude=exclude, columns=columns, **kw)
        logits = (scale * q @ k.T).masked_fill(mask, float("-inf"))
        _check_lse_against_logits(out, logits, columns, [q, k, scale], f"{impl}, columns={columns}")


def test_chunked_lse_exclude_errors():
    q, k, s = torch.randn(4, 8), torch.randn(6, 8), torch.tensor(2.0)
    with pytest.raises(TypeError, match="exclude must be None or an integer"):
        similarity_lse_chunked(q, k, s, exclude=torch.zeros(4))
    with pytest.raises(ValueError, match=r"exclude must have shape \(4,\)"):
        similarity_lse_chunked(q, k, s, exclude=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"exclude values must lie in \[-1, 6\)"):
        similarity_lse_chunked(q, k, s, exclude=torch.tensor([0, 1, 6, -1]))
    with pytest.raises(ValueError, match="not both"):
        similarity_lse_chunked(q, k, s, exclude=torch.zeros(4, dtype=torch.long), mask_diagonal=True)


def test_chunked_lse_accumulates_half_precision_in_fp32():
    q, k = torch.randn(33, 64).bfloat16(), torch.randn(70, 64).bfloat16()
    out, none = similarity_lse_chunked(q, k, torch.tensor(3.0), block_rows=8, block_cols=16)
    assert none is None and out.dtype == torch.float32
    ref = (3.0 * q.double() @ k.double().T).logsumexp(1)
    _assert_close(out, ref, "bf16 inputs, fp32 accumulation", atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- temperature, dispatch, errors


def test_logit_scale_starts_at_inverse_temperature_and_clamps():
    scale = LogitScale(0.07)
    _assert_close(scale(), 1 / 0.07, "initial scale", atol=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(math.log(1000.0))
    assert scale().item() == pytest.approx(100.0)
    _assert_close(scale.temperature, 0.01, "temperature", atol=1e-7)
    with pytest.raises(ValueError, match="init_temperature"):
        LogitScale(0.0)


def test_auto_dispatch(monkeypatch):
    assert resolve_impl("auto", torch.device("cpu"), 100) == "naive"
    assert resolve_impl("auto", torch.device("cpu"), 16384 * 16384) == "chunked"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast", torch.device("cpu"), 10)
    # CUDA: naive while the fp32 logits fit 1 GiB (16,384²), Triton above; float64 never Triton.
    budget = AUTO_NAIVE_MAX_LOGIT_BYTES // 4
    assert budget == 16384 * 16384
    cuda = torch.device("cuda")
    monkeypatch.setattr(mmcl.kernels, "is_available", lambda device: (True, ""))
    assert resolve_impl("auto", cuda, 100, torch.bfloat16) == "naive"
    assert resolve_impl("auto", cuda, budget, torch.float32) == "naive"
    assert resolve_impl("auto", cuda, budget + 1, torch.bfloat16) == "triton"
    assert resolve_impl("auto", cuda, 256 * 65536, torch.float16) == "naive"  # the MoCo queue shape
    assert resolve_impl("auto", cuda, 65536 * 65536, torch.bfloat16) == "triton"
    assert resolve_impl("auto", cuda, 2 * budget, torch.float64) == "chunked"
    # The kernels' own check is the only one: "auto" falls back (and says so above the budget),
    # forcing Triton raises with its reason.
    monkeypatch.setattr(mmcl.kernels, "is_available", lambda device: (False, "no GPU here"))
    assert resolve_impl("auto", cuda, 100) == "naive"
    with pytest.warns(UserWarning, match="no GPU here"):
        assert resolve_impl("auto", cuda, 2 * budget, torch.float32) == "chunked"
    with pytest.raises(ValueError, match='impl="triton" cannot run on cpu tensors: no GPU here'):
        clip_loss(torch.randn(4, 8), torch.randn(4, 8), 10.0, impl="triton")


def test_fp32_queue_reaches_the_kernel_in_the_queries_dtype(monkeypatch):
    seen = []

    def spy(query, key, scale, **kw):
        seen.append((query.dtype, key.dtype))
        return similarity_lse_chunked(query, key, scale, **kw)

    monkeypatch.setattr(mmcl.kernels, "is_available", lambda device: (True, ""))
    monkeypatch.setattr(mmcl.kernels, "similarity_lse", spy)
    monkeypatch.setattr(mmcl.kernels, "row_dot", lambda a, b: (a.float() * b.float()).sum(-1))
    q, k = torch.randn(5, 16).bfloat16(), torch.randn(5, 16).bfloat16()
    queue = torch.nn.functional.normalize(torch.randn(40, 16), dim=-1)  # fp32, as FeatureQueue keeps it
    loss = info_nce(q, k, 0.2, queue=queue, impl="triton")
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    ref = info_nce(q.double(), k.double(), 0.2, queue=queue.bfloat16().double(), impl="naive")
    _assert_close(loss, ref, "loss with the queue rounded to bf16", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_naive_16_bit_inputs_multiply_in_their_dtype_and_softmax_in_fp32(dtype):
    """The naive path (what "auto" runs on CUDA below the logits budget) keeps 16-bit products,
    as autocast does, then widens: the loss is the cross-entropy of fp32(a @ b.T) * scale."""
    img, txt = _leaf(23, 32).detach().to(dtype), _leaf(23, 32).detach().to(dtype)
    loss = clip_loss(img, txt, 14.3, impl="naive")
    assert loss.dtype == torch.float32
    logits = 14.3 * (img @ txt.T).double()  # the 16-bit products, widened exactly
    labels = torch.arange(23)
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))
    _assert_close(loss, ref, "loss from 16-bit products", atol=1e-5, rtol=1e-5)
    exact = clip_loss(img.double(), txt.double(), 14.3, impl="naive")
    _assert_close(loss, exact, "loss against exact products", atol=0.05, rtol=0.02)


def test_gather_outside_a_distributed_run_is_the_plain_loss():
    img, txt = _leaf(9, 16), _leaf(9, 16)
    for impl in ("naive", "chunked"):
        _assert_close(clip_loss(img, txt, 10.0, gather=True, local_loss=True, impl=impl), clip_loss(img, txt, 10.0), impl)
        _assert_close(nt_xent(img, txt, 0.3, gather=True, impl=impl), nt_xent(img, txt, 0.3), impl)
        feats, labels = torch.stack([img, txt], 1), torch.randint(0, 3, (9,))
        _assert_close(supcon_loss(feats, labels, 0.3, gather=True, impl=impl), supcon_loss(feats, labels, 0.3), impl)


BAD_INPUTS = [
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(5, 8), 1.0), ValueError, "same batch size"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(4, 9), 1.0), ValueError, "same feature dim"),
    (lambda: clip_loss(torch.randn(4, 8, 2), torch.randn(4, 8, 2), 1.0), ValueError, "must be 2-D"),
    (lambda: clip_loss(torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long), 1.0), TypeError, "floating-point"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(4, 8), -1.0), ValueError, "logit_scale must be finite and > 0"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2)), ValueError, "logit_scale must be a scalar"),
    (lambda: clip_loss([[1.0]], torch.randn(1, 1), 1.0), TypeError, "image_features must be a torch.Tensor"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), 0.0), ValueError, "temperature must be finite and > 0"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), float("nan")), ValueError, "temperature"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), 0.1, queue=torch.randn(10, 7)), ValueError, "queue must have"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), 0.1, impl="flash"), ValueError, "impl must be one of"),
    (lambda: nt_xent(torch.randn(0, 8), torch.randn(0, 8), 0.1), ValueError, "non-empty"),
    (lambda: supcon_loss(torch.randn(4, 8), None, 0.1), ValueError, "3-D"),
    (lambda: supcon_loss(torch.randn(4, 2, 8), torch.zeros(5, dtype=torch.long), 0.1), ValueError, "labels must have shape"),
    (lambda: supcon_loss(torch.randn(4, 2, 8), torch.zeros(4), 0.1), TypeError, "integer"),
    (lambda: supcon_loss(torch.randn(4, 1, 8), torch.arange(4), 0.1), ValueError, "at least one positive"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_chunked_lse_exact_when_rows_lie_far_below_the_tile_max(dtype):
    # Rows and columns with wildly different magnitudes: one exp pass relative to the tile max would
    # underflow the small ones, which must be recomputed exactly.
    q = torch.randn(12, 16, dtype=F64) * torch.logspace(-2, 2.5, 12, dtype=F64)[:, None]
    k = torch.randn(9, 16, dtype=F64) * torch.logspace(2, -2, 9, dtype=F64)[:, None]
    rows, cols = similarity_lse_chunked(q.to(dtype), k.to(dtype), torch.tensor(3.0, dtype=dtype), columns=True,
                                        block_rows=5, block_cols=4)
    logits = 3.0 * q @ k.T
    tol = 1e-12 if dtype == F64 else 2e-6
    _assert_close(rows, logits.logsumexp(1), "row logsumexp", atol=tol, rtol=tol)
    _assert_close(cols, logits.logsumexp(0), "column logsumexp", atol=tol, rtol=tol)
