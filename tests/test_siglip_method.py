"""The `siglip` training mode: the paper's initialisation, the loss against a float64 formula
(with the gradients of features, scale and bias, plain and GradCache), a short real run that
learns, and the scale and bias through save / load."""
import contextlib
import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_helpers import REPO, recipe_overrides, run_python, tiny_overrides, write_tokenizer

from mmcl.methods import METHODS, SigLipObjective, build_objective
from mmcl.models import DualEncoder
from mmcl.train import fit, load_config
from mmcl.train.builders import build_model
from mmcl.train.gradcache import cached_step

SIZES = [3, 1, 5]  # uneven micro-batches, 9 rows


def sigmoid_loss_float64(image, text, scale, bias):
    """−(1/B) Σ_ij log σ(z_ij (t x_i·y_j + b)), z = +1 on the diagonal, −1 elsewhere, in float64."""
    logits = scale.double() * image.double() @ text.double().T + bias.double()
    z = 2 * torch.eye(image.shape[0], dtype=torch.float64) - 1
    return -F.logsigmoid(z * logits).sum() / image.shape[0]


def siglip_overrides(tmp_path, **kw):
    return tiny_overrides("siglip", tmp_path / "run", write_tokenizer(tmp_path / "tok"), **kw)


def _model(tmp_path, **kw):
    cfg = load_config(None, siglip_overrides(tmp_path, **kw))
    cfg.loss.impl = "naive"
    torch.manual_seed(0)
    return build_model(cfg), cfg


def _batches(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        ids = torch.randint(5, 40, (n, 7), generator=g)
        out.append({"pixel_values": torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64), "input_ids": ids,
                    "attention_mask": torch.ones_like(ids)})
    return out


def test_siglip_mode_registered_and_initialised_as_the_paper(tmp_path):
    assert METHODS["siglip"] is SigLipObjective
    model, cfg = _model(tmp_path)
    assert SigLipObjective.eval_kind == "zeroshot" and SigLipObjective.needs_text
    assert float(model.logit_scale.log_scale.detach()) == pytest.approx(math.log(10.0), abs=1e-6)
    assert float(model.logit_bias.detach()) == -10.0
    assert model.logit_scale.log_scale.requires_grad and model.logit_bias.requires_grad
    # Unclamped, as the paper's t = exp(t'): a scale past CLIP's 100 stays itself.
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(math.log(300.0))
    assert float(model.logit_scale().detach()) == pytest.approx(300.0, rel=1e-5)
    assert isinstance(build_objective(cfg, model), SigLipObjective)

    # An explicit model.init_temperature still wins; a CLIP model keeps its state dict and clamp.
    cfg = load_config(None, siglip_overrides(tmp_path) + ["model.init_temperature=0.5"])
    assert float(build_model(cfg).logit_scale()) == pytest.approx(2.0, rel=1e-6)
    clip_cfg = load_config(None, tiny_overrides("clip", tmp_path / "c", write_tokenizer(tmp_path / "tok")))
    clip = build_model(clip_cfg)
    assert clip.logit_bias is None and not any("logit_bias" in k for k in clip.state_dict())
    assert float(clip.logit_scale().detach()) == pytest.approx(1 / 0.07, rel=1e-6) and clip.max_scale == 100.0
    assert "init_logit_bias" not in clip.config()
    with pytest.raises(ValueError, match="logit bias"):
        SigLipObjective(cfg, clip)


def test_siglip_objective_equals_float64_formula_with_gradients(tmp_path):
    model, cfg = _model(tmp_path)
    model = model.double().train()
    with torch.no_grad():  # away from the initial values, so that every gradient is sizeable
        model.logit_scale.log_scale.fill_(math.log(3.7))
        model.logit_bias.fill_(-1.3)
    objective = build_objective(cfg, model)
    batch = _batches([9])[0]
    emb = objective.embed(model, batch)
    scale = emb.pop("scale")
    loss, logs = objective.loss(emb, {}, scale)
    assert logs["logit_bias"] == pytest.approx(-1.3) and logs["temperature"] == pytest.approx(1 / 3.7)
    image, text = emb["image"], emb["text"]
    params = [model.logit_scale.log_scale, model.logit_bias]
    got = torch.autograd.grad(loss, [image, text, *params], retain_graph=True)

    t_prime = model.logit_scale.log_scale.detach().clone().requires_grad_(True)
    bias = model.logit_bias.detach().clone().requires_grad_(True)
    leaves = [image.detach().clone().requires_grad_(True), text.detach().clone().requires_grad_(True)]
    want_loss = sigmoid_loss_float64(*leaves, t_prime.exp(), bias)
    want = torch.autograd.grad(want_loss, [*leaves, t_prime, bias])
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-12, atol=1e-12)
    for name, g, w in zip(("image", "text", "log_scale", "bias"), got, want):
        assert w.abs().max() > 1e-6, name
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_siglip_gradcache_gives_the_gradients_of_one_batch(tmp_path):
    """GradCache passes only the scale to the loss: the bias comes from the model and still gets
    the gradient of the whole batch."""
    model, cfg = _model(tmp_path)
    model = model.double().train()
    with torch.no_grad():
        model.logit_bias.fill_(-2.0)
    objective = build_objective(cfg, model)
    batches = _batches(SIZES)
    big = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}

    model.zero_grad(set_to_none=True)
    emb = objective.embed(model, big)
    ref_loss, _ = objective.loss(emb, {}, emb.pop("scale"))
    ref_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    loss, _, _ = cached_step(model, lambda: model.logit_scale(), objective, batches, lambda l: l.backward(),
                             contextlib.nullcontext, torch.device("cpu"))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=0)
    assert got.keys() == want.keys() and {"logit_bias", "logit_scale.log_scale"} <= set(got)
    assert want["logit_bias"].abs() > 1e-4
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_softmax_model_gets_a_bias_to_train_with_sigmoid_loss(tmp_path):
    clip_cfg = load_config(None, tiny_overrides("clip", tmp_path / "c", write_tokenizer(tmp_path / "tok")))
    build_model(clip_cfg).save_pretrained(tmp_path / "clip")
    cfg = load_config(None, siglip_overrides(tmp_path) + [f"model.pretrained={tmp_path / 'clip'}"])
    model = build_model(cfg)
    assert float(model.logit_bias.detach()) == -10.0 and model.config()["init_logit_bias"] == -10.0
    with pytest.raises(ValueError, match="already has a logit bias"):
        model.add_logit_bias(0.0)
    with pytest.raises(ValueError, match="init_logit_bias"):
        DualEncoder.from_pretrained(tmp_path / "clip").add_logit_bias(float("nan"))


@pytest.mark.slow
def test_siglip_run_learns_and_saves_scale_and_bias(tmp_path):
    """40 steps of the digits recipe (about 20 s): the loss falls, zero-shot on unseen prompt
    templates is far above chance, and the final directory holds the trained scale and bias."""
    config = os.path.join(REPO, "recipes", "configs", "siglip_digits.yaml")
    result = fit(load_config(config, [f"output_dir={tmp_path / 'run'}", "train.max_steps=40", "optim.warmup_steps=5",
                                      "train.log_every=5", "eval.max_samples=100", "train.progress=false"]))
    logs = [json.loads(line) for line in open(tmp_path / "run" / "logs" / "metrics.jsonl")]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    assert result["zeroshot_top1"] > 0.5, result  # 10 digit classes: chance is 0.1

    back = DualEncoder.from_pretrained(tmp_path / "run" / "final")
    assert back.logit_bias is not None and back.max_scale is None
    # Trained values, not the initial ones; the logged bias is the one of the last logged step.
    assert abs(float(back.logit_bias.detach()) + 10.0) > 1e-3 and abs(float(back.logit_scale().detach()) - 10.0) > 1e-3
    logged = [r["logit_bias"] for r in logs if "logit_bias" in r]
    assert logged and logged[-1] == pytest.approx(float(back.logit_bias.detach()), abs=0.05)
    assert logged[-1] != pytest.approx(-10.0, abs=1e-3)


def test_siglip_model_save_load_round_trips_scale_and_bias(tmp_path):
    model, _ = _model(tmp_path)
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(math.log(123.4))  # past CLIP's clamp
        model.logit_bias.fill_(-7.25)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["init_logit_bias"] == -10.0 and config["max_scale"] is None
    back = DualEncoder.from_pretrained(tmp_path / "saved")
    assert float(back.logit_scale().detach()) == pytest.approx(123.4, rel=1e-6)
    assert float(back.logit_bias.detach()) == -7.25
    batch = _batches([4])[0]
    with torch.no_grad():
        a, b = model(**batch), back(**batch)
    torch.testing.assert_close(b.image_embeds, a.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(b.text_embeds, a.text_embeds, rtol=0, atol=0)
    assert float(b.logit_bias.detach()) == -7.25


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2], ids=["ddp", "gradcache"])
def test_two_process_siglip_run_matches_one_process(accumulate, tmp_path):
    """2 gloo processes (DDP, or GradCache with micro-batches of 2) on the same global batches of
    8 as one process: the scale and the bias reach DDP through the model's forward (no parameter
    outside it, which DDP's unused-parameter search would reject) and every weight agrees."""
    tok = write_tokenizer(tmp_path / "tok")
    common = ["eval.enabled=false", "optim.name=sgd", "optim.lr=0.2", "train.max_steps=2", "loss.impl=naive"]

    def overrides(out, batch):
        return recipe_overrides("siglip", tmp_path / out, tok, batch=batch) + common
    two = overrides("two", 8 // (2 * accumulate)) + [f"train.accumulate={accumulate}"]
    r = run_python(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                    "recipes/train_clip.py", "--config", os.path.join(REPO, "recipes", "configs", "siglip_digits.yaml"),
                    *two], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "weights identical on all 2 processes" in r.stdout
    fit(load_config(os.path.join(REPO, "recipes", "configs", "siglip_digits.yaml"), overrides("one", 8)))
    a = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and "logit_bias" in b
    for k in b:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), f"{k}: max diff {(a[k] - b[k]).abs().max():.3e}"
    assert abs(float(a["logit_bias"]) + 10.0) > 1e-4 and abs(float(a["logit_scale.log_scale"]) - math.log(10)) > 1e-4
