"""GradCache (train.accumulate=k) gives the parameter gradients of one k·B contrastive batch.

Real towers (tiny ViT + BERT built from transformers configs), float64, uneven micro-batches.
With dropout off the reference is one forward/backward over the whole batch; with dropout on it
is the same micro-batches kept in one graph from the same RNG state (dropout masks must match,
which fails unless GradCache restores the RNG before re-running each micro-batch).
"""
import contextlib

import pytest
import torch
from train_helpers import tiny_overrides, write_tokenizer

from mmcl.train import load_config
from mmcl.train.builders import build_model
from mmcl.train.gradcache import cached_step, plain_step
from mmcl.methods import ClipObjective, SimCLRObjective

SIZES = [3, 1, 4]  # micro-batches of uneven size, 8 rows in all


def _model(mode, tmp_path, dropout):
    cfg = load_config(None, tiny_overrides(mode, tmp_path / "run", write_tokenizer(tmp_path / "tok"), dropout=dropout))
    torch.manual_seed(0)
    model = build_model(cfg).double().train()
    return model, cfg


def _batches(mode, sizes):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in sizes:
        if mode == "clip":
            ids = torch.randint(5, 40, (n, 7), generator=g)
            mask = torch.ones_like(ids)
            mask[0, 5:] = 0  # one padded caption
            out.append({"pixel_values": torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64),
                        "input_ids": ids, "attention_mask": mask})
        else:
            out.append({"view1": torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64),
                        "view2": torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)})
    return out


def _objective(mode, cfg):
    cfg.loss.impl = "naive"
    return ClipObjective(cfg) if mode == "clip" else SimCLRObjective(cfg)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _cached(model, objective, batches):
    model.zero_grad(set_to_none=True)
    loss, _, _ = cached_step(model, lambda: model.logit_scale(), objective, batches, lambda l: l.backward(),
                             contextlib.nullcontext, torch.device("cpu"))
    return loss, _grads(model)


def _assert_same(got, want, rtol=1e-9, atol=1e-12):
    assert got.keys() == want.keys()
    for name in want:
        diff = (got[name] - want[name]).abs().max().item()
        assert torch.allclose(got[name], want[name], rtol=rtol, atol=atol), f"{name}: max |diff| {diff:.3e}"


@pytest.mark.parametrize("mode", ["clip", "simclr"])
def test_gradcache_equals_one_big_batch(mode, tmp_path):
    model, cfg = _model(mode, tmp_path, dropout=0.0)
    objective = _objective(mode, cfg)
    batches = _batches(mode, SIZES)
    big = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    if mode == "clip":  # captions of different micro-batches pad to one length
        big["attention_mask"] = torch.cat([b["attention_mask"] for b in batches])

    model.zero_grad(set_to_none=True)
    emb = objective.embed(model, big)
    scale = emb.pop("scale", None)
    ref_loss, _ = objective.loss(emb, {}, scale)
    ref_loss.backward()
    want = _grads(model)

    loss, got = _cached(model, objective, batches)
    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-12)
    _assert_same(got, want)
    # The image tower and (for CLIP) the temperature really receive gradient.
    assert any(n.startswith("image_tower") and g.abs().sum() > 0 for n, g in got.items())
    if mode == "clip":
        assert got["logit_scale.log_scale"].abs() > 0
        assert any(n.startswith("text_tower") and g.abs().sum() > 0 for n, g in got.items())

    # Plain accumulation of the same micro-batches is a different objective (k small batches):
    model.zero_grad(set_to_none=True)
    plain_step(model, objective, batches, lambda l: l.backward(), contextlib.nullcontext)
    plain = _grads(model)
    assert not all(torch.allclose(plain[n], want[n], rtol=1e-6) for n in want)


@pytest.mark.parametrize("mode", ["clip", "simclr"])
def test_gradcache_replays_dropout_masks(mode, tmp_path):
    model, cfg = _model(mode, tmp_path, dropout=0.3)
    objective = _objective(mode, cfg)
    batches = _batches(mode, SIZES)

    # Reference: the same micro-batches, in one graph, from the same RNG state.
    torch.manual_seed(123)
    model.zero_grad(set_to_none=True)
    parts = [objective.embed(model, b) for b in batches]
    emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "scale"}
    ref_loss, _ = objective.loss(emb, {}, model.logit_scale())
    ref_loss.backward()
    want = _grads(model)

    torch.manual_seed(123)
    loss, got = _cached(model, objective, batches)
    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-12)
    _assert_same(got, want)

    # Dropout is really active: another RNG state gives other gradients.
    torch.manual_seed(321)
    _, other = _cached(model, objective, batches)
    assert not all(torch.allclose(other[n], want[n], rtol=1e-6) for n in want)


def test_gradcache_moves_batchnorm_statistics_once(tmp_path):
    """A BatchNorm tower (ResNet config): after GradCache the running statistics are those of
    one ordinary forward per micro-batch, not two (the graph-free pass must leave them alone)."""
    resnet = ("model.image_tower_config={model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], "
              "depths: [1, 1], layer_type: basic}")
    cfg = load_config(None, tiny_overrides("simclr", tmp_path / "r", None) + [resnet])
    torch.manual_seed(0)
    model = build_model(cfg).double().train()
    reference = build_model(cfg).double().train()
    reference.load_state_dict(model.state_dict())
    objective = _objective("simclr", cfg)
    batches = _batches("simclr", SIZES)
    _cached(model, objective, batches)
    with torch.no_grad():
        for b in batches:
            objective.embed(reference, b)
    stats = {n: b for n, b in model.named_buffers() if "running" in n or "num_batches_tracked" in n}
    want = dict(reference.named_buffers())
    assert stats, "the tower has no BatchNorm statistics"
    for name, value in stats.items():
        torch.testing.assert_close(value, want[name], rtol=1e-12, atol=1e-12, msg=name)
