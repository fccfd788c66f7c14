"""Training building blocks without a training run: configs and overrides, parameter groups,
the lr schedule, LARS, checkpoint state encoding, the jsonl tracker, the locked-text cache."""
import glob
import json
import math
import os

import numpy as np
import pytest
import torch
from train_helpers import REPO, tiny_overrides, write_tokenizer

from mmcl.methods import METHODS
from mmcl.train import LARS, JsonlTracker, load_config, lr_factor, param_groups, parse_overrides
from mmcl.train.checkpoint import latest_checkpoint, load_state, save_state


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "recipes", "configs", "*.yaml"))))
def test_every_recipe_config_loads(path):
    cfg = load_config(path)
    assert cfg.mode in METHODS and cfg.train.max_steps >= 1


def test_overrides_are_yaml_scalars_and_nested():
    cfg = load_config(os.path.join(REPO, "recipes", "configs", "clip_digits.yaml"),
                      ["train.max_steps=30", "output_dir=runs/x", "optim.lr=3e-4", "train.skip_nonfinite=true",
                       "optim.betas=[0.9, 0.95]", "data.max_samples=null", "eval.templates=['a {}.', 'the {}.']"])
    assert cfg.train.max_steps == 30 and cfg.output_dir == "runs/x"
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.skip_nonfinite is True and cfg.optim.betas == (0.9, 0.95)
    assert cfg.data.max_samples is None and cfg.eval.templates == ["a {}.", "the {}."]
    assert cfg.model.lock_text is True  # untouched YAML values survive
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_unknown_key_names_it_and_close_matches():
    with pytest.raises(ValueError, match=r"train\.max_step'.*max_steps"):
        load_config(None, ["train.max_step=3", "model.image_tower=timm:resnet18"])
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer'.*optim"):
        load_config(None, ["optimizer.lr=1", "model.image_tower=timm:resnet18"])


@pytest.mark.parametrize("override,match", [
    ("train.batch_size=0", "train.batch_size"),
    ("mode=swav", "mode must be one of"),
    ("optim.name=adam", "optim.name"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.augment=strong", "DataConfig.augment"),
    ("train.batch_size=abc", "train.batch_size"),
    ("train.trackers=[mlflow]", "unknown tracker"),
])
def test_bad_values_raise_naming_the_key(override, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_config(None, ["model.image_tower=timm:resnet18", "model.text_tower=x", override])


def test_missing_towers_and_files_are_reported():
    with pytest.raises(ValueError, match="image_tower"):
        load_config(None, [])
    with pytest.raises(ValueError, match="text tower"):
        load_config(None, ["model.image_tower=timm:resnet18"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent/config.yaml")
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(None, ["eval.templates=[a {}., b]"])


# --------------------------------------------------------------------------- optimisation


def test_no_weight_decay_on_norms_biases_and_temperature(tmp_path):
    from mmcl.train.builders import build_model

    cfg = load_config(None, tiny_overrides("clip", tmp_path / "r", write_tokenizer(tmp_path / "tok")))
    model = build_model(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert "logit_scale.log_scale" in no_decay_names
    for n, p in model.named_parameters():
        if n.endswith("bias") or "layernorm" in n.lower() or "LayerNorm" in n:
            assert n in no_decay_names, n
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "image_projection.weight" in decay_names and all(p.ndim >= 2 for p in decay["params"])


def test_cosine_schedule_with_warmup_matches_formula():
    total, warm, floor = 23, 5, 0.1
    for step in range(total + 1):
        got = lr_factor(step, total_steps=total, warmup_steps=warm, schedule="cosine", min_ratio=floor)
        if step < warm:
            want = (step + 1) / warm
        else:
            want = floor + (1 - floor) * (1 + math.cos(math.pi * (step - warm) / (total - warm))) / 2
        assert got == pytest.approx(want, abs=1e-12)
    assert lr_factor(7, total_steps=10, warmup_steps=0, schedule="constant", min_ratio=0.0) == 1.0


def _lars_reference(w, g, buf, lr, wd, eta, mom):
    """LARS in float64 numpy, from the paper's formulas."""
    if wd > 0:
        g = g + wd * w
        wn, gn = np.linalg.norm(w), np.linalg.norm(g)
        if wn > 0 and gn > 0:
            g = g * (eta * wn / gn)
    buf = g.copy() if buf is None else mom * buf + g
    return w - lr * buf, buf


def test_lars_matches_reference_over_steps():
    torch.manual_seed(0)
    w_decay = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    w_plain = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = LARS([{"params": [w_decay], "weight_decay": 1e-2}, {"params": [w_plain], "weight_decay": 0.0}],
               lr=0.3, momentum=0.9, trust_coefficient=0.02)
    ref = {"d": (w_decay.detach().numpy().copy(), None), "p": (w_plain.detach().numpy().copy(), None)}
    for _ in range(4):
        gd, gp = torch.randn(7, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
        w_decay.grad, w_plain.grad = gd.clone(), gp.clone()
        opt.step()
        ref["d"] = _lars_reference(ref["d"][0], gd.numpy(), ref["d"][1], 0.3, 1e-2, 0.02, 0.9)
        ref["p"] = _lars_reference(ref["p"][0], gp.numpy(), ref["p"][1], 0.3, 0.0, 0.02, 0.9)
    np.testing.assert_allclose(w_decay.detach().numpy(), ref["d"][0], rtol=1e-12)
    np.testing.assert_allclose(w_plain.detach().numpy(), ref["p"][0], rtol=1e-12)


# --------------------------------------------------------------------------- checkpoint state


def test_state_roundtrip_keeps_types_and_tensors(tmp_path):
    import random

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(4, 3)
    opt.step()
    state = {"optimizer": opt.state_dict(), "numpy": np.random.get_state(), "python": random.getstate(),
             "torch": torch.get_rng_state(), "nan": float("nan"), "step": 7, "none": None}
    save_state(state, tmp_path)
    back = load_state(tmp_path)
    assert json.load(open(tmp_path / "state.json"))  # plain JSON next to the safetensors file
    assert back["step"] == 7 and back["none"] is None and math.isnan(back["nan"])
    assert list(back["optimizer"]["state"]) == [0]  # integer keys survive
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(back["torch"], state["torch"])
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    a = (random.random(), np.random.rand())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    assert a == (random.random(), np.random.rand())
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # loadable by torch as is


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_00000002", True), ("step_00000004", True), ("step_00000006", False),
                           (".tmp-step_00000008", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "COMPLETE").write_text("x")
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert latest_checkpoint(tmp_path / "nothing") is None


# --------------------------------------------------------------------------- tracker, text cache


def test_jsonl_tracker_through_accelerate(tmp_path):
    from accelerate import Accelerator

    tracker = JsonlTracker("t", str(tmp_path))
    acc = Accelerator(log_with=[tracker], project_dir=str(tmp_path))
    acc.init_trackers("t", config={"lr": 0.1, "mode": "clip"})
    acc.log({"loss": torch.tensor(1.5), "lr": 0.1}, step=3)
    acc.log({"loss": float("inf")}, step=4)
    acc.end_training()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(3, 1.5), (4, "inf")]
    assert json.load(open(tmp_path / "config.json")) == {"lr": 0.1, "mode": "clip"}


def test_locked_text_cache_returns_the_towers_features(tmp_path):
    from mmcl.train.builders import build_model

    tok = write_tokenizer(tmp_path / "tok")
    cfg = load_config(None, tiny_overrides("clip", tmp_path / "r", tok) + ["model.lock_text=true"])
    plain = build_model(cfg)
    cfg.model.cache_text_features = True
    cached = build_model(cfg)
    cached.load_state_dict(plain.state_dict())
    assert cached.state_dict().keys() == plain.state_dict().keys()
    texts = ["a handwritten seven .", "zero", "a small blurry two on a black background", "zero"]
    batch = plain.processor.tokenize(texts)
    want = plain.encode_text(**batch)
    first = cached.encode_text(**batch)
    again = cached.encode_text(**cached.processor.tokenize(texts[::-1]))  # other padding, all cached
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, want.flip(0), rtol=1e-5, atol=1e-6)
    wrapper = cached.text_tower.forward
    assert wrapper.misses == 3 and wrapper.hits == 5
    cfg.model.lock_text = False
    with pytest.raises(ValueError, match="fully locked"):
        build_model(cfg)
