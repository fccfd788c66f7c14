"""transformers' SiglipModel in mmcl: a tiny SiglipConfig saved with its processor loads through
DualEncoder.from_pretrained and reproduces SiglipModel's logits_per_image; the export writes a
SiglipModel whose zero-shot pipeline gives mmcl's sigmoid probabilities; what SiglipModel
cannot hold is refused with the reason. An open_clip SigLIP-style model (init_logit_bias) keeps
its bias: logits, loss gradients and zero-shot probabilities match open_clip's own."""
import json
import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import (BertConfig, PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel,
                          ViTConfig)

from mmcl.eval.zeroshot import ZeroShotClassifier
from mmcl.models import DualEncoder

WORDS = "this is a photo of cat dog ship tree aeroplane the an . two words here".split()
LABELS = ["cat", "dog", "aeroplane", "ship", "tree"]
TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis_template
MAX_LEN = 64  # the pipeline pads SigLIP texts to 64 tokens


def siglip_tokenizer():
    """A word-level tokenizer shaped like SigLIP's: lower-cased words, "</s>" appended, padded
    with "<pad>", no attention mask in its outputs."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(r"\w+|[^\w\s]", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids"], model_max_length=MAX_LEN)


def build_siglip_dir(directory, scale=7.3, bias=-2.1):
    """A random tiny SiglipModel (text width 48 with a 48 -> 32 head, vision width 32) saved with
    its image processor and tokenizer; returns (model, image processor, tokenizer)."""
    tokenizer = siglip_tokenizer()
    config = SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=48, projection_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=37, max_position_embeddings=MAX_LEN),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                           image_size=30, patch_size=6))
    torch.manual_seed(0)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(scale))
        model.logit_bias.fill_(bias)
    image_processor = SiglipImageProcessor(size={"height": 30, "width": 30})
    model.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, image_processor, tokenizer


def photos(n, size=45):
    rng = np.random.default_rng(2)
    return [Image.fromarray((rng.random((size, size + 7, 3)) * 255).astype("uint8")) for _ in range(n)]


TEXTS = ["a photo of a cat", "two words here", "the dog .", "a tree"]


def hf_logits(hf, image_processor, tokenizer, images, texts):
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        return hf(pixel_values=pixels, **ids).logits_per_image


def mmcl_logits(model, images, texts):
    with torch.no_grad():
        out = model(**model.processor(images=images, text=texts))
        return out.logit_scale * out.image_embeds @ out.text_embeds.T + out.logit_bias


def test_from_pretrained_reproduces_siglip_logits(tmp_path):
    hf, image_processor, tokenizer = build_siglip_dir(tmp_path / "siglip")
    model = DualEncoder.from_pretrained(tmp_path / "siglip")
    assert model.projection == "none" and model.projection_dim == 32
    assert float(model.logit_scale().detach()) == pytest.approx(7.3, rel=1e-6)
    assert float(model.logit_bias.detach()) == pytest.approx(-2.1, rel=1e-6) and model.max_scale is None
    # The processor: SigLIP's image preprocessing, and texts padded to full length (the text
    # tower pools its last position) with every position attended.
    images = photos(3)
    torch.testing.assert_close(model.processor.preprocess_images(images),
                               image_processor(images=images, return_tensors="pt")["pixel_values"])
    tok = model.processor.tokenize(TEXTS)
    assert torch.equal(tok["input_ids"], tokenizer(TEXTS, padding="max_length", return_tensors="pt")["input_ids"])
    assert tok["input_ids"].shape == (4, MAX_LEN) and bool(tok["attention_mask"].all())

    want = hf_logits(hf, image_processor, tokenizer, images, TEXTS)
    got = mmcl_logits(model, images, TEXTS)
    assert want.shape == (3, 4) and want.std() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # The pooling: the image embedding is the attention-pooling head's output, the text one the
    # last position through the text head (not a CLS / mean pooling of the same towers).
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = hf.vision_model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(model.image_tower(pixel_values=pixels), hf.vision_model.head(hidden))
        text_hidden = hf.text_model(input_ids=tok["input_ids"]).last_hidden_state
        torch.testing.assert_close(model.text_tower(input_ids=tok["input_ids"]),
                                   hf.text_model.head(text_hidden[:, -1]))

    # mmcl's own save / load keeps all of it, the processor's padding included.
    model.save_pretrained(tmp_path / "mmcl")
    back = DualEncoder.from_pretrained(tmp_path / "mmcl")
    assert back.processor.pad_to_max_length
    torch.testing.assert_close(mmcl_logits(back, images, TEXTS), want, rtol=0, atol=1e-5)


def test_export_writes_siglip_model_and_pipeline_gives_sigmoid_probabilities(tmp_path):
    build_siglip_dir(tmp_path / "siglip", scale=40.0, bias=-3.0)
    model = DualEncoder.from_pretrained(tmp_path / "siglip")
    with torch.no_grad():  # trained values of its own, so the export cannot pass by reloading the source
        model.logit_scale.log_scale.fill_(math.log(150.0))
        model.logit_bias.fill_(-4.5)
        model.text_tower.model.head.bias.add_(0.1)
    model.export_to_transformers(tmp_path / "export")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "export").model_type == "siglip"
    hf = SiglipModel.from_pretrained(tmp_path / "export").eval()
    assert float(hf.logit_scale.exp()) == pytest.approx(150.0, rel=1e-5) and float(hf.logit_bias.detach()) == -4.5
    images = photos(4)
    want = hf_logits(hf, SiglipImageProcessor.from_pretrained(tmp_path / "export"),
                     transformers.AutoTokenizer.from_pretrained(tmp_path / "export"), images, TEXTS)
    torch.testing.assert_close(mmcl_logits(model, images, TEXTS), want, rtol=0, atol=1e-5)

    # transformers' zero-shot pipeline scores each label with a sigmoid; so does mmcl's classifier.
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path / "export"))
    theirs = torch.tensor([[{r["label"]: r["score"] for r in pipe(im, candidate_labels=LABELS)}[c] for c in LABELS]
                           for im in images])
    classifier = ZeroShotClassifier(model, LABELS, templates=[TEMPLATE], progress=False)
    assert classifier.sigmoid
    ours = classifier.predict(torch.stack([model.processor.preprocess_images([im])[0] for im in images]))
    assert not torch.allclose(ours.sum(-1), torch.ones(4), atol=1e-2)  # independent per label, not a softmax
    assert ours.std() > 1e-3
    torch.testing.assert_close(theirs.float(), ours, rtol=1e-3, atol=1e-5)


def test_export_refuses_what_siglip_model_cannot_hold(tmp_path):
    build_siglip_dir(tmp_path / "siglip")
    tok_dir = tmp_path / "siglip"
    vit = ViTConfig(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=37)
    bert = BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    # A sigmoid model on ViT + BERT: a VisionTextDualEncoderModel would drop the bias and give softmax.
    sigmoid = DualEncoder.from_towers(vit, bert, projection_dim=8, tokenizer=tok_dir, init_logit_bias=-10.0,
                                      max_scale=None)
    with pytest.raises(ValueError, match="sigmoid model.*SiglipModel.*softmax"):
        sigmoid.export_to_transformers(tmp_path / "no")
    # SigLIP towers with mmcl linear heads: SiglipModel has no projection heads.
    towers = DualEncoder.from_pretrained(tmp_path / "siglip")
    headed = DualEncoder.from_towers(towers.image_tower.model.config, towers.text_tower.model.config,
                                     projection_dim=16, tokenizer=tok_dir, init_logit_bias=-10.0)
    with pytest.raises(ValueError, match="no projection heads"):
        headed.export_to_transformers(tmp_path / "no")
    assert not (tmp_path / "no").exists()
    # A new model on SigLIP towers (as a siglip run from tower configs builds it) pads its texts to
    # full length and exports with projection "none".
    fresh = DualEncoder.from_towers(towers.image_tower.model.config, towers.text_tower.model.config,
                                    projection="none", tokenizer=tok_dir, init_logit_bias=-10.0, max_scale=None)
    assert fresh.processor.pad_to_max_length and headed.processor.pad_to_max_length
    assert fresh.processor.tokenize(TEXTS)["input_ids"].shape == (4, MAX_LEN)
    fresh.export_to_transformers(tmp_path / "fresh")
    hf = SiglipModel.from_pretrained(tmp_path / "fresh").eval()
    batch = fresh.processor(images=photos(2), text=TEXTS)  # the same inputs to both models
    with torch.no_grad():
        want = hf(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits_per_image
    torch.testing.assert_close(mmcl_logits(fresh, photos(2), TEXTS), want, rtol=0, atol=1e-5)
    # The same towers without a bias are an ordinary softmax model (VisionTextDualEncoderModel).
    softmax = DualEncoder.from_towers(vit, bert, projection_dim=8, tokenizer=tok_dir)
    assert softmax.logit_bias is None
    classifier = ZeroShotClassifier(softmax, LABELS, templates=[TEMPLATE], progress=False)
    probs = classifier.predict(torch.randn(3, 3, 30, 30))
    assert not classifier.sigmoid
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


# A tiny open_clip SigLIP-style config: a learned logit bias, a text transformer without causal
# mask pooled at its last position (open_clip's SigLIP text tower), odd widths.
TINY_OPEN_CLIP_SIGLIP = {
    "embed_dim": 12, "init_logit_bias": -10, "custom_text": True,
    "vision_cfg": {"image_size": 24, "layers": 1, "width": 20, "head_width": 10, "patch_size": 8},
    "text_cfg": {"context_length": 10, "vocab_size": 49408, "width": 20, "heads": 2, "layers": 1,
                 "no_causal_mask": True, "pool_type": "last", "proj_bias": True},
}


def test_open_clip_siglip_model_keeps_its_logit_bias(tmp_path):
    import open_clip
    from open_clip.loss import SigLipLoss
    from safetensors.torch import save_file

    import mmcl

    (tmp_path / "mmcl-tiny-sigmoid.json").write_text(json.dumps(TINY_OPEN_CLIP_SIGLIP))
    open_clip.add_model_config(tmp_path / "mmcl-tiny-sigmoid.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("mmcl-tiny-sigmoid", pretrained=None).eval()
    with torch.no_grad():  # away from the initial values, so a reset to them shows
        reference.logit_scale.fill_(1.7)
        reference.logit_bias.fill_(-3.4)
    save_file(reference.state_dict(), str(tmp_path / "tiny.safetensors"))
    model = DualEncoder.from_pretrained(f"open_clip:mmcl-tiny-sigmoid:{tmp_path / 'tiny.safetensors'}")
    assert model.logit_bias is not None and model.max_scale is None
    assert float(model.logit_bias.detach()) == pytest.approx(-3.4, rel=1e-6)
    # The same checkpoint as an open_clip model directory (open_clip's published layout).
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_SIGLIP}))
    save_file(reference.state_dict(), str(tmp_path / "oc" / "open_clip_model.safetensors"))
    assert float(DualEncoder.from_pretrained(tmp_path / "oc").logit_bias.detach()) == pytest.approx(-3.4, rel=1e-6)

    texts = ["a photo of a cat", "a dog", "two words", "the tree", "a ship"]
    ids = model.processor.tokenize(texts)["input_ids"]
    assert torch.equal(ids, open_clip.get_tokenizer("mmcl-tiny-sigmoid")(texts))
    pixels = torch.randn(3, 3, 24, 24)
    want, _ = reference.get_logits(pixels, ids)  # exp(logit_scale) * cos + logit_bias
    assert want.std() > 1e-3
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=ids)
        torch.testing.assert_close(out.logit_scale * out.image_embeds @ out.text_embeds.T + out.logit_bias,
                                   want.detach(), rtol=0, atol=1e-5)

    # The sigmoid loss of the first 3 pairs: same value and gradients (bias, log scale, a tower
    # weight) as open_clip's SigLipLoss on open_clip's model.
    model.zero_grad()
    out = model(pixel_values=pixels, input_ids=ids[:3])
    loss = mmcl.siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias, impl="naive")
    loss.backward()
    ref_loss = SigLipLoss()(*reference(pixels, ids[:3]))
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    pairs = [(model.logit_bias, reference.logit_bias), (model.logit_scale.log_scale, reference.logit_scale),
             (model.image_tower.model.proj, reference.visual.proj)]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours.grad.reshape(-1), theirs.grad.reshape(-1), rtol=1e-4, atol=1e-6)

    # Zero-shot gives σ(logit) per class, not a softmax over the classes.
    classifier = ZeroShotClassifier(model, ["cat", "dog", "ship"], templates="none", progress=False)
    assert classifier.sigmoid
    with torch.no_grad():
        ref_probs = reference.get_logits(pixels, open_clip.get_tokenizer("mmcl-tiny-sigmoid")(["cat", "dog", "ship"]))[0]
    torch.testing.assert_close(classifier.predict(pixels), ref_probs.sigmoid(), rtol=0, atol=1e-6)

    # mmcl's save / load keeps the bias (and the unclamped scale).
    model.save_pretrained(tmp_path / "mmcl")
    back = DualEncoder.from_pretrained(tmp_path / "mmcl")
    assert float(back.logit_bias.detach()) == float(model.logit_bias.detach()) and back.max_scale is None
    with torch.no_grad():
        out = back(pixel_values=pixels, input_ids=ids)
        torch.testing.assert_close(out.logit_scale * out.image_embeds @ out.text_embeds.T + out.logit_bias,
                                   want.detach(), rtol=0, atol=1e-5)
