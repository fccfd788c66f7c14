"""Hard-negative reweighting (HCL) and debiasing (DCL) in info_nce, nt_xent and clip_loss against
the estimator written out with exponentials in float64 (values and gradients), on every path."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import mmcl.losses._common
import mmcl.losses.clip
import mmcl.losses.siglip
import mmcl.losses.ssl
import mmcl.losses.supcon
from mmcl.losses import options as loss_options
from mmcl.chunked import similarity_lse_chunked
from mmcl.losses import clip_loss, info_nce, nt_xent
from helpers.compare import assert_close, leaf

F64 = torch.float64
OPTIONS = [(1.0, 0.0), (0.0, 0.1), (0.5, 0.3), (2.0, 0.6)]  # (β, τ⁺)



@pytest.fixture
def small_tiles(monkeypatch):
    """The chunked path with tiles of 3 x 5, so every shape here spans uneven tiles."""
    monkeypatch.setattr(mmcl.losses._common, "similarity_lse_chunked",
                        functools.partial(similarity_lse_chunked, block_rows=3, block_cols=5))


# ----------------------------------------------------------------------------- the estimator written out


def _estimator(pos, neg, beta, tau_plus, scale):
    """Mean of −log(pos / (pos + Ng)) as the authors' code computes it: pos (B,) = e^{s⁺/τ},
    neg (B, n) = e^{s⁻/τ}, importance weights e^{β log neg}, Ng clamped below at n·e^{−1/τ}."""
    n = neg.shape[1]
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    ng = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
    ng = torch.maximum(ng, n * torch.exp(-torch.as_tensor(scale, dtype=F64)))
    return -torch.log(pos / (pos + ng))


def _off_diagonal(m):
    b = m.shape[0]
    return m.masked_select(~torch.eye(b, dtype=torch.bool)).view(b, b - 1)


def info_nce_reference(q, k, T, beta, tau_plus, queue=None):
    q, k = q.double(), k.double()
    pos = torch.exp((q * k).sum(-1) / T)
    neg = torch.exp(q @ queue.double().T / T) if queue is not None else _off_diagonal(torch.exp(q @ k.T / T))
    return _estimator(pos, neg, beta, tau_plus, 1 / T).mean()


def nt_xent_reference(z1, z2, T, beta, tau_plus):
    b = z1.shape[0]
    out = torch.cat([z1, z2]).double()
    neg = torch.exp(out @ out.T / T)
    mask = torch.ones(b, 2 * b, dtype=torch.bool)
    for i in range(b):
        mask[i, i] = mask[i, i + b] = False
    neg = neg.masked_select(torch.cat([mask, mask])).view(2 * b, -1)
    pos = torch.exp((z1.double() * z2.double()).sum(-1) / T)
    return _estimator(torch.cat([pos, pos]), neg, beta, tau_plus, 1 / T).mean()


def clip_reference(img, txt, scale, beta, tau_plus):
    logits = scale * img.double() @ txt.double().T
    pos = torch.exp(logits.diagonal())
    rows = _estimator(pos, _off_diagonal(logits.exp()), beta, tau_plus, scale)
    cols = _estimator(pos, _off_diagonal(logits.T.exp()), beta, tau_plus, scale)
    return 0.5 * (rows.mean() + cols.mean())


def _check(ours, reference, leaves, what, atol=1e-10, rtol=1e-9):
    assert_close(ours, reference, f"{what}: loss", atol, rtol)
    for i, (g, g_ref) in enumerate(zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(reference, leaves))):
        assert_close(g, g_ref, f"{what}: d loss / d input {i}", atol, rtol)


# ----------------------------------------------------------------------------- float64, naive and chunked


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("beta,tau_plus", OPTIONS)
@pytest.mark.parametrize("batch", [2, 13])
def test_info_nce_in_batch_matches_the_estimator(batch, beta, tau_plus, impl, small_tiles):
    q, k = leaf(batch, 48), leaf(batch, 48)
    ours = info_nce(q, k, 0.5, hard_negative_beta=beta, debias_tau_plus=tau_plus, impl=impl)
    _check(ours, info_nce_reference(q, k, 0.5, beta, tau_plus), [q, k], f"info_nce B={batch} {impl}")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("beta,tau_plus", OPTIONS)
def test_info_nce_queue_matches_the_estimator(beta, tau_plus, impl, small_tiles):
    q, k, queue = leaf(7, 32), leaf(7, 32), leaf(23, 32)  # queue larger than the batch
    ours = info_nce(q, k, 0.2, queue=queue, hard_negative_beta=beta, debias_tau_plus=tau_plus, impl=impl)
    _check(ours, info_nce_reference(q, k, 0.2, beta, tau_plus, queue.detach()), [q, k], f"MoCo {impl}")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("beta,tau_plus", OPTIONS)
@pytest.mark.parametrize("batch", [2, 11])
def test_nt_xent_matches_the_estimator(batch, beta, tau_plus, impl, small_tiles):
    z1, z2 = leaf(batch, 48), leaf(batch, 48)
    ours = nt_xent(z1, z2, 0.5, hard_negative_beta=beta, debias_tau_plus=tau_plus, impl=impl)
    _check(ours, nt_xent_reference(z1, z2, 0.5, beta, tau_plus), [z1, z2], f"nt_xent N={batch} {impl}")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("beta,tau_plus", OPTIONS)
@pytest.mark.parametrize("batch", [2, 17])
def test_clip_loss_matches_the_estimator_with_a_learned_scale(batch, beta, tau_plus, impl, small_tiles):
    img, txt = leaf(batch, 32), leaf(batch, 32)
    scale = torch.tensor(2.5, dtype=F64, requires_grad=True)  # the clamp n·e^{−scale} follows it too
    ours = clip_loss(img, txt, scale, hard_negative_beta=beta, debias_tau_plus=tau_plus, impl=impl)
    _check(ours, clip_reference(img, txt, scale, beta, tau_plus), [img, txt, scale], f"clip B={batch} {impl}")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_the_clamp_is_reached_and_followed(impl, small_tiles):
    """Easy positives (key ≈ query) with a large τ⁺ push (R − τ⁺ n e^p) below the floor on some
    rows and not others; both branches match the estimator, gradients included."""
    q = leaf(12, 16)
    k = F.normalize(q.detach() + 0.6 * torch.randn(12, 16, dtype=F64), dim=-1).requires_grad_()
    T, beta, tau_plus = 0.5, 0.5, 0.5
    pos = torch.exp((q * k).sum(-1) / T).detach()
    neg = _off_diagonal(torch.exp(q @ k.T / T)).detach()
    imp = neg ** beta
    raw = (-tau_plus * 11 * pos + (imp * neg).sum(-1) / imp.mean(-1)) / (1 - tau_plus)
    clamped = raw < 11 * math.exp(-1 / T)
    assert 0 < int(clamped.sum()) < 12, f"the test needs both branches, {int(clamped.sum())} of 12 rows clamped"
    ours = info_nce(q, k, T, hard_negative_beta=beta, debias_tau_plus=tau_plus, impl=impl)
    _check(ours, info_nce_reference(q, k, T, beta, tau_plus), [q, k], f"clamped rows, {impl}")


# ----------------------------------------------------------------------------- β = 0, τ⁺ = 0


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_zero_options_are_the_plain_loss_bitwise(impl):
    """β = 0, τ⁺ = 0 (the defaults) take the plain code: bitwise the same loss and gradients."""
    a, b, queue = leaf(9, 16), leaf(9, 16), leaf(20, 16)
    scale = torch.tensor(3.0, dtype=F64, requires_grad=True)
    calls = {
        "info_nce": lambda **kw: info_nce(a, b, 0.3, impl=impl, **kw),
        "moco": lambda **kw: info_nce(a, b, 0.3, queue=queue, impl=impl, **kw),
        "nt_xent": lambda **kw: nt_xent(a, b, 0.3, impl=impl, **kw),
        "clip": lambda **kw: clip_loss(a, b, scale, impl=impl, **kw),
    }
    for name, call in calls.items():
        plain, zero = call(), call(hard_negative_beta=0.0, debias_tau_plus=0)
        assert torch.equal(plain, zero), name
        for g_plain, g_zero in zip(torch.autograd.grad(plain, [a, b, scale], allow_unused=True),
                                   torch.autograd.grad(zero, [a, b, scale], allow_unused=True)):
            assert (g_plain is None and g_zero is None) or torch.equal(g_plain, g_zero), name


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_the_estimator_at_zero_options_reduces_to_the_plain_loss(impl):
    """The estimator's own code at β = 0, τ⁺ = 0 equals the plain loss to 1e-12 (float64) for
    normalised features, whose logits never reach the floor n·e^{−1/τ}."""
    q, k, queue = leaf(9, 16), leaf(9, 16), leaf(20, 16)
    zero = loss_options.HardNegatives(0.0, 0.0)
    scale = torch.tensor(1 / 0.3, dtype=F64)
    for cols in (None, queue):
        positives = scale * (q * k).sum(-1)
        rows = mmcl.losses.ssl._info_nce_hard_rows(q, k, cols, positives, scale, zero, impl)
        assert_close(rows.mean(), info_nce(q, k, 0.3, queue=cols, impl=impl), "estimator at 0, 0", 1e-12, 1e-12)
    ours = mmcl.losses.ssl._nt_xent_hard(q, k, scale, zero, impl, False, False)
    assert_close(ours, nt_xent(q, k, 0.3, impl=impl), "nt_xent estimator at 0, 0", 1e-12, 1e-12)


# ----------------------------------------------------------------------------- fp32, large scales, Triton


def test_fp32_at_clip_scale_100_stays_finite_and_accurate():
    """logit_scale 100 with β = 1 puts e^{200} in the written-out formula; the log-space paths stay
    finite in fp32 and within 1e-4 (relative) of float64, gradients included."""
    img64, txt64 = leaf(33, 24), leaf(33, 24)
    ref = clip_loss(img64, txt64, 100.0, hard_negative_beta=1.0, debias_tau_plus=0.9, impl="naive")
    g_ref = torch.autograd.grad(ref, [img64, txt64])
    for impl in ("naive", "chunked"):
        img, txt = (x.detach().float().requires_grad_() for x in (img64, txt64))
        ours = clip_loss(img, txt, 100.0, hard_negative_beta=1.0, debias_tau_plus=0.9, impl=impl)
        grads = torch.autograd.grad(ours, [img, txt])
        assert torch.isfinite(ours) and all(torch.isfinite(g).all() for g in grads), impl
        assert_close(ours, ref, f"{impl} fp32 loss", 1e-5, 1e-4)
        for g, gr in zip(grads, g_ref):
            assert_close(g, gr, f"{impl} fp32 gradient", 1e-5 * gr.abs().max().item(), 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_16_bit_features_give_fp32_losses_near_float64(dtype, impl):
    """16-bit features (the logits widened to fp32 for the estimator) against float64 of the same
    values: within the 16-bit products' rounding, gradients in the features' dtype and finite."""
    a, b, queue = (leaf(n, 16, dtype=dtype) for n in (9, 9, 13))
    kw = dict(hard_negative_beta=1.0, debias_tau_plus=0.2)
    up = [x.detach().double().requires_grad_() for x in (a, b)]
    for name, f in {"info_nce": lambda x, y, **k: info_nce(x, y, 0.2, **k),
                    "moco": lambda x, y, **k: info_nce(x, y, 0.2, queue=queue.detach().to(x.dtype), **k),
                    "nt_xent": lambda x, y, **k: nt_xent(x, y, 0.2, **k),
                    "clip": lambda x, y, **k: clip_loss(x, y, 10.0, **k)}.items():
        ours, ref = f(a, b, impl=impl, **kw), f(*up, impl="naive", **kw)
        assert ours.dtype == torch.float32, name
        grads = torch.autograd.grad(ours, [a, b])
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads), name
        assert_close(ours, ref, f"{name} {dtype} {impl}", 2e-2, 1e-2)
        for g, gr in zip(grads, torch.autograd.grad(ref, up)):
            assert_close(g, gr, f"{name} {dtype} {impl} gradient", 5e-2 * gr.abs().max().item(), 5e-2)


@pytest.mark.skipif(not mmcl.kernels.is_available("cpu")[0] and not torch.cuda.is_available(),
                    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("loss", ["info_nce", "moco", "nt_xent", "clip"])
def test_triton_matches_the_estimator(loss):
    """fp32 kernels (interpreted on CPU) at tiny awkward shapes against the float64 formula."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b, queue = (leaf(n, 20, dtype=torch.float32) for n in (5, 5, 19))
    beta, tau_plus, T = 1.0, 0.2, 0.5
    kw = dict(hard_negative_beta=beta, debias_tau_plus=tau_plus, impl="triton")
    on = [x.detach().to(device).requires_grad_() for x in (a, b, queue)]
    if loss == "info_nce":
        ours, ref, leaves = info_nce(on[0], on[1], T, **kw), info_nce_reference(a, b, T, beta, tau_plus), [a, b]
    elif loss == "moco":
        ours = info_nce(on[0], on[1], T, queue=on[2], **kw)
        ref, leaves = info_nce_reference(a, b, T, beta, tau_plus, queue.detach()), [a, b]
    elif loss == "nt_xent":
        ours, ref, leaves = nt_xent(on[0], on[1], T, **kw), nt_xent_reference(a, b, T, beta, tau_plus), [a, b]
    else:
        ours, ref, leaves = clip_loss(on[0], on[1], 1 / T, **kw), clip_reference(a, b, 1 / T, beta, tau_plus), [a, b]
    assert_close(ours.cpu(), ref, f"triton {loss} loss", 1e-5, 1e-5)
    grads = torch.autograd.grad(ours, on[: len(leaves)])
    for i, (g, gr) in enumerate(zip(grads, torch.autograd.grad(ref, leaves))):
        assert_close(g.cpu(), gr, f"triton {loss} d loss / d input {i}", 1e-5, 1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,error,match", [
    (dict(hard_negative_beta=-0.5), ValueError, "hard_negative_beta must be >= 0"),
    (dict(hard_negative_beta=float("nan")), ValueError, "hard_negative_beta must be finite"),
    (dict(hard_negative_beta="1"), TypeError, "hard_negative_beta must be a float"),
    (dict(hard_negative_beta=True), TypeError, "hard_negative_beta must be a float"),
    (dict(debias_tau_plus=1.0), ValueError, r"debias_tau_plus must lie in \[0, 1\)"),
    (dict(debias_tau_plus=-0.1), ValueError, r"debias_tau_plus must lie in \[0, 1\)"),
    (dict(debias_tau_plus=None), TypeError, "debias_tau_plus must be a float"),
])
def test_bad_options_raise_naming_the_argument(kw, error, match):
    a, b = leaf(4, 8), leaf(4, 8)
    for call in (lambda: info_nce(a, b, 0.5, **kw), lambda: nt_xent(a, b, 0.5, **kw),
                 lambda: clip_loss(a, b, 2.0, **kw)):
        with pytest.raises(error, match=match):
            call()


def test_no_negatives_raises():
    a, b = leaf(1, 8), leaf(1, 8)
    for call in (lambda: info_nce(a, b, 0.5, hard_negative_beta=1.0),
                 lambda: nt_xent(a, b, 0.5, debias_tau_plus=0.1), lambda: clip_loss(a, b, 2.0, hard_negative_beta=1.0)):
        with pytest.raises(ValueError, match="at least one negative"):
            call()


# ----------------------------------------------------------------------------- gather=True on 2 ranks


@pytest.mark.slow
def test_gathered_options_equal_one_process_on_the_whole_batch(tmp_path):
    """clip_loss and nt_xent (local_loss True/False) with gather=True on a real 2-process launch,
    with the hard-negative estimator and with mixed targets (partners local to each rank), even and
    uneven shards, naive and chunked: loss and DDP-averaged gradients as one float64 process on the
    whole batch (relative errors below 1e-12 in float64, 1e-5 in fp32)."""
    import json
    from pathlib import Path

    from helpers.launch import accelerate_launch

    out = tmp_path / "result.json"
    accelerate_launch(Path(__file__).parent / "scripts" / "dist_loss_options.py", str(out))
    per_rank = json.loads(out.read_text())
    assert [r["rank"] for r in per_rank] == [0, 1] and all(r["world_size"] == 2 for r in per_rank)
    for result in per_rank:
        assert len(result["cases"]) == 4 * 2 * 2 * 2 * 2  # losses, options, shards, impls, dtypes
        for case in result["cases"]:
            tol = 1e-12 if case["dtype"] == "float64" else 1e-5
            label = f"rank {result['rank']}: {case}"
            assert case["loss_err"] < tol and case["grad_err"] < tol, label


def test_chunked_options_never_materialise_the_logits(monkeypatch, small_tiles):
    """With impl="chunked" the options use only the tiled logsumexps and row dots: every helper that
    builds a (rows, columns) matrix is made to fail, and the losses still match the naive path."""
    a, b, queue = leaf(8, 16), leaf(8, 16), leaf(11, 16)
    options = [dict(hard_negative_beta=1.0, debias_tau_plus=0.2),
               dict(mix_partner=torch.randperm(8), mix_lambda=torch.rand(8, dtype=F64))]
    calls = [lambda **k: info_nce(a, b, 0.3, **k), lambda **k: info_nce(a, b, 0.3, queue=queue, **k),
             lambda **k: nt_xent(a, b, 0.3, **k), lambda **k: clip_loss(a, b, 3.0, **k)]
    expected = [call(impl="naive", **kw) for kw in options for call in calls]

    def refuse(*args, **kwargs):
        raise AssertionError("a (rows, columns) matrix was built")

    loss_modules = [mmcl.losses._common, mmcl.losses.clip, mmcl.losses.siglip, mmcl.losses.ssl, mmcl.losses.supcon]
    targets = [(m, name) for m in loss_modules for name in ("_logits", "_similarity_lse_naive") if hasattr(m, name)]
    for module, name in targets + [(loss_options, "mix_target_matrix"), (loss_options, "log_reweighted_from_logits")]:
        monkeypatch.setattr(module, name, refuse)
    for (kw, call), ref in zip([(kw, call) for kw in options for call in calls], expected):
        assert_close(call(impl="chunked", **kw), ref, f"chunked {sorted(kw)}")
