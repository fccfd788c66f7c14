"""i-Mix mixed targets in info_nce, nt_xent and clip_loss against the soft-label cross-entropy
written out with explicit label matrices in float64 (values and gradients), on every path."""
import functools

import pytest
import torch
import torch.nn.functional as F

import mmcl.kernels
import mmcl.losses._common
from mmcl.chunked import similarity_lse_chunked
from mmcl.losses import clip_loss, info_nce, nt_xent
from helpers.compare import assert_close, leaf

F64 = torch.float64



def _mixing(b, generator=None):
    """Partners as the loader's CutMix makes them (a few unmixed rows keep themselves, λ = 1) and
    λ in (0, 1), with one λ exactly 0."""
    partner = torch.randint(0, b, (b,), generator=generator)
    lam = torch.rand(b, dtype=F64, generator=generator)
    unmixed = torch.arange(b) % 3 == 0
    partner[unmixed], lam[unmixed] = torch.arange(b)[unmixed], 1.0
    if b > 1:
        lam[1] = 0.0
    return partner, lam


def _labels(b, n_columns, own, partner, lam):
    """The soft label matrix written out: row i has λ_i at own[i] and 1 − λ_i at partner[i]."""
    y = torch.zeros(b, n_columns, dtype=F64)
    for i in range(b):
        y[i, own[i]] += lam[i]
        y[i, partner[i]] += 1 - lam[i]
    return y


def _soft_ce(logits, y, keep=None):
    """Σ_i Σ_j −y_ij log softmax_j(logits_i) over the kept columns of each row."""
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    logp = torch.log_softmax(logits, 1)
    return -(y * torch.where(y > 0, logp, torch.zeros_like(logp))).sum()


def info_nce_reference(q, k, T, partner, lam, queue=None):
    b = q.shape[0]
    cols = torch.cat([k, queue]) if queue is not None else k
    logits = q.double() @ cols.double().T / T
    return _soft_ce(logits, _labels(b, cols.shape[0], range(b), partner, lam)) / b


def nt_xent_reference(z1, z2, T, partner, lam):
    b = z1.shape[0]
    z = torch.cat([z1, z2]).double()
    own = [b + i for i in range(b)] + list(range(b))
    other_view_of_partner = [b + int(p) for p in partner] + [int(p) for p in partner]
    y = _labels(2 * b, 2 * b, own, other_view_of_partner, torch.cat([lam, lam]))
    return _soft_ce(z @ z.T / T, y, keep=~torch.eye(2 * b, dtype=torch.bool)) / (2 * b)


def clip_reference(img, txt, scale, partner, lam):
    b = img.shape[0]
    logits = scale * img.double() @ txt.double().T
    y = _labels(b, b, range(b), partner, lam)
    return 0.5 * (_soft_ce(logits, y) + _soft_ce(logits.T, y.T)) / b


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(mmcl.losses._common, "similarity_lse_chunked",
                        functools.partial(similarity_lse_chunked, block_rows=3, block_cols=5))


def _check(ours, reference, leaves, what, atol=1e-10, rtol=1e-9):
    assert_close(ours, reference, f"{what}: loss", atol, rtol)
    for i, (g, g_ref) in enumerate(zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(reference, leaves))):
        assert_close(g, g_ref, f"{what}: d loss / d input {i}", atol, rtol)


# ----------------------------------------------------------------------------- float64, naive and chunked


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("batch", [2, 13])
@pytest.mark.parametrize("with_queue", [False, True])
def test_info_nce_matches_the_soft_label_cross_entropy(batch, with_queue, impl, small_tiles):
    q, k = leaf(batch, 48), leaf(batch, 48)
    queue = leaf(23, 48).detach() if with_queue else None
    partner, lam = _mixing(batch)
    ours = info_nce(q, k, 0.3, queue=queue, mix_partner=partner, mix_lambda=lam, impl=impl)
    _check(ours, info_nce_reference(q, k, 0.3, partner, lam, queue), [q, k], f"info_nce B={batch} {impl}")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("batch", [2, 11])
def test_nt_xent_matches_the_soft_label_cross_entropy(batch, impl, small_tiles):
    z1, z2 = leaf(batch, 48), leaf(batch, 48)
    partner, lam = _mixing(batch)
    ours = nt_xent(z1, z2, 0.5, mix_partner=partner, mix_lambda=lam, impl=impl)
    _check(ours, nt_xent_reference(z1, z2, 0.5, partner, lam), [z1, z2], f"nt_xent N={batch} {impl}")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("batch", [2, 17])
def test_clip_loss_mixes_the_text_targets_the_same_way(batch, impl, small_tiles):
    img, txt = leaf(batch, 32), leaf(batch, 32)
    scale = torch.tensor(4.0, dtype=F64, requires_grad=True)
    partner, lam = _mixing(batch)
    ours = clip_loss(img, txt, scale, mix_partner=partner, mix_lambda=lam, impl=impl)
    _check(ours, clip_reference(img, txt, scale, partner, lam), [img, txt, scale], f"clip B={batch} {impl}")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_lambda_one_is_the_plain_loss(impl):
    """λ = 1 everywhere (partners arbitrary) gives the plain loss to 1e-12 in float64; with a
    queue, the cross-entropy over the batch's keys followed by the queue (i-Mix's MoCo form)."""
    a, b, queue = leaf(9, 16), leaf(9, 16), leaf(20, 16).detach()
    scale = torch.tensor(3.0, dtype=F64, requires_grad=True)
    mix = dict(mix_partner=torch.randperm(9), mix_lambda=torch.ones(9, dtype=F64), impl=impl)
    pairs = {
        "info_nce": (info_nce(a, b, 0.3, **mix), info_nce(a, b, 0.3, impl=impl)),
        "nt_xent": (nt_xent(a, b, 0.3, **mix), nt_xent(a, b, 0.3, impl=impl)),
        "clip": (clip_loss(a, b, scale, **mix), clip_loss(a, b, scale, impl=impl)),
        "moco": (info_nce(a, b, 0.3, queue=queue, **mix),
                 F.cross_entropy(a @ torch.cat([b, queue]).T / 0.3, torch.arange(9))),
    }
    for name, (mixed, plain) in pairs.items():
        assert_close(mixed, plain, f"{name} at λ = 1", 1e-12, 1e-12)
        for g, g_plain in zip(torch.autograd.grad(mixed, [a, b], retain_graph=True),
                              torch.autograd.grad(plain, [a, b], retain_graph=True)):
            assert_close(g, g_plain, f"{name} gradient at λ = 1", 1e-12, 1e-12)


@pytest.mark.skipif(not mmcl.kernels.is_available("cpu")[0] and not torch.cuda.is_available(),
                    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("loss", ["info_nce", "moco", "nt_xent", "clip"])
def test_triton_matches_the_soft_label_cross_entropy(loss):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = leaf(5, 20, dtype=torch.float32), leaf(5, 20, dtype=torch.float32)
    queue = leaf(19, 20, dtype=torch.float32).detach()
    partner, lam = _mixing(5)
    on = [x.detach().to(device).requires_grad_() for x in (a, b)]
    kw = dict(mix_partner=partner.to(device), mix_lambda=lam.float().to(device), impl="triton")
    T = 0.5
    if loss == "info_nce":
        ours, ref = info_nce(*on, T, **kw), info_nce_reference(a, b, T, partner, lam)
    elif loss == "moco":
        ours, ref = info_nce(*on, T, queue=queue.to(device), **kw), info_nce_reference(a, b, T, partner, lam, queue)
    elif loss == "nt_xent":
        ours, ref = nt_xent(*on, T, **kw), nt_xent_reference(a, b, T, partner, lam)
    else:
        ours, ref = clip_loss(*on, 1 / T, **kw), clip_reference(a, b, 1 / T, partner, lam)
    assert_close(ours.cpu(), ref, f"triton {loss} loss", 1e-5, 1e-5)
    for i, (g, gr) in enumerate(zip(torch.autograd.grad(ours, on), torch.autograd.grad(ref, [a, b]))):
        assert_close(g.cpu(), gr, f"triton {loss} d loss / d input {i}", 1e-5, 1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("partner,lam,error,match", [
    (torch.arange(4), None, ValueError, "mix_lambda is missing"),
    (None, torch.ones(4), ValueError, "mix_partner is missing"),
    (torch.arange(4).float(), torch.ones(4), TypeError, "mix_partner must be an integer"),
    ([0, 1, 2, 3], torch.ones(4), TypeError, "mix_partner must be an integer"),
    (torch.ones(4, dtype=torch.bool), torch.ones(4), TypeError, "mix_partner must be an integer"),
    (torch.arange(4), torch.ones(4, dtype=torch.long), TypeError, "mix_lambda must be a floating"),
    (torch.arange(3), torch.ones(3), ValueError, r"mix_partner must have shape \(4,\)"),
    (torch.arange(4), torch.ones(4, 1), ValueError, r"mix_lambda must have shape \(4,\)"),
    (torch.tensor([0, 1, 2, 4]), torch.ones(4), ValueError, r"mix_partner must hold indices in \[0, 4\)"),
    (torch.tensor([0, -1, 2, 3]), torch.ones(4), ValueError, r"mix_partner must hold indices in \[0, 4\)"),
    (torch.arange(4), torch.tensor([1.0, 0.5, 1.5, 1.0]), ValueError, r"mix_lambda must hold fractions in \[0, 1\]"),
    (torch.arange(4), torch.tensor([1.0, float("nan"), 1.0, 1.0]), ValueError, "mix_lambda must hold fractions"),
])
def test_bad_mix_arguments_raise_naming_them(partner, lam, error, match):
    a, b = leaf(4, 8), leaf(4, 8)
    kw = dict(mix_partner=partner, mix_lambda=lam)
    for call in (lambda: info_nce(a, b, 0.5, **kw), lambda: nt_xent(a, b, 0.5, **kw),
                 lambda: clip_loss(a, b, 2.0, **kw)):
        with pytest.raises(error, match=match):
            call()


def test_mix_with_hard_negatives_raises():
    a, b = leaf(4, 8), leaf(4, 8)
    with pytest.raises(ValueError, match="cannot be combined with hard_negative_beta"):
        nt_xent(a, b, 0.5, mix_partner=torch.arange(4), mix_lambda=torch.ones(4), hard_negative_beta=1.0)
