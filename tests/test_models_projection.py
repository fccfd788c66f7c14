"""The projection heads: "mlp_bn" (Linear-BatchNorm-ReLU-Linear, BYOL / SimCLR v2) against the
written-out formula in both modes, its hidden width, the save_pretrained / from_pretrained round
trip with the BatchNorm statistics, the config checks."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import ResNetConfig

from mmcl.models import DualEncoder
from mmcl.models.dual_encoder import make_projection
from mmcl.train.builders import ModelConfig

RESNET = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], layer_type="basic",
                      downsample_in_first_stage=False)


def _mlp_bn_reference(x, head, train: bool):
    """Linear (no bias) → BatchNorm1d → ReLU → Linear, each step written out in float64. Train mode
    normalises with the batch's mean and biased variance, eval mode with the running statistics."""
    w1, bn, w2 = head[0].weight.double(), head[1], head[3]
    h = x.double() @ w1.T
    if train:
        mean, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.double() + bn.bias.double()
    return torch.clamp(h, min=0) @ w2.weight.double().T + w2.bias.double()


@pytest.mark.parametrize("b,d,hidden,out", [(2, 5, 7, 3), (13, 32, 48, 16), (33, 48, 17, 1)])
def test_mlp_bn_head_matches_the_formula_in_train_and_eval_mode(b, d, hidden, out):
    head = make_projection("mlp_bn", d, out, hidden=hidden).double()
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[0].out_features == hidden and head[0].bias is None and head[3].out_features == out
    with torch.no_grad():  # BatchNorm's affine parameters away from their (1, 0) start
        head[1].weight.uniform_(0.5, 1.5)
        head[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    y = head.train()(x)
    ref = _mlp_bn_reference(x, head, train=True)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    g, g_ref = torch.autograd.grad(y.square().sum(), x)[0], torch.autograd.grad(ref.square().sum(), x)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)
    # That forward moved the running statistics by momentum 0.1 (unbiased variance), from (0, 1).
    h = x.detach() @ head[0].weight.detach().T
    torch.testing.assert_close(head[1].running_mean, 0.1 * h.mean(0))
    torch.testing.assert_close(head[1].running_var, 0.9 + 0.1 * h.var(0, unbiased=True))
    # Eval mode: the running statistics, so one row alone gives the answer it gets inside a batch.
    head.eval()
    with torch.no_grad():
        alone = head(x[:1].detach())
        torch.testing.assert_close(head(x.detach()), _mlp_bn_reference(x.detach(), head, train=False))
    torch.testing.assert_close(alone, head(x.detach())[:1].detach())


def test_hidden_width_defaults_to_the_input_and_is_checked():
    assert make_projection("mlp_bn", 10, 4)[0].out_features == 10
    assert make_projection("mlp", 10, 4, hidden=6)[0].out_features == 6
    assert make_projection("mlp", 10, 4)[0].out_features == 10  # "mlp" unchanged without a width
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="projection_hidden"):
            make_projection("mlp_bn", 10, 4, hidden=bad)
    with pytest.raises(ValueError, match="projection_hidden"):
        DualEncoder.from_towers(RESNET, projection="linear", projection_hidden=8)
    with pytest.raises(ValueError, match="model.projection_hidden"):
        ModelConfig(image_tower="x", projection="none", projection_hidden=8).validate()
    with pytest.raises(ValueError, match="model.projection_hidden"):
        ModelConfig(image_tower="x", projection="mlp_bn", projection_hidden=0).validate()
    ModelConfig(image_tower="x", projection="mlp_bn", projection_hidden=8).validate()


def test_mlp_bn_model_saves_and_loads_with_its_statistics(tmp_path):
    torch.manual_seed(0)
    model = DualEncoder.from_towers(RESNET, projection="mlp_bn", projection_dim=6, projection_hidden=20,
                                    image_size=16).train()
    pixels = torch.randn(9, 3, 16, 16)
    with torch.no_grad():
        for _ in range(3):  # running statistics away from their initial values
            model.encode_image(torch.randn(9, 3, 16, 16) * 2 + 1)
    bn = model.image_projection[1]
    assert bn.num_batches_tracked.item() == 3 and not torch.allclose(bn.running_var, torch.ones(20))
    model.eval()
    before = model.encode_image(pixels)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["projection"] == "mlp_bn" and config["projection_hidden"] == 20
    back = DualEncoder.from_pretrained(tmp_path / "m")
    assert not back.training and not back.image_projection[1].training  # inference: running statistics
    assert back.image_projection[0].out_features == 20
    for name, buf in model.image_projection.named_buffers():
        assert torch.equal(dict(back.image_projection.named_buffers())[name], buf), name
    torch.testing.assert_close(back.encode_image(pixels), before, rtol=0, atol=0)
    torch.testing.assert_close(back.encode_image(pixels[:1]), before[:1], rtol=1e-6, atol=1e-6)
    # A model without a set width writes no key, and loads as before.
    plain = DualEncoder.from_towers(RESNET, projection="mlp", projection_dim=6, image_size=16)
    plain.save_pretrained(tmp_path / "p")
    assert "projection_hidden" not in json.loads((tmp_path / "p" / "config.json").read_text())
    assert DualEncoder.from_pretrained(tmp_path / "p").image_projection[0].out_features == plain.image_tower.output_dim
    with pytest.raises(ValueError, match="mlp_bn"):
        model.export_to_transformers(str(tmp_path / "hf"))


def test_build_model_reads_the_projection_keys(tmp_path):
    from mmcl.train import load_config
    from mmcl.train.builders import build_model

    tower = ("{model_type: resnet, num_channels: 3, embedding_size: 8, hidden_sizes: [8, 12], depths: [1, 1], "
             "layer_type: basic, downsample_in_first_stage: false}")
    cfg = load_config(None, ["mode=byol", f"model.image_tower_config={tower}", "model.projection=mlp_bn",
                             "model.projection_hidden=24", "model.projection_dim=10", "data.image_size=16",
                             "data.augment=simclr", f"output_dir={tmp_path}"])
    head = build_model(cfg).image_projection
    assert isinstance(head[1], torch.nn.BatchNorm1d) and head[0].out_features == 24 and head[3].out_features == 10
    assert F.normalize(head(torch.randn(4, 12)), dim=1).shape == (4, 10)


def test_tower_features_skip_the_head_in_embed_images_and_the_evaluator(tmp_path):
    from mmcl.eval import embed_images
    from mmcl.train import load_config
    from mmcl.train.evaluation import EvalConfig, Evaluator

    torch.manual_seed(0)
    model = DualEncoder.from_towers(RESNET, projection="mlp_bn", projection_dim=6, image_size=16)
    pixels = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        tower = model.image_tower(pixel_values=pixels)
        head = model.image_projection(tower)
    assert tower.shape == (7, 12) and model.image_features(pixels).shape == (7, 12)
    torch.testing.assert_close(embed_images(model, pixels, batch_size=3, features="tower"), F.normalize(tower, dim=1))
    torch.testing.assert_close(embed_images(model, pixels, batch_size=3, features="tower", normalize=False), tower)
    torch.testing.assert_close(embed_images(model, pixels, batch_size=3), F.normalize(head, dim=1))
    with pytest.raises(ValueError, match="features must be one of embeddings, tower"):
        embed_images(model, pixels, features="pooled")
    with pytest.raises(ValueError, match="eval.knn_features"):
        EvalConfig(knn_features="pooled").validate()
    # The evaluator's kNN on tower features is its kNN on the embeddings of the same model
    # without its head.
    tower_cfg = ("{model_type: resnet, num_channels: 3, embedding_size: 8, hidden_sizes: [8, 12], depths: [1, 1], "
                 "layer_type: basic, downsample_in_first_stage: false}")
    base = [f"output_dir={tmp_path}", "mode=simclr", f"model.image_tower_config={tower_cfg}", "data.image_size=16",
            "data.augment=simclr", "eval.knn_train_samples=300", "eval.max_samples=120"]
    on_tower = Evaluator(load_config(None, base + ["eval.knn_features=tower"]), "knn")(model)["knn_top1"]
    on_head = Evaluator(load_config(None, base), "knn")(model)["knn_top1"]
    model.image_projection = torch.nn.Identity()
    headless = Evaluator(load_config(None, base), "knn")(model)["knn_top1"]
    assert on_tower == headless and on_tower != on_head, (on_tower, headless, on_head)
