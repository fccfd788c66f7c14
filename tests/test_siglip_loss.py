"""SigLIP's sigmoid loss: the reference and the chunked path against open_clip's SigLipLoss and
transformers' SiglipModel (values and gradients of features, scale and bias, float64), the
chunked tiles against the reference, bad input, and the gathered loss on 2 processes."""
import json

import numpy as np
import pytest
import torch
from open_clip.loss import SigLipLoss

import mmcl
from mmcl.chunked import sigmoid_pair_loss_chunked
from mmcl.losses import siglip_loss

F64 = torch.float64


def _features(rows, dim=16, dtype=F64, normalize=True):
    x = torch.randn(rows, dim, dtype=F64)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    return x.to(dtype).requires_grad_()


def _scalars(scale=10.0, bias=-10.0, dtype=F64):
    return (torch.tensor(scale, dtype=dtype, requires_grad=True), torch.tensor(bias, dtype=dtype, requires_grad=True))


def _assert_close(actual, expected, what, atol=1e-12, rtol=1e-10):
    actual, expected = torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64)
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        diff = (actual - expected).abs()
        where = np.unravel_index(int(diff.argmax()), tuple(diff.shape)) if diff.dim() else ()
        raise AssertionError(f"{what}: max |diff| {diff.max().item():.3e} at {where} "
                             f"(|expected| up to {expected.abs().max().item():.3e})")


def _numpy_siglip(x, y, t, b):
    """The paper's formula in numpy float64: −(1/B) Σ_ij log σ(z_ij (t x_i·y_j + b))."""
    logits = t * x @ y.T + b
    z = 2 * np.eye(len(x)) - 1
    return float(np.sum(np.logaddexp(0.0, -z * logits)) / len(x))


@pytest.mark.parametrize("batch", [1, 37, 128])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_siglip_loss_matches_open_clip_values_and_gradients(batch, impl):
    img, txt = _features(batch), _features(batch)
    scale, bias = _scalars(scale=7.3, bias=-4.1)
    leaves = [img, txt, scale, bias]
    ours = siglip_loss(img, txt, scale, bias, impl=impl)
    ref = SigLipLoss()(img, txt, scale, bias)
    _assert_close(ours, ref, "loss")
    _assert_close(ours, _numpy_siglip(*(v.detach().numpy() for v in leaves)), "loss vs numpy")
    for name, g, r in zip(("image", "text", "scale", "bias"), torch.autograd.grad(ours, leaves),
                          torch.autograd.grad(ref, leaves)):
        _assert_close(g, r, f"d loss / d {name}")


def _tiny_siglip_model():
    from transformers import SiglipConfig, SiglipModel

    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8)
    vision = dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).double().eval()


@pytest.mark.parametrize("batch", [1, 37, 128])
def test_siglip_loss_matches_transformers_siglip_model(batch):
    """Given SiglipModel's own normalised embeddings, scale exp(logit_scale) and bias, the loss and
    the gradients of the embeddings and of both logit parameters equal return_loss=True's."""
    model = _tiny_siglip_model()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-6.0)
    out = model(input_ids=torch.randint(0, 64, (batch, 8)), pixel_values=torch.randn(batch, 3, 8, 8, dtype=F64),
                return_loss=True)
    leaves = [out.image_embeds, out.text_embeds, model.logit_scale, model.logit_bias]
    ref_grads = torch.autograd.grad(out.loss, leaves, retain_graph=True)
    for impl in ("naive", "chunked"):
        ours = siglip_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), model.logit_bias, impl=impl)
        _assert_close(ours, out.loss, f"{impl} loss")
        for name, g, r in zip(("image_embeds", "text_embeds", "logit_scale", "logit_bias"),
                              torch.autograd.grad(ours, leaves, retain_graph=True), ref_grads):
            _assert_close(g, r, f"{impl}: d loss / d {name}")


@pytest.mark.parametrize("rows,cols,blocks", [(1, 1, (1, 1)), (37, 41, (8, 5)), (64, 23, (64, 64)), (50, 130, (17, 32))])
def test_chunked_sigmoid_tiles_match_the_reference(rows, cols, blocks):
    """Uneven tiles, B ≠ N, positives at an offset (a rank's rows against all ranks' columns) and
    rows without a positive (-1); unnormalised features at scale 30 reach logits of ±100s."""
    q, k = _features(rows, 24, normalize=False), _features(cols, 24, normalize=False)
    scale, bias = _scalars(scale=30.0, bias=2.5)
    positive = (torch.arange(rows) + cols // 3) % cols
    positive[::4] = -1
    leaves = [q, k, scale, bias]
    ours = sigmoid_pair_loss_chunked(q, k, scale, bias, positive, block_rows=blocks[0], block_cols=blocks[1])
    # The reference, with rows lacking a positive: the signs built by hand.
    logits = scale * q @ k.T + bias
    signs = -torch.ones(rows, cols, dtype=F64)
    has = positive >= 0
    signs[torch.arange(rows)[has], positive[has]] = 1.0
    ref = -torch.nn.functional.logsigmoid(signs * logits).sum()
    assert torch.isfinite(ours)
    _assert_close(ours, ref, "summed loss")
    for name, g, r in zip(("query", "key", "scale", "bias"), torch.autograd.grad(ours, leaves),
                          torch.autograd.grad(ref, leaves)):
        _assert_close(g, r, f"d / d {name}", atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_siglip_accumulates_low_precision_in_fp32(dtype):
    """fp32/16-bit features: the chunked loss computes its tiles in fp32, so it lands on the
    float64 loss of the same (rounded) inputs to fp32 accuracy; gradients come back in the
    inputs' dtype."""
    img, txt = _features(67, 32, dtype), _features(67, 32, dtype)
    scale, bias = _scalars(dtype=torch.float32)
    loss = siglip_loss(img, txt, scale, bias, impl="chunked")
    assert loss.dtype == torch.float32
    ref = siglip_loss(img.double(), txt.double(), scale.double(), bias.double(), impl="naive")
    _assert_close(loss, ref, "loss", atol=0, rtol=2e-6)
    g_img, g_scale = torch.autograd.grad(loss, [img, scale])
    r_img, r_scale = torch.autograd.grad(ref, [img, scale])
    assert g_img.dtype == dtype
    eps = torch.finfo(dtype).eps
    _assert_close(g_img, r_img, "d / d image", atol=4 * eps * r_img.abs().max().item(), rtol=0)
    _assert_close(g_scale, r_scale, "d / d scale", atol=0, rtol=1e-5)


def test_float_scale_and_bias_and_the_top_level_export():
    img, txt = _features(9), _features(9)
    expected = SigLipLoss()(img, txt, torch.tensor(10.0, dtype=F64), torch.tensor(-10.0, dtype=F64))
    _assert_close(mmcl.siglip_loss(img, txt, 10.0, -10.0), expected, "loss with float scale and bias")
    # transformers keeps the logit parameters as (1,) tensors
    _assert_close(siglip_loss(img, txt, torch.full((1,), 10.0), torch.full((1,), -10.0), impl="chunked"),
                  expected, "loss with (1,) scale and bias", rtol=1e-6)


def test_gather_outside_a_distributed_run_is_the_plain_loss():
    img, txt = _features(11), _features(11)
    for impl in ("naive", "chunked"):
        _assert_close(siglip_loss(img, txt, 5.0, -2.0, gather=True, impl=impl),
                      siglip_loss(img, txt, 5.0, -2.0, impl="naive"), impl)


def test_chunked_siglip_saves_no_batch_by_batch_tensor():
    """What the chunked loss keeps for backward is O((B + N)·D): inputs, scalars, positives."""
    img, txt = _features(300, 8), _features(300, 8)
    scale, bias = _scalars()
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        siglip_loss(img, txt, scale, bias, impl="chunked")
    assert sizes and max(sizes) <= 300 * 8, sizes
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        siglip_loss(img, txt, scale, bias, impl="naive")
    assert max(sizes) >= 300 * 300  # the check can fail: the reference does keep its logits


def test_auto_takes_the_chunked_path_above_the_cpu_threshold(monkeypatch):
    """impl="auto" follows resolve_impl: on CPU the chunked path from AUTO_CHUNKED_MIN_LOGITS on."""
    import mmcl.losses._common
    import mmcl.losses.siglip as losses

    calls = []
    chunked = losses.sigmoid_pair_loss_chunked
    monkeypatch.setattr(losses, "sigmoid_pair_loss_chunked", lambda *a, **k: calls.append(a[0].shape) or chunked(*a, **k))
    img, txt = _features(10), _features(10)
    small = siglip_loss(img, txt, 5.0, -1.0)
    assert calls == []
    monkeypatch.setattr(mmcl.losses._common, "AUTO_CHUNKED_MIN_LOGITS", 100)
    _assert_close(siglip_loss(img, txt, 5.0, -1.0), small, "auto above the threshold")
    assert calls == [(10, 16)]


_T, _B = torch.tensor(10.0), torch.tensor(-10.0)
_X = torch.randn(4, 8)


@pytest.mark.parametrize("call,error,message", [
    (lambda: siglip_loss(_X, _X, _T, float("nan")), ValueError, "logit_bias must be finite"),
    (lambda: siglip_loss(_X, _X, _T, torch.tensor(float("inf"))), ValueError, "logit_bias must be finite"),
    (lambda: siglip_loss(_X, _X, _T, torch.zeros(2)), ValueError, "logit_bias must be a scalar"),
    (lambda: siglip_loss(_X, _X, _T, None), TypeError, "logit_bias must be a float or a 0-dim tensor"),
    (lambda: siglip_loss(_X, _X, _T, "0"), TypeError, "logit_bias must be a float"),
    (lambda: siglip_loss(_X, _X, _T, True), TypeError, "logit_bias must be a float"),
    (lambda: siglip_loss(_X, _X, _T, torch.tensor(1)), TypeError, "logit_bias must be a floating-point scalar"),
    (lambda: siglip_loss(_X, _X, 0.0, _B), ValueError, "logit_scale must be finite and > 0"),
    (lambda: siglip_loss(_X, _X, torch.tensor(-1.0), _B), ValueError, "logit_scale must be finite and > 0"),
    (lambda: siglip_loss(_X, _X, float("inf"), _B), ValueError, "logit_scale must be finite and > 0"),
    (lambda: siglip_loss(_X, torch.randn(5, 8), _T, _B), ValueError, "same batch size"),
    (lambda: siglip_loss(_X, torch.randn(4, 9), _T, _B), ValueError, "same feature dim"),
    (lambda: siglip_loss(_X[0], _X, _T, _B), ValueError, "image_features must be 2-D"),
    (lambda: siglip_loss(_X, _X.long(), _T, _B), TypeError, "text_features must be a floating-point tensor"),
    (lambda: siglip_loss(_X.numpy(), _X, _T, _B), TypeError, "image_features must be a torch.Tensor"),
    (lambda: siglip_loss(_X, _X.to("meta"), _T, _B), ValueError, "image_features is on cpu but text_features"),
    (lambda: siglip_loss(_X, _X, _T, _B, impl="fast"), ValueError, "impl must be one of"),
    (lambda: sigmoid_pair_loss_chunked(_X, _X, _T, _B, torch.tensor([0, 1, 2, 4])), ValueError,
     r"positive values must lie in \[-1, 4\)"),
    (lambda: sigmoid_pair_loss_chunked(_X, _X, _T, _B, torch.zeros(4)), TypeError, "positive must be None or an integer"),
])
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.slow
def test_gathered_siglip_on_two_processes_equals_one_process(tmp_path):
    """siglip_loss(gather=True) on 2 gloo ranks (accelerate launch), even and uneven shards, naive,
    chunked and Triton (interpreted): loss and DDP-averaged gradients of the towers, the scale and
    the bias as one float64 process on the whole batch."""
    from helpers.launch import SCRIPTS, accelerate_launch

    out = tmp_path / "result.json"
    accelerate_launch(SCRIPTS / "dist_siglip.py", str(out), "--impls", "naive,chunked,triton",
                      "--batch", "45", "--dim", "48", timeout=600,  # several 32-wide tiles for Triton
                      env={"TRITON_INTERPRET": "1"})
    per_rank = json.loads(out.read_text())
    assert [r["rank"] for r in per_rank] == [0, 1]
    uneven = [{c["rows"] for c in r["cases"] if c["shards"] == "uneven"} for r in per_rank]
    assert len(uneven[0]) == len(uneven[1]) == 1 and uneven[0] != uneven[1], uneven
    for result in per_rank:
        seen = {(c["shards"], c["impl"], c["dtype"]) for c in result["cases"]}
        expected = {(s, i, d) for s in ("even", "uneven") for i in ("naive", "chunked", "triton")
                    for d in ("float64", "float32") if not (i == "triton" and d == "float64")}
        assert seen == expected, sorted(seen)
        for case in result["cases"]:
            tol = 1e-12 if case["dtype"] == "float64" else 2e-6
            label = f"rank {result['rank']} {case}"
            assert case["loss_err"] < tol and case["grad_err"] < tol, label
            assert case["scale_grad_err"] < tol and case["bias_grad_err"] < tol, label
