"""BYOL (mmcl.methods.byol): the loss against its formula, the momentum ramp, the predictor trained
and checkpointed with the model, and the image-only rule."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mmcl.methods import build_objective
from mmcl.methods.byol import BYOLConfig, byol_loss, byol_predictor, normalized_std
from mmcl.train.builders import build_model
from mmcl.train.config import load_config
from mmcl.train.loop import fit
from train_helpers import tiny_overrides

TOWERS = ["model.image_tower=timm:resnet18", "model.text_tower=x"]  # validation only: nothing is built


def _byol_reference(p1, p2, t1, t2):
    """‖p̄1 − t̄2‖² + ‖p̄2 − t̄1‖², the bars written out as x / sqrt(Σ x²), mean over rows."""
    def unit(x):
        return x / torch.sqrt((x * x).sum(1, keepdim=True))

    return (((unit(p1) - unit(t2)) ** 2).sum(1) + ((unit(p2) - unit(t1)) ** 2).sum(1)).mean()


@pytest.mark.parametrize("b,d", [(1, 3), (7, 48), (33, 32)])
def test_byol_loss_matches_the_formula_with_gradients(b, d):
    p1, p2 = (torch.randn(b, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t1, t2 = torch.randn(b, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)
    ours = byol_loss(p1, p2, t1, t2)
    ref = _byol_reference(p1, p2, t1, t2)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12), (ours.item(), ref.item())
    g_ours = torch.autograd.grad(ours, (p1, p2))
    g_ref = torch.autograd.grad(ref, (p1, p2))
    for a, r in zip(g_ours, g_ref):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12), (a - r).abs().max()
    # No gradient reaches the targets; a prediction along the other view's target costs 0.
    t = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    byol_loss(p1, p2, t, t).backward()
    assert t.grad is None
    assert byol_loss(3 * t2, 0.5 * t1, t1, t2).abs().item() < 1e-12


def test_byol_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="t2"):
        byol_loss(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 7))


def test_predictor_shape_and_momentum_ramp(tmp_path):
    q = byol_predictor(16, 32)
    assert q(torch.randn(5, 16)).shape == (5, 16)
    cfg = load_config(None, tiny_overrides("byol", tmp_path / "r", None, steps=100))
    objective = build_objective(cfg, build_model(cfg))
    target = objective.target
    # BYOL: tau(k) = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, tau_base = 0.996, K = max_steps.
    for step in (0, 1, 37, 50, 99, 100):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * step / 100) + 1) / 2
        assert target.momentum_at(step) == pytest.approx(expected, abs=1e-12)
    assert all(not p.requires_grad for p in target.parameters())
    assert set(objective.trainable_modules()) == {"predictor"}


def test_normalized_std_monitors_collapse():
    import numpy as np

    z = torch.randn(50, 16, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)
    unit = z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    assert normalized_std(z) == pytest.approx(float(np.std(unit, axis=0, ddof=1).mean()), rel=1e-6)
    assert normalized_std(torch.randn(1, 16).expand(8, 16) * 5) < 1e-6  # collapsed: one direction
    spread = normalized_std(torch.randn(4000, 64))  # uniform on the sphere: about 1/sqrt(D)
    assert abs(spread - 64 ** -0.5) < 0.01 * 64 ** -0.5, spread
    assert math.isnan(normalized_std(torch.randn(1, 4)))
    with pytest.raises(ValueError, match="z must be a"):
        normalized_std(torch.randn(4))


def test_byol_objective_with_the_mlp_bn_projector_logs_online_std(tmp_path):
    cfg = load_config(None, tiny_overrides("byol", tmp_path / "r", None) + ["model.projection=mlp_bn",
                                                                         "model.projection_hidden=24"])
    model = build_model(cfg).train()
    objective = build_objective(cfg, model)
    head = objective.target.module.image_projection
    assert isinstance(head[1], torch.nn.BatchNorm1d) and head[0].out_features == 24 and objective.target.training
    batch = {"view1": torch.randn(6, 3, 16, 16), "view2": torch.randn(6, 3, 16, 16)}
    emb = objective.embed(model, batch)
    loss, logs = objective.loss(emb, objective.key_embeds(batch), None)
    assert 0 < float(loss) < 8 and logs["online_std"] == pytest.approx(normalized_std(emb["z1"]))


def test_byol_needs_an_image_only_model():
    with pytest.raises(ValueError, match="mode 'byol' trains an image-only model"):
        load_config(None, TOWERS + ["mode=byol", "data.augment=simclr"])
    with pytest.raises(ValueError, match="data.cutmix mixes the views"):
        load_config(None, ["model.image_tower=timm:resnet18", "mode=byol", "data.augment=simclr", "data.cutmix=0.5"])
    for field, value, match in (("momentum", 1.5, "byol.momentum"), ("final_momentum", -0.1, "byol.final_momentum"),
                                ("predictor_hidden", 0, "byol.predictor_hidden")):
        cfg = BYOLConfig(**{field: value})
        with pytest.raises(ValueError, match=match):
            cfg.validate()


@pytest.mark.slow
def test_byol_fit_trains_and_checkpoints_the_predictor(tmp_path):
    overrides = tiny_overrides("byol", tmp_path / "r", None, steps=4) + ["train.trackers=[jsonl]",
                                                                        "checkpoint.every=2", "checkpoint.keep=5"]
    result = fit(load_config(None, overrides))
    assert result["step"] == 4 and math.isfinite(result["loss"])
    ckpt = tmp_path / "r" / "checkpoints"
    first, last = (load_file(str(ckpt / f"step_0000000{s}" / "extra.safetensors")) for s in (2, 4))
    keys = [k for k in first if "predictor" in k]
    assert keys, sorted(first)
    # The predictor's weights moved between the checkpoints: the optimizer trains them.
    assert any(not torch.equal(first[k], last[k]) for k in keys if first[k].is_floating_point())
    assert any("target_encoder" in k for k in first)
    # Resuming from step 2 restores the predictor saved there and reaches the same step-4 weights.
    resumed = load_config(None, overrides + [f"output_dir={tmp_path / 'b'}", f"checkpoint.resume={ckpt / 'step_00000002'}"])
    fit(resumed)
    again = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000004" / "extra.safetensors"))
    for k in keys:
        assert torch.allclose(again[k], last[k], atol=1e-5), k


@pytest.mark.slow
def test_byol_predictor_gradients_are_averaged_over_two_processes(tmp_path):
    from helpers.launch import SCRIPTS, accelerate_launch

    out = tmp_path / "byol.json"
    accelerate_launch(SCRIPTS / "dist_byol.py", str(out))
    r = json.loads(out.read_text())
    assert r["own_vs_mean"] > 1e-4 * r["mean_norm"]  # the ranks' own gradients do differ ...
    assert r["max_err_vs_mean"] <= 1e-5 * max(r["mean_norm"], 1.0)  # ... and each rank holds their mean
    assert r["ranks_differ"] == 0.0
