"""The pieces of the MoCo / SimCLR reproduction protocol (issue 7), on CPU.

- the CIFAR-stem ResNet-18 tower ("mmcl:cifar_resnet18") against torchvision's ResNet-18 with the
  same stem surgery, its 512-d features, save/load;
- SplitBatchNorm2d against BatchNorm run separately on each chunk (float64, with gradients);
- MoCo's shuffling BN (mmcl.distributed.shuffle_batch / unshuffle_batch) against MoCo's formulas,
  in one process and in a real 2-process `accelerate launch`; model.batchnorm.sync reaching the key encoder;
- device-side view augmentation (data.augment_on_device) against gpu_augment's own ops;
- a short MoCo run on scikit-learn's digits through mmcl.train.fit whose kNN top-1 beats the
  random-init encoder's kNN top-1 (same evaluation code, same data).

Momentum update and the gathered queue are tested in test_models_momentum.py.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.launch import accelerate_launch, load_script

from mmcl import distributed
from mmcl.models import DualEncoder
from mmcl.models.cifar_resnet import CifarResNetTower, SplitBatchNorm2d, convert_split_batchnorm

SCRIPTS = Path(__file__).parent / "scripts"
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "configs"


# --------------------------------------------------------------------------- CIFAR ResNet-18


def _torchvision_cifar_resnet18() -> nn.Module:
    """The reference: torchvision's ResNet-18 with the CIFAR stem written out by hand."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def test_cifar_resnet18_stem_features_and_parity_with_torchvision():
    tower = CifarResNetTower("cifar_resnet18").eval()
    conv1 = tower.model.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(tower.model.maxpool, nn.Identity)
    assert tower.output_dim == 512

    # The first residual stage sees the full 32x32 image (the ImageNet stem would give 8x8).
    seen = {}
    tower.model.layer1.register_forward_hook(lambda m, i, o: seen.update(layer1=o.shape))  # returns None
    x = torch.randn(3, 3, 32, 32)
    out = tower(pixel_values=x)
    assert out.shape == (3, 512) and seen["layer1"] == (3, 64, 32, 32)

    reference = _torchvision_cifar_resnet18().eval()
    reference.load_state_dict(tower.model.state_dict())
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)


def test_cifar_resnet18_dual_encoder_saves_and_loads(tmp_path):
    model = DualEncoder.from_towers("mmcl:cifar_resnet18", projection_dim=32, projection="mlp").eval()
    assert model.processor.image_size == (32, 32)
    assert model.image_tower.spec() == {"kind": "mmcl", "name": "cifar_resnet18"}
    model.save_pretrained(tmp_path / "m")
    loaded = DualEncoder.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded.image_tower, CifarResNetTower)
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x), rtol=0, atol=0)


def test_cifar_tower_bad_specs():
    with pytest.raises(ValueError, match="cifar_resnet18"):
        DualEncoder.from_towers("mmcl:resnet18")
    with pytest.raises(ValueError, match="image towers"):
        DualEncoder.from_towers("mmcl:cifar_resnet18", "mmcl:cifar_resnet18")


# --------------------------------------------------------------------------- split BatchNorm


@pytest.mark.parametrize("splits,batch", [(3, 12), (4, 4), (1, 7)])
def test_split_batchnorm_is_batchnorm_per_chunk(splits, batch):
    c = 5
    bn = SplitBatchNorm2d(c, splits, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
    x = (torch.randn(batch, c, 3, 2, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    w = bn.weight.detach().clone().requires_grad_(True)
    b = bn.bias.detach().clone().requires_grad_(True)

    # Reference: each chunk through its own plain batch norm, running stats averaged over chunks.
    means, variances, outs = [], [], []
    for chunk in x.chunk(splits):
        rm, rv = start_mean.clone(), start_var.clone()
        outs.append(F.batch_norm(chunk, rm, rv, w, b, training=True, momentum=0.3, eps=bn.eps))
        means.append(rm), variances.append(rv)
    expected = torch.cat(outs)
    y = bn(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0), rtol=1e-12, atol=1e-12)

    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, bn.weight, bn.bias), g)
    rx, rw, rb = torch.autograd.grad(expected, (x, w, b), g)
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    bn.eval()  # eval mode: plain BatchNorm with the running statistics
    z = torch.randn(3, c, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(bn(z), F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                   training=False, eps=bn.eps))


def test_convert_split_batchnorm_keeps_weights_and_checks_sizes():
    tower = CifarResNetTower("cifar_resnet18")
    plain = sum(isinstance(m, nn.BatchNorm2d) for m in tower.modules())
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    convert_split_batchnorm(tower, 4)
    assert sum(type(m) is SplitBatchNorm2d for m in tower.modules()) == plain == 20
    after = tower.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tower.train()
    with pytest.raises(ValueError, match="divisible by num_splits=4"):
        tower(pixel_values=torch.randn(6, 3, 32, 32))
    with pytest.raises(ValueError, match="num_splits"):
        convert_split_batchnorm(tower, 0)


# --------------------------------------------------------------------------- shuffling BN


def test_shuffle_batch_one_process_is_a_permutation_and_its_exact_inverse():
    x = torch.randn(7, 4)
    shuffled, index = distributed.shuffle_batch(x, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(shuffled, x[perm])  # MoCo: x_gather[idx_shuffle], one rank
    assert torch.equal(index, torch.argsort(perm))
    assert torch.equal(distributed.unshuffle_batch(shuffled * 2, index), x * 2)
    with pytest.raises(ValueError, match="covers 7"):
        distributed.unshuffle_batch(shuffled[:5], index)


@pytest.mark.slow
def test_shuffle_bn_two_processes_follows_moco(tmp_path):
    out = tmp_path / "shuffle.json"
    accelerate_launch(SCRIPTS / "dist_shuffle_bn.py", str(out))
    results = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    script = load_script("dist_shuffle_bn")
    n = script.B
    all_x = torch.cat([script.rank_batch(0), script.rank_batch(1)])
    # Both ranks use rank 0's permutation (their own generators were seeded differently).
    index = torch.tensor(results[0]["unshuffle_index"])
    assert results[1]["unshuffle_index"] == results[0]["unshuffle_index"]
    perm = torch.argsort(index)
    assert sorted(perm.tolist()) == list(range(2 * n))
    assert not torch.equal(perm, torch.arange(2 * n))

    encoder = script.key_encoder().train()
    keys_ref = torch.empty(2 * n, 2, dtype=torch.float64)
    for r, res in enumerate(results):
        assert res["world_size"] == 2
        mine = perm[r * n:(r + 1) * n]
        # MoCo: rank r runs the key encoder on x_gather[idx_shuffle.view(W, -1)[r]] ...
        assert torch.equal(torch.tensor(res["shuffled"], dtype=torch.float64), all_x[mine])
        # ... and unshuffling gives back exactly its own rows.
        assert torch.equal(torch.tensor(res["restored"], dtype=torch.float64), script.rank_batch(r))
        with torch.no_grad():  # BatchNorm statistics of the rows that rank r actually held
            keys_ref[mine] = encoder(all_x[mine])
    for r, res in enumerate(results):
        keys = torch.tensor(res["keys"], dtype=torch.float64)
        torch.testing.assert_close(keys, keys_ref[r * n:(r + 1) * n], rtol=1e-12, atol=1e-12)
        # The shuffle changes what BatchNorm normalises with (the point of the guard).
        assert not torch.allclose(keys, torch.tensor(res["keys_without_shuffle"], dtype=torch.float64))
        assert "same batch size on every rank" in res["uneven_error"]
        # The objective shuffles equal batches and leaves unequal ones (an explicit branch) alone.
        assert res["moco_unshuffled"] == {"even": False, "uneven": True}, res["moco_unshuffled"]
        for part in ("model", "key_encoder"):  # model.batchnorm.sync: SyncBatchNorm in both encoders
            assert res["sync_bn"][part]["plain"] == 0 and res["sync_bn"][part]["sync"] > 0, res["sync_bn"]


# --------------------------------------------------------------------------- device augmentation


def test_device_augment_views_match_gpu_augment():
    from mmcl.data.gpu_augment import apply_augment, sample_augment_params
    from mmcl.data import DEVICE_PRESETS as PRESETS
    from mmcl.data import DeviceAugment

    model = DualEncoder.from_towers("mmcl:cifar_resnet18", projection_dim=8)
    proc = model.processor
    mean, std = torch.tensor(proc.image_mean).view(1, 3, 1, 1), torch.tensor(proc.image_std).view(1, 3, 1, 1)
    images = torch.rand(6, 3, 32, 32)
    batch = {"view1": (images - mean) / std, "view2": (images - mean) / std, "num_skipped": 0}
    out = DeviceAugment("moco_cifar", proc, generator=torch.Generator().manual_seed(5))(batch)

    g = torch.Generator().manual_seed(5)
    for key in ("view1", "view2"):  # the views are drawn in order from the same generator
        params = sample_augment_params(6, 32, 32, generator=g, **{k: v for k, v in PRESETS["moco_cifar"].items()})
        expected = (apply_augment(images, params, (32, 32), PRESETS["moco_cifar"]["jitter"]) - mean) / std
        torch.testing.assert_close(out[key], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["view1"], out["view2"])
    assert out["num_skipped"] == 0
    # uint8 views (what the loader gives for device views): the same ops on x / 255, float32 out.
    pixels = (images * 255).round().to(torch.uint8)
    out8 = DeviceAugment("moco_cifar", proc, generator=torch.Generator().manual_seed(5))(
        {"view1": pixels, "view2": pixels})
    g = torch.Generator().manual_seed(5)
    for key in ("view1", "view2"):
        params = sample_augment_params(6, 32, 32, generator=g, **{k: v for k, v in PRESETS["moco_cifar"].items()})
        expected = (apply_augment(pixels.float() / 255, params, (32, 32), PRESETS["moco_cifar"]["jitter"]) - mean) / std
        assert out8[key].dtype == torch.float32
        torch.testing.assert_close(out8[key], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        DeviceAugment("mocov2", proc)({"view1": batch["view1"]})
    with pytest.raises(ValueError, match="augment_on_device"):
        DeviceAugment("blur", proc)


@pytest.mark.parametrize("override,match", [
    ("data.augment=mocov2", "data.augment=none"),  # the YAML augments on the device
    ("data.augment_on_device=sharpen", "augment_on_device must be one of"),
    ("model.batchnorm.splits=3", "divisible by model.batchnorm.splits"),
    ("eval.knn_train_samples=0", "knn_train_samples"),
])
def test_protocol_config_errors(override, match):
    from mmcl.train import load_config

    with pytest.raises(ValueError, match=match):
        load_config(RECIPES / "moco_digits.yaml", ["train.batch_size=64", override])


# --------------------------------------------------------------------------- MoCo keys and learning

TINY_RESNET = ("model.image_tower_config={model_type: resnet, num_channels: 3, embedding_size: 8, "
               "hidden_sizes: [8, 16], depths: [1, 1], layer_type: basic}")


@pytest.mark.parametrize("shuffle_bn", [False, True])
def test_moco_keys_come_from_a_train_mode_key_encoder(shuffle_bn):
    """MoCo's builder runs the key encoder in train mode (BatchNorm on the key batch's own
    statistics). Right after construction the key encoder equals the query encoder, so its keys
    must equal the train-mode query embeddings of the same images (shuffling one process's batch
    changes nothing for plain BatchNorm), and its own running statistics must move."""
    from mmcl.train import load_config
    from mmcl.train.builders import build_model
    from mmcl.methods import build_objective

    cfg = load_config(None, ["mode=moco", TINY_RESNET, "data.image_size=16", "model.projection_dim=8",
                             "data.augment=mocov2", "moco.queue_size=16", f"moco.shuffle_bn={str(shuffle_bn).lower()}"])
    model = build_model(cfg)
    objective = build_objective(cfg, model)
    model.train()
    x = torch.randn(7, 3, 16, 16)
    bn = next(m for m in objective.key_encoder.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    keys = objective.key_embeds({"view2": x})["k"]
    with torch.no_grad():
        expected = model(pixel_values=x).image_embeds
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(bn.running_mean, before)


# The digits are easy for random conv features (a random-init encoder's kNN top-1 is ~0.86 on the
# 297 held-out digits), so "learning" means beating that by a clear margin: 4 points is 12 test
# images and about 30% of the random encoder's errors. Measured with this config (uint8 device
# views): 0.862 random, then 0.879 / 0.889 / 0.936 / 0.939 after 250 / 500 / 750 / 1000 steps
# (MoCo starts slowly: its keys come from a lagging EMA encoder, so shorter runs were not reliably
# above the margin).
DIGITS_MOCO = ["train.max_steps=1000", "train.batch_size=128", "data.image_size=16", "moco.queue_size=512",
               "moco.key_momentum=0.99", "loss.temperature=0.2", "optim.name=adamw", "optim.lr=0.002",
               "optim.weight_decay=0.05", "optim.warmup_steps=20", "data.augment=none",
               "data.augment_on_device=mocov2", "train.num_threads=1", "train.trackers=[]", "train.progress=false"]
KNN_MARGIN = 0.04


@pytest.mark.slow
def test_moco_on_digits_beats_the_random_init_encoder(tmp_path):
    from accelerate.utils import set_seed

    from mmcl.train import fit, load_config
    from mmcl.train.builders import build_model
    from mmcl.train.evaluation import Evaluator

    cfg = load_config(RECIPES / "moco_digits.yaml", DIGITS_MOCO + [f"output_dir={tmp_path}"])
    set_seed(cfg.seed)  # fit seeds the same way before building: this IS its starting encoder
    random_init = Evaluator(cfg)(build_model(cfg))["knn_top1"]
    result = fit(cfg)
    assert result["step"] == 1000 and result["nonfinite_steps"] == 0
    assert result["knn_top1"] >= random_init + KNN_MARGIN, (
        f"MoCo kNN top-1 {result['knn_top1']:.4f} vs random-init {random_init:.4f} (margin {KNN_MARGIN})")


def test_evaluator_caches_preprocessed_pixels_with_the_same_knn(monkeypatch):
    """Periodic kNN evaluations decode the held-out and memory-bank images once (a pixel cache
    within Evaluator.pixel_cache_bytes) and give exactly what decoding every time gives; images
    beyond the budget are decoded at every evaluation."""
    from mmcl.eval import embed
    from mmcl.train import load_config
    from mmcl.train.builders import build_model
    from mmcl.train.evaluation import Evaluator

    cfg = load_config(RECIPES / "moco_digits.yaml", ["data.image_size=16", "eval.knn_train_samples=300",
                                                      "eval.max_samples=200"])
    model = build_model(cfg).eval()
    decoded = []
    real_load = embed.load_image
    monkeypatch.setattr(embed, "load_image", lambda item: decoded.append(1) or real_load(item))
    cached, uncached = Evaluator(cfg), Evaluator(cfg, pixel_cache_bytes=0)
    first = cached(model)["knn_top1"]
    assert len(decoded) == 300 + 200
    with torch.no_grad():  # a changed model: the cache holds pixels, not features
        next(model.parameters()).mul_(0.5)
    again = cached(model)["knn_top1"]
    assert len(decoded) == 500, "the second evaluation decoded images again"
    assert cached._pixels["train"].shape == (300, 3, 16, 16)
    assert again == uncached(model)["knn_top1"] and len(decoded) == 1000
    assert 0.0 < first <= 1.0
    # The budget covers both splits together: room for the 300 training images only.
    partial = Evaluator(cfg, pixel_cache_bytes=300 * 3 * 16 * 16 * 4)
    assert partial(model)["knn_top1"] == again
    assert set(partial._pixels) == {"train"}
