"""The methods' loss options: i-Mix targets from a CutMix-ed batch (SimCLR, MoCo, CLIP) against the
written-out soft-label cross-entropy, across concatenated micro-batches; HCL / DCL settings reaching
the loss; their validation."""
import pytest
import torch
import torch.nn.functional as F

from mmcl.losses import info_nce
from mmcl.methods import build_objective
from mmcl.methods.base import LossConfig, mix_keys, mix_targets
from mmcl.train.builders import build_model
from mmcl.train.config import load_config
from train_helpers import tiny_overrides, write_tokenizer


def _soft_ce(logits, targets):
    """−Σ_j Y_ij log softmax(logits)_ij, mean over rows, written out."""
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(targets * log_p).sum(1).mean()


def _mix_matrix(partner, lam, columns):
    y = torch.zeros(partner.shape[0], columns, dtype=torch.float64)
    rows = torch.arange(partner.shape[0])
    y[rows, rows] += lam.double()
    y[rows, partner] += 1 - lam.double()
    return y


def _objective(mode, tmp_path, *extra):
    cfg = load_config(None, tiny_overrides(mode, tmp_path / "r", write_tokenizer(tmp_path / "tok")) + list(extra))
    return build_objective(cfg, build_model(cfg))


def test_mix_keys_survive_concatenation_of_micro_batches():
    # Two micro-batches of 3 and 4 samples, partners local to each; concatenated keys give global rows.
    a = {"mix_partner": torch.tensor([2, 1, 0]), "mix_lambda": torch.tensor([0.25, 1.0, 0.5])}
    b = {"mix_partner": torch.tensor([1, 0, 3, 2]), "mix_lambda": torch.tensor([0.75, 0.6, 1.0, 0.4])}
    ka, kb = mix_keys(a), mix_keys(b)
    keys = {k: torch.cat([ka[k], kb[k]]) for k in ka}
    out = mix_targets(keys, torch.zeros(1))
    assert out["mix_partner"].tolist() == [2, 1, 0, 4, 3, 6, 5]
    assert torch.equal(out["mix_lambda"], torch.cat([a["mix_lambda"], b["mix_lambda"]]))
    assert mix_keys({"view1": torch.zeros(2)}) == {} and mix_targets({}, torch.zeros(1)) == {}


def test_simclr_objective_uses_the_mixed_targets(tmp_path):
    objective = _objective("simclr", tmp_path, "data.cutmix=0.5", "loss.impl=naive")
    n, d, T = 5, 16, objective.loss_cfg.temperature
    z1 = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_(True)
    z2 = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_(True)
    partner, lam = torch.tensor([3, 1, 4, 0, 2]), torch.tensor([0.3, 1.0, 0.55, 0.8, 0.1], dtype=torch.float64)
    keys = objective.key_embeds({"view1": z1, "mix_partner": partner, "mix_lambda": lam})
    loss, _ = objective.loss({"z1": z1, "z2": z2}, keys, None)
    # Written out: 2N anchors; anchor i (view 1) has positive N+i, anchor N+i has positive i; the
    # soft label puts λ_i on the own positive and 1 − λ_i on the partner's view in the other half.
    z = torch.cat([z1, z2])
    logits = z @ z.T / T
    logits.fill_diagonal_(float("-inf"))
    y = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    for i in range(n):
        for row, off in ((i, n), (n + i, 0)):
            y[row, off + i] += lam[i]
            y[row, off + int(partner[i])] += 1 - lam[i]
    log_p = torch.log_softmax(logits, dim=1)
    ref = -(y * torch.where(y > 0, log_p, torch.zeros_like(log_p))).sum(1).mean()
    assert torch.allclose(loss, ref, rtol=1e-9, atol=1e-12), (loss.item(), ref.item())
    g, g_ref = torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(ref, (z1, z2))
    for a, r in zip(g, g_ref):
        assert torch.allclose(a, r, rtol=1e-8, atol=1e-12)


def test_moco_objective_uses_the_mixed_targets_with_a_queue(tmp_path):
    objective = _objective("moco", tmp_path, "data.cutmix=0.5", "loss.impl=naive")
    n, d, T = 6, 16, objective.loss_cfg.temperature
    q = F.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(n, d), dim=1)
    objective.queue.enqueue(F.normalize(torch.randn(9, d), dim=1))
    partner, lam = torch.tensor([1, 0, 5, 3, 2, 4]), torch.tensor([0.5, 0.7, 0.2, 1.0, 0.9, 0.35])
    keys = {"k": k, **mix_keys({"mix_partner": partner, "mix_lambda": lam})}
    loss, _ = objective.loss({"q": q}, keys, None)
    # i-Mix's MoCo form: columns = [this batch's keys; the queue], λ on the own key, 1 − λ on the partner's.
    columns = torch.cat([k, objective.queue.valid_features()]).double()
    ref = _soft_ce(q.double() @ columns.T / T, _mix_matrix(partner, lam, columns.shape[0]))
    assert torch.allclose(loss.double(), ref, rtol=1e-5), (loss.item(), ref.item())
    g = torch.autograd.grad(loss, q)[0]
    qd = q.detach().double().requires_grad_(True)
    g_ref = torch.autograd.grad(_soft_ce(qd @ columns.T / T, _mix_matrix(partner, lam, columns.shape[0])), qd)[0]
    assert torch.allclose(g.double(), g_ref, atol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_clip_objective_mixes_the_text_targets(tmp_path, impl):
    objective = _objective("clip", tmp_path, "data.cutmix=0.5", f"loss.impl={impl}")
    n, d = 5, 16
    img = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_(True)
    txt = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    partner = torch.tensor([2, 3, 0, 1, 4])
    lam = torch.tensor([0.6, 0.4, 1.0, 0.75, 1.0], dtype=torch.float64)
    keys = objective.key_embeds({"pixel_values": img, "mix_partner": partner, "mix_lambda": lam})
    loss, _ = objective.loss({"image": img, "text": txt}, keys, scale)
    # Written out: Y_ij = λ_i [j = i] + (1 − λ_i) [j = partner_i]; image→text is the soft-label
    # cross-entropy of each image's row; text→image uses the same Y transposed (text j's soft
    # label over the images is column j of Y), each direction a mean over its B rows.
    logits = scale * img @ txt.T
    y = _mix_matrix(partner, lam, n)
    image_to_text = -(y * torch.log_softmax(logits, dim=1)).sum() / n
    text_to_image = -(y.T * torch.log_softmax(logits.T, dim=1)).sum() / n
    ref = (image_to_text + text_to_image) / 2
    assert torch.allclose(loss, ref, rtol=1e-9), (loss.item(), ref.item())
    grads = torch.autograd.grad(loss, (img, txt, scale))
    grads_ref = torch.autograd.grad(ref, (img, txt, scale))
    for name, g, r in zip(("image", "text", "scale"), grads, grads_ref):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-12), (name, (g - r).abs().max())
    plain, _ = objective.loss({"image": img, "text": txt}, {}, scale)
    assert not torch.allclose(plain, loss)  # the mixed targets changed the loss


def test_clip_takes_mixed_images_and_siglip_refuses_them(tmp_path):
    tok = write_tokenizer(tmp_path / "tok")
    cfg = load_config(None, tiny_overrides("clip", tmp_path / "r", tok) + ["data.cutmix=0.5"])
    assert cfg.data.cutmix == 0.5
    with pytest.raises(ValueError, match="data.cutmix.*'siglip'"):
        load_config(None, tiny_overrides("siglip", tmp_path / "r", tok) + ["data.cutmix=0.5"])


def test_hard_negative_options_reach_the_moco_loss(tmp_path):
    objective = _objective("moco", tmp_path, "loss.hard_negative_beta=0.5", "loss.debias_tau_plus=0.1",
                           "loss.impl=naive")
    q, k = F.normalize(torch.randn(5, 16), dim=1), F.normalize(torch.randn(5, 16), dim=1)
    objective.queue.enqueue(F.normalize(torch.randn(7, 16), dim=1))
    loss, _ = objective.loss({"q": q}, {"k": k}, None)
    queue = objective.queue.valid_features()
    expected = info_nce(q, k, 0.2, queue=queue, hard_negative_beta=0.5, debias_tau_plus=0.1, impl="naive")
    plain = info_nce(q, k, 0.2, queue=queue, impl="naive")
    assert torch.allclose(loss, expected) and not torch.allclose(loss, plain)


@pytest.mark.parametrize("field,value,match", [("hard_negative_beta", -0.1, "loss.hard_negative_beta"),
                                               ("debias_tau_plus", 1.0, "loss.debias_tau_plus"),
                                               ("debias_tau_plus", -0.5, "loss.debias_tau_plus")])
def test_loss_options_are_validated(field, value, match):
    cfg = LossConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_mixed_targets_and_hard_negatives_do_not_combine(tmp_path):
    with pytest.raises(ValueError, match="data.cutmix"):
        load_config(None, tiny_overrides("simclr", tmp_path / "r", None) + ["data.cutmix=0.5",
                                                                             "loss.hard_negative_beta=1"])


@pytest.mark.slow
def test_clip_fit_trains_on_mixed_images(tmp_path):
    from mmcl.train.loop import fit

    seen = []

    def on_batch(step, batch):
        seen.append({k: batch[k].clone() for k in ("pixel_values", "mix_partner", "mix_lambda")})

    tok = write_tokenizer(tmp_path / "tok")
    result = fit(load_config(None, tiny_overrides("clip", tmp_path / "r", tok, steps=2) + ["data.cutmix=1.0"]),
                 on_batch=on_batch)
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    for batch in seen:  # every sample took a box from another one
        n = batch["pixel_values"].shape[0]
        assert (batch["mix_partner"] != torch.arange(n)).all()
        assert (batch["mix_lambda"] <= 1).all() and (batch["mix_lambda"] < 1).any()
